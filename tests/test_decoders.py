"""The decoder layers: conv_transpose, upsample and global_max_pool. Each hand-written
backward against jax.vjp (check_layer, float64 ≤ 1e-12 and float32 ≤ 1e-5) and, in a small
decoder, central differences; conv_transpose against jax.lax.conv_transpose, PyTorch's output
size rule and the adjoint of conv over random geometries; upsample against jax.image.resize
and the transpose of its vjp; global_max_pool's ties; bad input.

Compiles dominate: shapes are tiny, each random geometry is one jitted call.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax import lax

import jbp
from conftest import rel_err
from reference_models import assert_three_witnesses_agree

SPATIAL = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}


# ---------------------------------------------------------------------------- check_layer

CHECKED = [
    # 4 positions, P² = 16 < K·O/G = 24: the per-example squared norms take the Gram path
    ("conv_transpose_2d_every_option",
     jbp.conv_transpose(6, (3, 2), stride=(2, 3), padding=((1, 2), (0, 1)),
                        output_padding=(1, 2), dilation=(2, 1), groups=3), (2, 2, 6)),
    ("upsample_2d_linear", jbp.upsample((2, 3), "linear"), (3, 2, 2)),
    ("global_max_pool", jbp.global_max_pool(), (3, 2, 2)),  # zeros: every position tied
]


@pytest.mark.parametrize("layer,in_shape", [c[1:] for c in CHECKED], ids=[c[0] for c in CHECKED])
def test_check_layer(layer, in_shape):
    """jax.vjp in float64 (1e-12) and float32 (1e-5) at random, zero and large inputs, a batch
    of one and random params; examples kept apart; the per-example rule's gradients, squared
    norms and sums of squares against jax.vjp with one example's cotangent."""
    report = jbp.check_layer(layer, in_shape)
    assert report.ok, str(report)


# ---------------------------------------------------------------------------- conv_transpose

def torch_out_size(n, k, s, d, padding, op):
    """PyTorch's ConvTranspose rule ((lo, hi) pairs for its symmetric p), and
    lax.conv_transpose's for "SAME" and "VALID"."""
    if padding == "SAME":
        return n * s
    if padding == "VALID":
        return n * s + max(d * (k - 1) + 1 - s, 0)
    lo, hi = padding
    return (n - 1) * s - lo - hi + d * (k - 1) + op + 1


def _lax_reference(x, W, stride, dilation, pads, groups):
    """lax.conv_transpose group by group (it takes no groups): the transpose of the
    convolution whose kernel W is (*k, O/G, C), with PyTorch's padding meaning."""
    dn = SPATIAL[W.ndim - 2]
    c = W.shape[-1] // groups
    return jnp.concatenate([
        lax.conv_transpose(x[..., g * c:(g + 1) * c], W[..., g * c:(g + 1) * c], stride, pads,
                           rhs_dilation=dilation, dimension_numbers=dn, transpose_kernel=True,
                           use_consistent_padding=not isinstance(pads, str))
        for g in range(groups)], axis=-1)


def _witnesses(layer, conv, params, x, dy, z, lax_args):
    """The manual backward and jax.vjp; lax's forward; ⟨conv(z), x⟩ and ⟨z, conv_transpose(x)⟩."""
    y, cache, _ = layer.forward(params, x)
    manual = layer.backward(params, cache, dy)
    _, vjp = jax.vjp(layer.apply, params, x)
    ref = _lax_reference(x, params["W"], *lax_args) + params["b"]
    adjoint = (None if conv is None else
               (jnp.vdot(conv.apply({"W": params["W"]}, z), x), jnp.vdot(z, y - params["b"])))
    return y, manual, vjp(dy), ref, adjoint


witnesses = jax.jit(_witnesses, static_argnums=(0, 1, 6))


