"""The convolution layer and its transpose, channels last, 1-D ``(B, W, C)`` or 2-D
``(B, H, W, C)``.

``conv``'s forward is :func:`jbp.layers.conv_geometry.convolve`; its backward the two gradient
convolutions worked out by hand there (the lecture map of a convolution's backward is that
module's docstring), and its per-example rule the per-example kernel gradients and their
norms, from the same module.

``conv_transpose`` is the lecture's point made a layer: its forward *is* a convolution's
input gradient (:func:`~jbp.layers.conv_geometry.input_grad`), so its backward is a
convolution again. For ``y = convᵀ(x; W)``, ⟨y, dy⟩ = ⟨x, conv(dy; W)⟩, so

- ∂C/∂x = conv(dy; W): the convolution's forward (:func:`~jbp.layers.conv_geometry.convolve`);
- ∂C/∂W = the convolution's kernel gradient with the roles read off the same pairing: ``dy``
  in the place of its input, ``x`` in the place of its delta
  (:func:`~jbp.layers.conv_geometry.kernel_grad`);
- ∂C/∂b = Σ over examples and positions of dy.

The three functions of conv's forward and backward, shuffled; nothing new is computed.
"""

import math
from typing import NamedTuple

import jax.numpy as jnp

from jbp.init import constant, normal
from jbp.layer import (Layer, PerExampleRule, as_shape, boolean, call_text, cast_like,
                       constructor, kronecker_rows, param_dtype, positive_int, positive_number)
from jbp.layers.conv_geometry import (SPATIAL, axis_names, convolve, input_grad,
                                      kernel_grad, padding_arg, patches,
                                      per_example_kernel_grads, per_example_sq_norms,
                                      spatial_arg, transposed_window, window)


class Convolution(NamedTuple):
    """What a conv layer tells other code (its ``Layer.info``): its geometry."""

    kernel_size: tuple
    stride: tuple
    dilation: tuple
    padding: object
    groups: int
    transposed: bool = False  # conv_transpose
    output_padding: object = 0


