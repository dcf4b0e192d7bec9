"""Maxout: the maximum over groups of ``k`` consecutive features.

Lecture map: a maxout network learns its own piecewise-linear activation. Put it after a
``dense(k * units)``: each unit outputs the largest of its ``k`` pre-activations, so the
gradient flows only to the element that won (ties share it equally, as ``jnp.max`` does).

Shapes: ``z (..., k·m) -> a (..., m)``; cache ``z``.
"""

import jax.numpy as jnp

from jbp.layer import EXAMPLEWISE, Layer, as_shape, constructor, positive_int


@constructor
def maxout(k: int = 2) -> Layer:
    """Maxout over groups of ``k`` consecutive features of the last axis."""
    k = positive_int(k, "k (the group size)", "maxout")
    who = f"maxout({k})"

    def check_width(n):
        if n % k:
            raise ValueError(f"{who}: the last axis ({n} features) must be divisible by k={k}")

    def init(key, in_shape):
        shape = as_shape(in_shape, who)
        if not shape:
            raise ValueError(f"{who}: expects at least one feature axis, got per-example shape ()")
        check_width(shape[-1])
        return shape[:-1] + (shape[-1] // k,), {}

    def grouped(z):
        return z.reshape(z.shape[:-1] + (z.shape[-1] // k, k))

    def forward(params, z, *, key=None, train=False, state=None, side=None):
        if z.ndim < 1:
            raise ValueError(f"{who}: expected input (..., features), got shape {tuple(z.shape)}")
        check_width(z.shape[-1])
        return jnp.max(grouped(z), axis=-1), z, state

    def backward(params, z, da):
        zg = grouped(z)
        winners = (zg == jnp.max(zg, axis=-1, keepdims=True)).astype(z.dtype)
        share = winners / jnp.sum(winners, axis=-1, keepdims=True)
        return {}, (share * da[..., None]).reshape(z.shape).astype(z.dtype)

    return Layer(who, init, forward, backward, per_example=EXAMPLEWISE)
