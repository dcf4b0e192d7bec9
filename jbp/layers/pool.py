"""Pooling, channels last, 1-D ``(B, W, C)`` or 2-D ``(B, H, W, C)``; backward by hand.

Lecture map. A pooling layer has no weights: every output is the maximum (``max_pool``) or
the mean (``avg_pool``) of one window of one channel, and ``global_avg_pool`` and
``global_max_pool`` take the mean and the maximum over all positions. So its backward only routes the delta back to the inputs each
window read (the hidden-layer case with σ′ replaced by "which input made the output"):

- max pool: ∂y/∂x is 1 at the window's arg-max and 0 elsewhere, so each delta goes to the
  one input that won its window; where windows overlap (stride < window) an input collects
  the deltas of every window it won;
- avg pool: ∂y/∂x = 1/count for every input in the window, so each window spreads
  delta/count evenly over what it read;
- global avg pool: every input receives delta / (number of positions);
- global max pool: the delta goes to the channel's maximum (shared equally among ties).

How the backward is written. Tap ``j`` of a window (one position inside it) reads a strided
slice of the padded input: rows ``o·s + j`` for every output position o. The backward of
that slice writes what it receives back to the same rows: a ``lax.pad`` with ``s − 1``
zeros between entries ("interior" padding) and ``j`` in front. Summing over the taps and
dropping the padding's share gives ∂C/∂x; overlapping windows add up by themselves.

**Ties** (max pool). ``jax.grad`` of ``lax.reduce_window(..., lax.max, ...)`` gives the
whole delta to *one* input per window: the first in row-major window order among the
maxima. Precisely, it scans the window's taps in row-major order, starting from the first,
and moves to tap j whenever ``not (current >= x_j)``; the backward here runs that very scan,
so it routes exactly as ``jax.grad`` does, including all-equal windows (ReLU zeros) and NaN
(``NaN >= x`` is false, so the scan moves on from a NaN). Padding ("SAME" or explicit)
takes part as −inf, as in the forward. (``jbp.maxout`` shares ties equally instead, as
``jnp.max`` does: two reductions, two conventions.)

**Divisor** (avg pool). The mean is over the *real* inputs in the window: padding is not
counted (TensorFlow's ``avg_pool``; PyTorch's ``count_include_pad=False``), so a constant
image stays constant at the borders. With "VALID" padding every divisor is the window size.

Shapes: ``x (B, *in_size, C)``; ``max_pool``/``avg_pool`` give ``(B, *out_size, C)``,
``global_avg_pool`` and ``global_max_pool`` give ``(B, C)``. Cache: ``x`` (the max pools: to
find the arg-max again),
nothing but static shapes for the averages. Integer input (raw images) is pooled as floats.
Every pooling layer keeps the examples of a batch apart (``EXAMPLEWISE``).
"""

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from jbp.layer import EXAMPLEWISE, Layer, as_shape, cast_like, constructor
from jbp.layers.conv_geometry import (SPATIAL, Window, axis_names, pad_spatial, padding_arg,
                                      spatial_arg, tap_slice, window)


def _floating(x):
    """``x`` as a float array: integers (raw images) become the default float type."""
    return x if jnp.issubdtype(x.dtype, jnp.inexact) else x.astype(jnp.result_type(float))


def _scatter_tap(g, geo: Window, tap):
    """The backward of :func:`tap_slice`: ``g (B, *out_size, C)`` written back to rows
    ``o·s + j`` of a zero array shaped like the padded input."""
    config = [(0, 0, 0)]
    for j, s, m, length, (lo, hi) in zip(tap, geo.stride, geo.out_size, geo.in_size, geo.pads):
        written = j + (m - 1) * s + 1  # rows up to and including the last one written
        config.append((j, length + lo + hi - written, s - 1))
    config.append((0, 0, 0))
    return lax.pad(g, jnp.zeros((), g.dtype), config)


def _unpad(x_padded, geo: Window):
    """Drop the padding rows: ``(B, *padded, C) -> (B, *in_size, C)``."""
    start = [0] + [lo for lo, _ in geo.pads] + [0]
    limit = [x_padded.shape[0]] + [lo + n for (lo, _), n in zip(geo.pads, geo.in_size)]
    return lax.slice(x_padded, start, limit + [x_padded.shape[-1]])


def _max_routes(x, geo: Window):
    """For every window, the tap that ``jax.grad`` routes its delta to: the row-major scan
    that keeps the current tap while ``current >= next`` (see the module docstring)."""
    padded = pad_spatial(x, geo, -jnp.inf)
    best, route = None, None
    for t, tap in enumerate(geo.taps):
        v = tap_slice(padded, geo, tap)
        if best is None:
            best, route = v, jnp.zeros(v.shape, jnp.int32)
        else:
            keep = best >= v
            best, route = jnp.where(keep, best, v), jnp.where(keep, route, t)
    return route


