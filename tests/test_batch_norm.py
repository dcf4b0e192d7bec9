"""batch_norm and explicit state: the backward against jax.vjp and an independent witness
(layer_norm of the transposed batch), the state both gradient paths return, evaluation with
the running statistics, per-example functions in both modes, fit with checkpoints and
resume, second order, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import jbp
from conftest import rel_err

CE = jbp.losses.softmax_cross_entropy


@pytest.mark.parametrize("in_shape,train", [((5,), True), ((3, 2), True), ((2, 3, 2), False)],
                         ids=["(B,C)-train", "(B,W,C)-train", "(B,H,W,C)-eval"])
def test_check_layer(in_shape, train):
    """jax.vjp in float64 and float32, at random inputs, zeros (a constant channel) and large
    inputs; in evaluation mode also a batch of one and the per-example rule."""
    report = jbp.check_layer(jbp.batch_norm(), in_shape, train=train)
    assert report.ok, str(report)


def test_training_mode_is_layer_norm_of_the_transposed_batch():
    """On (B, C), batch statistics per channel are layer_norm's row statistics of xᵀ (C, B):
    forward and hand-written backward must agree with that independent layer."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x, dy = (jnp.asarray(rng.normal(size=(6, 4)) * 3 + 1) for _ in range(2))
        params = {"scale": jnp.asarray(rng.normal(size=4)), "offset": jnp.asarray(rng.normal(size=4))}
        bn, ln = jbp.batch_norm(dtype=jnp.float64), jbp.layer_norm(dtype=jnp.float64)
        y, cache, new_state = bn.forward(params, x, train=True, state=bn.init_state((4,)))
        dp, dx = bn.backward(params, cache, dy)
        ones = {"scale": jnp.ones(6), "offset": jnp.zeros(6)}
        x_hat_t, ln_cache, _ = ln.forward(ones, x.T)
        np.testing.assert_allclose(y, params["scale"] * x_hat_t.T + params["offset"], rtol=1e-13)
        _, dx_t = ln.backward(ones, ln_cache, (params["scale"] * dy).T)
        np.testing.assert_allclose(dx, dx_t.T, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(dp["offset"], dy.sum(0), rtol=1e-13)
        # the running statistics move a tenth of the way (momentum 0.9) to the batch's
        np.testing.assert_allclose(new_state["mean"], 0.1 * np.mean(np.asarray(x), 0), rtol=1e-13)
        np.testing.assert_allclose(new_state["var"], 0.9 + 0.1 * np.var(np.asarray(x), 0),
                                   rtol=1e-13)


def test_evaluation_mode_uses_the_running_statistics():
    layer = jbp.batch_norm(eps=1e-3)
    params = {"scale": jnp.array([2.0, 1.0]), "offset": jnp.array([0.5, -1.0])}
    state = {"mean": jnp.array([1.0, -2.0]), "var": jnp.array([4.0, 0.25])}
    x = jnp.array([[3.0, 0.0], [1.0, -2.0]])
    y, new_state = layer.apply(params, x, state=state)
    want = params["scale"] * (x - state["mean"]) / np.sqrt(state["var"] + 1e-3) + params["offset"]
    np.testing.assert_allclose(y, want, rtol=1e-6)
    assert new_state is state


# ---------------------------------------------------------------------------- in a CNN

def _cnn(dtype):
    """conv -> tanh -> batch_norm -> residual(conv -> relu -> batch_norm) -> pool -> dense.
    (Not conv -> batch_norm: the batch mean cancels the conv's bias, whose gradient is then
    zero up to round-off, which no relative tolerance can compare.)"""
    block = jbp.serial(jbp.conv(3, 3, dtype=dtype), jbp.relu(), jbp.batch_norm(dtype=dtype))
    return jbp.serial(jbp.conv(3, 3, dtype=dtype), jbp.tanh(), jbp.batch_norm(dtype=dtype),
                      jbp.residual(block), jbp.global_avg_pool(), jbp.dense(3, dtype=dtype))


def _setup(dtype, batch=5, seed=0):
    model = _cnn(dtype)
    _, params = model.init(jax.random.key(seed), (6, 2))
    state = model.init_state((6, 2))
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, 6, 2)), dtype)
    y = jnp.asarray(rng.integers(0, 3, batch))
    return model, params, state, x, y


