"""Composition: ``serial`` chains layers, ``mlp`` builds the classic fully connected net.

Lecture map: the forward pass runs the layers in order and keeps every layer's cache; the
backward pass is "a reverse neural network": the layers' backwards in reverse order, each
handing ∂C/∂(its input) to the layer before it.

Params of a serial model: a tuple with one entry per layer (``{}`` for a weightless one).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jbp import activations
from jbp.dense import dense
from jbp.layer import Layer, as_shape


def _where(i: int, layer: Layer, err: Exception) -> Exception:
    """The same error with the failing layer's position prepended."""
    msg = str(err).removeprefix(f"{layer.name}: ")
    return type(err)(f"layer {i} ({layer.name}): {msg}")


def backward_trace(layers: Sequence[Layer], params, caches, dy):
    """Run the layers' backwards in reverse order.

    Returns ``(dparams, dx, dys)`` where ``dys[i]`` is the gradient layer ``i`` received
    with respect to its output: ∂C/∂z for a dense layer (the lecture's delta), ∂C/∂a for an
    activation.
    """
    n = len(layers)
    dparams, dys = [None] * n, [None] * n
    for i in reversed(range(n)):
        dys[i] = dy
        dparams[i], dy = layers[i].backward(params[i], caches[i], dy)
    return tuple(dparams), dy, tuple(dys)


def serial(*layers: Layer) -> Layer:
    """Chain ``layers``; the result is itself a Layer (composites nest)."""
    if not layers:
        raise ValueError("serial: needs at least one layer")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"serial: argument {i} must be a Layer, got {type(layer).__name__}")
    n = len(layers)
    name = "serial(" + ", ".join(layer.name for layer in layers) + ")"

    def init(key, in_shape):
        shape = as_shape(in_shape, "serial")
        params = []
        for i, (layer, k) in enumerate(zip(layers, jax.random.split(key, n))):
            try:
                shape, p = layer.init(k, shape)
            except (TypeError, ValueError) as err:
                raise _where(i, layer, err) from None
            params.append(p)
        return shape, tuple(params)

    def check_params(params):
        if not isinstance(params, (tuple, list)) or len(params) != n:
            got = f"{type(params).__name__} of length {len(params)}" if isinstance(
                params, (tuple, list)) else type(params).__name__
            raise TypeError(f"serial: params must be a tuple with one entry per layer ({n}), "
                            f"got {got}")

    def forward(params, x, *, key=None, train=False, **kwargs):
        check_params(params)
        keys = jax.random.split(key, n) if key is not None else [None] * n
        caches = []
        for i, layer in enumerate(layers):
            try:
                x, cache = layer.forward(params[i], x, key=keys[i], train=train, **kwargs)
            except (TypeError, ValueError) as err:
                raise _where(i, layer, err) from None
            caches.append(cache)
        return x, tuple(caches)

    def backward(params, caches, dy):
        dparams, dx, _ = backward_trace(layers, params, caches, dy)
        return dparams, dx

    return Layer(name, init, forward, backward, tuple(layers))


def mlp(sizes: Sequence[int], activation="relu", *, dtype=jnp.float32) -> Layer:
    """A multilayer perceptron ``sizes[0] -> sizes[1] -> ... -> sizes[-1]``.

    Layers: ``dense(sizes[1]), act, dense(sizes[2]), act, ..., dense(sizes[-1])``; the
    output layer has no activation (it gives logits). ``activation`` is a name from
    :data:`jbp.activations.ACTIVATIONS` or a Layer. Dense weights are LeCun normal.

    Shapes: ``x (B, sizes[0]) -> logits (B, sizes[-1])``.
    """
    sizes = list(sizes) if isinstance(sizes, Sequence) else sizes
    if not isinstance(sizes, list) or len(sizes) < 2:
        raise ValueError(f"mlp: sizes must list the input size and at least one layer size, "
                         f"e.g. [40, 100, 10]; got {sizes!r}")
    for s in sizes:
        if not isinstance(s, int) or isinstance(s, bool) or s <= 0:
            raise ValueError(f"mlp: every size must be a positive int, got {sizes!r}")
    act = activations.get(activation)
    layers = []
    for width in sizes[1:-1]:
        layers += [dense(width, dtype=dtype), act]
    layers.append(dense(sizes[-1], dtype=dtype))
    model = serial(*layers)

    def init(key, in_shape):
        shape = as_shape(in_shape, "mlp")
        if shape != (sizes[0],):
            raise ValueError(f"mlp: built for per-example input shape ({sizes[0]},), got {shape}")
        return model.init(key, shape)

    name = f"mlp({sizes}, {act.name})"
    return model._replace(name=name, init=init)