def _pool_layer(kind: str, window_size, stride, padding) -> Layer:
    """``max_pool`` and ``avg_pool``: one body, two reductions."""
    who = kind
    window_size = spatial_arg(window_size, "window", who)
    stride = window_size if stride is None else spatial_arg(stride, "stride", who)
    padding = padding_arg(padding, who)
    lengths = {len(v) for v in (window_size, stride) if isinstance(v, tuple)}
    if isinstance(padding, tuple):
        lengths.add(len(padding))
    if len(lengths) > 1:
        raise ValueError(f"{who}: window, stride and padding pairs given as tuples must have one "
                         f"length (the number of spatial axes), got window={window_size!r}, "
                         f"stride={stride!r}, padding={padding!r}")
    who = f"{kind}({window_size!r}" + (f", stride={stride!r}" if stride != window_size else "") + (
        f", padding={padding!r}" if padding != "VALID" else "") + ")"

    def geometry(in_size):
        geo = window(in_size, window_size, stride, 1, padding, who, what="window")
        for axis, (k, (lo, hi)) in enumerate(zip(geo.size, geo.pads)):
            if max(lo, hi) >= k:  # a window could then hold nothing but padding
                raise ValueError(f"{who}: padding ({lo}, {hi}) along "
                                 f"{SPATIAL[len(geo.size)][axis]} must be smaller than the "
                                 f"window ({k})")
        return geo

    def check_rank(shape, batched: bool):
        """1 or 2 spatial axes, as many as a tuple window/stride/padding has."""
        n = len(shape) - (2 if batched else 1)
        front = "batch, " if batched else ""
        what = "input" if batched else "a per-example input"
        if n not in SPATIAL:
            raise ValueError(f"{who}: expects {what} ({front}W, C) or ({front}H, W, C), got "
                             f"shape {shape}")
        for arg, value in (("window", window_size), ("stride", stride), ("padding", padding)):
            if isinstance(value, tuple) and len(value) != n:
                raise ValueError(f"{who}: a {len(value)}-D {arg} {value!r} needs {what} "
                                 f"({front}{axis_names(len(value))}, C), got shape {shape}")

    def init(key, in_shape):
        shape = as_shape(in_shape, who)
        check_rank(shape, batched=False)
        geo = geometry(shape[:-1])
        return (*geo.out_size, shape[-1]), {}

    def count(geo: Window, dtype):
        """How many real (not padding) inputs each window holds: ``(1, *out_size, 1)``."""
        per_axis_counts = []
        for n, k, s, m, (lo, _) in zip(geo.in_size, geo.size, geo.stride, geo.out_size, geo.pads):
            start = np.arange(m) * s - lo  # first input row of each window
            per_axis_counts.append(np.minimum(start + k, n) - np.maximum(start, 0))
        grid = math.prod(np.ix_(*per_axis_counts))  # the product of the axes' counts
        return jnp.asarray(grid.reshape(1, *geo.out_size, 1), dtype)

    def forward(params, x, *, key=None, train=False, state=None, side=None):
        check_rank(tuple(x.shape), batched=True)
        x = _floating(x)
        geo = geometry(tuple(x.shape[1:-1]))
        dims, strides = (1, *geo.size, 1), (1, *geo.stride, 1)
        pads = ((0, 0), *geo.pads, (0, 0))
        if kind == "max_pool":
            y = lax.reduce_window(x, -jnp.inf, lax.max, dims, strides, pads)
            return y, x, state
        total = lax.reduce_window(x, 0.0, lax.add, dims, strides, pads)
        return total / count(geo, x.dtype), tuple(x.shape), state

    def backward(params, cache, dy):
        if kind == "max_pool":
            x = cache
            geo = geometry(tuple(x.shape[1:-1]))
            route = _max_routes(x, geo)
            parts = [_scatter_tap(jnp.where(route == t, dy, 0), geo, tap)
                     for t, tap in enumerate(geo.taps)]
        else:
            geo = geometry(cache[1:-1])  # the cache is the input's shape
            g = dy / count(geo, dy.dtype)  # every input of a window gets delta / count
            parts = [_scatter_tap(g, geo, tap) for tap in geo.taps]
            x = dy  # the output's dtype is the (floating) input's
        return {}, cast_like(_unpad(sum(parts[1:], parts[0]), geo), x)

    return Layer(who, init, forward, backward, per_example=EXAMPLEWISE)


