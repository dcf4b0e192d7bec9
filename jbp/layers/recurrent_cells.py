"""The cells of :mod:`jbp.layers.recurrent`: one time step forward and backward, by hand.

Each cell is a :class:`Cell` of two functions side by side, its equations written above
them. Shared notation: ``zx_t = x_t W_x + b`` (computed for every step before the scan),
``H`` units, ``G`` gate blocks stacked on the last axis of ``W_x (F, G·H)``, ``W_h (H, G·H)``
and ``b (G·H,)``; ``dh`` is the total ∂C/∂h_t (output t plus step t+1), ``δzx_t`` =
∂C/∂zx_t, and a gate's δ (δr, δi, ...) is ∂C/∂(its pre-activation). Every array is
``(B, ·)``: one step of the whole batch, rows kept apart.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

sigmoid = jax.nn.sigmoid


class Cell(NamedTuple):
    """One step of a recurrent cell, forward and backward (all arrays (B, ·), one step).

    ``step(params, zx_t, state) -> (state_t, saved_t)``: ``zx_t = x_t W_x + b`` (B, G·H);
    ``state`` a tuple (h,) or (h, c). ``back(params, saved_t, state_t, prev, dstate) ->
    (δzx_t, dprev)``: ``dstate`` the total ∂C/∂state_t, ``δzx_t`` = ∂C/∂zx_t, ``dprev`` =
    ∂C/∂state_{t−1} through this step. ``recurrent_delta(δzx, saved)``: ∂C/∂(h_{t−1} W_h),
    the delta that ∂C/∂W_h sums (δzx itself unless a gate multiplies the product).
    """

    kind: str
    gates: int
    n_states: int
    step: Callable
    back: Callable
    recurrent_delta: Callable = lambda dzx, saved: dzx


# ---------------------------------------------------------------------------- Elman RNN:
#   h_t = tanh(z_t),  z_t = x_t W_x + b + h_{t−1} W_h
#   δz_t = ∂C/∂h_t · (1 − h_t²),  ∂C/∂h_{t−1} = δz_t W_hᵀ

def _rnn_step(params, zx, state):
    (h,) = state
    h = jnp.tanh(zx + h @ params["W_h"])
    return (h,), ()


def _rnn_back(params, saved, state, prev, dstate):
    (h,), (dh,) = state, dstate
    dz = dh * (1 - h * h)
    return dz, (dz @ params["W_h"].T,)


# ---------------------------------------------------------------------------- GRU, the
# variant of cuDNN, PyTorch and Flax: the reset gate multiplies the recurrent product
# (after the matmul, with its own bias b_hn), so one matmul h_{t−1} W_h serves all gates.
# Blocks [r, u, n] (u is the update gate, often called z):
#   r = σ(zx_r + h W_hr)   u = σ(zx_u + h W_hu)   q = h W_hn + b_hn
#   n = tanh(zx_n + r·q)   h_t = (1 − u)·n + u·h_{t−1}
# Backward, dh = ∂C/∂h_t:
#   δn = dh (1 − u)(1 − n²)   δu = dh (h_{t−1} − n) u(1 − u)   δr = δn q r(1 − r)
#   δzx = [δr, δu, δn]        δq = δn·r, so the recurrent delta is [δr, δu, δn·r]
#   ∂C/∂h_{t−1} = [δr, δu, δn·r] W_hᵀ + dh·u

def _gru_step(params, zx, state):
    (h,) = state
    H = h.shape[-1]
    zh = h @ params["W_h"]
    r = sigmoid(zx[:, :H] + zh[:, :H])
    u = sigmoid(zx[:, H:2 * H] + zh[:, H:2 * H])
    q = zh[:, 2 * H:] + params["b_hn"]
    n = jnp.tanh(zx[:, 2 * H:] + r * q)
    return (n + u * (h - n),), (r, u, n, q)


def _gru_back(params, saved, state, prev, dstate):
    (r, u, n, q), (h_prev,), (dh,) = saved, prev, dstate
    dn = dh * (1 - u) * (1 - n * n)
    du = dh * (h_prev - n) * u * (1 - u)
    dr = dn * q * r * (1 - r)
    dzh = jnp.concatenate([dr, du, dn * r], axis=-1)
    return jnp.concatenate([dr, du, dn], axis=-1), (dzh @ params["W_h"].T + dh * u,)


def _gru_recurrent_delta(dzx, saved):
    r = saved[0]
    H = r.shape[-1]
    return jnp.concatenate([dzx[..., :2 * H], dzx[..., 2 * H:] * r], axis=-1)


# ---------------------------------------------------------------------------- LSTM.
# Blocks [i, f, g, o]; the forget gate's bias starts at 1 (remember by default):
#   i, f, o = σ(z_i), σ(z_f), σ(z_o)   g = tanh(z_g)
#   c_t = f·c_{t−1} + i·g             h_t = o·tanh(c_t)
# Backward, dh = ∂C/∂h_t and dc = ∂C/∂c_t from step t+1:
#   dc ← dc + dh·o·(1 − tanh²c_t)    (c_t feeds h_t and c_{t+1}: the deltas add up)
#   δi = dc·g·i(1 − i)   δf = dc·c_{t−1}·f(1 − f)   δg = dc·i·(1 − g²)   δo = dh·tanh c_t·o(1 − o)
#   ∂C/∂h_{t−1} = δz W_hᵀ,  ∂C/∂c_{t−1} = dc·f   (the path along which gradients need not vanish)

def _lstm_step(params, zx, state):
    h, c = state
    H = h.shape[-1]
    z = zx + h @ params["W_h"]
    i, f, o = sigmoid(z[:, :H]), sigmoid(z[:, H:2 * H]), sigmoid(z[:, 3 * H:])
    g = jnp.tanh(z[:, 2 * H:3 * H])
    c = f * c + i * g
    return (o * jnp.tanh(c), c), jnp.concatenate([i, f, g, o], axis=-1)


def _lstm_back(params, saved, state, prev, dstate):
    (_, c), (_, c_prev), (dh, dc) = state, prev, dstate
    H = c.shape[-1]
    i, f, g, o = (saved[:, k * H:(k + 1) * H] for k in range(4))
    tc = jnp.tanh(c)
    dc = dc + dh * o * (1 - tc * tc)
    dz = jnp.concatenate([dc * g * i * (1 - i), dc * c_prev * f * (1 - f),
                          dc * i * (1 - g * g), dh * tc * o * (1 - o)], axis=-1)
    return dz, (dz @ params["W_h"].T, dc * f)


CELLS = {"rnn": Cell("rnn", 1, 1, _rnn_step, _rnn_back),
         "gru": Cell("gru", 3, 1, _gru_step, _gru_back, _gru_recurrent_delta),
         "lstm": Cell("lstm", 4, 2, _lstm_step, _lstm_back)}