def _arguments(name, out_channels, kernel_size, stride, padding, dilation, groups, use_bias,
               gain, output_padding=0):
    """The checked arguments a convolution and its transpose share, in this order:
    ``out_channels, kernel_size, stride, dilation, padding, groups, use_bias, gain,
    output_padding``."""
    out_channels = positive_int(out_channels, "out_channels", name)
    kernel_size, stride, dilation = (spatial_arg(v, what, name) for what, v in (
        ("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)))
    output_padding = spatial_arg(output_padding, "output_padding", name, minimum=0)
    padding = padding_arg(padding, name)
    groups = positive_int(groups, "groups", name)
    gain, use_bias = positive_number(gain, "gain", name), boolean(use_bias, "use_bias", name)
    if out_channels % groups:
        raise ValueError(f"{name}: out_channels ({out_channels}) must be divisible by groups "
                         f"({groups})")
    tuples = {"kernel_size": kernel_size, "stride": stride, "dilation": dilation,
              **({"output_padding": output_padding} if name == "conv_transpose" else {}),
              "padding": padding}
    if len({len(v) for v in tuples.values() if isinstance(v, tuple)}) > 1:
        *first, last = tuples
        raise ValueError(f"{name}: {', '.join(first)} and {last} pairs given as tuples must "
                         f"have one length (the number of spatial axes), got "
                         + ", ".join(f"{k}={v!r}" for k, v in tuples.items()))
    return (out_channels, kernel_size, stride, dilation, padding, groups, use_bias, gain,
            output_padding)


def _spatial_shape(shape, who, groups):
    """A per-example input shape ``(W, C)`` or ``(H, W, C)`` whose channels the groups divide."""
    shape = as_shape(shape, who)
    if len(shape) - 1 not in SPATIAL:
        raise ValueError(f"{who}: expects a per-example input (W, C) for a 1-D or (H, W, C) "
                         f"for a 2-D convolution, got {shape}")
    _check_channels(shape[-1], who, groups)
    return shape


def _check_channels(c, who, groups):
    if c % groups:
        raise ValueError(f"{who}: the input's {c} channels must be divisible by groups={groups}")


def _check_rank(x, W, who):
    n = W.ndim - 2
    if x.ndim != n + 2:
        raise ValueError(f"{who}: a {n}-D convolution expects input (batch, "
                         f"{axis_names(n)}, C), got shape {tuple(x.shape)} (its W has "
                         f"shape {tuple(W.shape)})")


def _params(key, shape, out_channels, fan_in, gain, use_bias, dtype, who):
    """``{"W": shape ~ N(0, gain²/fan_in), "b": zeros (out_channels,)}`` (no b without bias)."""
    dt = param_dtype(dtype, who)
    W = normal(key, shape, dt, scale=gain / math.sqrt(fan_in))
    return {"W": W, "b": constant(0, (out_channels,), dt)} if use_bias else {"W": W}


def _bias_grad(delta, per_example=False):
    """Σ of ``delta`` over the batch (unless ``per_example``) and every position."""
    return jnp.sum(delta, axis=tuple(range(int(per_example), delta.ndim - 1)))


def _convolution(who, init, check_input, geometry, groups, use_bias, info,
                 kronecker=None) -> Layer:
    """The Layer of ``conv`` (``info.transposed`` False) or ``conv_transpose`` (True): both are
    the bilinear pairing ⟨conv(a; W), δ⟩, read in the two directions. conv's forward is
    ``convolve``, its ∂C/∂x ``input_grad`` and ∂C/∂W ``kernel_grad(x, δ)``; the transpose's
    forward is ``input_grad``, its ∂C/∂x ``convolve`` and ∂C/∂W ``kernel_grad(δ, x)``: the
    input and the delta trade places (:func:`roles`), in the per-example rule too. ``geometry``
    maps the input's spatial size to the :class:`~jbp.layers.conv_geometry.Window` of the
    convolution (for the transpose: of the convolution it transposes). ``kronecker``: the
    Kronecker rows of :mod:`jbp.kronecker` (conv with groups=1 declares them; a grouped
    convolution has one block per group and the transpose other factors: neither does)."""
    transposed = info.transposed
    along, back = (input_grad, convolve) if transposed else (convolve, input_grad)

    def roles(x, delta):
        """(the convolution's input, its delta): swapped in the transpose."""
        return (delta, x) if transposed else (x, delta)

    def forward(params, x, *, key=None, train=False, state=None, side=None):
        W = params["W"]
        check_input(x, W)
        geo = geometry(tuple(x.shape[1:-1]))
        dt = jnp.result_type(x.dtype, W.dtype)
        y = along(x.astype(dt), W.astype(dt), geo, groups)
        return (y + params["b"].astype(dt) if use_bias else y), x, state

    def backward(params, x, delta):
        W = params["W"]
        geo = geometry(tuple(x.shape[1:-1]))
        dt = jnp.result_type(x.dtype, W.dtype, delta.dtype)
        delta = delta.astype(dt)
        grads = {"W": kernel_grad(*roles(x.astype(dt), delta), geo, groups).astype(W.dtype)}
        if use_bias:
            grads["b"] = _bias_grad(delta).astype(params["b"].dtype)
        dx = back(delta, W.astype(dt), geo, groups)
        return grads, cast_like(dx, x)

    def grads(params, x, delta):
        geo = geometry(tuple(x.shape[1:-1]))
        x = x.astype(jnp.result_type(x.dtype, delta.dtype))
        g = {"W": per_example_kernel_grads(*roles(x, delta), geo, groups)}
        return {**g, "b": _bias_grad(delta, per_example=True)} if use_bias else g

    def sq_norms(params, x, delta):
        geo = geometry(tuple(x.shape[1:-1]))
        x = x.astype(jnp.result_type(x.dtype, delta.dtype))
        # the bias term needs the output's delta, which is per_example_sq_norms' second
        # argument only in conv
        sq = per_example_sq_norms(*roles(x, delta), geo, groups,
                                  use_bias=use_bias and not transposed)
        if use_bias and transposed:
            sq = sq + jnp.sum(_bias_grad(delta, per_example=True) ** 2, axis=1)
        return sq

    rule = PerExampleRule(grads, sq_norms, kronecker=kronecker)
    return Layer(who, init, forward, backward, per_example=rule, info=info)


@constructor
def conv(out_channels: int, kernel_size, *, stride=1, padding="SAME", dilation=1, groups: int = 1,
         use_bias: bool = True, gain: float = 1.0, dtype=jnp.float32) -> Layer:
    """A convolution with ``out_channels`` output channels, channels last.

    Args:
      out_channels: O, the number of output channels (filters).
      kernel_size: taps per spatial axis: an int (every axis) or a tuple ``(k,)``/``(kh, kw)``.
      stride: an int or a tuple per spatial axis; the window moves this many rows.
      padding: ``"SAME"`` (out = ceil(in / stride), the smaller half of the padding in
        front, as ``jax.lax``), ``"VALID"`` (none), an int (that many zeros on both sides of
        every spatial axis) or pairs ``((lo, hi), ...)``, one per spatial axis.
      dilation: an int or a tuple per spatial axis; the kernel's taps are this far apart.
      groups: G, dividing both the input channels C and O; group g sees input channels
        g·C/G..(g+1)·C/G − 1 only (``groups = C``: depthwise convolution).
      use_bias: False leaves ``b`` out of the params (what to write before a batch norm,
        whose shift would make a bias' gradient exactly zero).
      gain: W is drawn from N(0, gain²/fan_in), fan_in = prod(kernel_size)·C/G (LeCun
        normal for 1, He normal for √2); b starts at zero.
      dtype: the params' dtype.

    1-D or 2-D is decided by the per-example input shape given to ``init``: ``(W, C)`` or
    ``(H, W, C)``. Params: ``{"W": (*kernel_size, C/G, O), "b": (O,)}``.
    Shapes: ``x (B, *in_size, C) -> z (B, *out_size, O)``; cache ``a = x``. Input and params
    of different dtypes are computed in their promoted dtype (integer images included);
    the gradients come back in the params' and the input's dtypes.
    """
    who = call_text(conv, out_channels, kernel_size, stride=stride, padding=padding,
                    dilation=dilation, groups=groups)
    out_channels, kernel_size, stride, dilation, padding, groups, use_bias, gain, _ = _arguments(
        "conv", out_channels, kernel_size, stride, padding, dilation, groups, use_bias, gain)

    def geometry(in_size):
        return window(in_size, kernel_size, stride, dilation, padding, who)

    def init(key, in_shape):
        *in_size, c = _spatial_shape(in_shape, who, groups)
        geo = geometry(tuple(in_size))
        params = _params(key, (*geo.size, c // groups, out_channels), out_channels,
                         math.prod(geo.size) * c // groups, gain, use_bias, dtype, who)
        return (*geo.out_size, out_channels), params

    def check_input(x, W):
        _check_rank(x, W, who)
        _check_channels(x.shape[-1], who, groups)
        if x.shape[-1] != W.shape[-2] * groups:
            raise ValueError(f"{who}: expected {W.shape[-2] * groups} input channels (W has "
                             f"shape {tuple(W.shape)}, groups={groups}), got input of shape "
                             f"{tuple(x.shape)}")

    def kronecker(params, a, delta):  # KFC: the patches, every output position expanded
        return kronecker_rows(patches(a, geometry(tuple(a.shape[1:-1]))), delta, use_bias)

    info = Convolution(kernel_size, stride, dilation, padding, groups)
    return _convolution(who, init, check_input, geometry, groups, use_bias, info,
                        kronecker if groups == 1 else None)


@constructor
def conv_transpose(out_channels: int, kernel_size, *, stride=1, padding="SAME",
                   output_padding=0, dilation=1, groups: int = 1, use_bias: bool = True,
                   gain: float = 1.0, dtype=jnp.float32) -> Layer:
    """A transposed convolution with ``out_channels`` output channels, channels last: the
    input gradient of ``conv(C, kernel_size, stride=, padding=, dilation=, groups=)`` as a
    layer (a decoder's learned upsampling; "fractionally strided" or "deconvolution").

    Args:
      out_channels: O, the number of output channels.
      kernel_size, stride, dilation, groups: those of the convolution it transposes (an
        int or a tuple per spatial axis); with stride s the output has about s times the
        input's rows.
      padding: that of the convolution it transposes; the output size per spatial axis
        (n input rows, span K = dilation·(kernel_size − 1) + 1) is ``jax.lax.conv_transpose``'s
        and PyTorch's ``ConvTranspose`` rule: ``"SAME"`` (default) n·s, ``"VALID"`` n·s +
        max(K − s, 0), an int p (both sides) or pairs ``((lo, hi), ...)``:
        (n − 1)·s + K − lo − hi + output_padding.
      output_padding: an int or a tuple per spatial axis, rows added at the back of the
        output (with numeric padding only), each smaller than the stride or the dilation:
        a stride-s convolution maps s input sizes to one output size, and this picks which.
      use_bias: False leaves ``b`` out of the params.
      gain: W is drawn from N(0, gain²/fan_in), fan_in = C/G · max(prod(kernel_size) /
        prod(stride), 1), about how many input values each output sums; b starts at zero.
      dtype: the params' dtype.

    Params: ``{"W": (*kernel_size, O/G, C), "b": (O,)}``: the kernel of the convolution it
    transposes, which maps O channels to C (so ``conv`` with the same W is its adjoint).
    Shapes: ``x (B, *in_size, C) -> y (B, *out_size, O)``; cache ``x``. Backward (module
    docstring): ∂C/∂x = conv(dy; W), ∂C/∂W = the kernel gradient with dy as the input and
    x as the delta. Per example: the kernel gradients of conv's rule with the same roles.
    """
    who = call_text(conv_transpose, out_channels, kernel_size, stride=stride, padding=padding,
                    output_padding=output_padding, dilation=dilation, groups=groups)
    out_channels, kernel_size, stride, dilation, padding, groups, use_bias, gain, output_padding = \
        _arguments("conv_transpose", out_channels, kernel_size, stride, padding, dilation,
                   groups, use_bias, gain, output_padding)

    def geometry(in_size):
        """The Window of the convolution this one transposes: its out_size is in_size."""
        return transposed_window(in_size, kernel_size, stride, dilation, padding,
                                 output_padding, who)

    def init(key, in_shape):
        *in_size, c = _spatial_shape(in_shape, who, groups)
        geo = geometry(tuple(in_size))
        fan_in = c // groups * max(math.prod(geo.size) / math.prod(geo.stride), 1)
        params = _params(key, (*geo.size, out_channels // groups, c), out_channels, fan_in,
                         gain, use_bias, dtype, who)
        return (*geo.in_size, out_channels), params

    def check_input(x, W):
        _check_rank(x, W, who)
        if x.shape[-1] != W.shape[-1]:
            raise ValueError(f"{who}: expected {W.shape[-1]} input channels (W has shape "
                             f"{tuple(W.shape)}: input channels last), got input of shape "
                             f"{tuple(x.shape)}")

    info = Convolution(kernel_size, stride, dilation, padding, groups, transposed=True,
                       output_padding=output_padding)
    return _convolution(who, init, check_input, geometry, groups, use_bias, info)