@constructor
def max_pool(window, stride=None, padding="VALID") -> Layer:
    """Max pooling over windows of ``window`` rows per spatial axis, channel by channel.

    Args:
      window: an int (every spatial axis) or a tuple ``(w,)``/``(wh, ww)``.
      stride: an int or a tuple per spatial axis; ``None`` (default): the window, so the
        windows tile the input without overlap.
      padding: ``"VALID"`` (default, none), ``"SAME"`` (out = ceil(in / stride)), an int or
        pairs ``((lo, hi), ...)``; padding rows hold −inf, and must be fewer than the window.

    1-D or 2-D from the input: ``x (B, *in_size, C) -> y (B, *out_size, C)``; no params
    (``{}``). The backward routes each delta to its window's arg-max, ties exactly as
    ``jax.grad`` routes them: to the first maximum in row-major window order.
    """
    return _pool_layer("max_pool", window, stride, padding)


@constructor
def avg_pool(window, stride=None, padding="VALID") -> Layer:
    """Average pooling over windows of ``window`` rows per spatial axis, channel by channel.

    Arguments as :func:`max_pool`. The divisor is the number of real inputs in each window:
    padding is not counted. ``x (B, *in_size, C) -> y (B, *out_size, C)``; no params.
    """
    return _pool_layer("avg_pool", window, stride, padding)


def _global_init(who: str):
    """The ``init`` of a pooling over every position: ``(..., C) -> (C,)``, no params."""

    def init(key, in_shape):
        shape = as_shape(in_shape, who)
        if len(shape) < 2:
            raise ValueError(f"{who}: expects a per-example input (..., C) with at least one "
                             f"spatial axis, e.g. (W, C) or (H, W, C); got {shape}")
        return shape[-1:], {}

    return init


def _global_input(x, who: str):
    """``x`` as floats, and the axes of its positions; an error unless it has one."""
    if x.ndim < 3:
        raise ValueError(f"{who}: expects input (batch, ..., C) with at least one spatial "
                         f"axis, got shape {tuple(x.shape)}")
    return _floating(x), tuple(range(1, x.ndim - 1))


@constructor
def global_avg_pool() -> Layer:
    """The mean over every spatial position: ``x (B, *in_size, C) -> y (B, C)``; no params.

    Backward: each of the P = prod(in_size) inputs of a channel receives delta / P.
    """
    who = "global_avg_pool"

    def forward(params, x, *, key=None, train=False, state=None, side=None):
        x, axes = _global_input(x, who)
        return jnp.mean(x, axis=axes), tuple(x.shape), state

    def backward(params, shape, dy):
        positions = math.prod(shape[1:-1])
        g = (dy / positions).reshape(shape[0], *(1,) * (len(shape) - 2), shape[-1])
        return {}, jnp.broadcast_to(g, shape)  # in dy's dtype, the (floating) input's

    return Layer(who, _global_init(who), forward, backward, per_example=EXAMPLEWISE)


@constructor
def global_max_pool() -> Layer:
    """The maximum over every spatial position: ``x (B, *in_size, C) -> y (B, C)``; no params.

    Backward: each channel's delta goes to the inputs that hold its maximum. **Ties share
    it equally**, as ``jax.grad`` of ``jnp.max`` does (and ``jbp.maxout``): with m inputs
    equal to the maximum, each receives delta / m (an all-zero channel after a ReLU spreads
    it over every position). ``max_pool`` instead routes a window's delta to its first
    maximum, as ``jax.grad`` of ``lax.reduce_window`` does. The formula is ``jax.grad``'s,
    ``dy / count · [x = max]``, so a channel whose maximum is NaN (equal to no input) gets
    what ``jax.grad`` gives it, eagerly and under ``jit``. Cache: ``x`` (the maximum is found
    again).
    """
    who = "global_max_pool"

    def forward(params, x, *, key=None, train=False, state=None, side=None):
        x, axes = _global_input(x, who)
        return jnp.max(x, axis=axes), x, state

    def backward(params, x, dy):
        axes = tuple(range(1, x.ndim - 1))
        at_max = x == jnp.max(x, axis=axes, keepdims=True)
        count = jnp.sum(at_max, axis=axes, keepdims=True).astype(dy.dtype)
        shape = (dy.shape[0], *(1,) * len(axes), dy.shape[-1])
        return {}, dy.reshape(shape) / count * at_max.astype(dy.dtype)

    return Layer(who, _global_init(who), forward, backward, per_example=EXAMPLEWISE)
