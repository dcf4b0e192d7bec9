"""Whole models: manual backprop == jax.grad == finite differences, over random architectures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jbp
from conftest import cast, rel_err, rtol
from reference_models import black_box_sum, random_params, walked_sum

ACTIVATIONS = list(jbp.activations.ACTIVATIONS)
LOSSES = list(jbp.losses.LOSSES.values())


@st.composite
def problems(draw, max_width=64):
    """A random serial MLP (depth 1–6, mixed activations), a batch and a loss."""
    depth = draw(st.integers(1, 6))
    n_in = draw(st.integers(1, max_width))
    widths = draw(st.lists(st.integers(1, max_width), min_size=depth, max_size=depth))
    acts = draw(st.lists(st.sampled_from(ACTIVATIONS), min_size=depth - 1, max_size=depth - 1))
    batch = draw(st.integers(1, 33))
    loss = draw(st.sampled_from(LOSSES))
    seed = draw(st.integers(0, 2**16))
    layers = [jbp.dense(widths[0])]
    for act, width in zip(acts, widths[1:]):
        layers += [jbp.activations.get(act), jbp.dense(width)]
    return jbp.serial(*layers), n_in, batch, loss, seed


def make_data(model, n_in, batch, loss, seed, dtype):
    """Params with nonzero biases, drawn by NumPy (no compile per shape), and a batch."""
    rng = np.random.default_rng(seed)
    out_shape, params = random_params(model, (n_in,), rng, dtype)
    x = jnp.asarray(rng.normal(size=(batch, n_in)), dtype)
    n_out = out_shape[0]
    if loss is jbp.losses.softmax_cross_entropy:
        y = jnp.asarray(rng.integers(0, n_out, size=batch), jnp.int32)
    elif loss is jbp.losses.mean_squared_error:
        y = jnp.asarray(rng.normal(size=(batch, n_out)), dtype)
    else:
        y = jnp.asarray(rng.uniform(size=(batch, n_out)), dtype)
    return params, x, y


def offset_grads(model, loss, params, x, y):
    """∂C/∂(each layer's output) by autodiff: a zero offset added after every layer."""

    def cost(offsets):
        h = x
        for layer, p, offset in zip(model.layers, params, offsets):
            h = layer.apply(p, h) + offset
        return loss.value(h, y)

    shapes = []
    h = x
    for layer, p in zip(model.layers, params):
        h = jax.eval_shape(layer.apply, p, h)
        shapes.append(jnp.zeros(h.shape, h.dtype))
    return jax.grad(cost)(tuple(shapes))


def witnesses(model, loss, params, x, y, finite_differences):
    """Everything one example checks, in one jitted call (one compile per example)."""
    value, manual, deltas = jbp.backprop(model, loss, params, x, y)
    auto_value, auto = jbp.autodiff_value_and_grad(model, loss)(params, x, y)
    fd = jbp.numerical_value_and_grad(model, loss)(params, x, y)[1] if finite_differences else None
    return (value, manual, deltas), (auto_value, auto, offset_grads(model, loss, params, x, y)), fd


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@settings(max_examples=8)
@given(problem=problems())
def test_manual_equals_autodiff_equals_finite_differences(dtype_name, problem):
    """Manual backprop vs jax.grad (values, grads, and every layer's delta = ∂C/∂z), and in
    float64 also vs central differences."""
    dtype = jnp.dtype(dtype_name)
    with jax.enable_x64(dtype == jnp.float64):
        model, n_in, batch, loss, seed = problem
        params, x, y = make_data(model, n_in, batch, loss, seed, dtype)
        check = jax.jit(witnesses, static_argnums=(0, 1, 5))
        manual, auto, fd = check(model, loss, params, x, y, dtype == jnp.float64)
        value, grads, deltas = manual
        assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
        assert all(g.dtype == dtype for g in jax.tree_util.tree_leaves(grads))
        assert len(deltas) == len(model.layers)
        assert rel_err(manual, auto) <= rtol(dtype)
        assert jbp.compare_grads(grads, auto[1]).ok
        if fd is not None:
            # Central differences in float64 are good to ~1e-9 relative away from kinks.
            assert rel_err(grads, fd) <= 1e-6


def test_eager_equals_jit():
    """Without jit the same numbers come out (one model holding every activation), for the
    hand-written gradient; jbp's side of the autodiff path is the same forward."""
    with jax.enable_x64(True):
        layers = [jbp.dense(5)]
        for act in ACTIVATIONS:
            layers += [jbp.activations.get(act), jbp.dense(5)]
        model = jbp.serial(*layers)
        params, x, y = make_data(model, 6, 4, jbp.losses.softmax_cross_entropy, 1, jnp.float64)
        f = jbp.manual_value_and_grad(model, jbp.losses.softmax_cross_entropy)
        eager, jitted = f(params, x, y), jax.jit(f)(params, x, y)
        assert rel_err(eager, jitted) <= 1e-13


def test_dropout_model_manual_equals_autodiff(dtype):
    model = jbp.serial(jbp.dense(16), jbp.relu(), jbp.dropout(0.4), jbp.dense(4))
    params, x, y = make_data(model, 8, 12, jbp.losses.softmax_cross_entropy, 0, dtype)
    key = jax.random.key(5)
    kwargs = dict(key=key, train=True)
    manual = jbp.manual_value_and_grad(model, jbp.losses.softmax_cross_entropy)
    auto = jbp.autodiff_value_and_grad(model, jbp.losses.softmax_cross_entropy)
    g_man = jax.jit(manual, static_argnames="train")(params, x, y, **kwargs)[1]
    g_auto = jax.jit(auto, static_argnames="train")(params, x, y, **kwargs)[1]
    assert rel_err(g_man, g_auto) <= rtol(dtype)
    g_eval = jax.jit(manual)(params, x, y)[1]
    assert rel_err(g_eval, g_man) > 1e-3     # the dropout mask really changed the gradient


def test_maxout_model_manual_equals_autodiff_and_fd():
    with jax.enable_x64(True):
        model = jbp.serial(jbp.flatten(), jbp.dense(12), jbp.maxout(3), jbp.dense(3))
        rng = np.random.default_rng(0)
        _, params = model.init(jax.random.key(0), (2, 3))
        params = cast(params, jnp.float64)
        x, y = jnp.asarray(rng.normal(size=(5, 2, 3))), jnp.array([0, 1, 2, 1, 0])
        loss = jbp.losses.softmax_cross_entropy
        g_man, g_auto, g_fd = jax.jit(lambda p: [
            make(model, loss)(p, x, y)[1] for make in (
                jbp.manual_value_and_grad, jbp.autodiff_value_and_grad,
                jbp.numerical_value_and_grad)])(params)
        assert rel_err(g_man, g_auto) <= 1e-12
        assert rel_err(g_man, g_fd) <= 1e-6


@st.composite
def graphs(draw, width=st.integers(1, 12)):
    """A random nesting of serial chains and fan-out/fan-in composites (written as a walk,
    or as a black box with its own backward), ending in a dense layer of logits."""

    def block(depth):
        w = draw(width)
        kind = draw(st.sampled_from(["chain", "walked", "black-box"] if depth < 2 else ["chain"]))
        if kind == "chain":
            act = jbp.activations.get(draw(st.sampled_from(ACTIVATIONS)))
            return jbp.serial(jbp.dense(w), act)
        combine = walked_sum if kind == "walked" else black_box_sum
        return combine(jbp.serial(block(depth + 1), jbp.dense(w)),
                       jbp.serial(block(depth + 1), jbp.dense(w)))

    layers = [block(0) for _ in range(draw(st.integers(1, 3)))]
    return jbp.serial(*layers, jbp.dense(draw(st.integers(2, 6))))


@settings(max_examples=8)
@given(model=graphs(), n_in=st.integers(1, 8), batch=st.integers(1, 9),
       dtypes=st.sampled_from([("float32", "float32"), ("float64", "float64"),
                               ("float32", "float64"), ("float64", "float32")]),
       padding=st.lists(st.booleans(), min_size=9, max_size=9),
       poison=st.sampled_from([None, np.nan, np.inf, -np.inf]), seed=st.integers(0, 2**16))
def test_composites_mixed_dtypes_padding_and_nan(model, n_in, batch, dtypes, padding, poison,
                                                 seed):
    """Manual == jax.grad on random composite graphs, with params and inputs of different
    dtypes, padding labels and, sometimes, a NaN or inf in the input: the same value, the
    same NaN pattern, equal finite gradients, each in its param's dtype."""
    param_dtype, x_dtype = (jnp.dtype(d) for d in dtypes)
    with jax.enable_x64(True):
        rng = np.random.default_rng(seed)
        (classes,), params = random_params(model, (n_in,), rng, param_dtype)
        x = rng.normal(size=(batch, n_in))
        if poison is not None:
            x[rng.integers(batch), rng.integers(n_in)] = poison
        x = jnp.asarray(x, x_dtype)
        y = np.where(padding[:batch], jbp.IGNORE_LABEL, rng.integers(0, classes, batch))
        loss = jbp.losses.softmax_cross_entropy

        @jax.jit
        def both(params, x, y):
            return (jbp.backprop(model, loss, params, x, y),
                    jbp.autodiff_value_and_grad(model, loss)(params, x, y))

        (value, grads, deltas), (auto_value, auto) = both(params, x, jnp.asarray(y))
        assert len(deltas) == len(model.layers)
        assert jax.tree_util.tree_map(lambda g: g.dtype, grads) == jax.tree_util.tree_map(
            lambda p: p.dtype, params)
        tol = 1e-12 if param_dtype == x_dtype == jnp.float64 else 1e-4
        for got, want in zip(jax.tree_util.tree_leaves((value, grads)),
                             jax.tree_util.tree_leaves((auto_value, auto))):
            got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
            finite = ~np.isnan(want)
            assert rel_err(got[finite], want[finite]) <= tol
