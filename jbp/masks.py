"""Side inputs: what a padded batch of sequences tells the layers beside ``x``.

A batch of sequences of different lengths is padded to a common length ``T``; the layers
that mix positions (attention, the recurrent layers) must then know which positions are
real. They receive that as a **side input**: a dict passed as ``side=`` to the model
(``model.apply``, the gradient functions, the per-example functions, ``fit``, ...), which
the composites hand to every child that declares it reads one of its names
(``Layer.side_inputs``), the way they thread ``state``. Layers that treat every position on
its own (dense, activations, layer_norm, rms_norm, embedding) never see it. The names:

- ``"lengths"`` ``(B,)`` integers: example i's real positions are ``0 … lengths[i] − 1``,
  padding after them (what :func:`jbp.data.pad_sequences` gives). The recurrent layers stop
  their state at the last real step; attention masks the padded keys.
- ``"key_mask"`` ``(B, T)`` bool: True where a key is real, for attention (padding
  anywhere, e.g. on the left).
- ``"attention_mask"`` ``(B, T_q, T_k)`` or ``(B, H, T_q, T_k)`` bool: True where query
  ``t`` may attend to key ``t'``; combined (and) with the others and with ``causal``.
- ``"source_lengths"`` ``(B,)`` integers: an encoder–decoder's source lengths
  (:mod:`jbp.layers.seq2seq`): the encoder's ``lengths``, and the memory keys that
  cross-attention may look at.

Eagerly, lengths outside ``[1, T]`` are an error that names the layer. Under ``jax.jit``
they cannot be checked; both gradient paths then do the same thing: a length ≤ 0 leaves
every position padding (recurrent: the initial state, zero outputs; attention: a query row
with no key gives zeros), a length > T leaves none.

Side inputs describe the model's input positions: a layer that changes the number of
positions (a strided convolution, pooling, conv_transpose, upsample) makes them wrong for
the layers after it. The layers that mix positions without reading a side input
(convolutions, the pools, batch_norm, group_norm and instance_norm) count padding as
positions like any other.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SIDE_INPUTS = ("lengths", "key_mask", "attention_mask", "source_lengths")


def check_side(layer, side) -> None:
    """Raise unless ``side`` is None or a dict of names ``layer`` (or a layer inside it)
    reads; called for every layer the forward reaches, composites pass each child only
    its own names (:func:`side_for`)."""
    if side is None:
        return
    if not isinstance(side, Mapping):
        raise TypeError(f"{layer.name}: side must be a dict of side inputs (e.g. "
                        f"{{'lengths': lengths}}), got {type(side).__name__}")
    for name in side:
        if name not in SIDE_INPUTS:
            raise ValueError(f"{layer.name}: unknown side input {name!r}; the side inputs "
                             f"are {list(SIDE_INPUTS)}")
        if name not in layer.side_inputs:
            reads = (f"its layers read only {list(layer.side_inputs)}" if layer.side_inputs
                     else "none of its layers reads a side input (attention and the "
                     "recurrent layers do)")
            raise ValueError(f"{layer.name}: side input {name!r} was given, but {reads}")


def side_for(child, side):
    """The part of ``side`` that ``child`` reads (``{}`` for a child that reads none)."""
    return {k: v for k, v in (side or {}).items() if k in child.side_inputs}


def _array(value, name: str, who: str):
    if isinstance(value, np.ndarray):
        value = jnp.asarray(value)
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise TypeError(f"{who}: side input {name!r} must be an array, got "
                        f"{type(value).__name__}")
    return value


def lengths_of(side, b: int, t: int, who: str, name: str = "lengths"):
    """``side[name]`` as a ``(B,)`` int32 array, or None where it is not given; an error
    naming ``who`` for a wrong shape or dtype, or (when concrete) a length outside
    ``[1, T]``."""
    if not side or side.get(name) is None:
        return None
    lengths = _array(side[name], name, who)
    if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"{who}: side input {name!r} must be ({b},) integers (one length "
                         f"per example), got {lengths.dtype}{list(lengths.shape)}")
    if not isinstance(lengths, jax.core.Tracer):
        concrete = np.asarray(lengths)  # numpy: inside a trace, jnp would stage it
        low, high = int(concrete.min()), int(concrete.max())
        if low < 1 or high > t:
            raise ValueError(f"{who}: side input {name!r} must lie in [1, T] = [1, {t}], "
                             f"got values from {low} to {high}")
    return lengths.astype(jnp.int32)


def positions(lengths, t: int):
    """``(B, T)`` bool: True at the real positions ``t < lengths[i]``."""
    return jnp.arange(t)[None, :] < lengths[:, None]


def key_mask_of(side, b: int, t: int, who: str):
    """The ``(B, T)`` bool mask of real keys from ``lengths`` and ``key_mask`` (both, where
    both are given), or None where neither is."""
    lengths = lengths_of(side, b, t, who)
    mask = None if lengths is None else positions(lengths, t)
    if side and side.get("key_mask") is not None:
        given = _array(side["key_mask"], "key_mask", who)
        if given.shape != (b, t) or given.dtype != jnp.bool_:
            raise ValueError(f"{who}: side input 'key_mask' must be a ({b}, {t}) bool array "
                             f"(True at the real keys), got {given.dtype}{list(given.shape)}")
        mask = given if mask is None else mask & given
    return mask


def attention_mask_of(side, b: int, h: int, t_q: int, t_k: int, who: str):
    """``side["attention_mask"]`` as ``(B, 1 or H, T_q, T_k)`` bool, or None."""
    if not side or side.get("attention_mask") is None:
        return None
    mask = _array(side["attention_mask"], "attention_mask", who)
    ok = mask.dtype == jnp.bool_ and (mask.shape == (b, t_q, t_k) or mask.shape in (
        (b, 1, t_q, t_k), (b, h, t_q, t_k)))
    if not ok:
        raise ValueError(f"{who}: side input 'attention_mask' must be a bool array of shape "
                         f"({b}, {t_q}, {t_k}) or ({b}, {h}, {t_q}, {t_k}), got "
                         f"{mask.dtype}{list(mask.shape)}")
    return mask[:, None] if mask.ndim == 3 else mask


class WithSide(NamedTuple):
    """An input batch and its side inputs as one pytree, so that code which slices, shards
    or stacks the rows of ``x`` (``fit``'s batches, its evaluation chunks, the data-parallel
    split) does the same to the side inputs' rows."""

    x: Any
    side: dict


def split_side(x):
    """``(x, side)`` from a :class:`WithSide`, ``(x, None)`` from a plain array."""
    return (x.x, x.side or None) if isinstance(x, WithSide) else (x, None)


def rows(tree, idx):
    """``tree`` (an array or a :class:`WithSide`) at rows ``idx`` of every leaf."""
    return jax.tree_util.tree_map(lambda a: a[idx], tree)
