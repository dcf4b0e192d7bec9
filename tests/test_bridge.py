"""as_custom_vjp: JAX's own derivative of the bridged model is the hand-written backward."""

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.test_util import check_grads

import jbp
from reference_models import TOL, L, case, rel_err


@pytest.mark.parametrize("name", ["tanh", "mixed", "dropout-eval"])
def test_check_grads_second_order(name):
    with jax.enable_x64(True):
        model, params, x, _, kw = case(name, jnp.float64, batch=3)
        apply = jbp.as_custom_vjp(model)
        # jitted: every evaluation check_grads makes runs one compiled program
        check_grads(jax.jit(lambda p, x: apply(p, x, **kw)), (params, x), order=2,
                    modes=["rev"])


def _check_bridge(name, dtype):
    model, params, x, y, kw = case(name, dtype)
    loss = L.softmax_cross_entropy
    apply = jbp.as_custom_vjp(model)

    @jax.jit
    def three(params, x, y):
        return (jax.value_and_grad(lambda p: loss.value(apply(p, x, **kw), y))(params),
                jbp.manual_value_and_grad(model, loss)(params, x, y, **kw),
                jbp.autodiff_value_and_grad(model, loss)(params, x, y, **kw)[1])

    (value, grads), (manual_value, manual), auto = three(params, x, y)
    assert abs(value - manual_value) <= TOL[dtype] * abs(manual_value)  # two forwards
    assert rel_err(grads, manual) <= TOL[dtype]
    assert rel_err(grads, auto) <= TOL[dtype]
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda g, p: g.dtype == p.dtype, grads, params))


# Every layer type appears in one of these (all activations in "activations"; flatten,
# maxout and dropout with a key in "mixed"; dropout's None cache in "dropout-eval").
@pytest.mark.parametrize("name", ["dense", "activations", "mixed", "dropout-eval", "dropout-key"])
def test_jax_grad_through_bridge_equals_manual_and_autodiff_float64(name):
    with jax.enable_x64(True):
        _check_bridge(name, jnp.float64)


def test_jax_grad_through_bridge_float32():
    _check_bridge("mixed", jnp.float32)


def test_the_bridge_really_uses_the_hand_written_backward():
    """A layer whose backward is deliberately twice the truth shows up in jax.grad."""
    double = jbp.Layer("double-backward", lambda key, s: (s, {}), lambda p, x, **_: (x, None),
                       lambda p, c, dy: ({}, 2 * dy))
    model = jbp.serial(jbp.dense(3), double)
    _, params = model.init(jax.random.key(0), (4,))
    x = jnp.ones((2, 4))
    bridged = jax.grad(lambda p: jnp.sum(jbp.as_custom_vjp(model)(p, x)))(params)
    plain = jax.grad(lambda p: jnp.sum(model.apply(p, x)))(params)
    assert rel_err(bridged, jax.tree_util.tree_map(lambda g: 2 * g, plain)) == 0


def test_jit_vmap_and_an_optax_step():
    model, params, x, y, _ = case("relu", jnp.float32, batch=8)
    loss = L.softmax_cross_entropy
    apply = jbp.as_custom_vjp(model)

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(lambda p: loss.value(apply(p, x), y))(params)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state

    opt = optax.sgd(0.1)
    new, _ = step(params, opt.init(params))
    xs, ys = x.reshape(2, 4, -1), y.reshape(2, 4)

    @jax.jit
    def witnesses(params):
        # vmap over a leading axis of batches: per-batch gradients through the manual backward
        per_batch = jax.vmap(lambda xb, yb: jax.grad(lambda p: loss.value(apply(p, xb), yb))(
            params))(xs, ys)
        manual = jbp.manual_value_and_grad(model, loss)
        return manual(params, x, y)[1], per_batch, manual(params, xs[0], ys[0])[1]

    manual, per_batch, first = witnesses(params)
    want = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, manual)
    assert rel_err(new, want) <= 1e-6
    assert rel_err(jax.tree_util.tree_map(lambda g: g[0], per_batch), first) <= 1e-6


def test_bad_cotangents_give_clear_errors():
    model, params, x, _, _ = case("tanh", jnp.float32)
    apply = jbp.as_custom_vjp(model)
    y, pullback = jax.vjp(lambda p: apply(p, x), params)
    with pytest.raises(ValueError, match=r"float32\[5,3\]"):  # JAX checks the pullback itself
        pullback(jnp.ones((5, 4)))
    _, residuals = apply.fwd(params, x, None, False)
    with pytest.raises(ValueError, match=r"cotangent of the output has shape \(5, 4\) and dtype "
                                         r"float32, expected the output's shape \(5, 3\)"):
        apply.bwd(residuals, jnp.ones((5, 4)))
    with pytest.raises(ValueError, match=r"dtype int32, expected the output's shape \(5, 3\) "
                                         r"and dtype float32"):
        apply.bwd(residuals, jnp.ones((5, 3), jnp.int32))
    with pytest.raises(TypeError, match="must be an array"):
        apply.bwd(residuals, [[1.0]])


def test_a_backward_with_wrong_shapes_is_caught():
    wrong = jbp.Layer("wrong", lambda key, s: (s, {}), lambda p, x, **_: (x, None),
                      lambda p, c, dy: ({}, dy[:, :1]))
    apply = jbp.as_custom_vjp(wrong)
    with pytest.raises(ValueError, match=r"the backward's dx has shape \(2, 1\), expected \(2, 4\)"):
        jax.grad(lambda x: jnp.sum(apply({}, x)))(jnp.ones((2, 4)))
    bad_dparams = jbp.Layer("bad-dparams", lambda key, s: (s, {"w": jnp.ones(3)}),
                            lambda p, x, **_: (x * p["w"], x),
                            lambda p, x, dy: ({"w": jnp.sum(x * dy)}, dy * p["w"]))
    apply = jbp.as_custom_vjp(bad_dparams)
    with pytest.raises(ValueError, match=r"dparams\['w'\] has shape \(\), expected \(3,\)"):
        jax.grad(lambda p: jnp.sum(apply(p, jnp.ones((2, 3)))))({"w": jnp.ones(3)})


def test_not_a_layer():
    with pytest.raises(TypeError, match="model must be a jbp Layer"):
        jbp.as_custom_vjp(lambda p, x: x)


def test_forward_mode_of_the_bridge_names_the_bridge_and_what_works():
    """jax.jvp / jax.jacfwd of a custom_vjp function are undefined; the error says which
    model, and that reverse mode, jax.hessian and jbp.hvp work (and they do)."""
    model = jbp.mlp([3, 4, 2], activation="tanh")
    _, params = model.init(jax.random.key(0), (3,))
    apply, x = jbp.as_custom_vjp(model), jnp.ones((2, 3))
    for forward_mode in (lambda f: jax.jvp(f, (x,), (x,)), lambda f: jax.jacfwd(f)(x)):
        with pytest.raises(TypeError, match=r"as_custom_vjp\(mlp\(\[3, 4, 2\], tanh\)\): "
                                            r"forward-mode autodiff .* jax.hessian .* jbp.hvp"):
            forward_mode(lambda x_: apply(params, x_))
    assert jax.eval_shape(jax.hessian(lambda x_: jnp.sum(apply(params, x_) ** 2)), x).shape == \
        (2, 3, 2, 3)
