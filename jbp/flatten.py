"""Flatten: ``(B, d1, d2, ...) -> (B, d1·d2·...)``; the backward reshapes back.

Shapes: cache is the input's per-example shape (static), so the backward needs no array.
"""

import math

from jbp.layer import Layer, as_shape, check_empty_params


def flatten() -> Layer:
    who = "flatten"

    def init(key, in_shape):
        return (math.prod(as_shape(in_shape, who)),), {}

    def forward(params, x, **_):
        check_empty_params(params, who)
        if x.ndim < 2:
            raise ValueError(f"{who}: expected input (batch, ...), got shape {tuple(x.shape)}")
        return x.reshape(x.shape[0], -1), x.shape

    def backward(params, x_shape, dy):
        return {}, dy.reshape(x_shape)

    return Layer(who, init, forward, backward)
