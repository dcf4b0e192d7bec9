"""Position embeddings and the pre-norm transformer block.

- ``positional_embedding(max_len, kind)``: ``y = x + P[:T]`` on ``x (B, T, d)``. ``kind=
  "learned"``: ``P`` is a parameter ``(max_len, d)``, so ∂C/∂P[t] = Σ_batch ∂C/∂y[:, t] for
  ``t < T`` and zero for the positions this input does not reach. ``kind="sinusoidal"``: the
  fixed table ``P[t, 2i] = sin(t/10000^(2i/d))``, ``P[t, 2i+1] = cos(t/10000^(2i/d))``, no
  parameters. Either way ∂C/∂x = ∂C/∂y.
- ``transformer_block(d_model, heads, head_dim, mlp_hidden)``: the pre-norm block ::

      h = x + attention(layer_norm(x))
      y = h + dense(d_model)(gelu(dense(mlp_hidden)(layer_norm(h))))

  a ``serial`` of two ``residual`` blocks around ``layer_norm``, ``attention``, ``dense`` and
  ``gelu``: its children are listed (``Layer.layers``), so its backward is those
  composites' walk and every child reaches ``backprop``, the per-example functions and the
  checks of the model's boundary.
"""

import math

import jax.numpy as jnp
import numpy as np

from jbp.init import normal
from jbp.layer import EXAMPLEWISE, Layer, PerExampleRule, as_shape, constructor, param_dtype, positive_int
from jbp.layers.activations import gelu
from jbp.layers.attention import attention
from jbp.layers.branches import residual
from jbp.layers.dense import dense
from jbp.layers.norm import layer_norm
from jbp.layers.serial import serial

KINDS = ("learned", "sinusoidal")


def sinusoidal_table(t: int, d: int) -> np.ndarray:
    """The fixed ``(t, d)`` table in float64: sin in the even columns, cos in the odd ones."""
    angle = np.arange(t)[:, None] / 10000.0 ** (2 * np.arange((d + 1) // 2) / d)
    table = np.empty((t, 2 * angle.shape[1]))
    table[:, 0::2], table[:, 1::2] = np.sin(angle), np.cos(angle)
    return table[:, :d]


def _pad_positions(a, max_len: int):
    """``a (..., T, d)`` with zero rows appended up to ``max_len`` positions."""
    pad = [(0, 0)] * a.ndim
    pad[-2] = (0, max_len - a.shape[-2])
    return jnp.pad(a, pad)


@constructor
def positional_embedding(max_len: int, kind: str = "learned", *, dtype=jnp.float32) -> Layer:
    """Add a position embedding to ``x (B, T, d)``, ``T ≤ max_len``; ``y`` has ``x``'s dtype.

    ``kind="learned"``: params ``{"P": (max_len, d)}`` ~ N(0, 0.02²); cache None; per example
    ∂ℓ_i/∂P = δ_i padded to ``max_len`` rows. ``kind="sinusoidal"``: params ``{}``.
    """
    max_len = positive_int(max_len, "max_len", "positional_embedding")
    if kind not in KINDS:
        raise ValueError(f"positional_embedding: kind must be one of {KINDS}, got {kind!r}")
    learned = kind == "learned"
    who = f"positional_embedding({max_len}, {kind})"

    def check_input(x, d=None):
        if x.ndim != 3 or (d is not None and x.shape[-1] != d):
            want = f"(B, T, {d})" if d is not None else "(B, T, d)"
            raise ValueError(f"{who}: expected input of shape {want}, got {tuple(x.shape)}")
        if not 1 <= x.shape[1] <= max_len:
            raise ValueError(f"{who}: expected 1 ≤ T ≤ max_len = {max_len} positions, got "
                             f"T = {x.shape[1]}")

    def init(key, in_shape):
        shape = as_shape(in_shape, who)
        if len(shape) != 2:
            raise ValueError(f"{who}: expects a per-example shape (T, d), got {shape}")
        if shape[0] > max_len:
            raise ValueError(f"{who}: T = {shape[0]} positions exceed max_len = {max_len}")
        if not learned:
            return shape, {}
        return shape, {"P": normal(key, (max_len, shape[1]), param_dtype(dtype, who), scale=0.02)}

    def forward(params, x, *, key=None, train=False, state=None, side=None):
        if not learned:
            check_input(x)
            table = sinusoidal_table(x.shape[1], x.shape[2])
            return x + jnp.asarray(table, x.dtype), None, state
        check_input(x, params["P"].shape[1])
        return (x + params["P"][: x.shape[1]]).astype(x.dtype), None, state

    def backward(params, cache, dy):
        if not learned:
            return {}, dy
        dP = _pad_positions(jnp.sum(dy, axis=0), max_len)
        return {"P": dP.astype(params["P"].dtype)}, dy

    rule = PerExampleRule(lambda params, cache, delta: {"P": _pad_positions(delta, max_len)})
    return Layer(who, init, forward, backward, per_example=rule if learned else EXAMPLEWISE)


@constructor
def transformer_block(d_model: int, heads: int, head_dim: int, mlp_hidden: int, *,
                      causal: bool = False, block_size: int = 128, dtype=jnp.float32) -> Layer:
    """A pre-norm transformer block on ``x (B, T, d_model) -> (B, T, d_model)`` (see the
    module docstring).

    Params (those of the serial it is): ``((layer_norm, attention), (layer_norm,
    dense(mlp_hidden), {}, dense(d_model)))``. The MLP's first dense is He-initialised (gelu).
    """
    d_model = positive_int(d_model, "d_model", "transformer_block")
    mlp_hidden = positive_int(mlp_hidden, "mlp_hidden", "transformer_block")
    attend = attention(heads, head_dim, causal=causal, block_size=block_size, dtype=dtype)
    mlp = serial(layer_norm(dtype=dtype), dense(mlp_hidden, gain=math.sqrt(2), dtype=dtype),
                 gelu(), dense(d_model, dtype=dtype))
    block = serial(residual(serial(layer_norm(dtype=dtype), attend)), residual(mlp))
    who = (f"transformer_block({d_model}, {heads}, {head_dim}, {mlp_hidden}"
           f"{', causal' if causal else ''})")

    def init(key, in_shape):
        shape = as_shape(in_shape, who, ndim=2, layout=f"(T, {d_model})")
        if shape[1] != d_model:
            raise ValueError(f"{who}: expects a per-example shape (T, {d_model}), got {shape}")
        return block.init(key, shape)

    return block.replace(name=who, init=init)
