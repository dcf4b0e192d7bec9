"""conv and pooling: each hand-written backward against jax.vjp of its own forward, a small CNN
and random CNN architectures (hypothesis) against jax.grad and central differences, per-example rules against vmap(grad), max-pool
ties against jax.grad bit for bit, and every bad input.

Compiles dominate the run time: shapes are small, and each jitted function is shared.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import jbp
from conftest import cast, rel_err, rtol
from reference_models import assert_three_witnesses_agree
from jbp.layers import conv_geometry as convmod

CE = jbp.losses.softmax_cross_entropy


def _vjp_pair(layer, params, x, dy):
    """(manual, reference) pairs of (dparams, dx) for the cotangent dy."""
    _, cache, _ = layer.forward(params, x)
    manual = layer.backward(params, cache, dy)
    _, vjp = jax.vjp(layer.apply, params, x)
    return manual, vjp(dy)


vjp_pair = jax.jit(_vjp_pair, static_argnums=0)


def _case(layer, in_shape, dtype, batch=2, seed=0):
    # numpy draws the data: eager jax.random ops would compile once per shape.
    rng = np.random.default_rng(seed)
    out_shape, params = layer.init(jax.random.key(seed), in_shape)
    params = cast(params, dtype)
    x = jnp.asarray(rng.normal(size=(batch, *in_shape)), dtype)
    dy = jnp.asarray(rng.normal(size=(batch, *out_shape)), dtype)
    return params, x, dy


def _assert_backward_equals_vjp(layer, in_shape, dtype, batch=2):
    params, x, dy = _case(layer, in_shape, dtype, batch)
    (dp, dx), (dp_ref, dx_ref) = vjp_pair(layer, params, x, dy)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert jax.tree_util.tree_structure(dp) == jax.tree_util.tree_structure(params)
    assert all(g.dtype == p.dtype for g, p in zip(jax.tree_util.tree_leaves(dp),
                                                  jax.tree_util.tree_leaves(params)))
    assert rel_err((dp, dx), (dp_ref, dx_ref)) <= rtol(dtype)


# ---------------------------------------------------------------------------- check_layer

CHECKED = [
    ("conv2d_every_option", jbp.conv(6, (3, 2), stride=(2, 3), padding=((1, 2), (0, 3)),
                                     dilation=(1, 2), groups=3), (7, 9, 3)),
    ("conv2d_gram_path", jbp.conv(8, 3, stride=2), (5, 5, 4)),
    ("max_pool_overlapping_same", jbp.max_pool(3, 2, "SAME"), (5, 6, 2)),
    ("avg_pool_asymmetric", jbp.avg_pool(3, 2, ((2, 1),)), (8, 3)),
    ("global_avg_pool", jbp.global_avg_pool(), (3, 4, 2)),
]


@pytest.mark.parametrize("layer,in_shape", [c[1:] for c in CHECKED], ids=[c[0] for c in CHECKED])
def test_check_layer(layer, in_shape):
    """jax.vjp in float64 (1e-12) and float32 (1e-5) at random, zero (max-pool ties
    everywhere) and large inputs and a batch of one; examples kept apart; the per-example
    rule's gradients, squared norms (the Gram path for conv2d_gram_path) and sums of
    squares against jax.vjp with one example's cotangent."""
    report = jbp.check_layer(layer, in_shape)
    assert report.ok, str(report)


def test_the_gram_case_takes_the_gram_path():
    geo = convmod.window((5, 5), 3, 2, 1, "SAME", "test")
    assert convmod.gram_is_cheaper(geo, 4, 8, 1)  # P = 9: 81 < K·O = 36·8
    assert not convmod.gram_is_cheaper(convmod.window((7,), 3, 1, 1, "SAME", "test"), 2, 3, 1)


# ---------------------------------------------------------------------------- geometry sweep

# (id, layer, per-example input shape, batch): strides that leave input rows unused,
# padding larger than the kernel (negative padding in the transposed convolution),
# asymmetric pairs, dilation, groups (depthwise too), odd sizes, kernels of 1 and of the
# whole input, 1-D and 2-D, a batch of one.
CONV_CASES = [
    ("1d_valid_stride_leaves_rows", jbp.conv(2, 3, stride=3, padding="VALID"), (8, 2), 2),
    ("1d_padding_larger_than_kernel", jbp.conv(2, 2, padding=3), (5, 3), 2),
    ("1d_asymmetric_dilated_strided", jbp.conv(3, 3, stride=2, dilation=2, padding=((0, 4),)),
     (7, 2), 2),
    ("1d_depthwise_multiplier_2", jbp.conv(6, 3, groups=3), (6, 3), 2),
    ("1d_kernel_1", jbp.conv(4, 1, stride=2), (5, 3), 2),
    ("1d_kernel_is_the_input", jbp.conv(3, 5, padding="VALID"), (5, 2), 3),
    ("2d_valid_dilated_stride_leaves_rows", jbp.conv(3, (2, 3), stride=(3, 2), dilation=(2, 1),
                                                     padding="VALID"), (9, 8, 2), 2),
    ("2d_asymmetric_groups", jbp.conv(4, (3, 1), padding=((2, 0), (1, 3)), groups=2), (4, 5, 4), 2),
    ("2d_depthwise_strided", jbp.conv(3, 3, stride=(1, 2), groups=3), (5, 6, 3), 2),
    ("2d_batch_of_one_odd", jbp.conv(5, (5, 3), padding=1), (5, 3, 1), 1),
]


