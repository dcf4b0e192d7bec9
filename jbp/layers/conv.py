"""The convolution layer, channels last, 1-D ``(B, W, C)`` or 2-D ``(B, H, W, C)``.

Its forward is :func:`jbp.layers.conv_geometry.convolve`; its backward the two gradient
convolutions worked out by hand there (the lecture map of a convolution's backward is that
module's docstring), and its per-example rule the per-example kernel gradients and their
norms, from the same module.
"""

import math
from typing import NamedTuple

import jax.numpy as jnp

from jbp.init import constant, normal
from jbp.layer import (Layer, PerExampleRule, as_shape, boolean, call_text, cast_like,
                       constructor, kronecker_rows, param_dtype, positive_int, positive_number)
from jbp.layers.conv_geometry import (SPATIAL, axis_names, convolve, input_grad,
                                      kernel_grad, padding_arg, patches, per_example_kernel_grads,
                                      per_example_sq_norms, spatial_arg, window)


class Convolution(NamedTuple):
    """What a conv layer tells other code (its ``Layer.info``): its geometry."""

    kernel_size: tuple
    stride: tuple
    dilation: tuple
    padding: object
    groups: int


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
    out_channels = positive_int(out_channels, "out_channels", "conv")
    kernel_size, stride, dilation = (spatial_arg(v, name, "conv") for name, v in (
        ("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)))
    padding = padding_arg(padding, "conv")
    groups = positive_int(groups, "groups", "conv")
    gain, use_bias = positive_number(gain, "gain", "conv"), boolean(use_bias, "use_bias", "conv")
    if out_channels % groups:
        raise ValueError(f"conv: out_channels ({out_channels}) must be divisible by groups "
                         f"({groups})")
    lengths = {len(v) for v in (kernel_size, stride, dilation) if isinstance(v, tuple)}
    if isinstance(padding, tuple):
        lengths.add(len(padding))
    if len(lengths) > 1:
        raise ValueError(f"conv: kernel_size, stride, dilation and padding pairs given as tuples "
                         f"must have one length (the number of spatial axes), got "
                         f"kernel_size={kernel_size!r}, stride={stride!r}, dilation={dilation!r}, "
                         f"padding={padding!r}")

    def geometry(in_size):
        return window(in_size, kernel_size, stride, dilation, padding, who)

    def check_channels(c):
        if c % groups:
            raise ValueError(f"{who}: the input's {c} channels must be divisible by groups={groups}")

    def init(key, in_shape):
        shape = as_shape(in_shape, who)
        if len(shape) - 1 not in SPATIAL:
            raise ValueError(f"{who}: expects a per-example input (W, C) for a 1-D or (H, W, C) "
                             f"for a 2-D convolution, got {shape}")
        *in_size, c = shape
        check_channels(c)
        geo = geometry(tuple(in_size))
        fan_in = math.prod(geo.size) * c // groups
        dt = param_dtype(dtype, who)
        W = normal(key, (*geo.size, c // groups, out_channels), dt,
                   scale=gain / math.sqrt(fan_in))
        params = {"W": W, "b": constant(0, (out_channels,), dt)}
        return (*geo.out_size, out_channels), params if use_bias else {"W": W}

    def forward(params, x, *, key=None, train=False, state=None, side=None):
        W = params["W"]
        n = W.ndim - 2
        if x.ndim != n + 2:
            raise ValueError(f"{who}: a {n}-D convolution expects input (batch, "
                             f"{axis_names(n)}, C), got shape {tuple(x.shape)} (its W has "
                             f"shape {tuple(W.shape)})")
        check_channels(x.shape[-1])
        if x.shape[-1] != W.shape[-2] * groups:
            raise ValueError(f"{who}: expected {W.shape[-2] * groups} input channels (W has "
                             f"shape {tuple(W.shape)}, groups={groups}), got input of shape "
                             f"{tuple(x.shape)}")
        geo = geometry(tuple(x.shape[1:-1]))
        dt = jnp.result_type(x.dtype, W.dtype)
        a = x
        z = convolve(a.astype(dt), W.astype(dt), geo, groups)
        return (z + params["b"].astype(dt) if use_bias else z), a, state

    def backward(params, a, delta):
        W = params["W"]
        geo = geometry(tuple(a.shape[1:-1]))
        dt = jnp.result_type(a.dtype, W.dtype, delta.dtype)
        delta = delta.astype(dt)
        grads = {"W": kernel_grad(a.astype(dt), delta, geo, groups).astype(W.dtype)}
        if use_bias:
            db = jnp.sum(delta, axis=tuple(range(delta.ndim - 1)))
            grads["b"] = db.astype(params["b"].dtype)
        da = input_grad(delta, W.astype(dt), geo, groups)
        return grads, cast_like(da, a)

    def grads(params, a, delta):
        geo = geometry(tuple(a.shape[1:-1]))
        a = a.astype(jnp.result_type(a.dtype, delta.dtype))
        g = {"W": per_example_kernel_grads(a, delta, geo, groups)}
        return {**g, "b": jnp.sum(delta, axis=tuple(range(1, delta.ndim - 1)))} if use_bias else g

    def sq_norms(params, a, delta):
        geo = geometry(tuple(a.shape[1:-1]))
        a = a.astype(jnp.result_type(a.dtype, delta.dtype))
        return per_example_sq_norms(a, delta, geo, groups, use_bias=use_bias)

    def kronecker(params, a, delta):  # KFC: the patches, every output position expanded
        if groups != 1:
            raise ValueError(f"{who}: Kronecker factors are implemented for groups=1 only "
                             f"(a grouped convolution has one block per group)")
        geo = geometry(tuple(a.shape[1:-1]))
        return kronecker_rows(patches(a, geo), delta, use_bias)

    info = Convolution(kernel_size, stride, dilation, padding, groups)
    rule = PerExampleRule(grads, sq_norms, kronecker=kronecker)
    return Layer(who, init, forward, backward, per_example=rule, info=info)
