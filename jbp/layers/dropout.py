"""Inverted dropout with an explicit PRNG key and train flag.

``rate`` is the probability of *dropping* a unit. In training each unit is kept with
probability ``1 − rate`` and scaled by ``1/(1 − rate)``, so evaluation is the identity.
The backward multiplies by the same scaled mask.

Shapes: any ``x (B, ...)``; cache: the scaled mask (shape of ``x``), or None in evaluation.
"""

import jax

from jbp.layer import EXAMPLEWISE, Layer, as_shape, constructor


@constructor
def dropout(rate: float) -> Layer:
    """Dropout that zeroes each unit with probability ``rate`` when ``train=True``."""
    try:
        ok = 0.0 <= float(rate) < 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"dropout: rate (the drop probability) must be in [0, 1), got {rate!r}")
    rate = float(rate)
    who = f"dropout({rate})"

    def init(key, in_shape):
        return as_shape(in_shape, who), {}

    def forward(params, x, *, key=None, train=False, state=None, side=None):
        if not train or rate == 0.0:
            return x, None, state
        if key is None:
            raise ValueError(f"{who}: train=True needs a PRNG key (forward(..., key=key, train=True))")
        keep = 1.0 - rate
        mask = jax.random.bernoulli(key, keep, x.shape).astype(x.dtype) / keep
        return x * mask, mask, state

    def backward(params, mask, dy):
        return {}, dy if mask is None else (dy * mask).astype(mask.dtype)

    return Layer(who, init, forward, backward, per_example=EXAMPLEWISE)
