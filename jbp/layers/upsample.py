"""Upsampling, channels last, 1-D ``(B, W, C)`` or 2-D ``(B, H, W, C)``: each spatial axis
``factor`` times longer; no params, backward by hand.

Lecture map. Along one axis an upsampling is a linear map with fixed weights, ``y = M·x``
(M of shape (n·f, n), the same for every example, channel and other axis), so its
backward is the transpose, ``dx = Mᵀ·dy``: the dense layer's ``delta·Wᵀ`` with a ``W``
that is not learned. Neither M is ever formed:

- ``"nearest"``: ``y[i] = x[i // f]``, one 1 per row of M; Mᵀ sums each block of f rows of
  ``dy``: every input collects the deltas of the f outputs that copied it.
- ``"linear"``: output ``i = f·j + r`` samples the input at ``j + t_r``, ``t_r = (2r + 1 −
  f)/(2f)`` ("half-pixel centres": PyTorch's ``align_corners=False``, ``jax.image.resize``'s
  ``"linear"``), between ``x[j]`` and its neighbour ``x[j ± 1]`` (the next one for
  ``t_r > 0``, the one before for ``t_r < 0``) with weights ``1 − |t_r|`` and ``|t_r|``; at
  the edges the neighbour is the edge row itself (clamped). Mᵀ sends every delta back to
  the same two inputs with the same weights: ``dx = Σ_r (1 − |t_r|)·dy_r`` plus the deltas
  weighted ``|t_r|`` shifted back by one row (the edge keeps what the clamp gave it).

2-D upsampling is separable: the map along H, then along W; the backward applies the
transposes (they act on different axes, so in either order).

Shapes: ``x (B, *in_size, C) -> y (B, *(in_size · factor), C)``. Cache: the input's shape.
Integer input (raw images) is upsampled as floats. Examples stay apart (``EXAMPLEWISE``).
"""

import jax.numpy as jnp
from jax import lax

from jbp.layer import EXAMPLEWISE, Layer, as_shape, call_text, constructor
from jbp.layers.conv_geometry import SPATIAL, per_axis, spatial_arg
from jbp.layers.pool import _floating

METHODS = ("nearest", "linear")


def _offsets(f: int) -> list:
    """``t_r`` for every output ``r`` of a block of ``f``: where it samples, in input rows."""
    return [(2 * r + 1 - f) / (2 * f) for r in range(f)]


def _neighbour(x, axis: int, step: int):
    """``x[j + step]`` along ``axis`` (step ±1), the edge row standing in past the edge."""
    n = x.shape[axis]
    if step > 0:
        return jnp.concatenate([lax.slice_in_dim(x, 1, n, axis=axis),
                                lax.slice_in_dim(x, n - 1, n, axis=axis)], axis=axis)
    return jnp.concatenate([lax.slice_in_dim(x, 0, 1, axis=axis),
                            lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)


def _neighbour_backward(g, axis: int, step: int):
    """The transpose of :func:`_neighbour`: row j's delta back to row j + step (the edge
    row keeps its own as well, since it stood in for the row past the edge)."""
    n = g.shape[axis]
    if n == 1:
        return g
    def row(start, stop):
        return lax.slice_in_dim(g, start, stop, axis=axis)

    zero = jnp.zeros_like(row(0, 1))
    if step > 0:
        return jnp.concatenate([zero, row(0, n - 2), row(n - 2, n - 1) + row(n - 1, n)], axis=axis)
    return jnp.concatenate([row(0, 1) + row(1, 2), row(2, n), zero], axis=axis)


def _up(x, axis: int, f: int, method: str):
    """``x`` upsampled ``f`` times along ``axis``."""
    if method == "nearest":
        return jnp.repeat(x, f, axis=axis)
    parts = []
    for t in _offsets(f):
        part = (1 - abs(t)) * x
        parts.append(part if t == 0 else part + abs(t) * _neighbour(x, axis, 1 if t > 0 else -1))
    y = jnp.stack(parts, axis=axis + 1)  # (..., n, f, ...): row f·j + r is block j's part r
    return y.reshape(*x.shape[:axis], x.shape[axis] * f, *x.shape[axis + 1:])


def _up_backward(g, axis: int, f: int, method: str):
    """``Mᵀ·g`` along ``axis``: ``g (..., n·f, ...) -> (..., n, ...)``."""
    n = g.shape[axis] // f
    blocks = g.reshape(*g.shape[:axis], n, f, *g.shape[axis + 1:])
    if method == "nearest":
        return jnp.sum(blocks, axis=axis + 1)
    parts = [lax.index_in_dim(blocks, r, axis=axis + 1, keepdims=False) for r in range(f)]
    offsets = _offsets(f)
    dx = sum((1 - abs(t)) * p for t, p in zip(offsets, parts))
    for step in (1, -1):
        sent = [abs(t) * p for t, p in zip(offsets, parts) if t * step > 0]
        if sent:
            dx = dx + _neighbour_backward(sum(sent[1:], sent[0]), axis, step)
    return dx


@constructor
def upsample(factor, method: str = "nearest") -> Layer:
    """Every spatial axis ``factor`` times longer, channel by channel; no params.

    Args:
      factor: an int (every spatial axis) or a tuple per spatial axis, each ≥ 1.
      method: ``"nearest"`` (each row repeated ``factor`` times) or ``"linear"`` (linear
        interpolation with half-pixel centres, the edges clamped; bilinear in 2-D), as
        ``jax.image.resize`` gives for these sizes.

    ``x (B, *in_size, C) -> y (B, *(in_size · factor), C)``. Backward (module docstring):
    the transpose of the fixed interpolation, axis by axis.
    """
    who = call_text(upsample, factor, method=method)
    factor = spatial_arg(factor, "factor", "upsample")
    if method not in METHODS:
        raise ValueError(f"upsample: method must be one of {METHODS}, got {method!r}")

    def factors(shape, batched: bool):
        """The factor per spatial axis of an input ``shape``; an error unless it has 1 or 2."""
        n = len(shape) - (2 if batched else 1)
        front, what = ("batch, ", "input") if batched else ("", "a per-example input")
        if n not in SPATIAL:
            raise ValueError(f"{who}: expects {what} ({front}W, C) or ({front}H, W, C), got "
                             f"shape {tuple(shape)}")
        return per_axis(factor, n, "factor", who)

    def init(key, in_shape):
        shape = as_shape(in_shape, who)
        fs = factors(shape, batched=False)
        return (*(m * f for m, f in zip(shape[:-1], fs)), shape[-1]), {}

    def forward(params, x, *, key=None, train=False, state=None, side=None):
        fs = factors(x.shape, batched=True)
        y = _floating(x)
        for axis, f in enumerate(fs, start=1):
            y = _up(y, axis, f, method)
        return y, tuple(x.shape), state

    def backward(params, shape, dy):
        dx = dy
        for axis, f in reversed(list(enumerate(factors(shape, batched=True), start=1))):
            dx = _up_backward(dx, axis, f, method)
        return {}, dx  # in dy's dtype, the (floating) input's

    return Layer(who, init, forward, backward, per_example=EXAMPLEWISE)
