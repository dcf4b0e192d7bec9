"""embedding: the scatter-add backward equals jax.vjp of its own forward; repeated ids
accumulate; the ids get float0; out-of-range ids; a model embedding -> layer_norm -> dense
and a model holding every layer of the CNN family through every gradient function; check_layer's integer inputs; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.test_util import check_grads

import jbp
from conftest import cast, jit, rel_err, rtol

CE = jbp.losses.softmax_cross_entropy


@pytest.mark.parametrize("layer,in_shape", [
    (jbp.embedding(10, 4), (5,)),
    (jbp.embedding(10, 4), ()),
    (jbp.serial(jbp.embedding(10, 4), jbp.layer_norm(), jbp.dense(3)), (2, 3)),
], ids=["(B,T)", "(B,)", "serial-(B,S,T)"])
def test_check_layer(layer, in_shape):
    """Random ids (with repeats), all ids 0, all ids vocab − 1, a batch of one; float64 and
    float32; examples kept apart; per-example gradients, norms and sums of squares."""
    report = jbp.check_layer(layer, in_shape, int_range=(0, 10))
    assert report.ok, str(report)
    assert len(report.checks) == 16 and "leaves of dparams" in str(report)


def test_repeated_ids_accumulate_and_ids_get_float0():
    layer = jbp.embedding(5, 2)
    E = jnp.arange(10.0).reshape(5, 2)
    ids = jnp.array([[1, 1, 3], [1, 0, 0]])
    dy = jnp.arange(12.0).reshape(2, 3, 2) + 1
    y, cache, _ = layer.forward({"E": E}, ids)
    np.testing.assert_array_equal(y, E[ids])
    (dp, dx) = layer.backward({"E": E}, cache, dy)
    want = np.zeros((5, 2))
    want[1] = dy[0, 0] + dy[0, 1] + dy[1, 0]     # id 1 three times: three deltas add up
    want[3] = dy[0, 2]
    want[0] = dy[1, 1] + dy[1, 2]
    np.testing.assert_array_equal(dp["E"], want)
    _, vjp = jax.vjp(layer.apply, {"E": E}, ids)
    dp_ref, dx_ref = vjp(dy)
    np.testing.assert_array_equal(dp_ref["E"], want)
    assert dx.dtype == dx_ref.dtype == jax.dtypes.float0 and dx.shape == dx_ref.shape == ids.shape


def _model(dtype):
    return jbp.serial(jbp.embedding(7, 6, dtype=dtype), jbp.layer_norm(dtype=dtype),
                      jbp.dense(5, dtype=dtype), jbp.tanh(), jbp.flatten(),
                      jbp.dense(3, dtype=dtype))


def _every_new_layer(dtype):
    """embedding, conv, batch_norm (evaluation mode), max and avg pool, a residual block
    with layer_norm, a parallel concat of two convolutions, global_avg_pool, dense."""
    block = jbp.serial(jbp.conv(6, 3, dtype=dtype), jbp.layer_norm(dtype=dtype), jbp.tanh())
    branches = jbp.parallel(jbp.conv(2, 1, dtype=dtype),
                            jbp.serial(jbp.conv(3, 3, dilation=2, dtype=dtype), jbp.relu()),
                            combine="concat")
    return jbp.serial(jbp.embedding(7, 4, dtype=dtype), jbp.conv(6, 3, dtype=dtype),
                      jbp.batch_norm(dtype=dtype), jbp.tanh(), jbp.max_pool(2, 1, "SAME"),
                      jbp.residual(block), jbp.avg_pool(2), branches, jbp.global_avg_pool(),
                      jbp.dense(3, dtype=dtype))


def _sequence_model(dtype):
    """embedding, positional embedding, a causal transformer block, a GRU (last state)."""
    return jbp.serial(jbp.embedding(7, 4, dtype=dtype), jbp.positional_embedding(4, dtype=dtype),
                      jbp.transformer_block(4, 2, 2, 6, causal=True, block_size=3, dtype=dtype),
                      jbp.gru(3, return_sequences=False, dtype=dtype), jbp.dense(3, dtype=dtype))


MODELS = {  # name: (builder, the shapes of backprop's deltas for ids (6, 4))
    "embedding-layer_norm": (_model, [(6, 4, 6), (6, 4, 6), (6, 4, 5), (6, 4, 5), (6, 20),
                                      (6, 3)]),
    "every-new-layer": (_every_new_layer, [(6, 4, 4)] + [(6, 4, 6)] * 5 + [(6, 2, 6),
                                           (6, 2, 5), (6, 5), (6, 3)]),
    "sequence": (_sequence_model, [(6, 4, 4)] * 3 + [(6, 3), (6, 3)]),
}


@pytest.mark.parametrize("name", MODELS)
def test_model_through_every_gradient_function(name, dtype):
    """Both dtypes: backprop == jax.grad == jax.grad through as_custom_vjp. float64 also: ==
    central differences; per-example gradients and norms == vmap(grad); hvp == jvp of grad;
    ggn_diagonal == diag(Jᵀ H J); per-example variance and DP-SGD's clipped mean from
    vmap(grad); check_grads, order 2 (for the first model). The embedding comes first (its float0 dx is where the
    backward pass ends); batch norm runs in evaluation mode with a random state."""
    build, delta_shapes = MODELS[name]
    model = build(dtype)
    _, params = model.init(jax.random.key(0), (4,))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda p: p + jnp.asarray(rng.normal(size=p.shape) * 0.3, dtype), cast(params, dtype))
    kw = {}
    if model.stateful:
        kw["state"] = jax.tree_util.tree_map(
            lambda s: jnp.asarray(rng.uniform(0.5, 2, s.shape), dtype), model.init_state((4,)))
    ids = jnp.asarray(rng.integers(0, 7, (6, 4)), jnp.int32)
    ids = ids.at[0].set(jnp.array([2, 2, 5, 2], jnp.int32))  # repeats inside one example
    y = jnp.array([0, 1, 2, 1, 0, 2])
    v = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape), dtype), params)
    apply = jbp.as_custom_vjp(model)
    flat, unravel = ravel_pytree(params)

    def out_of(p, i, f=model.apply):
        out = f(p, i, **kw)
        return out[0] if model.stateful else out

    def cost(p):
        return CE.value(out_of(p, ids), y)

    @jit
    def run(params, v):
        grads = {"backprop": jbp.backprop(model, CE, params, ids, y, **kw),
                 "auto": jbp.autodiff_value_and_grad(model, CE)(params, ids, y, **kw),
                 "bridge": jax.grad(lambda p: CE.value(out_of(p, ids, apply), y))(params)}
        if dtype != jnp.float64:
            return grads, {}
        ref = jax.vmap(jax.grad(lambda p, i, t: CE.value(out_of(p, i[None]), t[None])),
                       in_axes=(None, 0, 0))(params, ids, y)
        out = out_of(params, ids)
        jac = jax.jacrev(lambda f: out_of(unravel(f), ids))(flat).reshape(out.size, -1)
        hess = jax.hessian(lambda o: CE.value(o, y))(out).reshape(out.size, out.size)
        pairs = {  # name: (jbp, reference)
            "finite differences": (grads["backprop"][1],
                                   jbp.numerical_value_and_grad(model, CE)(params, ids, y,
                                                                           **kw)[1]),
            "per_example_grads": (jbp.per_example_grads(model, CE)(params, ids, y, **kw), ref),
            "per_example_grad_norms": (jbp.per_example_grad_norms(model, CE)(params, ids, y,
                                                                             **kw), _norms(ref)),
            "hvp": (jbp.hvp(model, CE)(params, ids, y, v, **kw),
                    jax.jvp(jax.grad(cost), (params,), (v,))[1]),
            "ggn_diagonal": (jbp.ggn_diagonal(model, CE)(params, ids, y, **kw),
                             unravel(jnp.einsum("ap,ab,bp->p", jac, hess, jac))),
            "per_example_grad_variance": (
                jbp.per_example_grad_variance(model, CE)(params, ids, y, **kw)[1],
                jax.tree_util.tree_map(lambda g: jnp.var(g, 0), ref)),
            "clipped_grad_mean": (jbp.clipped_grad_mean(model, CE, 0.1)(params, ids, y, **kw)[0],
                                  _clipped(ref, 0.1))}
        return grads, pairs

    grads, pairs = run(params, v)
    (value, manual, deltas), (auto_value, auto) = grads["backprop"], grads["auto"]
    if model.stateful:
        (value, _), (auto_value, _) = value, auto_value
    assert abs(value - auto_value) <= rtol(dtype) * abs(value)
    assert rel_err(manual, auto) <= rtol(dtype) and rel_err(grads["bridge"], auto) <= rtol(dtype)
    assert [d.shape for d in deltas] == delta_shapes
    for what, (got, want) in pairs.items():
        assert rel_err(got, want) <= (1e-6 if what == "finite differences" else 1e-10), what
    if dtype == jnp.float64 and name == "embedding-layer_norm":
        # the bridge from outside, reverse mode, first and second order, with integer input
        # (float0); each layer of the other two models has its own check_grads at order 2
        # (test_conv, test_batch_norm, test_attention, test_recurrent), the composites theirs
        # in test_bridge
        check_grads(jax.jit(lambda p: out_of(p, ids, apply)), (params,), order=2, modes=["rev"],
                    eps=1e-6)


def _norms(per_example):
    return jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1)
                        for g in jax.tree_util.tree_leaves(per_example)))


def _clipped(per_example, clip):
    factor = 1.0 / jnp.maximum(1.0, _norms(per_example) / clip)
    return jax.tree_util.tree_map(
        lambda g: jnp.mean(g * factor.reshape((-1,) + (1,) * (g.ndim - 1)), 0), per_example)


def test_out_of_range_ids_raise_where_concrete():
    layer = jbp.embedding(10, 4)
    _, params = layer.init(jax.random.key(0), (3,))
    with pytest.raises(ValueError, match=r"^embedding\(10, 4\): token ids must lie in \[0, 10\); "
                                         r"found 10 at index \(1, 2\) \(1 id\(s\) out of range\)"):
        layer.apply(params, jnp.array([[0, 1, 2], [3, 4, 10]]))
    with pytest.raises(ValueError, match=r"found -1 at index \(0, 0\) \(2 id\(s\)"):
        layer.apply(params, np.array([[-1, 1, 2], [3, 4, 12]]))
    with pytest.raises(ValueError, match=r"found 10 at index \(\) \(1 id\(s\)"):
        layer.apply(params, jnp.array(10))  # a single id
    model = jbp.serial(layer, jbp.flatten(), jbp.dense(2))
    _, params = model.init(jax.random.key(0), (3,))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 10\)") as err:
        jbp.manual_value_and_grad(model, CE)(params, jnp.array([[0, 1, 99]]), jnp.array([0]))
    assert "in the forward of layer 0 (embedding(10, 4))" in err.value.__notes__[0]


def test_out_of_range_ids_under_jit_give_nan_alike_in_both_gradients():
    """Under jit nothing can raise: the row of a bad id (too large, or negative: not wrapped
    as NumPy would) is NaN, so the loss is NaN and both gradients carry the same NaNs."""
    model = jbp.serial(jbp.embedding(5, 3), jbp.flatten(), jbp.dense(2))
    _, params = model.init(jax.random.key(0), (2,))
    ids, y = jnp.array([[0, 7], [1, 2], [-1, 4], [3, 3]]), jnp.array([0, 1, 0, 1])
    out = jax.jit(lambda p, i: jax.vmap(lambda r: model.layers[0].apply(p[0], r[None]))(i))(
        params, ids)[:, 0]
    assert np.array_equal(np.isnan(out).all(-1), np.array(
        [[False, True], [False, False], [True, False], [False, False]]))
    assert not np.isnan(out).any(-1)[~np.isnan(out).all(-1)].any()  # whole rows, or nothing
    manual = jax.jit(jbp.manual_value_and_grad(model, CE))(params, ids, y)
    auto = jax.jit(jbp.autodiff_value_and_grad(model, CE))(params, ids, y)
    assert np.isnan(manual[0]) and np.isnan(auto[0])
    for g, a in zip(jax.tree_util.tree_leaves(manual[1]), jax.tree_util.tree_leaves(auto[1])):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(a))
        np.testing.assert_allclose(g, a, rtol=1e-6, equal_nan=True)
    dE = manual[1][0]["E"]
    assert np.isnan(dE).any() and not np.isnan(dE[1:3]).any()  # ids 1, 2: only in good rows


def _broken_embedding(mix=False):
    """set instead of add (a repeated id keeps one delta), or rows that mix the batch."""
    good = jbp.embedding(6, 3)

    def forward(params, ids, *, key=None, train=False):
        y, cache, _ = good.forward(params, ids)
        return (y + jnp.mean(y, axis=0) if mix else y), cache

    def backward(params, ids, dy):
        if mix:
            dy = dy + jnp.mean(dy, axis=0)
            return good.backward(params, ids, dy)
        return {"E": jnp.zeros((6, 3)).at[ids].set(dy)}, np.zeros(ids.shape, jax.dtypes.float0)

    return good.replace(name="broken", forward=forward, backward=backward)


def test_check_layer_with_integer_inputs_finds_what_is_wrong():
    overwrite = jbp.check_layer(_broken_embedding(), (5,), int_range=(0, 6))
    # every case has repeated ids (the random draw of 20 ids from 6; zeros; large), except
    # the batch of one, whose 5 random ids are distinct or not by chance
    assert {c.name for c in overwrite.failures} >= {
        f"{d} {case}: backward vs jax.vjp" for d in ("float64", "float32")
        for case in ("random", "zeros", "large")}
    mixing = jbp.check_layer(_broken_embedding(mix=True), (5,), int_range=(0, 6))
    assert mixing.failures[0].name == "float64 random: per-example declaration"
    apart = [leaf for leaf in mixing.failures[0].comparison.leaves if "y_row_i" in leaf.path]
    assert apart and not apart[0].ok  # row i of y moved when the other rows were redrawn
    for bad in ((0,), (5, 5), (0, 6, 1), (0.0, 6), (True, 6), "06"):
        with pytest.raises(ValueError, match=r"check_layer: int_range must be a pair of ints"):
            jbp.check_layer(jbp.embedding(6, 3), (5,), int_range=bad)


def test_bad_input_is_refused_naming_the_layer():
    for args in ((0, 4), (10, 0), (-1, 4), (10.0, 4), (True, 4), (10, None)):
        with pytest.raises(ValueError, match=r"^embedding: (vocab_size|dim) must be a positive "
                                             r"int"):
            jbp.embedding(*args)
    layer = jbp.embedding(10, 4)
    _, params = layer.init(jax.random.key(0), (3,))
    with pytest.raises(TypeError, match=r"^embedding\(10, 4\): expected integer token ids, got "
                                        r"an input of dtype float32 and shape \(2, 3\)"):
        layer.apply(params, jnp.ones((2, 3)))
    with pytest.raises(TypeError, match=r"expected integer token ids, got an input of dtype bool"):
        layer.apply(params, jnp.ones((2, 3), bool))
    np.testing.assert_array_equal(layer.apply(params, jnp.array(3)), params["E"][3])  # one id
    ids = jnp.array([[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(jax.vmap(lambda i: layer.apply(params, i))(ids),
                                  layer.apply(params, ids))
    with pytest.raises(ValueError, match=r"embedding\(10, 4\): expected params\['E'\] shaped "
                                         r"\(10, 4\), got \(4, 10\)"):
        layer.apply({"E": jnp.ones((4, 10))}, jnp.ones((2, 3), int))
    with pytest.raises(TypeError, match=r"embedding\(10, 4\): params must be a dict with the key "
                                        r"\['E'\], got \['W', 'b'\]"):
        layer.apply({"W": 1, "b": 2}, jnp.ones((2, 3), int))
    assert jbp.embedding(10, 4) == jbp.embedding(10, 4) != jbp.embedding(10, 5)
    assert repr(jbp.embedding(10, 4, dtype=jnp.float64)) == "embedding(10, 4, dtype=float64)"