def test_state_mirrors_the_params_and_only_batch_norm_holds_some():
    model, params, state, _, _ = _setup(jnp.float32)
    assert model.stateful and not jbp.mlp([2, 3]).stateful
    assert jax.tree_util.tree_structure(state[:3]) == jax.tree_util.tree_structure(
        ({}, {}, {"mean": 0, "var": 0}))
    assert state[3][2]["mean"].shape == (3,) and state[4:] == ({}, {})


def test_manual_equals_autodiff_equals_central_differences_in_training_mode():
    with jax.enable_x64(True):
        model, params, state, x, y = _setup(jnp.float64)
        kw = {"train": True, "state": state}

        @jax.jit
        def three(params):
            return (jbp.backprop(model, CE, params, x, y, **kw),
                    jbp.autodiff_value_and_grad(model, CE)(params, x, y, **kw),
                    jbp.numerical_value_and_grad(model, CE)(params, x, y, **kw)[1])

        ((value, new_state), grads, deltas), ((auto_value, auto_state), auto), fd = three(params)
        assert abs(float(value) - float(auto_value)) <= 1e-12 * abs(float(value))
    assert rel_err(grads, auto) <= 1e-12 and rel_err(grads, fd) <= 1e-6
    assert rel_err(new_state, auto_state) == 0
    # one delta per child of the model (the residual block is one)
    assert [d.shape for d in deltas] == [(5, 6, 3)] * 4 + [(5, 3), (5, 3)]


def test_float32_training_step_updates_the_state_identically_in_both_paths():
    """Both paths run the same forward; in two compiled programs XLA may order a reduction
    differently, so "identically" is to float32 round-off, not bit for bit."""
    model, params, state, x, y = _setup(jnp.float32)
    manual = jax.jit(jbp.manual_value_and_grad(model, CE), static_argnames="train")
    auto = jax.jit(jbp.autodiff_value_and_grad(model, CE), static_argnames="train")
    (v, s), g = manual(params, x, y, train=True, state=state)
    (v_ref, s_ref), g_ref = auto(params, x, y, train=True, state=state)
    assert rel_err(s, s_ref) <= 1e-6
    assert abs(v - v_ref) <= 1e-6 * abs(v_ref)
    assert rel_err(g, g_ref) <= 1e-5
    assert not np.allclose(s[2]["mean"], state[2]["mean"])  # it moved


def test_per_example_functions_in_evaluation_mode_and_refused_in_training_mode():
    with jax.enable_x64(True):
        model, params, _, x, y = _setup(jnp.float64)
        rng = np.random.default_rng(3)
        state = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.uniform(0.5, 2, s.shape)),
                                       model.init_state((6, 2)))

        @jax.jit
        def both(params):
            def loss_i(p, xi, yi):
                return CE.value(model.apply(p, xi[None], state=state)[0], yi[None])

            ref = jax.vmap(jax.grad(loss_i), in_axes=(None, 0, 0))(params, x, y)
            return ref, jbp.per_example_grads(model, CE)(params, x, y, state=state), \
                jbp.per_example_grad_norms(model, CE)(params, x, y, state=state)

        ref, grads, norms = both(params)
    assert rel_err(grads, ref) <= 1e-12
    ref_norms = np.sqrt(sum(np.sum(np.asarray(g).reshape(5, -1) ** 2, 1)
                            for g in jax.tree_util.tree_leaves(ref)))
    assert rel_err(norms, ref_norms) <= 1e-12
    model, params, state, x, y = _setup(jnp.float32)
    for fn in (jbp.per_example_grads(model, CE), jbp.per_example_grad_norms(model, CE),
               jbp.per_example_grad_variance(model, CE), jbp.clipped_grad_mean(model, CE, 1.0),
               jbp.ggn_diagonal(model, CE)):
        with pytest.raises(ValueError, match="batch_norm: in training mode .* per-example"):
            jax.eval_shape(lambda p: fn(p, x, y, train=True, state=state), params)


