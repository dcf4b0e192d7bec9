"""Composition: ``serial`` chains layers, ``mlp`` builds the classic fully connected net.

Lecture map: the forward pass runs the layers in order and keeps every layer's cache; the
backward pass is "a reverse neural network": the layers' backwards in reverse order, each
handing ∂C/∂(its input) to the layer before it.

Params of a serial model: a tuple with one entry per layer (``{}`` for a weightless one).
An error raised inside a layer keeps its type, message and traceback; a note says which
layer of which composite it came from.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jbp.layers import activations, memory
from jbp.layers.dense import dense
from jbp.layer import (EXAMPLEWISE, Layer, as_integer, as_shape, child_keys, child_states,
                       composite_init_state, composite_state, constructor, forward_chain,
                       noting_position, out_shape)


@constructor
def serial(*layers: Layer, remat_every: int | str | None = None) -> Layer:
    """Chain ``layers``; the result is itself a Layer (composites nest).

    ``remat_every=k`` keeps, of the forward, only the input of every segment of ``k``
    layers, and the backward reruns each segment's forward before walking it
    (``"sqrt"``: k = ⌈√n⌉, the √n scheme; :mod:`jbp.layers.memory`). The params, the
    gradients and everything the walk reaches stay as without it; a layer that keeps state
    is then refused.
    """
    if not layers:
        raise ValueError("serial: needs at least one layer")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"serial: argument {i} must be a Layer, got {type(layer).__name__}")
    n = len(layers)
    k = None if remat_every is None else memory.segment_length(remat_every, n, "serial")
    name = ("serial(" + ", ".join(layer.name for layer in layers)
            + ("" if k is None else f", remat_every={k}") + ")")

    def init(key, in_shape):
        shape = as_shape(in_shape, "serial")
        params = []
        for i, (layer, k) in enumerate(zip(layers, jax.random.split(key, n))):
            with noting_position(i, layer, name, "init"):
                shape, p = layer.init(k, shape)
            params.append(p)
        return shape, tuple(params)

    def forward(params, x, *, key=None, train=False, state=None, side=None):
        states = list(child_states(state, n))
        y, caches = forward_chain(layers, range(n), params, x, keys=child_keys(key, n),
                                  train=train, states=states, side=side, parent=name)
        return y, tuple(caches), composite_state(states)

    def init_state(in_shape):
        shapes = [as_shape(in_shape, "serial")]
        for layer in layers[:-1]:
            shapes.append(out_shape(layer, shapes[-1]))
        return composite_init_state(layers, shapes)

    def walk(params, caches, dy, visit):
        results = [None] * n
        for i in reversed(range(n)):
            with noting_position(i, layers[i], name, "backward"):
                results[i], dy = visit(layers[i], params[i], caches[i], dy)
        return tuple(results), dy

    if k is not None:  # the same chain, keeping only the segments' inputs
        forward, walk = memory.recomputed_segments(layers, k, name)

    stateful = any(layer.stateful for layer in layers)
    return Layer(name, init, forward, layers=tuple(layers),
                 walk=walk, per_example=EXAMPLEWISE, init_state=init_state if stateful else None)


def init_gain(activation: Layer) -> float:
    """The weight scale that keeps activations' variance through ``activation``: what it
    declares (:class:`jbp.layers.activations.Activation`: He (√2) for the rectifiers relu,
    elu, gelu, silu; √(2/(1 + s²)) for leaky_relu with slope s; LeCun (1) for sigmoid,
    tanh, softplus, identity), else 1 (user layers)."""
    info = activation.info
    return info.gain if isinstance(info, activations.Activation) else 1.0


@constructor
def mlp(sizes: Sequence[int], activation="relu", *, gain: float | None = None,
        dtype=jnp.float32) -> Layer:
    """A multilayer perceptron ``sizes[0] -> sizes[1] -> ... -> sizes[-1]``.

    Layers: ``dense(sizes[1]), act, dense(sizes[2]), act, ..., dense(sizes[-1])``; the
    output layer has no activation (it gives logits). ``activation`` is a name from
    :data:`jbp.activations.ACTIVATIONS` or a Layer. Weights are drawn from N(0, gain²/in);
    ``gain=None`` picks it by the activation (:func:`init_gain`: He initialisation for
    ReLU and its relatives, LeCun for sigmoid and tanh) for the hidden layers; the output
    layer, which no activation follows, is LeCun normal.

    Shapes: ``x (B, sizes[0]) -> logits (B, sizes[-1])`` (any leading axes, see ``dense``).
    """
    sizes = list(sizes) if isinstance(sizes, Sequence) and not isinstance(sizes, str) else sizes
    if not isinstance(sizes, list) or len(sizes) < 2:
        raise ValueError(f"mlp: sizes must list the input size and at least one layer size, "
                         f"e.g. [40, 100, 10]; got {sizes!r}")
    if any(as_integer(s) is None or s <= 0 for s in sizes):
        raise ValueError(f"mlp: every size must be a positive int, got {sizes!r}")
    sizes = [as_integer(s) for s in sizes]
    act = activations.get(activation)
    gain = init_gain(act) if gain is None else gain
    layers = []
    for width in sizes[1:-1]:
        layers += [dense(width, gain=gain, dtype=dtype), act]
    layers.append(dense(sizes[-1], dtype=dtype))
    model = serial(*layers)

    def init(key, in_shape):
        shape = as_shape(in_shape, "mlp")
        if shape != (sizes[0],):
            raise ValueError(f"mlp: built for per-example input shape ({sizes[0]},), got {shape}")
        return model.init(key, shape)

    return model.replace(name=f"mlp({sizes}, {act.name})", init=init)
