"""Position embeddings and the pre-norm transformer block.

- ``positional_embedding(max_len, kind)``: ``y = x + P[:T]`` on ``x (B, T, d)``. ``kind=
  "learned"``: ``P`` is a parameter ``(max_len, d)``, so ∂C/∂P[t] = Σ_batch ∂C/∂y[:, t] for
  ``t < T`` and zero for the positions this input does not reach. ``kind="sinusoidal"``: the
  fixed table ``P[t, 2i] = sin(t/10000^(2i/d))``, ``P[t, 2i+1] = cos(t/10000^(2i/d))``, no
  parameters. Either way ∂C/∂x = ∂C/∂y.
- ``transformer_block(heads, head_dim, mlp_hidden)``: the pre-norm block ::

      h = x + attention(layer_norm(x))
      y = h + dense(d)(gelu(dense(mlp_hidden)(layer_norm(h))))

  built from ``serial``, ``residual``, ``layer_norm``, ``attention``, ``dense`` and ``gelu``,
  so its backward is those composites' walk (every child reaches ``backprop`` and the
  per-example functions). The MLP's last dense maps back to the model width ``d``, which
  only the input tells: the block is built for the ``d`` it meets (in ``init`` from the
  per-example shape, in ``forward``/``walk`` from the array), and equal widths build equal
  blocks. So the Layer lists no ``layers`` of its own: its children exist per width.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from jbp.init import normal
from jbp.layer import (EXAMPLEWISE, Layer, PerExampleRule, as_shape, check_array,
                       check_empty_params, constructor, param_dtype, positive_int)
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
        check_array(x, who)
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

    def forward(params, x, *, key=None, train=False):
        if not learned:
            check_empty_params(params, who)
            check_input(x)
            table = sinusoidal_table(x.shape[1], x.shape[2])
            return x + jnp.asarray(table, x.dtype), None
        if not isinstance(params, dict) or set(params) != {"P"} or params["P"].ndim != 2 \
                or params["P"].shape[0] != max_len:
            raise TypeError(f"{who}: params must be a dict {{'P': ({max_len}, d)}}")
        check_input(x, params["P"].shape[1])
        return (x + params["P"][: x.shape[1]]).astype(x.dtype), None

    def backward(params, cache, dy):
        if not learned:
            return {}, dy
        dP = _pad_positions(jnp.sum(dy, axis=0), max_len)
        return {"P": dP.astype(params["P"].dtype)}, dy

    rule = PerExampleRule(lambda cache, delta: {"P": _pad_positions(delta, max_len)})
    return Layer(who, init, forward, backward, per_example=rule if learned else EXAMPLEWISE)


@constructor
def transformer_block(heads: int, head_dim: int, mlp_hidden: int, *, causal: bool = False,
                      block_size: int = 128, dtype=jnp.float32) -> Layer:
    """A pre-norm transformer block on ``x (B, T, d) -> (B, T, d)`` (see the module docstring).

    Params (those of the serial it is): ``((layer_norm, attention), (layer_norm,
    dense(mlp_hidden), {}, dense(d)))``. The MLP's first dense is He-initialised (gelu).
    """
    mlp_hidden = positive_int(mlp_hidden, "mlp_hidden", "transformer_block")
    attend = attention(heads, head_dim, causal=causal, block_size=block_size, dtype=dtype)
    who = f"transformer_block({heads}, {head_dim}, {mlp_hidden}{', causal' if causal else ''})"

    def block(d: int) -> Layer:
        mlp = serial(layer_norm(dtype=dtype), dense(mlp_hidden, gain=math.sqrt(2), dtype=dtype),
                     gelu(), dense(d, dtype=dtype))
        return serial(residual(serial(layer_norm(dtype=dtype), attend)), residual(mlp))

    def init(key, in_shape):
        shape = as_shape(in_shape, who)
        if len(shape) != 2:
            raise ValueError(f"{who}: expects a per-example shape (T, d), got {shape}")
        return block(shape[1]).init(key, shape)

    def forward(params, x, *, key=None, train=False, side=None):
        check_array(x, who)
        if x.ndim != 3:
            raise ValueError(f"{who}: expected input of shape (B, T, d), got {tuple(x.shape)}")
        try:
            d = params[0][0]["scale"].shape[0]
        except (TypeError, KeyError, IndexError, AttributeError):
            raise TypeError(f"{who}: params must be those init gives, ((layer_norm, attention), "
                            f"(layer_norm, dense, {{}}, dense))") from None
        if x.shape[-1] != d:
            raise ValueError(f"{who}: expected input of shape (B, T, {d}) (the width the params "
                             f"were built for), got {tuple(x.shape)}")
        return block(d).forward(params, x, key=key, train=train, side=side)

    def walk(params, cache, dy, visit):
        return block(dy.shape[-1]).walk(params, cache, dy, visit)

    return Layer(who, init, forward, walk=walk, per_example=EXAMPLEWISE,
                 side_inputs=attend.side_inputs)