def test_second_order_and_custom_vjp_in_both_modes():
    """as_custom_vjp passes check_grads (rev, order 2) and returns the new state; hvp, the
    jvp of the manual gradient, equals JAX's Hessian-vector product in training mode."""
    with jax.enable_x64(True):
        model, params, state, x, y = _setup(jnp.float64, batch=3, seed=1)
        x = x + 0.3 * jnp.sign(x)  # away from relu's kink, for the finite differences
        apply = jbp.as_custom_vjp(model)
        for train in (True, False):
            out, new_state = apply(params, x, train=train, state=state)
            want_out, want_state = model.apply(params, x, train=train, state=state)
            np.testing.assert_array_equal(out, want_out)
            jax.tree_util.tree_map(np.testing.assert_array_equal, new_state, want_state)
            check_grads(jax.jit(lambda p, a, t=train: apply(p, a, train=t, state=state)[0]),
                        (params, x), order=2, modes=["rev"], eps=1e-6)
        v = jax.tree_util.tree_map(jnp.ones_like, params)

        @jax.jit
        def both(params, v):
            def cost(p):
                return CE.value(model.apply(p, x, train=True, state=state)[0], y)

            exact = jax.jvp(jax.grad(cost), (params,), (v,))[1]
            return jbp.hvp(model, CE)(params, x, y, v, train=True, state=state), exact

        hv, exact = both(params, v)
    assert rel_err(hv, exact) <= 1e-10


# ---------------------------------------------------------------------------- fit

def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6, 2)).astype(np.float32)
    y = (x[:, :, 0].mean(1) > 0).astype(np.int32) + (x[:, :, 1].mean(1) > 0)
    return x, y


def test_fit_carries_the_state_through_steps_evaluation_checkpoints_and_resume(tmp_path):
    model, params, state, _, _ = _setup(jnp.float32)
    data = _data()
    kw = dict(key=jax.random.key(1), batch_size=10, eval_data=_data(20, 1), progress=False,
              state=state, learning_rate=1e-2)
    p_full, s_full, h_full = jbp.fit(model, CE, params, data, steps=8, **kw)
    # evaluation used the returned running statistics
    x_test, y_test = _data(20, 1)
    out, _ = model.apply(p_full, jnp.asarray(x_test), state=s_full)
    assert h_full["eval"][-1]["test_loss"] == pytest.approx(float(CE.value(out, y_test)), rel=1e-5)
    assert not np.allclose(s_full[2]["var"], 1.0)
    # interrupted after one epoch (4 steps) and resumed: the same params and state, bit for bit
    jbp.fit(model, CE, params, data, steps=4, checkpoint_dir=tmp_path, **kw)
    p, s, h = jbp.fit(model, CE, params, data, steps=8, checkpoint_dir=tmp_path, resume=True,
                      **kw)
    jax.tree_util.tree_map(np.testing.assert_array_equal, (p, s), (p_full, s_full))
    assert h["loss"] == h_full["loss"]
    # the autodiff path trains to the same numbers (same batches, same state updates)
    p_auto, s_auto, _ = jbp.fit(model, CE, params, data, steps=8, grad="autodiff", **kw)
    assert rel_err(s_auto, s_full) <= 1e-4 and rel_err(p_auto, p_full) <= 1e-4
    snapshots = []
    jbp.fit(model, CE, params, data, steps=4, on_epoch=lambda e, p, h, state: snapshots.append(state),
            **kw)
    assert len(snapshots) == 1 and snapshots[0][2]["mean"].shape == (3,)


# ---------------------------------------------------------------------------- bad input