@settings(max_examples=6)
@given(data=st.data())
def test_random_geometries_against_lax_pytorch_and_the_adjoint_of_conv(data):
    """Random 1-D and 2-D geometries in float64: the output size is PyTorch's (lax's for
    "SAME"/"VALID"), the forward is lax.conv_transpose's, the backward jax.vjp's (≤ 1e-12),
    and conv with the same W is its adjoint, ⟨conv(z), x⟩ = ⟨z, conv_transpose(x)⟩."""
    n = data.draw(st.sampled_from([1, 2]), "spatial axes")
    groups = data.draw(st.sampled_from([1, 2]), "groups")
    axes = st.lists(st.integers(1, 3), min_size=n, max_size=n).map(tuple)
    kernel, stride, dilation = (data.draw(axes, what) for what in ("kernel", "stride", "dilation"))
    padding = data.draw(st.one_of(
        st.sampled_from(["SAME", "VALID"]), st.integers(0, 3),
        st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=n, max_size=n)
        .map(tuple)), "padding")
    output_padding = tuple(0 if isinstance(padding, str) else
                           data.draw(st.sampled_from([max(s, d) - 1, 0]), "output_padding")
                           for s, d in zip(stride, dilation))
    size = tuple(data.draw(st.integers(1, 4), "size") for _ in range(n))
    pairs = padding if isinstance(padding, (str, tuple)) else ((padding, padding),) * n
    want = tuple(torch_out_size(*args, pairs if isinstance(pairs, str) else pairs[i],
                                output_padding[i])
                 for i, args in enumerate(zip(size, kernel, stride, dilation)))
    assume(min(want) >= 1)  # padding that leaves no output is refused: test_bad_input
    c_in, c_out = groups * data.draw(st.integers(1, 2), "in"), groups * data.draw(
        st.integers(1, 2), "out")
    with jax.enable_x64(True):
        layer = jbp.conv_transpose(c_out, kernel, stride=stride, padding=padding,
                                   output_padding=output_padding, dilation=dilation,
                                   groups=groups, dtype=jnp.float64)
        out_shape, params = layer.init(jax.random.key(0), (*size, c_in))
        assert out_shape == (*want, c_out)
        # conv's geometry gives back `size` rows unless output_padding ≥ stride (dilation > stride)
        conv = None if any(op >= s for op, s in zip(output_padding, stride)) else jbp.conv(
            c_in, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
            use_bias=False, dtype=jnp.float64)
        rng = np.random.default_rng(sum(size))
        batch = data.draw(st.integers(1, 2), "batch")
        x, dy, z = (jnp.asarray(rng.normal(size=(batch, *s))) for s in
                    ((*size, c_in), out_shape, out_shape))
        lax_pads = padding if isinstance(padding, str) else tuple(
            (lo, hi - op) for (lo, hi), op in zip(pairs, output_padding))
        y, manual, reference, ref_y, adjoint = witnesses(
            layer, conv, params, x, dy, z, (stride, dilation, lax_pads, groups))
    assert rel_err(y, ref_y) <= 1e-13
    assert rel_err(manual, reference) <= 1e-12
    if adjoint is not None:
        lhs, rhs = (float(a) for a in adjoint)
        assert abs(lhs - rhs) <= 1e-12 * max(abs(rhs), 1.0)