@pytest.mark.parametrize("layer,in_shape,batch", [c[1:] for c in CONV_CASES],
                         ids=[c[0] for c in CONV_CASES])
def test_conv_backward_equals_vjp(layer, in_shape, batch):
    """float64 (≤ 1e-12); test_check_layer covers float32 (≤ 1e-5) on the hardest cases."""
    with jax.enable_x64(True):
        _assert_backward_equals_vjp(layer, in_shape, jnp.float64, batch)


POOL_CASES = [
    ("max_1d_odd_size", jbp.max_pool(2), (7, 2)),
    ("max_1d_overlapping", jbp.max_pool(3, 1), (6, 2)),
    ("max_2d_same", jbp.max_pool((2, 3), (1, 2), "SAME"), (5, 7, 2)),
    ("max_2d_asymmetric_pairs", jbp.max_pool((3, 2), padding=((1, 1), (0, 1))), (4, 5, 1)),
    ("avg_2d_valid", jbp.avg_pool(2), (5, 4, 2)),
    ("avg_1d_overlapping_same", jbp.avg_pool(3, 1, "SAME"), (6, 2)),
    ("avg_2d_asymmetric_pairs", jbp.avg_pool(2, 1, ((1, 0), (0, 1))), (3, 3, 2)),
    ("global_1d", jbp.global_avg_pool(), (7, 3)),
]


@pytest.mark.parametrize("layer,in_shape", [c[1:] for c in POOL_CASES],
                         ids=[c[0] for c in POOL_CASES])
def test_pool_backward_equals_vjp(layer, in_shape):
    """float64 (≤ 1e-12); test_check_layer covers float32 for each kind of pooling."""
    with jax.enable_x64(True):
        _assert_backward_equals_vjp(layer, in_shape, jnp.float64)


@settings(max_examples=6)
@given(data=st.data())
def test_random_conv_geometries(data):
    """Random 1-D and 2-D geometries in float64 (the draws shrink to a failing one)."""
    n = data.draw(st.sampled_from([1, 2]), "spatial axes")
    groups = data.draw(st.sampled_from([1, 2]), "groups")
    axes = st.lists(st.integers(1, 3), min_size=n, max_size=n).map(tuple)
    kernel, stride, dilation = (data.draw(axes, what) for what in ("kernel", "stride", "dilation"))
    padding = data.draw(st.one_of(st.sampled_from(["SAME", "VALID"]), st.integers(0, 3),
                                  st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)),
                                           min_size=n, max_size=n).map(tuple)), "padding")
    size = tuple(data.draw(st.integers(d * (k - 1) + 1, 7), "size")
                 for k, d in zip(kernel, dilation))  # fits even unpadded
    layer = jbp.conv(2 * groups, kernel, stride=stride, padding=padding, dilation=dilation,
                     groups=groups)
    with jax.enable_x64(True):
        _assert_backward_equals_vjp(layer, (*size, 2 * groups), jnp.float64,
                                    data.draw(st.integers(1, 3), "batch"))


@st.composite
def cnns(draw):
    """A random CNN: 1–3 blocks of conv (random channels, kernel, stride, padding), an
    activation, maybe batch norm, maybe a pool, each block maybe residual (then shape-keeping);
    a global average pool and a dense head. Returns (model, per-example input shape)."""
    n = draw(st.sampled_from([1, 2]), "spatial axes")
    channels = in_channels = draw(st.integers(1, 3), "input channels")
    size = draw(st.integers(4, 7), "size")
    layers = []
    for _ in range(draw(st.integers(1, 3), "blocks")):
        act = draw(st.sampled_from([jbp.relu(), jbp.tanh(), jbp.gelu()]), "activation")
        if draw(st.booleans(), "residual"):
            block = [jbp.conv(channels, draw(st.integers(1, 3), "kernel"), dtype=jnp.float64), act]
            if draw(st.booleans(), "batch norm"):
                block.append(jbp.batch_norm(dtype=jnp.float64))
            layers.append(jbp.residual(jbp.serial(*block)))
            continue
        channels = draw(st.integers(1, 4), "channels")
        layers += [jbp.conv(channels, draw(st.integers(1, 3), "kernel"),
                            stride=draw(st.integers(1, 2), "stride"),
                            padding=draw(st.sampled_from(["SAME", "VALID", 1]), "padding"),
                            dtype=jnp.float64), act]
        if draw(st.booleans(), "batch norm"):
            layers.append(jbp.batch_norm(dtype=jnp.float64))
        pool = draw(st.sampled_from([None, jbp.max_pool, jbp.avg_pool]), "pool")
        if pool is not None:
            layers.append(pool(2, 1, "SAME"))
    layers += [jbp.global_avg_pool(), jbp.dense(3, dtype=jnp.float64)]
    return jbp.serial(*layers), (size,) * n + (in_channels,)


