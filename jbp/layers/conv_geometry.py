"""The arithmetic of a convolution, channels last, 1-D ``(B, W, C)`` or 2-D ``(B, H, W, C)``:
its arguments, its window geometry, and its gradients by hand (the layer: :mod:`jbp.layers.conv`).

Lecture map. A convolution is a dense layer applied at every position to the patch of the
input its window covers, with one weight matrix shared by all positions:

    z[o] = Σ_j a[o·s + j·d − lo] · W[j] + b        (per spatial axis: output position o,
                                                    kernel tap j, stride s, dilation d,
                                                    padding lo rows in front)

- forward: ∂z/∂W = the input patch, so the forward caches the input ``a`` (as dense does);
- ∂C/∂W = Σ over examples and positions of patchᵀ·δ: the input convolved with the delta
  (the delta plays the kernel, the batch is what is summed over);
- ∂C/∂a = every output position sends δ·Wᵀ back to the inputs its window read: a
  *transposed* convolution, i.e. a convolution of the (stride-dilated) delta with the
  kernel flipped in space and its in/out axes swapped. The backward of a convolution is a
  convolution;
- ∂C/∂b = Σ over examples and positions of δ.

Both gradients below are ``jax.lax.conv_general_dilated`` calls whose padding is worked out
by hand (:func:`input_grad`, :func:`kernel_grad`); nothing here calls autodiff.

Shapes (n = 1 or 2 spatial axes, decided by the per-example input shape at init):

- ``x``/``a``: ``(B, *in_size, C)``; ``z``: ``(B, *out_size, O)``; ``delta``: like ``z``;
- ``W``: ``(*kernel_size, C/groups, O)``, ``b``: ``(O,)``;
- cache: ``a``.

Per example (:data:`PerExampleRule`): ∂ℓ_i/∂W is the kernel-gradient convolution of example
i alone; all B of them are one convolution in which every example is its own feature group
(``feature_group_count``). Their squared norms avoid forming them where that is cheaper,
as BackPACK does: with U_i the unfolded input (P positions × K patch entries),
‖U_iᵀδ_i‖²_F = Σ (U_i U_iᵀ) ⊙ (δ_i δ_iᵀ), two P×P Gram matrices instead of a K×O gradient.
"""

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

from jbp.layer import as_integer

SPATIAL = {1: "W", 2: "HW"}  # the spatial letters of the dimension-number strings
PADDINGS = ("SAME", "VALID")


# ---------------------------------------------------------------------------- arguments

def _is_int(v) -> bool:
    return as_integer(v) is not None


def spatial_arg(value, what: str, who: str, *, minimum: int = 1):
    """An int or a tuple of ints (one per spatial axis, 1 or 2 of them), each ≥ ``minimum``;
    returned as given (an int stays an int: it means "the same on every axis")."""
    if _is_int(value):
        if value < minimum:
            raise ValueError(f"{who}: {what} must be ≥ {minimum}, got {value!r}")
        return int(value)
    if isinstance(value, (tuple, list)) and len(value) in SPATIAL and all(map(_is_int, value)):
        if any(v < minimum for v in value):
            raise ValueError(f"{who}: every entry of {what} must be ≥ {minimum}, got {value!r}")
        return tuple(int(v) for v in value)
    raise ValueError(f"{who}: {what} must be an int or a tuple of 1 or 2 ints (one per spatial "
                     f"axis), got {value!r}")


