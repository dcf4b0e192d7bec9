"""The layer protocol: one forward definition, two derivatives.

A layer is an immutable value of pure functions::

    init(key, in_shape)          -> (out_shape, params)   # shapes per example, no batch dim
    forward(params, x, **kw)     -> (y, cache)            # x batch-first: (B, *in_shape)
    backward(params, cache, dy)  -> (dparams, dx)         # hand-written, jax.numpy only
    apply(params, x, **kw)       =  forward(params, x, **kw)[0]

``apply`` is what ``jax.grad`` differentiates; ``backward`` reverses ``forward`` by hand
and never calls autodiff. ``dparams`` has the structure of ``params``; ``dx`` the shape of
``x``. The keyword arguments of ``forward`` are ``key`` (a PRNG key, or None) and ``train``
(bool); layers without randomness ignore them.
"""

from typing import Any, Callable, NamedTuple

import jax

Params = Any
Shape = tuple[int, ...]


class Layer(NamedTuple):
    """A layer (or a whole model: composites are layers too).

    Attributes:
      name: short human-readable name, used in error messages and reports.
      init: ``(key, in_shape) -> (out_shape, params)``.
      forward: ``(params, x, *, key=None, train=False) -> (y, cache)``.
      backward: ``(params, cache, dy) -> (dparams, dx)``.
      layers: the children of a composite (``serial``), else ``()``.
    """

    name: str
    init: Callable
    forward: Callable
    backward: Callable
    layers: tuple = ()

    def apply(self, params: Params, x: jax.Array, **kwargs) -> jax.Array:
        """The layer as a plain function of ``params`` and ``x``: ``forward(...)[0]``."""
        return self.forward(params, x, **kwargs)[0]


def as_shape(in_shape, who: str) -> Shape:
    """``in_shape`` as a tuple of positive ints, or a ValueError that names ``who``."""
    try:
        shape = tuple(int(d) for d in in_shape)
    except TypeError:
        raise TypeError(f"{who}: in_shape must be a tuple of ints (per example, no batch "
                        f"dimension), got {in_shape!r}") from None
    if any(d <= 0 for d in shape):
        raise ValueError(f"{who}: in_shape must hold positive sizes, got {shape}")
    return shape


def check_input(x: jax.Array, per_example: Shape, who: str) -> None:
    """Raise a ValueError unless ``x`` has shape ``(B, *per_example)``."""
    if not hasattr(x, "shape"):
        raise TypeError(f"{who}: input must be an array, got {type(x).__name__}")
    if x.ndim != len(per_example) + 1 or tuple(x.shape[1:]) != tuple(per_example):
        raise ValueError(f"{who}: expected input of shape (batch, {', '.join(map(str, per_example))}), "
                         f"i.e. per-example shape {tuple(per_example)}, got {tuple(x.shape)}")


def check_empty_params(params: Params, who: str) -> None:
    """Raise a TypeError unless ``params`` is the empty entry of a weightless layer."""
    if params is not None and not (isinstance(params, (dict, tuple, list)) and len(params) == 0):
        raise TypeError(f"{who}: this layer has no weights, its params must be {{}}, "
                        f"got {type(params).__name__}")