@settings(max_examples=4)
@given(problem=cnns(), seed=st.integers(0, 2**16))
def test_random_cnns_manual_equals_autodiff_and_central_differences(problem, seed):
    """Random CNN architectures in float64, batch norm in training mode: backprop's loss,
    grads and deltas == jax.grad's (the deltas as gradients with respect to a zero added to
    every layer's output, ≤ 1e-12), the new state identical, and == central differences."""
    model, in_shape = problem
    with jax.enable_x64(True):
        try:
            _, params = model.init(jax.random.key(seed), in_shape)
        except ValueError as err:  # only a kernel larger than a VALID-padded input is drawn away
            assert "larger than" in str(err), err
            return
        rng = np.random.default_rng(seed)
        x = jnp.asarray(rng.normal(size=(3, *in_shape)))
        y = jnp.asarray(rng.integers(0, 3, 3))
        kw = {"train": True, "state": model.init_state(in_shape)} if model.stateful else {}

        def cost(params, offsets):  # each layer's output plus a zero: ∂C/∂offset_i = delta_i
            a, state = x, kw.get("state", ({},) * len(model.layers))
            for layer, p, s, e in zip(model.layers, params, state, offsets):
                a = jbp.layer.run(layer, p, a, train=True, state=s)[0] + e
            return CE.value(a, y)

        @jax.jit
        def witnesses(params):
            value, grads, deltas = jbp.backprop(model, CE, params, x, y, **kw)
            zeros = tuple(jnp.zeros_like(d) for d in deltas)
            ref_value, (ref_grads, ref_deltas) = jax.value_and_grad(cost, (0, 1))(params, zeros)
            fd = jbp.numerical_value_and_grad(model, CE)(params, x, y, **kw)[1]
            return value, grads, deltas, ref_value, ref_grads, ref_deltas, fd

        value, grads, deltas, ref_value, ref_grads, ref_deltas, fd = witnesses(params)
        if model.stateful:
            value = value[0]
        assert abs(float(value) - float(ref_value)) <= 1e-12 * abs(float(ref_value))
        assert rel_err(deltas, ref_deltas) <= 1e-12
        assert rel_err(grads, ref_grads) <= 1e-12 and rel_err(grads, fd) <= 1e-5


# ---------------------------------------------------------------------------- forwards

def test_conv_forward_is_the_lecture_formula():
    """z[o] = Σ_j a[o·s + j·d − lo]·W[j] + b, group by group, by loops in numpy."""
    s, d, (lo, hi), groups = 2, 2, (1, 3), 2
    layer = jbp.conv(4, 3, stride=s, dilation=d, padding=((lo, hi),), groups=groups)
    with jax.enable_x64(True):
        params, x, _ = _case(layer, (8, 4), jnp.float64)
        z = np.asarray(layer.apply(params, x))
    W, b, a = np.asarray(params["W"]), np.asarray(params["b"]), np.asarray(x)
    a_pad = np.pad(a, ((0, 0), (lo, hi), (0, 0)))
    c_group, o_group = W.shape[1], W.shape[2] // groups
    want = np.zeros(z.shape)
    for o in range(z.shape[1]):
        for out in range(W.shape[2]):
            g = out // o_group
            for j in range(W.shape[0]):
                want[:, o, out] += a_pad[:, o * s + j * d, g * c_group:(g + 1) * c_group] @ W[j, :, out]
    np.testing.assert_allclose(z, want + b, rtol=1e-13, atol=1e-13)