def test_pytorch_and_lax_size_rules_by_example():
    """A few sizes worked out by hand: a 2× decoder step, output padding picking the size
    a stride-2 convolution lost, "VALID" with the kernel shorter than the stride."""
    cases = [(jbp.conv_transpose(4, 4, stride=2, padding=1), (5, 3), (10, 4)),     # 2·5
             (jbp.conv_transpose(4, 3, stride=2, padding=1), (5, 3), (9, 4)),      # 4·2 − 2 + 3
             (jbp.conv_transpose(4, 3, stride=2, padding=1, output_padding=1), (5, 3), (10, 4)),
             (jbp.conv_transpose(2, 2, stride=3, padding="VALID"), (4, 1), (12, 2)),
             (jbp.conv_transpose(2, (3, 1), stride=(2, 1)), (3, 5, 2), (6, 5, 2))]
    for layer, in_shape, out_shape in cases:
        assert jbp.layer.out_shape(layer, in_shape) == out_shape, layer
    # output padding ≥ stride, which PyTorch allows below the dilation: a row no tap reaches
    layer = jbp.conv_transpose(2, 2, padding=0, output_padding=1, dilation=2, use_bias=False)
    _, params = layer.init(jax.random.key(0), (4, 1))
    x = jnp.arange(1.0, 5.0).reshape(1, 4, 1)
    y, _ = forward_and_backward(layer, x, jnp.ones((1, 7, 2)), params)
    np.testing.assert_allclose(y, _lax_reference(x, params["W"], (1,), (2,), ((0, -1),), 1),
                               rtol=1e-6)
    np.testing.assert_array_equal(y[0, -1], [0, 0])


# ---------------------------------------------------------------------------- upsample

@functools.partial(jax.jit, static_argnums=(0, 1))
def resize_witnesses(layer, method, x, dy):
    """Ours (forward, manual backward) against jax.image.resize and the vjp of resize."""
    y, cache, _ = layer.forward({}, x)
    _, dx = layer.backward({}, cache, dy)
    ref_y, vjp = jax.vjp(lambda a: jax.image.resize(a, y.shape, method), x)
    return y, dx, ref_y, vjp(dy)[0]


@settings(max_examples=6)
@given(n=st.sampled_from([1, 2]), method=st.sampled_from(["nearest", "linear"]),
       data=st.data())
def test_upsample_is_jax_image_resize_and_its_backward_the_transpose(n, method, data):
    """float64: the forward equals jax.image.resize (nearest; linear with half-pixel
    centres, clamped edges), the hand-written backward equals jax.vjp of resize, for odd and
    even factors and sizes down to one row."""
    factor = tuple(data.draw(st.integers(1, 4), "factor") for _ in range(n))
    size = tuple(data.draw(st.integers(1, 4), "size") for _ in range(n))
    layer = jbp.upsample(factor if n == 2 else factor[0], method)
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(2, *size, 2)))
        dy = jnp.asarray(rng.normal(size=(2, *(m * f for m, f in zip(size, factor)), 2)))
        y, dx, ref_y, ref_dx = resize_witnesses(layer, method, x, dy)
    assert rel_err(y, ref_y) <= 1e-13 and rel_err(dx, ref_dx) <= 1e-12


def _forward_and_backward(layer, x, dy, params=None):
    params = {} if params is None else params
    y, cache, _ = layer.forward(params, x)
    return y, layer.backward(params, cache, dy)[1]


forward_and_backward = jax.jit(_forward_and_backward, static_argnums=0)


def test_upsample_by_hand():
    """Nearest copies, linear interpolates at (i + ½)/2 − ½: weights ¾ and ¼, the edges
    clamped; the backward sends every delta to the inputs it came from, with those weights."""
    x = jnp.asarray([[[0.0], [4.0], [8.0]]])
    dy = jnp.asarray([[[1.0], [2], [0], [0], [0], [0]]])
    y, dx = forward_and_backward(jbp.upsample(2), x, dy)
    np.testing.assert_array_equal(y[0, :, 0], [0, 0, 4, 4, 8, 8])
    np.testing.assert_array_equal(dx[0, :, 0], [3, 0, 0])
    y, dx = forward_and_backward(jbp.upsample(2, "linear"), x, dy)
    np.testing.assert_array_equal(y[0, :, 0], [0, 1, 3, 5, 7, 8])
    np.testing.assert_array_equal(dx[0, :, 0], [1 + 2 * 0.75, 2 * 0.25, 0])  # output 0 is x[0]


# ---------------------------------------------------------------------------- global max pool