def padding_arg(padding, who: str):
    """``"SAME"``, ``"VALID"``, an int ≥ 0 or pairs ``((lo, hi), ...)`` of ints ≥ 0."""
    if isinstance(padding, str):
        if padding.upper() not in PADDINGS:
            raise ValueError(f"{who}: padding must be 'SAME', 'VALID', an int or pairs "
                             f"((lo, hi), ...); got the unknown string {padding!r}")
        return padding.upper()
    if _is_int(padding):
        if padding < 0:
            raise ValueError(f"{who}: padding must be ≥ 0, got {padding!r}")
        return int(padding)
    pairs = padding if isinstance(padding, (tuple, list)) else None
    if (pairs is None or len(pairs) not in SPATIAL or not all(
            isinstance(p, (tuple, list)) and len(p) == 2 and all(map(_is_int, p)) for p in pairs)):
        raise ValueError(f"{who}: padding must be 'SAME', 'VALID', an int or one (lo, hi) pair "
                         f"of ints per spatial axis, e.g. ((1, 2), (0, 0)); got {padding!r}")
    if any(v < 0 for p in pairs for v in p):
        raise ValueError(f"{who}: padding must be ≥ 0, got {padding!r}")
    return tuple((int(lo), int(hi)) for lo, hi in pairs)


def per_axis(value, n: int, what: str, who: str) -> tuple:
    """``value`` (int or tuple) as a tuple of ``n`` entries; a tuple must have length n."""
    if isinstance(value, tuple):
        if len(value) != n:
            raise ValueError(f"{who}: {what} {value} has {len(value)} entries, but the input "
                             f"has {n} spatial {'axis' if n == 1 else 'axes'} "
                             f"({axis_names(n)})")
        return value
    return (value,) * n


def axis_names(n: int) -> str:
    return ", ".join(SPATIAL[n])


# ---------------------------------------------------------------------------- geometry

class Window(NamedTuple):
    """Where a sliding window goes, per spatial axis (all tuples of ints, static).

    A window of ``size`` taps spaced ``dilation`` apart spans ``span = dilation·(size − 1) + 1``
    rows of the padded input; it starts at every ``stride``-th row. ``unused`` counts the
    rows of the padded input after the last window ends, which the stride skips.
    """

    size: tuple
    stride: tuple
    dilation: tuple
    pads: tuple  # ((lo, hi), ...)
    in_size: tuple
    out_size: tuple
    unused: tuple

    @property
    def span(self) -> tuple:
        return tuple(d * (k - 1) + 1 for k, d in zip(self.size, self.dilation))

    @property
    def taps(self) -> list:
        """Every tap of the window, row-major: ``[(j_1, ..., j_n), ...]``."""
        return list(np.ndindex(*self.size))