def test_same_padding_matches_lax():
    """"SAME" is worked out as lax does: out = ceil(in / stride), the smaller half in front;
    max pooling pads with −inf like lax.reduce_window."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 7, 6, 2)), jnp.float32)
    layer = jbp.conv(3, (4, 3), stride=(2, 3), dilation=(1, 2))
    _, params = layer.init(jax.random.key(0), (7, 6, 2))
    want = lax.conv_general_dilated(x, params["W"], (2, 3), "SAME", rhs_dilation=(1, 2),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC")) + params["b"]
    np.testing.assert_allclose(layer.apply(params, x), want, rtol=1e-6, atol=1e-6)
    assert want.shape[1:3] == (math.ceil(7 / 2), math.ceil(6 / 3))
    pooled = jbp.max_pool((3, 2), (2, 2), "SAME").apply({}, x)
    want = lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 2, 1), (1, 2, 2, 1), "SAME")
    np.testing.assert_array_equal(pooled, want)


def test_avg_pool_divisor_counts_only_real_inputs():
    """With padding, each window is divided by the number of real inputs it holds (padding
    is not counted): a constant input stays constant at the borders."""
    layer = jbp.avg_pool(3, 1, "SAME")
    np.testing.assert_allclose(layer.apply({}, jnp.full((1, 4, 5, 2), 7.0)), 7.0, rtol=1e-6)
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    y = layer.apply({}, x)
    assert y[0, 0, 0, 0] == (0 + 1 + 4 + 5) / 4  # the corner window holds 4 real inputs
    assert y[0, 1, 1, 0] == jnp.mean(x[0, :3, :3, 0])  # an inner one holds 9
    (_, dx), _ = vjp_pair(layer, {}, x, jnp.ones_like(y))
    assert dx[0, 0, 0, 0] == pytest.approx(1 / 4 + 2 / 6 + 1 / 9)  # its share of each window


def test_global_avg_pool_is_the_mean_over_positions():
    x = jnp.arange(24.0).reshape(2, 3, 2, 2)
    y, cache, _ = jbp.global_avg_pool().forward({}, x)
    np.testing.assert_array_equal(y, x.mean(axis=(1, 2)))
    _, dx = jbp.global_avg_pool().backward({}, cache, jnp.ones((2, 2)))
    np.testing.assert_array_equal(dx, jnp.full(x.shape, 1 / 6))


# ---------------------------------------------------------------------------- max-pool ties

def _routes(layer, x, dy):
    (_, dx), (_, dx_ref) = vjp_pair(layer, {}, x, dy)
    return np.asarray(dx), np.asarray(dx_ref)


def test_max_pool_ties_go_to_the_first_maximum_as_jax_grad():
    """An all-equal window (zeros after a ReLU) gives its whole delta to its first input in
    row-major order, as jax.grad does (not shared, as jbp.maxout shares ties)."""
    x = jnp.zeros((1, 4, 4, 1))
    dy = jnp.arange(1.0, 5.0).reshape(1, 2, 2, 1)
    dx, dx_ref = _routes(jbp.max_pool(2), x, dy)
    want = np.zeros((4, 4))
    want[0, 0], want[0, 2], want[2, 0], want[2, 2] = 1, 2, 3, 4
    np.testing.assert_array_equal(dx[0, :, :, 0], want)
    np.testing.assert_array_equal(dx, dx_ref)
    # Overlapping windows: every window a tied input wins first adds its delta to it.
    x = jnp.asarray([1.0, 3, 3, 1, 3, 3]).reshape(1, 6, 1)
    dx, dx_ref = _routes(jbp.max_pool(3, 1), x, jnp.arange(1.0, 5.0).reshape(1, 4, 1))
    np.testing.assert_array_equal(dx[0, :, 0], [0, 1 + 2, 3, 0, 4, 0])
    np.testing.assert_array_equal(dx, dx_ref)
    # Row-major order in 2-D: (0, 1) comes before (1, 0).
    x = jnp.asarray([[0.0, 1], [1, 0]]).reshape(1, 2, 2, 1)
    dx, dx_ref = _routes(jbp.max_pool(2), x, jnp.ones((1, 1, 1, 1)))
    np.testing.assert_array_equal(dx[0, :, :, 0], [[0, 1], [0, 0]])
    np.testing.assert_array_equal(dx, dx_ref)


@pytest.mark.parametrize("layer,in_shape", [
    (jbp.max_pool(3, 1, "SAME"), (9, 2)),
    (jbp.max_pool(3, 1, "SAME"), (5, 6, 2)),
    (jbp.max_pool((2, 3), (1, 2), ((1, 1), (2, 0))), (6, 7, 1)),
], ids=["1d_same_overlapping", "2d_same_overlapping", "2d_asymmetric_strided"])
def test_max_pool_routes_exactly_as_jax_grad(layer, in_shape):
    """Inputs from {-1, 0, 1} (ties everywhere) with NaN and ±inf sprinkled in, padding
    that takes part as −inf: the same routing, bit for bit (integer deltas add exactly)."""
    rng = np.random.default_rng(0)
    for _ in range(4):
        x = rng.integers(-1, 2, size=(3, *in_shape)).astype(np.float32)
        u = rng.random(x.shape)
        x[u < 0.1], x[(u > 0.1) & (u < 0.2)], x[(u > 0.2) & (u < 0.25)] = np.nan, -np.inf, np.inf
        out_shape, _ = layer.init(None, in_shape)
        dy = jnp.asarray(rng.integers(1, 9, size=(3, *out_shape)), jnp.float32)
        dx, dx_ref = _routes(layer, jnp.asarray(x), dy)
        np.testing.assert_array_equal(dx, dx_ref)


# ---------------------------------------------------------------------------- a small CNN

def _cnn(dtype=jnp.float32):
    """conv -> relu -> max_pool -> conv -> relu -> global_avg_pool -> dense, on (6, 6, 2)."""
    return jbp.serial(jbp.conv(4, 3, dtype=dtype), jbp.relu(), jbp.max_pool(2),
                      jbp.conv(4, 3, stride=2, groups=2, dtype=dtype), jbp.relu(),
                      jbp.global_avg_pool(), jbp.dense(3, dtype=dtype))


def _cnn_data(batch=5, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(batch, 6, 6, 2))), jnp.asarray(rng.integers(0, 3, batch)))


def test_cnn_manual_equals_autodiff_equals_central_differences():
    with jax.enable_x64(True):
        model = _cnn(jnp.float64)
        _, params = model.init(jax.random.key(0), (6, 6, 2))
        x, y = _cnn_data()

        deltas = assert_three_witnesses_agree(model, CE, params, x, y)
        assert [d.shape for d in deltas] == [(5, 6, 6, 4), (5, 6, 6, 4), (5, 3, 3, 4),
                                            (5, 2, 2, 4), (5, 2, 2, 4), (5, 4), (5, 3)]


def test_cnn_per_example_grads_and_norms_equal_vmap_grad():
    """The first conv takes the formed path (P² = 1296 ≥ K·O = 18·4), the second the Gram
    path (P² = 16 < K·O/G = 18·2)."""
    assert not convmod.gram_is_cheaper(convmod.window((6, 6), 3, 1, 1, "SAME", ""), 2, 4, 1)
    assert convmod.gram_is_cheaper(convmod.window((3, 3), 3, 2, 1, "SAME", ""), 4, 4, 2)
    with jax.enable_x64(True):
        model = _cnn(jnp.float64)
        _, params = model.init(jax.random.key(1), (6, 6, 2))
        x, y = _cnn_data(seed=1)

        @jax.jit
        def both(params):
            ref = jax.vmap(jax.grad(lambda p, xi, yi: CE.value(model.apply(p, xi[None]), yi[None])),
                           in_axes=(None, 0, 0))(params, x, y)
            ref_norms = jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1)
                                     for g in jax.tree_util.tree_leaves(ref)))
            return (ref, ref_norms, jbp.per_example_grads(model, CE)(params, x, y),
                    jbp.per_example_grad_norms(model, CE)(params, x, y))

        ref, ref_norms, grads, norms = both(params)
        assert rel_err(grads, ref) <= 1e-12
        assert rel_err(norms, ref_norms) <= 1e-12


GEOMETRIES = [  # (in_size, channels, out, kernel, stride, dilation, padding, groups)
    ((6, 5), 4, 6, 3, 2, 1, "SAME", 2),
    ((7,), 3, 6, 2, 3, 2, ((2, 0),), 3),
    ((5, 6), 2, 4, (3, 2), 1, (1, 2), 1, 1),
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["2d_groups", "1d_depthwise", "2d_dilated"])
def test_sq_norm_paths_agree(geometry):
    """Gram path == formed path == Σ(∂ℓ_i/∂θ)², and the per-example kernel gradients (one
    convolution, every example its own group) == the batch kernel gradient of each example
    alone."""
    in_size, c, out, kernel, stride, dilation, padding, groups = geometry
    geo = convmod.window(in_size, kernel, stride, dilation, padding, "test")

    @jax.jit
    def all_ways(a, delta):
        per_example = convmod.per_example_kernel_grads(a, delta, geo, groups)
        alone = jnp.stack([convmod.kernel_grad(a[i:i + 1], delta[i:i + 1], geo, groups)
                           for i in range(3)])
        squares = (jnp.sum(per_example.reshape(3, -1) ** 2, axis=1)
                   + jnp.sum(jnp.sum(delta, axis=tuple(range(1, delta.ndim - 1))) ** 2, axis=1))
        return (per_example, alone, squares,
                convmod.per_example_sq_norms(a, delta, geo, groups, path="gram"),
                convmod.per_example_sq_norms(a, delta, geo, groups, path="formed"))

    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        a = jnp.asarray(rng.normal(size=(3, *in_size, c)))
        delta = jnp.asarray(rng.normal(size=(3, *geo.out_size, out)))
        per_example, alone, squares, gram, formed = all_ways(a, delta)
    assert rel_err(per_example, alone) <= 1e-13
    assert rel_err(gram, squares) <= 1e-13 and rel_err(formed, squares) <= 1e-13


# ---------------------------------------------------------------------------- dtypes, values

def _mixed(layer, params, x):
    y, cache, _ = layer.forward(params, x)
    dparams, dx = layer.backward(params, cache, jnp.ones_like(y))
    _, vjp = jax.vjp(lambda p: layer.apply(p, x), params)
    pools = [pool.backward({}, *pool.forward({}, x)[1::-1])[1] for pool in (
        jbp.max_pool(2), jbp.avg_pool(2, padding="SAME"), jbp.global_avg_pool())]
    return y, dparams, dx, vjp(jnp.ones_like(y))[0], pools


@pytest.mark.parametrize("p_dtype,x_dtype", [(jnp.float32, jnp.float64),
                                             (jnp.bfloat16, jnp.float32),
                                             (jnp.float32, jnp.uint8)],
                         ids=["float32_params_float64_x", "bfloat16_params", "uint8_images"])
def test_gradients_come_in_the_params_and_inputs_dtypes(p_dtype, x_dtype):
    """Computed in the promoted dtype; dparams in the params' dtype, dx in x's (an integer
    input's dx stays float); pools take integer images as floats."""
    with jax.enable_x64(True):
        layer = jbp.conv(3, 2, stride=2, dtype=p_dtype)
        _, params = layer.init(jax.random.key(0), (5, 4, 2))
        x = jnp.asarray(np.random.default_rng(0).integers(0, 9, (2, 5, 4, 2)), x_dtype)
        y, dparams, dx, reference, pools = jax.jit(_mixed, static_argnums=0)(layer, params, x)
        promoted = jnp.result_type(p_dtype, x_dtype)
    assert y.dtype == promoted
    assert dparams["W"].dtype == p_dtype and dparams["b"].dtype == p_dtype
    assert dx.dtype == (x_dtype if x_dtype != jnp.uint8 else y.dtype)
    assert rel_err(dparams, reference) <= 1e-6
    assert all(d.shape == x.shape and jnp.issubdtype(d.dtype, jnp.floating) for d in pools)


def test_layers_are_values():
    assert jbp.conv(8, 3, stride=2) == jbp.conv(8, 3, stride=2)
    assert hash(jbp.max_pool(2)) == hash(jbp.max_pool(2)) and jbp.max_pool(2) != jbp.avg_pool(2)
    assert repr(jbp.conv(8, (3, 3), padding="VALID", groups=2)) == \
        "conv(8, (3, 3), padding='VALID', groups=2)"
    assert repr(jbp.global_avg_pool()) == "global_avg_pool()"


# ---------------------------------------------------------------------------- bad input

KEY = jax.random.key(0)
_SHAPE = jax.ShapeDtypeStruct  # errors are raised while tracing: eval_shape finds them, no compile


def _apply_to(layer, in_shape, x_shape):
    """``layer.apply`` on an input of ``x_shape``, traced only, with params built for ``in_shape``."""
    _, params = layer.init(KEY, in_shape)
    return lambda: jax.eval_shape(layer.apply, params, _SHAPE(x_shape, jnp.float32))


BAD = [  # (id, what raises, the message it must carry)
    ("kernel_larger_than_input", lambda: jbp.conv(4, 5, padding="VALID").init(KEY, (4, 2)),
     r"conv\(4, 5, padding='VALID'\): the kernel \(5 taps\) is larger than the padded input "
     r"along W \(4 \+ 0 \+ 0 = 4 rows\)"),
    ("dilated_kernel_larger_than_padded_input",
     lambda: jbp.conv(4, 3, dilation=3, padding=1).init(KEY, (6, 4, 2)),
     r"the kernel \(3 taps with dilation 3: 7 rows\) is larger than the padded input along W "
     r"\(4 \+ 1 \+ 1 = 6 rows\)"),
    ("kernel_larger_than_a_later_input",
     _apply_to(jbp.conv(4, 3, padding="VALID"), (6, 6, 2), (1, 2, 6, 2)),
     r"the kernel \(3 taps\) is larger than the padded input along H \(2 \+ 0 \+ 0 = 2 rows\)"),
    ("channels_not_divisible_by_groups", lambda: jbp.conv(4, 3, groups=2).init(KEY, (6, 3)),
     r"conv\(4, 3, groups=2\): the input's 3 channels must be divisible by groups=2"),
    ("out_channels_not_divisible_by_groups", lambda: jbp.conv(3, 3, groups=2),
     r"out_channels \(3\) must be divisible by groups \(2\)"),
    ("2d_conv_given_1d_input", _apply_to(jbp.conv(4, (3, 3)), (6, 6, 2), (2, 6, 2)),
     r"conv\(4, \(3, 3\)\): a 2-D convolution expects input \(batch, H, W, C\), got shape "
     r"\(2, 6, 2\)"),
    ("2d_kernel_for_1d_input", lambda: jbp.conv(4, (3, 3)).init(KEY, (6, 2)),
     r"conv\(4, \(3, 3\)\): kernel size \(3, 3\) has 2 entries, but the input has 1 spatial "
     r"axis \(W\)"),
    ("wrong_input_channels", _apply_to(jbp.conv(4, (3, 3)), (6, 6, 2), (2, 6, 6, 3)),
     r"expected 2 input channels \(W has shape \(3, 3, 2, 4\), groups=1\), got input of shape "
     r"\(2, 6, 6, 3\)"),
    ("no_spatial_axis", lambda: jbp.conv(4, 3).init(KEY, (6,)),
     r"expects a per-example input \(W, C\) for a 1-D or \(H, W, C\) for a 2-D convolution, "
     r"got \(6,\)"),
    ("3d_input", lambda: jbp.conv(4, 3).init(KEY, (2, 3, 6, 2)),
     r"for a 2-D convolution, got \(2, 3, 6, 2\)"),
    ("stride_0", lambda: jbp.conv(4, 3, stride=0), r"conv: stride must be ≥ 1, got 0"),
    ("kernel_size_0", lambda: jbp.conv(4, 0), r"conv: kernel_size must be ≥ 1, got 0"),
    ("kernel_size_negative", lambda: jbp.conv(4, (3, -1)),
     r"conv: every entry of kernel_size must be ≥ 1, got \(3, -1\)"),
    ("dilation_0", lambda: jbp.conv(4, 3, dilation=0), r"conv: dilation must be ≥ 1, got 0"),
    ("kernel_size_3d", lambda: jbp.conv(4, (3, 3, 3)),
     r"kernel_size must be an int or a tuple of 1 or 2 ints"),
    ("tuple_lengths_disagree", lambda: jbp.conv(4, (3, 3), stride=(1,)),
     r"given as tuples must have one length"),
    ("stride_of_wrong_length", lambda: jbp.conv(4, 3, stride=(1, 2)).init(KEY, (6, 2)),
     r"stride \(1, 2\) has 2 entries, but the input has 1 spatial axis"),
    ("unknown_padding_string", lambda: jbp.conv(4, 3, padding="same!"),
     r"got the unknown string 'same!'"),
    ("negative_padding", lambda: jbp.conv(4, 3, padding=-1), r"conv: padding must be ≥ 0, got -1"),
    ("padding_not_pairs", lambda: jbp.conv(4, 3, padding=((1, 2, 3),)),
     r"one \(lo, hi\) pair of ints per spatial axis"),
    ("out_channels_0", lambda: jbp.conv(0, 3), r"conv: out_channels must be a positive int, got 0"),
    ("groups_0", lambda: jbp.conv(4, 3, groups=0), r"conv: groups must be a positive int, got 0"),
    ("pool_window_0", lambda: jbp.max_pool(0), r"max_pool: window must be ≥ 1, got 0"),
    ("pool_stride_0", lambda: jbp.avg_pool(2, stride=(1, 0)),
     r"avg_pool: every entry of stride must be ≥ 1"),
    ("pool_unknown_padding", lambda: jbp.max_pool(2, padding="FULL"),
     r"max_pool: padding .* unknown string 'FULL'"),
    ("pool_window_larger_than_input", lambda: jbp.max_pool(5).init(KEY, (4, 2)),
     r"max_pool\(5\): the window \(5 rows\) is larger than the padded input along W \(4 \+ 0 \+ 0"),
    ("pool_window_larger_than_a_later_input",
     lambda: jax.eval_shape(jbp.max_pool(3).apply, {}, _SHAPE((3, 2, 4, 2), jnp.float32)),
     r"the window \(3 rows\) is larger than the padded input along H \(2 \+ 0 \+ 0 = 2 rows\)"),
    ("pool_2d_window_for_1d_input", lambda: jbp.avg_pool((2, 2)).init(KEY, (4, 2)),
     r"avg_pool\(\(2, 2\)\): a 2-D window \(2, 2\) needs a per-example input \(H, W, C\), got "
     r"shape \(4, 2\)"),
    ("pool_2d_window_given_1d_input",
     lambda: jax.eval_shape(jbp.max_pool((2, 2)).apply, {}, _SHAPE((3, 4, 2), jnp.float32)),
     r"a 2-D window \(2, 2\) needs input \(batch, H, W, C\), got shape \(3, 4, 2\)"),
    ("pool_padding_not_smaller_than_window", lambda: jbp.max_pool(2, padding=2).init(KEY, (4, 2)),
     r"padding \(2, 2\) along W must be smaller than the window \(2\)"),
    ("pool_no_spatial_axis",
     lambda: jax.eval_shape(jbp.max_pool(2).apply, {}, _SHAPE((3, 4), jnp.float32)),
     r"max_pool\(2\): expects input \(batch, W, C\) or \(batch, H, W, C\), got shape \(3, 4\)"),
    ("global_pool_no_spatial_axis", lambda: jbp.global_avg_pool().init(KEY, (4,)),
     r"global_avg_pool: expects a per-example input \(\.\.\., C\) with at least one"),
    ("global_pool_given_2d_batch",
     lambda: jax.eval_shape(jbp.global_avg_pool().apply, {}, _SHAPE((3, 4), jnp.float32)),
     r"global_avg_pool: expects input \(batch, \.\.\., C\) with at least one spatial axis"),
]


@pytest.mark.parametrize("make,match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_gets_a_clear_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_conv_params_of_another_layer_are_refused():
    with pytest.raises(TypeError, match=r"conv\(4, 3\): params must be a dict with keys "
                                        r"\['W', 'b'\], got tuple"):
        jax.eval_shape(jbp.conv(4, 3).apply, (), _SHAPE((2, 6, 2), jnp.float32))


def test_second_order_through_the_hand_written_backward():
    """The backward is jax.numpy and lax all the way down, so JAX differentiates it: the
    custom_vjp bridge passes check_grads at order 2, and hvp (jax.jvp of the manual
    gradient) equals JAX's own Hessian-vector product."""
    from jax.test_util import check_grads

    with jax.enable_x64(True):
        model = jbp.serial(jbp.conv(3, 3, stride=2, dtype=jnp.float64), jbp.tanh(),
                           jbp.max_pool(2, 1, "SAME"), jbp.avg_pool(2),
                           jbp.conv(2, 2, groups=1, dtype=jnp.float64), jbp.global_avg_pool(),
                           jbp.dense(3, dtype=jnp.float64))
        _, params = model.init(jax.random.key(2), (5, 5, 2))
        x, y = _cnn_data(batch=2, seed=2)
        x = x[:, :5, :5]
        apply = jbp.as_custom_vjp(model)
        check_grads(jax.jit(apply), (params, x), order=2, modes=["rev"], eps=1e-6)  # max-pool kinks
        v = jax.tree_util.tree_map(jnp.ones_like, params)

        @jax.jit
        def both(params, v):
            exact = jax.jvp(jax.grad(lambda p: CE.value(model.apply(p, x), y)), (params,), (v,))[1]
            return jbp.hvp(model, CE)(params, x, y, v), exact

        hv, exact = both(params, v)
    assert rel_err(hv, exact) <= 1e-12


def test_gram_path_norms_are_never_negative_and_as_accurate_as_vmap_grad():
    """conv(16, 1, VALID) on 2 positions whose contributions nearly cancel (x₂ ≈ x₁, δ₂ ≈ −δ₁,
    so ∂ℓ_i/∂W = x₁δ₁ᵀ + x₂δ₂ᵀ is ~1e-4 of its terms): the Gram sum alone cancels to noise,
    negative for some examples (NaN norms, a NaN clipped mean). The norms must be finite and
    as close to float64 as vmap(grad)'s float32 norms."""
    rng = np.random.default_rng(0)
    layer, mse = jbp.conv(16, 1, padding="VALID"), jbp.losses.mean_squared_error
    _, params = layer.init(jax.random.key(0), (2, 8))
    x = rng.normal(size=(32, 2, 8))
    x[:, 1] = x[:, 0] * (1 + 1e-4 * rng.normal(size=(32, 8)))
    y = np.asarray(layer.apply(params, jnp.asarray(x, jnp.float32)), np.float64)
    r = rng.normal(size=(32, 16))
    y[:, 0] -= r
    y[:, 1] += r * (1 + 1e-4 * rng.normal(size=(32, 16)))  # residuals, so δ, nearly cancel
    x32, y32 = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    geo = convmod.window((2,), (1,), (1,), (1,), "VALID", "conv")
    assert convmod.gram_is_cheaper(geo, 8, 16, 1)
    got = np.asarray(jax.jit(jbp.per_example_grad_norms(layer, mse))(params, x32, y32), np.float64)

    def norm_by_grad(xi, yi):
        g = jax.grad(lambda p: mse.value(layer.apply(p, xi[None]), yi[None]))(params)
        return jnp.sqrt(sum(jnp.sum(leaf ** 2) for leaf in jax.tree_util.tree_leaves(g)))

    by_vmap = np.asarray(jax.jit(jax.vmap(norm_by_grad))(x32, y32), np.float64)
    with jax.enable_x64(True):
        exact = np.asarray(jax.jit(jbp.per_example_grad_norms(layer, mse))(
            *cast((params, x32, y32), jnp.float64)))
    assert np.all(np.isfinite(got))
    err, vmap_err = np.abs(got - exact) / exact, np.abs(by_vmap - exact) / exact
    assert np.max(err) <= 2 * np.max(vmap_err) + 1e-6, (np.max(err), np.max(vmap_err))
    clipped, _ = jbp.clipped_grad_mean(layer, mse, 1.0)(params, x32, y32)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(clipped))


@pytest.mark.parametrize("in_size, kernel, stride, dilation, padding", [
    ((7, 6), (3, 2), (2, 3), (1, 2), ((1, 2), (0, 3))),  # strides skip rows at the back
    ((6, 5), 2, 1, 2, "SAME"),                             # dilated, stride 1
    ((9,), 3, 2, 1, "VALID"),                              # 1-D (conv uses the convolution)
])
def test_kernel_grad_per_tap_equals_the_convolution_form(in_size, kernel, stride, dilation,
                                                         padding):
    """The two forms of ∂C/∂W (one product per tap in a scan; one convolution of the input
    with the delta) agree in float64 on geometries with stride, dilation and asymmetric
    padding; kernel_grad picks the taps for 2-D kernels of one group."""
    geo = convmod.window(in_size, kernel, stride, dilation, convmod.padding_arg(padding, "test"),
                         "test")
    with jax.enable_x64(True):
        rng = np.random.default_rng(len(in_size))
        a = jnp.asarray(rng.normal(size=(3, *in_size, 4)))
        delta = jnp.asarray(rng.normal(size=(3, *geo.out_size, 5)))
        taps = jax.jit(lambda a, d: convmod.kernel_grad_by_taps(a, d, geo))(a, delta)
        conv = jax.jit(lambda a, d: convmod.kernel_grad_by_conv(a, d, geo, 1))(a, delta)
        assert taps.shape == (*geo.size, 4, 5)
        assert rel_err(taps, conv) <= 1e-12
        jaxpr = jax.make_jaxpr(lambda a, d: convmod.kernel_grad(a, d, geo, 1))(a, delta)
    assert any(e.primitive.name == "scan" for e in jaxpr.eqns) == (len(in_size) > 1)