def test_global_max_pool_ties_share_the_delta_as_jax_grad_of_max():
    """Per channel: all tied (a ReLU's zeros) → delta/6 each; two of six tied → half each;
    one maximum → all of it. Bit for bit jax.vjp of jnp.max, a NaN channel too."""
    x = np.zeros((1, 3, 2, 4), np.float32)
    x[0, :, :, 1] = [[1, 5], [0, 2], [-1, 5]]
    x[0, :, :, 2] = [[1, 7], [5, 2], [0, 5]]
    x[0, 0, 0, 3] = np.nan
    dy = jnp.asarray([[6.0, 2.0, 3.0, 4.0]])
    y, dx = forward_and_backward(jbp.global_max_pool(), jnp.asarray(x), dy)
    np.testing.assert_array_equal(y[0, :3], [0, 5, 7])
    np.testing.assert_array_equal(dx[0, :, :, 0], np.ones((3, 2)))
    np.testing.assert_array_equal(dx[0, :, :, 1], [[0, 1], [0, 0], [0, 1]])
    np.testing.assert_array_equal(dx[0, :, :, 2], [[0, 3], [0, 0], [0, 0]])
    assert np.isnan(y[0, 3])
    reference = jax.jit(lambda a, d: jax.vjp(lambda b: jnp.max(b, axis=(1, 2)), a)[1](d)[0])
    np.testing.assert_array_equal(dx, reference(jnp.asarray(x), dy))


# ---------------------------------------------------------------------------- a small decoder

def test_decoder_manual_equals_autodiff_and_central_differences():
    """A 1-D encoder–decoder with a skip (parallel) and every new layer: the hand-written
    backward == jax.grad (≤ 1e-12) == central differences, one delta per layer."""
    f64 = jnp.float64
    with jax.enable_x64(True):
        model = jbp.serial(
            jbp.conv(2, 3, stride=2, dtype=f64), jbp.tanh(),
            jbp.parallel(jbp.conv_transpose(2, 3, stride=2, padding=1, output_padding=1,
                                            groups=2, dtype=f64),
                         jbp.upsample(2, "linear")),
            jbp.global_max_pool(), jbp.dense(2, dtype=f64))
        _, params = model.init(jax.random.key(0), (6, 1))
        rng = np.random.default_rng(0)
        x, y = jnp.asarray(rng.normal(size=(3, 6, 1))), jnp.asarray([0, 1, 1])
        deltas = assert_three_witnesses_agree(model, jbp.losses.softmax_cross_entropy,
                                              params, x, y)
    assert [d.shape for d in deltas] == [(3, 3, 2), (3, 3, 2), (3, 6, 2), (3, 2), (3, 2)]


# ---------------------------------------------------------------------------- values, bad input

def test_layers_are_values_and_tell_fit_they_convolve():
    assert jbp.conv_transpose(4, 3, stride=2) == jbp.conv_transpose(4, 3, stride=2)
    assert jbp.conv_transpose(4, 3) != jbp.conv(4, 3)
    assert repr(jbp.conv_transpose(4, 3, stride=2, padding=1, output_padding=1)) == \
        "conv_transpose(4, 3, stride=2, padding=1, output_padding=1)"
    assert repr(jbp.upsample(2, "linear")) == "upsample(2, method='linear')"
    assert repr(jbp.global_max_pool()) == "global_max_pool()"
    info = jbp.conv_transpose(4, 3, stride=2).info
    assert isinstance(info, jbp.layers.conv.Convolution) and info.transposed


KEY = jax.random.key(0)


def _apply_to(layer, in_shape, x_shape):
    """``layer.apply`` on an input of ``x_shape``, traced only, with params for ``in_shape``."""
    _, params = layer.init(KEY, in_shape)
    return lambda: jax.eval_shape(layer.apply, params, jax.ShapeDtypeStruct(x_shape, jnp.float32))


