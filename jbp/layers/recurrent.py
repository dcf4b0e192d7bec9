"""Recurrent layers, ``rnn`` (Elman), ``gru`` and ``lstm``, and ``bidirectional``; BPTT by hand.

Lecture map. A recurrent layer applies one cell at every time step, with the same weights
at every step, and feeds its state back in:

    z_t = x_t W_x + b + h_{t−1} W_h        G gate blocks of H units: z_t is (B, G·H)
    h_t = cell(z_t, h_{t−1})               (and the LSTM's cell state c_t)

Unrolled over time this is a deep net of T layers sharing their weights, so the backward
pass is the lecture's backward pass over the unrolled net, last step first:
backpropagation through time (BPTT). ∂C/∂h_t has two sources: the output at step t
(dy_t) and step t+1 (the "Σ w ∂C/∂z′" of the hidden-layer case, here δz_{t+1} W_hᵀ plus
any direct path, GRU's u·∂C/∂h and LSTM's f·∂C/∂c). A reverse ``lax.scan`` carries it.
A shared weight sums its gradient over the steps: ∂C/∂W_h = Σ_t h_{t−1}ᵀ δz_t.

The cells' equations, and their derivatives step by step, are in
:mod:`jbp.layers.recurrent_cells`, each cell's backward beside its forward; this module
runs them over time.

Cost. The forward computes the input projection ``x W_x + b`` of every step as one big
matmul before its scan, which does only ``h_{t−1} W_h`` and the gates. The backward's
reverse scan does only the gates' derivatives and ``δz_t W_hᵀ``; ∂C/∂W_x = Σ x_tᵀ δz_t,
∂C/∂b, ∂C/∂x = δz W_xᵀ and ∂C/∂W_h = Σ h_{t−1}ᵀ δz_t are big matmuls after it.

Shapes: ``x (B, T, F) -> y (B, T, H)``, or with ``return_sequences=False`` ``y (B, H)``,
the state after the last step run. Params, weights ``(in, out)`` applied as ``x @ W + b``
(as dense), gate blocks side by side on the last axis:
``{"W_x": (F, G·H), "W_h": (H, G·H), "b": (G·H,)}``; GRU adds ``"b_hn": (H,)``;
``initial_state="learned"`` adds ``"h0": (H,)`` (LSTM: and ``"c0": (H,)``), else the
state starts at zero. ``reverse=True`` runs from the last step to the first, and y stays
aligned with x: y_t is the state after reading x_{T−1}, ..., x_t (so the last step run,
and the output of ``return_sequences=False``, has read the whole sequence back to x_0).

Lengths (the side input ``lengths``, :mod:`jbp.masks`): a step past example i's length is
padding. It keeps the state (``h_t = h_{t−1}``, the cell's result dropped), and its output
is 0, so the state after the last step run is the state at the last real step, and a
reversed run starts at each example's last real step. BPTT mirrors it: at a padding step
δz_t = 0 and ∂C/∂h_{t−1} = ∂C/∂h_t, so no gradient reaches the padding's inputs or flows
through the cell there.

Cache (:class:`_Cache`): ``x``; the initial state; the state after every step (h, and c
for LSTM) and the gate activations the cell's derivative needs (GRU: r, u, n and
h_{t−1} W_hn + b_hn; LSTM: i, f, g, o), time-major in the order the steps ran; and a
reference to the params (no copy) for the per-example rule — nothing else.

Per example: the reverse scan keeps the rows of a batch apart, so run on the per-example
cotangent it gives every example's δz_t at once; ∂ℓ_i/∂W_x = Σ_t x_itᵀ δz_it and so on
keep the batch axis (:func:`_rule`). :func:`bptt_deltas` returns the ∂C/∂h_t the reverse
scan carried, for every step: the lecture's vanishing gradients, step by step.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jbp import masks
from jbp.init import constant, normal
from jbp.layer import (Layer, PerExampleRule, as_shape, boolean, call_text, cast_like,
                       constructor, param_dtype, positive_int)
from jbp.layers.branches import parallel
from jbp.layers.recurrent_cells import CELLS, Cell

INITIAL_STATES = ("zeros", "learned")


# ---------------------------------------------------------------------------- the scans

class _Options(NamedTuple):
    """What a recurrent layer was built from (its ``Layer.info``)."""

    cell: Cell
    hidden: int
    initial_state: str
    reverse: bool
    return_sequences: bool
    dtype: object
    make: Callable  # the public constructor, for bidirectional's reversed twin


def _time_major(a, reverse):
    """``(B, T, ·)`` -> ``(T, B, ·)`` in the order the steps run."""
    a = jnp.swapaxes(a, 0, 1)
    return a[::-1] if reverse else a


def _batch_major(a, reverse):
    """The inverse of :func:`_time_major`: ``(T, B, ·)`` in run order -> ``(B, T, ·)``."""
    return jnp.swapaxes(a[::-1] if reverse else a, 0, 1)


def _bptt(opts, params, cache, dy):
    """The reverse scan: ``(δzx (T, B, G·H), ∂C/∂state_{−1}, ∂C/∂h_t (T, B, H))``, time-major
    in the order the steps ran; row i of each depends on row i of ``dy`` alone. A padding
    step (``cache.real`` False) kept the state as it was: its δzx is 0 and ∂C/∂state passes
    through it unchanged."""
    state0, states, saved, real = cache.state0, cache.states, cache.saved, cache.real
    cell = opts.cell
    prev = tuple(jnp.concatenate([s0[None], s[:-1]]) for s0, s in zip(state0, states))
    dtype = jnp.result_type(dy, states[0])
    zeros = jnp.zeros(state0[0].shape, dtype)
    if opts.return_sequences:
        dys, dstate = _time_major(dy.astype(dtype), opts.reverse), (zeros,) * cell.n_states
        if real is not None:
            dys = jnp.where(real, dys, 0)  # a padding step's output is a constant 0
    else:  # only the last state is an output: ∂C/∂h_{T−1} = dy starts the scan
        dys, dstate = None, (dy.astype(dtype),) + (zeros,) * (cell.n_states - 1)

    def step(dstate, inputs):
        dy_t, saved_t, state_t, prev_t, real_t = inputs
        dh = dstate[0] if dy_t is None else dstate[0] + dy_t  # from step t+1 and output t
        dstate = (dh,) + dstate[1:]
        dzx, dprev = cell.back(params, saved_t, state_t, prev_t, dstate)
        if real_t is not None:
            dzx = jnp.where(real_t, dzx, 0)
            dprev = tuple(jnp.where(real_t, a, b) for a, b in zip(dprev, dstate))
        return dprev, (dzx, dh)

    dstate0, (dzx, dh) = lax.scan(step, dstate, (dys, saved, states, prev, real), reverse=True)
    return dzx, dstate0, dh, prev[0]


class _Cache(NamedTuple):
    x: jax.Array  # (B, T, F), for ∂C/∂W_x
    state0: tuple  # the initial state, (B, H) each
    states: tuple  # every step's state, (T, B, H) each, time-major in the order run
    saved: object  # the cell's gate activations, (T, B, ·)
    real: jax.Array | None  # (T, B, 1) bool in run order, False at padding; None: no lengths


def _forward(opts, params, x, who, side):
    W_x, W_h, H = params["W_x"], params["W_h"], opts.hidden
    if x.ndim != 3 or x.shape[-1] != W_x.shape[0]:
        raise ValueError(f"{who}: expected input of shape (batch, time, {W_x.shape[0]}) "
                         f"({W_x.shape[0]} features, as at init), got {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{who}: the input has no time steps (shape {tuple(x.shape)})")
    zx = _time_major(x @ W_x + params["b"], opts.reverse)  # every step's x_t W_x + b at once
    dtype = jnp.result_type(zx, W_h)
    start = ["h0", "c0"][:opts.cell.n_states] if opts.initial_state == "learned" else ()
    # zeros like a slice of zx: under shard_map they vary over the devices as the state will
    zero = jnp.zeros_like(zx[0, :, :H], dtype=dtype)
    state0 = tuple(zero + params[k].astype(dtype) for k in start) or (zero,) * opts.cell.n_states

    lengths = masks.lengths_of(side, x.shape[0], x.shape[1], who)
    real = None if lengths is None else _time_major(
        masks.positions(lengths, x.shape[1])[..., None], opts.reverse)

    def step(state, inputs):
        zx_t, real_t = inputs
        new, saved = opts.cell.step(params, zx_t, state)
        if real_t is not None:  # a padding step keeps the state
            new = tuple(jnp.where(real_t, a, b) for a, b in zip(new, state))
        return new, (new, saved)

    last, (states, saved) = lax.scan(step, state0, (zx.astype(dtype), real))
    if not opts.return_sequences:
        y = last[0]
    else:
        y = _batch_major(states[0] if real is None else jnp.where(real, states[0], 0),
                         opts.reverse)
    return y, _Cache(x, state0, states, saved, real)


def _grads(opts, params, cache, dy, *, per_example=False):
    """``(∂C/∂params, δzx)`` from one reverse scan, ``δzx`` in x's order ``(B, T, G·H)``;
    with ``per_example`` every gradient keeps the batch axis: ∂ℓ_i/∂params for a ``dy``
    whose row i is ∂ℓ_i/∂y_i."""
    x, saved = cache.x, cache.saved
    dzx, dstate0, _, h_prev = _bptt(opts, params, cache, dy)
    b = "b" if per_example else ""
    dzh = opts.cell.recurrent_delta(dzx, saved)
    dzx_b = _batch_major(dzx, opts.reverse)
    grads = {"W_x": jnp.einsum(f"btf,btg->{b}fg", x, dzx_b),      # Σ_t x_tᵀ δz_t
             "W_h": jnp.einsum(f"tbh,tbg->{b}hg", h_prev, dzh),   # Σ_t h_{t−1}ᵀ δz_t
             "b": jnp.einsum(f"tbg->{b}g", dzx)}
    if "b_hn" in params:
        grads["b_hn"] = jnp.einsum(f"tbh->{b}h", dzh[..., 2 * opts.hidden:])
    for name, d in zip(("h0", "c0"), dstate0):  # the learned start feeds step 0 of every row
        if name in params:
            grads[name] = d if per_example else jnp.sum(d, axis=0)
    return {k: grads[k].astype(params[k].dtype) for k in params}, dzx_b


def bptt_deltas(layer: Layer, params, cache, dy) -> jax.Array:
    """∂C/∂h_t for every step t, ``(B, T, H)`` in x's order: what BPTT carried back.

    ``layer`` is an ``rnn``, ``gru`` or ``lstm``; ``cache`` its forward's cache; ``dy``
    ∂C/∂y, shaped like its output (for a layer inside a model: ``jbp.backprop``'s delta of
    that layer). ∂C/∂h_t is the *total* derivative: through the output at step t and
    through every later step (the one the layer's backward scans with; its norm over the
    steps shows gradients vanishing, or not, as they go back in time).
    """
    opts = _options(layer, "bptt_deltas")
    return _batch_major(_bptt(opts, params, cache, dy)[2], opts.reverse)


def _options(layer, who) -> _Options:
    if not isinstance(layer, Layer) or not isinstance(layer.info, _Options):
        got = layer.name if isinstance(layer, Layer) else type(layer).__name__
        raise TypeError(f"{who}: needs a recurrent layer (jbp.rnn, jbp.gru or jbp.lstm), "
                        f"got {got}")
    return layer.info


def _rule(opts) -> PerExampleRule:
    """∂ℓ_i/∂params: the reverse scan run once on the per-example cotangent (it keeps rows
    apart, so it gives every example's δz_t), then the sums over t with the batch axis kept."""
    return PerExampleRule(lambda params, cache, delta: _grads(opts, params, cache, delta,
                                                              per_example=True)[0])


def _recurrent(opts: _Options) -> Layer:
    cell, H = opts.cell, opts.hidden
    who = call_text(opts.make, H, initial_state=opts.initial_state, reverse=opts.reverse,
                    return_sequences=opts.return_sequences)
    dtype = opts.dtype
    names = ["W_x", "W_h", "b"] + ["b_hn"] * (cell.kind == "gru") + (
        ["h0", "c0"][:cell.n_states] if opts.initial_state == "learned" else [])

    def init(key, in_shape):
        shape = as_shape(in_shape, who, ndim=2, layout="(time, features)")
        F, G, dt = shape[1], cell.gates, param_dtype(dtype, who)
        k_x, k_h = jax.random.split(key)
        # orthogonal W_h, one per gate: a QR, which needs float32 or float64 (not bfloat16)
        orthogonal = jax.nn.initializers.orthogonal()
        qr_dtype = jnp.promote_types(dt, jnp.float32)
        W_h = jnp.concatenate([orthogonal(k, (H, H), qr_dtype) for k in jax.random.split(k_h, G)],
                              axis=1)
        b = np.zeros((G * H,), dt)
        if cell.kind == "lstm":
            b[H:2 * H] = 1  # forget gate open
        params = {"W_x": normal(k_x, (F, G * H), dt) / F**0.5,  # as dense
                  "W_h": W_h.astype(dt), "b": jnp.asarray(b)}
        params.update({k: constant(0, (H,), dt) for k in names[3:]})
        return ((shape[0], H) if opts.return_sequences else (H,)), params

    def forward(params, x, *, key=None, train=False, state=None, side=None):
        return (*_forward(opts, params, x, who, side), state)

    def backward(params, cache, dy):
        grads, dzx = _grads(opts, params, cache, dy)
        return grads, cast_like(dzx @ params["W_x"].T, cache.x)  # ∂C/∂x_t = δz_t W_xᵀ

    return Layer(who, init, forward, backward, per_example=_rule(opts), side_inputs=("lengths",),
                 info=opts)



def _build(kind, make, hidden, initial_state, reverse, return_sequences, dtype) -> Layer:
    hidden = positive_int(hidden, "hidden", kind)
    if initial_state not in INITIAL_STATES:
        raise ValueError(f"{kind}: initial_state must be one of {INITIAL_STATES}, got "
                         f"{initial_state!r}")
    reverse, return_sequences = (boolean(reverse, "reverse", kind),
                                 boolean(return_sequences, "return_sequences", kind))
    return _recurrent(_Options(CELLS[kind], hidden, initial_state, reverse, return_sequences,
                               dtype, make))


@constructor
def rnn(hidden: int, *, initial_state: str = "zeros", reverse: bool = False,
        return_sequences: bool = True, dtype=jnp.float32) -> Layer:
    """An Elman RNN of ``hidden`` tanh units: ``h_t = tanh(x_t W_x + b + h_{t−1} W_h)``.

    Params ``{"W_x": (F, H), "W_h": (H, H), "b": (H,)}`` (+ ``"h0": (H,)`` for a learned
    initial state); ``W_x`` is N(0, 1/F), ``W_h`` orthogonal, ``b`` zero.
    ``x (B, T, F) -> y (B, T, H)``, or ``(B, H)`` with ``return_sequences=False``.
    """
    return _build("rnn", rnn, hidden, initial_state, reverse, return_sequences, dtype)


@constructor
def gru(hidden: int, *, initial_state: str = "zeros", reverse: bool = False,
        return_sequences: bool = True, dtype=jnp.float32) -> Layer:
    """A GRU of ``hidden`` units, the cuDNN/PyTorch/Flax variant (the reset gate applied
    after the recurrent matmul): with ``[r, u, n]`` blocks,
    ``r = σ(x W_xr + b_r + h W_hr)``, ``u = σ(x W_xu + b_u + h W_hu)``,
    ``n = tanh(x W_xn + b_n + r·(h W_hn + b_hn))``, ``h_t = (1 − u)·n + u·h_{t−1}``.

    Params ``{"W_x": (F, 3H), "W_h": (H, 3H), "b": (3H,), "b_hn": (H,)}`` (+ ``"h0"``).
    ``x (B, T, F) -> y (B, T, H)``, or ``(B, H)`` with ``return_sequences=False``.
    """
    return _build("gru", gru, hidden, initial_state, reverse, return_sequences, dtype)


@constructor
def lstm(hidden: int, *, initial_state: str = "zeros", reverse: bool = False,
         return_sequences: bool = True, dtype=jnp.float32) -> Layer:
    """An LSTM of ``hidden`` units (no peepholes): with ``[i, f, g, o]`` blocks of
    ``z = x W_x + b + h_{t−1} W_h``, ``c_t = σ(z_f)·c_{t−1} + σ(z_i)·tanh(z_g)``,
    ``h_t = σ(z_o)·tanh(c_t)``; the forget gate's bias starts at 1.

    Params ``{"W_x": (F, 4H), "W_h": (H, 4H), "b": (4H,)}`` (+ ``"h0"``, ``"c0"``).
    ``x (B, T, F) -> y (B, T, H)``, or ``(B, H)`` with ``return_sequences=False``.
    """
    return _build("lstm", lstm, hidden, initial_state, reverse, return_sequences, dtype)


@constructor
def bidirectional(layer: Layer) -> Layer:
    """``layer`` (an ``rnn``, ``gru`` or ``lstm`` running forward) and its twin with
    ``reverse=True``, outputs concatenated on the last axis: ``(B, T, 2H)``, or ``(B, 2H)``
    with ``return_sequences=False`` (the forward run's last state, then the reversed
    run's, which has read the whole sequence back to x_0).

    Params ``(forward params, reversed params)``. A composite (``parallel`` with
    ``combine="concat"``): both runs are walked, for ``backprop`` and per-example rules.
    """
    opts = _options(layer, "bidirectional")
    if opts.reverse:
        raise ValueError(f"bidirectional: give the layer that runs forward (it builds the "
                         f"reversed twin), got {layer.name}")
    twin = opts.make(opts.hidden, initial_state=opts.initial_state, reverse=True,
                     return_sequences=opts.return_sequences, dtype=opts.dtype)
    return parallel(layer, twin, combine="concat").replace(name=f"bidirectional({layer.name})")