def window(in_size, size, stride, dilation, padding, who: str, what: str = "kernel") -> Window:
    """The :class:`Window` of an ``in_size`` input; a ValueError naming ``who`` if it does
    not fit. ``padding`` is a normalised :func:`padding_arg`.

    "SAME" is worked out as ``jax.lax`` (and TensorFlow) do: ``out = ceil(n / s)``, the total
    padding ``max((out − 1)·s + span − n, 0)``, its smaller half in front.
    """
    n = len(in_size)
    size, stride, dilation = (per_axis(v, n, w, who) for v, w in
                              ((size, f"{what} size"), (stride, "stride"), (dilation, "dilation")))
    if padding == "VALID":
        pads = ((0, 0),) * n
    elif padding == "SAME":
        pads = []
        for length, k, s, d in zip(in_size, size, stride, dilation):
            total = max((-(-length // s) - 1) * s + d * (k - 1) + 1 - length, 0)
            pads.append((total // 2, total - total // 2))
        pads = tuple(pads)
    else:
        pads = per_axis(padding, n, "padding", who) if isinstance(padding, tuple) and \
            isinstance(padding[0], tuple) else ((padding, padding),) * n
    out_size, unused = [], []
    for axis, (length, k, s, d, (lo, hi)) in enumerate(zip(in_size, size, stride, dilation, pads)):
        padded, span = length + lo + hi, d * (k - 1) + 1
        if span > padded:
            spanned = f"{k} {'taps' if what == 'kernel' else 'rows'}" + (
                f" with dilation {d}: {span} rows" if d > 1 else "")
            raise ValueError(f"{who}: the {what} ({spanned}) is larger than the padded input "
                             f"along {SPATIAL[n][axis]} ({length} + {lo} + {hi} = {padded} rows)")
        m = (padded - span) // s + 1
        out_size.append(m)
        unused.append(padded - ((m - 1) * s + span))
    return Window(size, stride, dilation, pads, tuple(in_size), tuple(out_size), tuple(unused))


def transposed_window(in_size, size, stride, dilation, padding, output_padding,
                      who: str) -> Window:
    """The :class:`Window` of the convolution whose input gradient a transposed convolution
    of an ``in_size`` input is: its ``out_size`` is ``in_size``, its ``in_size`` the
    transposed convolution's output size, per spatial axis (span K = d·(k − 1) + 1)::

        out = (n − 1)·s + K − lo − hi + output_padding

    With ``padding`` ``p`` (an int: both sides; pairs ``(lo, hi)``) that is PyTorch's
    ``ConvTranspose`` rule, ``(n − 1)·s − 2p + d·(k − 1) + output_padding + 1``;
    ``"SAME"`` gives ``n·s`` and ``"VALID"`` ``n·s + max(K − s, 0)``, as
    ``jax.lax.conv_transpose``. The output padding rows at the back and rows no window of
    the convolution reads come out as a padding ``hi`` less that much, possibly negative
    (``lax`` then crops): so ``unused`` is 0 and the convolution of an ``out`` input gives
    exactly ``n`` rows, which is what its backward needs. ``output_padding`` must be
    smaller than the stride or the dilation (PyTorch's rule; otherwise it adds rows that no
    tap reaches), and goes with numeric padding only.
    """
    n = len(in_size)
    size, stride, dilation, extra = (per_axis(v, n, w, who) for v, w in (
        (size, "kernel size"), (stride, "stride"), (dilation, "dilation"),
        (output_padding, "output_padding")))
    if padding in PADDINGS and any(extra):
        raise ValueError(f"{who}: output_padding goes with padding given as numbers (PyTorch's "
                         f"rule); with {padding!r} the output size is fixed by the stride")
    given = (per_axis(padding, n, "padding", who) if isinstance(padding, tuple)
             else ((padding, padding),) * n)
    pads, out_size = [], []
    for axis, (m, k, s, d, op) in enumerate(zip(in_size, size, stride, dilation, extra)):
        span = d * (k - 1) + 1
        if op >= max(s, d):
            raise ValueError(f"{who}: output_padding ({op}) along {SPATIAL[n][axis]} must be "
                             f"smaller than the stride ({s}) or the dilation ({d})")
        if padding == "SAME":  # out = n·s: the convolution's "SAME" of an n·s input
            total = span - s
            lo, hi = (total // 2, total - total // 2) if total >= 0 else (0, total)
        elif padding == "VALID":
            lo, hi = 0, min(span - s, 0)
        else:
            lo, hi = given[axis]
            hi -= op
        length = (m - 1) * s + span - lo - hi
        if length < 1:
            raise ValueError(f"{who}: the padding ({lo}, {hi + op}) along {SPATIAL[n][axis]} "
                             f"leaves no output: ({m} − 1)·{s} + {span} − {lo} − {hi + op}"
                             f"{f' + {op}' if op else ''} = {length} rows")
        pads.append((lo, hi))
        out_size.append(length)
    return Window(size, stride, dilation, tuple(pads), tuple(out_size), tuple(in_size),
                  (0,) * n)


def tap_slice(x_padded, geo: Window, tap):
    """What kernel tap ``j`` reads at every output position: rows ``o·s + j·d`` of the
    padded input, ``(B, *in_padded, C) -> (B, *out_size, C)`` (a strided slice)."""
    start = [0] + [j * d for j, d in zip(tap, geo.dilation)] + [0]
    limit = [x_padded.shape[0]] + [j * d + (m - 1) * s + 1 for j, d, m, s in
                                   zip(tap, geo.dilation, geo.out_size, geo.stride)]
    return lax.slice(x_padded, start, limit + [x_padded.shape[-1]], [1, *geo.stride, 1])


def pad_spatial(x, geo: Window, value=0.0):
    """``x (B, *in_size, C)`` with ``geo.pads`` rows of ``value`` around its spatial axes."""
    return lax.pad(x, jnp.asarray(value, x.dtype), [(0, 0, 0), *((lo, hi, 0) for lo, hi in geo.pads),
                                                    (0, 0, 0)])


def tap_reader(a, geo: Window):
    """``(starts, read)`` for a ``lax.scan`` over the kernel taps of ``a (B, *in_size, C)``:
    ``starts (taps, n)``, the first row each tap reads (``j·d`` per axis), and
    ``read(start) -> (B, *out_size, C)``, what the tap starting there reads at every output
    position (:func:`tap_slice` with the tap traced)."""
    padded = pad_spatial(a, geo)
    extent = [(m - 1) * s + 1 for m, s in zip(geo.out_size, geo.stride)]
    every_stride = (slice(None), *(slice(None, None, s) for s in geo.stride), slice(None))

    def read(start):
        x = lax.dynamic_slice(padded, [0, *start, 0], [a.shape[0], *extent, a.shape[-1]])
        return x[every_stride]

    starts = jnp.asarray([[j * d for j, d in zip(tap, geo.dilation)] for tap in geo.taps])
    return starts, read


def patches(a, geo: Window):
    """Every output position's patch of ``a (B, *in_size, C)``: ``(B, *out_size, taps·C)``,
    tap-major as ``W (*kernel_size, C, O).reshape(-1, O)`` has its rows (one group)."""
    padded = pad_spatial(a, geo)
    taps = [tap_slice(padded, geo, tap) for tap in geo.taps]
    return jnp.stack(taps, axis=-2).reshape(*taps[0].shape[:-1], -1)


# ---------------------------------------------------------------------------- the two gradients

def _dimension_numbers(n: int):
    s = SPATIAL[n]
    return ("N" + s + "C", s + "IO", "N" + s + "C")  # NWC/WIO or NHWC/HWIO


def convolve(a, W, geo: Window, groups: int):
    """The forward: ``a (B, *in_size, C)``, ``W (*size, C/groups, O)`` -> ``(B, *out_size, O)``."""
    return lax.conv_general_dilated(a, W, window_strides=geo.stride, padding=geo.pads,
                                    rhs_dilation=geo.dilation,
                                    dimension_numbers=_dimension_numbers(len(geo.size)),
                                    feature_group_count=groups)


def input_grad(delta, W, geo: Window, groups: int):
    """∂C/∂a as a transposed convolution: ``delta (B, *out_size, O) -> (B, *in_size, C)``.

    Per spatial axis the forward reads ``a[i]`` with ``i = o·s + j·d − lo`` (output o, tap j),
    so ∂C/∂a[i] = Σ over the (o, j) with o·s + j·d − lo = i of δ[o]·W[j]ᵀ. Three steps make
    that an ordinary (stride-1) convolution:

    1. *dilate the delta by the stride* (``lhs_dilation=s``): put s − 1 zeros between its
       rows, so δ[o] sits at row o·s of a sequence of length (m − 1)·s + 1;
    2. *flip the kernel* (tap j -> k − 1 − j) and swap its in/out axes: the window now runs
       over the delta, reading row i + lo − j·d for tap j, which after the flip is
       row i − (span − 1 − lo) + j′·d: a convolution with the same dilation d whose input is
       padded by ``span − 1 − lo`` rows in front;
    3. *pad the back so exactly n rows come out*: ``span − 1 − hi + unused``. The ``unused``
       rows are input rows after the last window (the stride skipped them): no output read
       them, so their gradient is zero, and the extra padding delivers those zeros.

    Padding larger than the window makes ``span − 1 − lo`` negative: lax then crops, which
    is right (those delta rows only read padding, which has no gradient).

    Groups: group g of the forward maps input channels g·C/G.. to output channels g·O/G..;
    backwards it maps that group's O/G delta channels to its C/G input channels, so the
    kernel ``(*k, C/G, O)`` becomes ``(*k, O/G, C)`` group by group.
    """
    n = len(geo.size)
    pads = [(span - 1 - lo, span - 1 - hi + r)
            for span, (lo, hi), r in zip(geo.span, geo.pads, geo.unused)]
    c_group, out = W.shape[-2], W.shape[-1]
    flipped = jnp.flip(W, axis=tuple(range(n)))
    swapped = flipped.reshape(*geo.size, c_group, groups, out // groups)       # (*k, C/G, G, O/G)
    swapped = jnp.swapaxes(swapped, -3, -1)                                    # (*k, O/G, G, C/G)
    swapped = swapped.reshape(*geo.size, out // groups, groups * c_group)      # (*k, O/G, C)
    return lax.conv_general_dilated(delta, swapped, window_strides=(1,) * n, padding=pads,
                                    lhs_dilation=geo.stride, rhs_dilation=geo.dilation,
                                    dimension_numbers=_dimension_numbers(n),
                                    feature_group_count=groups)


def _kernel_grad_pads(geo: Window):
    # Keep the forward's front padding, drop the unused rows at the back (negative padding
    # crops): then the delta, dilated by the stride, fits exactly k times at steps of d.
    return [(lo, hi - r) for (lo, hi), r in zip(geo.pads, geo.unused)]


def kernel_grad(a, delta, geo: Window, groups: int):
    """∂C/∂W, ``(*size, C/groups, O)``: :func:`kernel_grad_by_taps` for a 2-D kernel of one
    group, else :func:`kernel_grad_by_conv`. Measured by
    ``scripts/time_conv_kernel_grad.py`` (XLA:CPU, 2 cores): at cnn2d's 64→64 3×3 layer (B 128,
    32×32) the convolution form took 1586 ms (6.1 GFLOP/s), the taps 219 ms (44.0), same
    temporary memory; at cnn1d's 32→32 layer (kernel 5, B 100, 40) the convolution form
    won, 0.9 against 1.2 ms."""
    if groups == 1 and len(geo.size) > 1:
        return kernel_grad_by_taps(a, delta, geo)
    return kernel_grad_by_conv(a, delta, geo, groups)


def kernel_grad_by_taps(a, delta, geo: Window):
    """∂C/∂W of one group as one product per kernel tap: ``∂C/∂W[j] = Σ_batch Σ_positions
    tap_slice(a, j)ᵀ δ``, ``(B·positions, C)ᵀ @ (B·positions, O)``, in a ``lax.scan`` over the
    taps so that one tap's slice of the input is alive at a time (a Python loop let XLA
    hold all of them: 292 MiB against 64 at the layer above)."""
    c, o = a.shape[-1], delta.shape[-1]
    delta = delta.reshape(-1, o)
    starts, read = tap_reader(a, geo)

    def tap_product(_, start):
        return None, read(start).reshape(-1, c).T @ delta

    _, per_tap = lax.scan(tap_product, None, starts)
    return per_tap.reshape(*geo.size, c, o)


def kernel_grad_by_conv(a, delta, geo: Window, groups: int):
    """∂C/∂W as a convolution of the input with the delta: ``(*size, C/groups, O)``.

    ∂C/∂W[j, c, o] = Σ_batch Σ_positions a_pad[p·s + j·d, c]·δ[p, o]: slide the *delta* over
    the padded input as if it were the kernel. Its taps are s apart (``rhs_dilation=s``),
    and the result's position j steps d rows through the input (``window_strides=d``). The
    batch is the axis summed over, so it plays the "input feature" role on both sides
    (dimension letters C of ``a`` and I of ``delta``), while the input channels play the
    "batch" (N) and come out as the kernel's C/groups axis.

    Groups: output channel group g may only meet input channel group g, which is what
    ``batch_group_count=groups`` says of the channels in the N role.
    """
    s = SPATIAL[len(geo.size)]
    return lax.conv_general_dilated(a, delta, window_strides=geo.dilation,
                                    padding=_kernel_grad_pads(geo), rhs_dilation=geo.stride,
                                    dimension_numbers=("C" + s + "N", "I" + s + "O", s + "NC"),
                                    batch_group_count=groups)


def per_example_kernel_grads(a, delta, geo: Window, groups: int):
    """∂ℓ_i/∂W for every example: ``(B, *size, C/groups, O)``, in one convolution.

    :func:`kernel_grad` sums over the batch because the batch is its contracted axis (the
    input-feature role). To keep the examples apart, make every example its own *feature
    group* instead (``feature_group_count = B·G``): feature (i, g) is example i's input
    channel group g (its C/G channels stay in the N role, as before) and meets only
    example i's delta channels of group g, laid out (B, G, O/G) along the delta's O axis.
    Nothing is summed over examples. (``batch_group_count = B·G`` with the channels
    example-major says the same, but XLA's CPU backend ran it far slower: docs/performance.md,
    "Measurements behind design choices".)
    """
    n, batch = len(geo.size), a.shape[0]
    c, out = a.shape[-1], delta.shape[-1]
    s = SPATIAL[n]
    a_ex = a.reshape(batch, *a.shape[1:-1], groups, c // groups)
    a_ex = jnp.moveaxis(a_ex, -2, 1).reshape(batch * groups, *a.shape[1:-1], c // groups)  # (B·G, *n, C/G)
    d_ex = jnp.moveaxis(delta, 0, -2).reshape(*delta.shape[1:-1], 1, batch * out)          # (*m, 1, B·O)
    g = lax.conv_general_dilated(a_ex, d_ex, window_strides=geo.dilation,
                                 padding=_kernel_grad_pads(geo), rhs_dilation=geo.stride,
                                 dimension_numbers=("C" + s + "N", s + "IO", s + "NC"),
                                 feature_group_count=batch * groups)                  # (*k, C/G, B·O)
    return jnp.moveaxis(g.reshape(*geo.size, c // groups, batch, out), -2, 0)


def gram_is_cheaper(geo: Window, in_channels: int, out_channels: int, groups: int) -> bool:
    """Whether the P×P Gram matrices are smaller than a group's K×O/G kernel gradient:
    P² < K·O/G, with P = prod(out_size) positions and K = prod(size)·C/G patch entries."""
    positions = math.prod(geo.out_size)
    patch = math.prod(geo.size) * in_channels // groups
    return positions * positions < patch * (out_channels // groups)


# The Gram path's sum is trusted where its terms cancel by at most this factor
# (Σ|terms| ≤ CANCELLATION · result); see per_example_sq_norms.
CANCELLATION = 16


def per_example_sq_norms(a, delta, geo: Window, groups: int, path: str | None = None,
                         use_bias: bool = True):
    """‖∂ℓ_i/∂W‖² + ‖∂ℓ_i/∂b‖² (the bias term only ``use_bias``) for every example: ``(B,)``.

    Per group, ∂ℓ_i/∂W is U_iᵀδ_i with U_i the unfolded input (P positions × K = prod(k)·C/G
    patch entries) and δ_i (P × O/G). Then ‖U_iᵀδ_i‖²_F = Σ (U_i U_iᵀ) ⊙ (δ_i δ_iᵀ): two P×P
    Gram matrices in place of a K×O/G gradient. Which is smaller is known from the shapes,
    so the choice is static (:func:`gram_is_cheaper`): the Gram path where P² < K·O/G (deep
    layers: few positions, many channels), the gradients themselves otherwise. ``path``
    (``"gram"`` or ``"formed"``) overrides the choice, to compare the two.

    U_i U_iᵀ never needs U_i: column block j of U_i is X_j, what tap j reads (P × C/G: the
    padded input from row j·d on, every s-th row), so U_i U_iᵀ = Σ_j X_j X_jᵀ. A
    ``lax.scan`` over the taps adds them up one at a time, so only one X_j is alive at once
    (with a Python loop XLA kept every X_j alive: docs/performance.md, "Measurements behind
    design choices").

    Accuracy. The Gram sum adds terms of both signs; where they cancel (an example whose
    gradient is small next to its inputs and deltas, e.g. positions whose contributions
    nearly cancel), its rounding error grows with the cancellation factor κ = Σ|terms|/sum,
    about ε·κ/4 relative, where the formed gradient's norm keeps ~ε·√κ; at κ ~ 1e4 the float32
    sum even comes out negative. So the sum is kept only where κ ≤ :data:`CANCELLATION` (16:
    within ~4ε, measured against float64 over random, ReLU-like and near-cancelling batches);
    if any example of the batch exceeds it, those examples are computed from their formed
    gradients, one output channel per group at a time (a ``lax.cond``, so a batch that needs
    none pays nothing; memory B·prod(k)·C). Both paths give results ≥ 0.
    """
    batch, out = delta.shape[0], delta.shape[-1]
    positions = math.prod(geo.out_size)
    d = delta.reshape(batch, positions, out)
    # ∂ℓ_i/∂b = Σ_positions δ_i
    sq_b = jnp.sum(jnp.sum(d, axis=1) ** 2, axis=1) if use_bias else 0
    if path not in (None, "gram", "formed"):
        raise ValueError(f"per_example_sq_norms: path must be None, 'gram' or 'formed', got {path!r}")
    if path is None:
        path = "gram" if gram_is_cheaper(geo, a.shape[-1], out, groups) else "formed"
    if path == "formed":
        g = per_example_kernel_grads(a, delta, geo, groups)
        return jnp.sum(g.reshape(batch, -1) ** 2, axis=1) + sq_b
    d = d.reshape(batch, positions, groups, out // groups)
    gram_delta = jnp.einsum("bpgo,bqgo->bgpq", d, d)
    starts, read = tap_reader(a, geo)

    def add_tap(gram, start):
        x = read(start).reshape(batch, positions, groups, -1)  # X_j, (B, P, G, C/G)
        return gram + jnp.einsum("bpgc,bqgc->bgpq", x, x), None

    zeros = jnp.zeros((batch, groups, positions, positions), a.dtype)
    gram_input, _ = lax.scan(add_tap, zeros, starts)
    terms = gram_input * gram_delta
    sq_w = jnp.sum(terms, axis=(1, 2, 3))
    trusted = CANCELLATION * sq_w >= jnp.sum(jnp.abs(terms), axis=(1, 2, 3))  # so sq_w ≥ 0
    sq_w = lax.cond(jnp.all(trusted), lambda: sq_w, lambda: jnp.where(
        trusted, sq_w, _kernel_sq_norms_by_column(a, delta, geo, groups)))
    return sq_w + sq_b


def _kernel_sq_norms_by_column(a, delta, geo: Window, groups: int):
    """‖∂ℓ_i/∂W‖² for every example ``(B,)`` from the formed gradients, one output channel of
    every group at a time (a ``lax.scan``: memory B·prod(k)·C instead of B·prod(k)·C·O/G)."""
    batch, per_group = delta.shape[0], delta.shape[-1] // groups
    columns = jnp.moveaxis(delta.reshape(*delta.shape[:-1], groups, per_group), -1, 0)

    def add_column(total, d):  # d: (B, *out_size, G), output channel j of every group
        g = per_example_kernel_grads(a, d, geo, groups)
        return total + jnp.sum(g.reshape(batch, -1) ** 2, axis=1), None

    return lax.scan(add_column, jnp.zeros((batch,), delta.dtype), columns)[0]


# ---------------------------------------------------------------------------- the layer