def test_bad_input_gets_a_clear_error():
    model, params, state, x, y = _setup(jnp.float32)
    manual = jbp.manual_value_and_grad(model, CE)
    with pytest.raises(TypeError, match="keeps state .* pass state=model.init_state"):
        manual(params, x, y)
    with pytest.raises(TypeError, match="keeps no state, but state= was given"):
        jbp.manual_value_and_grad(jbp.mlp([2, 3]), CE)(params, x, y, state=state)
    with pytest.raises(TypeError, match="keeps state"):
        jbp.fit(model, CE, params, _data(), key=jax.random.key(0), progress=False)
    with pytest.raises(ValueError, match="more than one value per channel"):
        manual(params, x[:1, :1], y[:1], train=True, state=state)
    with pytest.raises(TypeError, match=r"train must be a Python bool, got a traced value; "
                                        r"under jax.jit mark it static"):
        jax.jit(manual)(params, x, y, train=True, state=state)  # train traced, not static
    bn = jbp.batch_norm()
    bn_params, bn_state = bn.init(jax.random.key(0), (3,))[1], bn.init_state((3,))
    with pytest.raises(TypeError, match=r"batch_norm: train must be a Python bool"):
        jax.jit(lambda t: bn.apply(bn_params, jnp.ones((4, 3)), train=t, state=bn_state))(True)
    wrong = jbp.serial(jbp.dense(4), jbp.batch_norm()).init_state((2,))
    with pytest.raises(ValueError, match=r"batch_norm: state must be \{'mean': \(3,\).*another model"):
        manual(params, x, y, state=state[:2] + (wrong[1],) + state[3:])
    with pytest.raises(ValueError, match="one entry per child .* another model"):
        manual(params, x, y, state=wrong)
    for momentum in (1.5, -0.1, "0.9", True):
        with pytest.raises(ValueError, match="batch_norm: momentum must be a number in"):
            jbp.batch_norm(momentum)
    with pytest.raises(ValueError, match="batch_norm: eps must be a positive number"):
        jbp.batch_norm(eps=0)
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, ..., 3\)"):
        jbp.batch_norm().apply(jbp.batch_norm().init(None, (3,))[1], jnp.ones((2, 4)),
                               state=jbp.batch_norm().init_state((3,)))
    with pytest.raises(ValueError, match="data_parallel_value_and_grad: .* keeps state"):
        jbp.data_parallel_value_and_grad(model, CE, "auto")
    with pytest.raises(ValueError, match="fit: .* keeps state .* grad='manual'"):
        jbp.fit(model, CE, params, _data(), key=jax.random.key(0), state=state,
                grad=lambda p, a, b: (0.0, p), progress=False)
    box = jbp.Layer("box", model.init, lambda p, a, **k: (a, None), lambda p, c, d: ({}, d))
    with pytest.raises(TypeError, match="its child batch_norm keeps state, so the composite "
                                        "must too"):
        jbp.Layer("mine", model.init, model.forward, layers=(box, jbp.batch_norm()),
                  walk=lambda p, c, d, v: (p, d))
    assert jbp.batch_norm() == jbp.batch_norm(0.9) and repr(jbp.batch_norm(0.99)) == \
        "batch_norm(momentum=0.99)"


def test_optax_loop_by_hand():
    """The README's pattern: the state comes out of the value and goes into the next step."""
    model, params, state, x, y = _setup(jnp.float32)
    opt = optax.sgd(0.1)
    opt_state = opt.init(params)
    grad_fn = jax.jit(jbp.manual_value_and_grad(model, CE), static_argnames="train")
    losses = []
    for _ in range(5):
        (value, state), grads = grad_fn(params, x, y, train=True, state=state)
        updates, opt_state = opt.update(grads, opt_state)
        params = optax.apply_updates(params, updates)
        losses.append(float(value))
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------------- edges

def test_integer_images_are_normalised_in_floats():
    """Raw uint8 input in evaluation mode gives what its float32 copy gives (it was cast to the
    integer dtype: [0, 5, 0, ...]), and in training mode too."""
    bn = jbp.batch_norm()
    params = {"scale": jnp.asarray([1.5, 2.0]), "offset": jnp.asarray([0.5, -1.0])}
    state = {"mean": jnp.asarray([100.0, 30.5]), "var": jnp.asarray([400.0, 90.0])}
    pixels = np.asarray([[120, 3], [255, 70], [0, 17]], np.uint8)
    for train in (False, True):
        got, _ = bn.apply(params, jnp.asarray(pixels), train=train, state=state)
        want, _ = bn.apply(params, jnp.asarray(pixels, jnp.float32), train=train, state=state)
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(got, want)


def test_training_mode_counts_values_per_channel_not_examples():
    """One example of 5 positions has 5 values per channel: accepted, and its gradient is
    jax.grad's; one value per channel, or an empty batch (whose NaN statistics would poison
    the running state), is refused, naming the layer."""
    bn = jbp.batch_norm()
    params, state = bn.init(None, (5, 3))[1], bn.init_state((5, 3))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, 3)), jnp.float32)
    y = jnp.zeros((1, 5, 3))
    manual, auto = (grad(bn, jbp.losses.mean_squared_error)(params, x, y, train=True,
                                                            state=state)[1]
                    for grad in (jbp.manual_value_and_grad, jbp.autodiff_value_and_grad))
    assert rel_err(manual, auto) <= 1e-5
    for shape in ((1, 1, 3), (1, 3), (0, 3), (0, 4, 3)):
        with pytest.raises(ValueError, match=r"batch_norm: training mode needs more than one "
                                             r"value per channel .*got input of shape"):
            bn.apply(params, jnp.ones(shape), train=True, state=state)
