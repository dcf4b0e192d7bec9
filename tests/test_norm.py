"""layer_norm: the three-term backward equals jax.vjp of its own forward, on batches,
sequences, single features, constant rows; per-example rule; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp
from conftest import cast, rel_err, rtol


@pytest.mark.parametrize("in_shape", [(6,), (3, 5), (1,)], ids=["(B,n)", "(B,T,n)", "n=1"])
def test_check_layer(in_shape):
    """jax.vjp in float64 (≤ 1e-12) and float32 (≤ 1e-5) at random inputs, zeros (every row
    constant), large inputs and a batch of one; examples kept apart; the per-example rule."""
    report = jbp.check_layer(jbp.layer_norm(), in_shape)
    assert report.ok, str(report)


def _random(in_shape, dtype, batch=4, seed=0, loc=0.0, spread=2.0):
    """Random params (not init's ones and zeros: those would hide a forgotten scale) and data."""
    rng = np.random.default_rng(seed)
    n = in_shape[-1]
    params = {"scale": jnp.asarray(rng.normal(size=n), dtype),
              "offset": jnp.asarray(rng.normal(size=n), dtype)}
    x = jnp.asarray(loc + rng.normal(size=(batch, *in_shape)) * spread, dtype)
    dy = jnp.asarray(rng.normal(size=(batch, *in_shape)), dtype)
    return params, x, dy


def _pair(layer, params, x, dy):
    _, cache, _ = layer.forward(params, x)
    _, vjp = jax.vjp(layer.apply, params, x)
    return layer.backward(params, cache, dy), vjp(dy)


_pair_jit = jax.jit(_pair, static_argnums=0)


@pytest.mark.parametrize("in_shape", [(7,), (3, 5), (2, 3, 4), (1,)],
                         ids=["(B,n)", "(B,T,n)", "(B,S,T,n)", "n=1"])
def test_backward_equals_vjp_with_random_scale_and_offset(in_shape, dtype):
    layer = jbp.layer_norm(dtype=dtype)
    params, x, dy = _random(in_shape, dtype)
    (dp, dx), (dp_ref, dx_ref) = _pair_jit(layer, params, x, dy)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert {k: v.dtype for k, v in dp.items()} == {"scale": dtype, "offset": dtype}
    assert rel_err((dp, dx), (dp_ref, dx_ref)) <= rtol(dtype)
    # ∂C/∂offset = Σ dy and ∂C/∂scale = Σ dy·x̂ over every leading axis
    np.testing.assert_allclose(dp["offset"], dy.reshape(-1, in_shape[-1]).sum(0),
                               rtol=10 * rtol(dtype), atol=10 * rtol(dtype))


def test_three_term_formula_by_hand():
    """A row of three features, every number checkable on paper: x = (1, 2, 3), eps → 0."""
    with jax.enable_x64(True):
        layer = jbp.layer_norm(eps=1e-300)
        params = {"scale": jnp.array([1.0, 2.0, 3.0]), "offset": jnp.zeros(3)}
        x, dy = jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[1.0, 0.0, 0.0]])
        y, (x_hat, r), _ = layer.forward(params, x)
        s = np.sqrt(2 / 3)                                   # σ of (1, 2, 3)
        np.testing.assert_allclose(x_hat, [[-1 / s, 0, 1 / s]], rtol=1e-15)
        np.testing.assert_allclose(r, [[1 / s]], rtol=1e-15)
        _, dx = layer.backward(params, cache=(x_hat, r), dy=dy)
        g = np.array([1.0, 0.0, 0.0])                        # scale·dy
        xh = np.array([-1 / s, 0, 1 / s])
        want = (g - g.mean() - xh * (g * xh).mean()) / s    # = (1/6, −1/3, 1/6)·√(3/2)
        np.testing.assert_allclose(dx, [want], rtol=1e-14)
        np.testing.assert_allclose(want, np.array([1 / 6, -1 / 3, 1 / 6]) / s, rtol=1e-14)
        assert abs(float(jnp.sum(dx))) < 1e-15              # a shift of the row changes nothing


def test_one_feature_and_constant_rows_are_finite():
    """n = 1 and constant rows have σ² = 0: x̂ = 0, y = offset, dx = r (g − mean(g)) with
    r = 1/√eps, all finite, and equal to jax.vjp."""
    with jax.enable_x64(True):
        for in_shape, x in (((1,), jnp.array([[3.0], [-7.0]])),
                            ((4,), jnp.array([[2.5] * 4, [0.1] * 4, [-1e6] * 4]))):
            layer = jbp.layer_norm(dtype=jnp.float64)
            params, _, _ = _random(in_shape, jnp.float64)
            dy = jnp.asarray(np.random.default_rng(1).normal(size=x.shape))
            y, (x_hat, r), _ = layer.forward(params, x)
            assert np.all(np.abs(x_hat) < 1e-9)
            np.testing.assert_allclose(y, jnp.broadcast_to(params["offset"], x.shape), atol=1e-8)
            (dp, dx), ref = _pair_jit(layer, params, x, dy)
            assert all(np.all(np.isfinite(a)) for a in jax.tree_util.tree_leaves((dp, dx)))
            assert rel_err((dp, dx), ref) <= 1e-12
            g = params["scale"] * dy
            np.testing.assert_allclose(dx, (g - g.mean(-1, keepdims=True)) / np.sqrt(1e-5),
                                       rtol=1e-6, atol=1e-6)