BAD = [  # (id, what raises, the message it must carry)
    ("output_padding_not_smaller_than_stride",
     lambda: jbp.conv_transpose(4, 3, stride=2, padding=1, output_padding=2).init(KEY, (5, 2)),
     r"conv_transpose\(4, 3, stride=2, padding=1, output_padding=2\): output_padding \(2\) "
     r"along W must be smaller than the stride \(2\) or the dilation \(1\)"),
    ("output_padding_with_same",
     lambda: jbp.conv_transpose(4, 3, stride=2, output_padding=1).init(KEY, (5, 2)),
     r"output_padding goes with padding given as numbers \(PyTorch's rule\); with 'SAME'"),
    ("padding_leaves_no_output",
     lambda: jbp.conv_transpose(4, 2, padding=2).init(KEY, (2, 6, 2)),
     r"conv_transpose\(4, 2, padding=2\): the padding \(2, 2\) along H leaves no output: "
     r"\(2 − 1\)·1 \+ 2 − 2 − 2 = -1 rows"),
    ("negative_output_padding", lambda: jbp.conv_transpose(4, 3, output_padding=-1),
     r"conv_transpose: output_padding must be ≥ 0, got -1"),
    ("out_channels_not_divisible_by_groups", lambda: jbp.conv_transpose(3, 3, groups=2),
     r"conv_transpose: out_channels \(3\) must be divisible by groups \(2\)"),
    ("in_channels_not_divisible_by_groups",
     lambda: jbp.conv_transpose(4, 3, groups=2).init(KEY, (5, 3)),
     r"conv_transpose\(4, 3, groups=2\): the input's 3 channels must be divisible by groups=2"),
    ("tuple_lengths_disagree", lambda: jbp.conv_transpose(4, (3, 3), output_padding=(1,)),
     r"conv_transpose: kernel_size, stride, dilation, output_padding and padding pairs given "
     r"as tuples must have one length"),
    ("wrong_input_channels", _apply_to(jbp.conv_transpose(4, 3), (5, 2), (1, 5, 3)),
     r"conv_transpose\(4, 3\): expected 2 input channels \(W has shape \(3, 4, 2\): input "
     r"channels last\), got input of shape \(1, 5, 3\)"),
    ("2d_kernel_given_1d_input", _apply_to(jbp.conv_transpose(4, (3, 3)), (5, 5, 2), (1, 5, 2)),
     r"a 2-D convolution expects input \(batch, H, W, C\), got shape \(1, 5, 2\)"),
    ("no_spatial_axis", lambda: jbp.conv_transpose(4, 3).init(KEY, (6,)),
     r"conv_transpose\(4, 3\): expects a per-example input \(W, C\) for a 1-D or \(H, W, C\)"),
    ("upsample_factor_0", lambda: jbp.upsample(0), r"upsample: factor must be ≥ 1, got 0"),
    ("upsample_unknown_method", lambda: jbp.upsample(2, "cubic"),
     r"upsample: method must be one of \('nearest', 'linear'\), got 'cubic'"),
    ("upsample_no_spatial_axis", lambda: jbp.upsample(2).init(KEY, (4,)),
     r"upsample\(2\): expects a per-example input \(W, C\) or \(H, W, C\), got shape \(4,\)"),
    ("upsample_2d_factor_given_1d_input", _apply_to(jbp.upsample((2, 2)), (4, 4, 1), (3, 4, 1)),
     r"upsample\(\(2, 2\)\): factor \(2, 2\) has 2 entries, but the input has 1 spatial axis"),
    ("global_max_pool_no_spatial_axis",
     lambda: jax.eval_shape(jbp.global_max_pool().apply, {},
                            jax.ShapeDtypeStruct((3, 4), jnp.float32)),
     r"global_max_pool: expects input \(batch, \.\.\., C\) with at least one spatial axis"),
]


@pytest.mark.parametrize("make,match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_gets_a_clear_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()
