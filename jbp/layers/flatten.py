"""Flatten: ``(B, d1, d2, ...) -> (B, d1·d2·...)``; the backward reshapes back.

Shapes: cache is the input's per-example shape (static), so the backward needs no array.
"""

import math

from jbp.layer import EXAMPLEWISE, Layer, as_shape, constructor


@constructor
def flatten() -> Layer:
    who = "flatten"

    def init(key, in_shape):
        return (math.prod(as_shape(in_shape, who)),), {}

    def forward(params, x, *, key=None, train=False, state=None, side=None):
        if x.ndim < 2:
            raise ValueError(f"{who}: expected input (batch, ...), got shape {tuple(x.shape)}")
        return x.reshape(x.shape[0], -1), x.shape, state

    def backward(params, x_shape, dy):
        return {}, dy.reshape(x_shape)

    return Layer(who, init, forward, backward, per_example=EXAMPLEWISE)