def test_variance_is_two_pass():
    """A row with a large mean and a small spread in float32: E[x²] − μ² here comes out
    negative (NaN output); the mean of squared deviations stays within float32 rounding
    of the float64 truth."""
    layer = jbp.layer_norm()
    params, x, _ = _random((16,), jnp.float32, loc=1e4, spread=0.1)
    params = {"scale": jnp.ones(16), "offset": jnp.zeros(16)}
    y = np.asarray(layer.apply(params, x))
    x64 = np.asarray(x, np.float64)
    truth = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    assert np.all(np.isfinite(y)) and np.max(np.abs(y - truth)) < 0.05


def test_leading_axes_single_example_and_vmap():
    """(B, T, n): parameter gradients summed over B and T; a single example (n,) works and
    jax.vmap over examples equals the batched call."""
    layer = jbp.layer_norm()
    params, x, dy = _random((3, 5), jnp.float32)
    y = layer.apply(params, x)
    np.testing.assert_allclose(jax.vmap(lambda xi: layer.apply(params, xi))(x), y, rtol=1e-6)
    np.testing.assert_allclose(layer.apply(params, x[0, 0]), y[0, 0], rtol=1e-6)
    dp, _ = layer.backward(params, layer.forward(params, x)[1], dy)
    dp_rows, _ = layer.backward(params, layer.forward(params, x.reshape(-1, 5))[1],
                                dy.reshape(-1, 5))
    assert rel_err(dp, dp_rows) <= 1e-6


def test_model_with_layer_norm_manual_equals_autodiff_and_finite_differences(dtype):
    model = jbp.serial(jbp.dense(8, dtype=dtype), jbp.layer_norm(dtype=dtype), jbp.relu(),
                       jbp.dense(8, dtype=dtype), jbp.layer_norm(eps=1e-3, dtype=dtype),
                       jbp.tanh(), jbp.dense(3, dtype=dtype))
    _, params = model.init(jax.random.key(0), (5,))
    params = cast(params, dtype)  # init's scale/offset are ones/zeros: perturb them
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda p: p + jnp.asarray(rng.normal(size=p.shape) * 0.3, dtype), params)
    x, y = jnp.asarray(rng.normal(size=(6, 5)), dtype), jnp.array([0, 1, 2, 1, 0, 2])
    CE = jbp.losses.softmax_cross_entropy

    @jax.jit
    def run(params):
        out = (jbp.backprop(model, CE, params, x, y), jbp.autodiff_value_and_grad(model, CE)(
            params, x, y), jbp.per_example_grads(model, CE)(params, x, y),
            jax.vmap(jax.grad(lambda p, xi, yi: CE.value(model.apply(p, xi[None]), yi[None])),
                     in_axes=(None, 0, 0))(params, x, y))
        if dtype == jnp.float64:
            out += (jbp.numerical_value_and_grad(model, CE)(params, x, y)[1],)
        return out

    (value, grads, deltas), (auto_value, auto), per_example, ref, *fd = run(params)
    assert abs(value - auto_value) <= rtol(dtype) * abs(value)
    assert rel_err(grads, auto) <= rtol(dtype)
    assert rel_err(per_example, ref) <= 10 * rtol(dtype)
    assert len(deltas) == len(model.layers)
    if fd:
        assert rel_err(grads, fd[0]) <= 1e-6


def test_bad_input_is_refused_naming_the_layer():
    for eps in (0, -1e-5, 0.0, float("nan"), float("inf"), True, "1e-5", None):
        with pytest.raises(ValueError, match=r"layer_norm: eps must be a positive number"):
            jbp.layer_norm(eps=eps)
    layer = jbp.layer_norm()
    _, params = layer.init(jax.random.key(0), (8,))
    with pytest.raises(ValueError, match=r"layer_norm: expected input of shape \(\.\.\., 8\) "
                                         r"\(the last axis is normalised; the params have 8 "
                                         r"features\), got \(2, 5\)"):
        layer.apply(params, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"layer_norm: expected input of shape \(\.\.\., 8\)"):
        layer.apply(params, jnp.ones(()))
    with pytest.raises(TypeError, match=r"layer_norm: params must be a dict with keys "
                                        r"\['offset', 'scale'\], got \['W', 'b'\]"):
        layer.apply({"W": 1, "b": 2}, jnp.ones((2, 8)))
    with pytest.raises(ValueError, match=r"layer_norm: expected params\['offset'\] shaped \(8,\), "
                                         r"got \(7,\)"):
        layer.apply({"scale": jnp.ones(8), "offset": jnp.ones(7)}, jnp.ones((2, 8)))
    with pytest.raises(ValueError, match=r"layer_norm: expects a per-example shape"):
        layer.init(jax.random.key(0), ())
    with pytest.raises(TypeError, match=r"layer_norm: input must be an array, got list"):
        layer.apply(params, [[1.0] * 8])
    assert jbp.layer_norm() == jbp.layer_norm() and repr(jbp.layer_norm(eps=1e-3)) == \
        "layer_norm(eps=0.001)"
