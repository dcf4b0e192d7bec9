"""Two gradient functions with one signature: ``(params, x, y) -> (loss, grads)``.

``manual_value_and_grad`` runs the forward pass (caching ∂z/∂w = a), starts the backward
pass at the output with the loss's hand-written ∂C/∂out, and runs the layers' backwards
in reverse. ``autodiff_value_and_grad`` asks ``jax.value_and_grad`` for the same numbers.
Both are pure, so ``jax.jit``, an optax loop or a benchmark takes either one.
Keyword arguments (``key=``, ``train=``) go through to the model's forward.
"""

from typing import Callable

import jax

from jbp.layer import Layer
from jbp.losses import Loss
from jbp.serial import backward_trace

GradFn = Callable  # (params, x, y, **kw) -> (loss, grads)


def _check(model, loss):
    if not isinstance(model, Layer):
        raise TypeError(f"model must be a jbp Layer (e.g. jbp.mlp(...)), got {type(model).__name__}")
    if not isinstance(loss, Loss):
        raise TypeError(f"loss must be a jbp Loss (e.g. jbp.losses.softmax_cross_entropy), "
                        f"got {type(loss).__name__}")


def backprop(model: Layer, loss: Loss, params, x, y, **kwargs):
    """One hand-written forward and backward pass, with its trace.

    Returns ``(value, grads, deltas)``: the loss C, ∂C/∂params (structured like
    ``params``), and ``deltas``, the gradient each top-level layer received for its output
    (a tuple with one array per layer of a serial model, ``(∂C/∂out,)`` otherwise): for a
    dense layer that is the lecture's delta = ∂C/∂z, shape ``(B, out)``.
    """
    _check(model, loss)
    out, cache = model.forward(params, x, **kwargs)
    value = loss.value(out, y)
    dout = loss.grad(out, y)
    if model.layers:
        grads, _, deltas = backward_trace(model.layers, params, cache, dout)
    else:
        grads, _ = model.backward(params, cache, dout)
        deltas = (dout,)
    return value, grads, deltas


def manual_value_and_grad(model: Layer, loss: Loss) -> GradFn:
    """``f(params, x, y) -> (C, ∂C/∂params)`` by the hand-written backward pass."""
    _check(model, loss)

    def value_and_grad(params, x, y, **kwargs):
        value, grads, _ = backprop(model, loss, params, x, y, **kwargs)
        return value, grads

    return value_and_grad


def autodiff_value_and_grad(model: Layer, loss: Loss) -> GradFn:
    """``f(params, x, y) -> (C, ∂C/∂params)`` by ``jax.value_and_grad`` of the forward."""
    _check(model, loss)

    def value_and_grad(params, x, y, **kwargs):
        return jax.value_and_grad(lambda p: loss.value(model.apply(p, x, **kwargs), y))(params)

    return value_and_grad
