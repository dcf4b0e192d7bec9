"""Two gradient functions with one signature: ``(params, x, y) -> (loss, grads)``.

``manual_value_and_grad`` runs the forward pass (caching ∂z/∂w = a), starts the backward
pass at the output with the loss's hand-written ∂C/∂out, and runs the layers' backwards
in reverse. ``autodiff_value_and_grad`` asks ``jax.value_and_grad`` for the same numbers.
Both are pure, so ``jax.jit``, an optax loop or a benchmark takes either one. Keywords:
``weights`` (per-example loss weights, see :mod:`jbp.losses`), ``key`` and ``train`` (for
the model's forward), ``state`` (for a model that keeps state), ``side`` (side inputs such as
a padded batch's ``lengths``, see :mod:`jbp.masks`); anything else is a TypeError.

A model that keeps state (batch_norm) needs ``state=``; the value then comes back with the
new state, ``((C, new_state), grads)``, as ``jax.value_and_grad(..., has_aux=True)`` gives
it. Both functions run the same forward, so they return the same new state.

The manual side checks, while tracing, what every backward returns: gradients with the
structure, shapes and dtypes of the params they belong to (as ``jax.grad`` gives them), or
a ValueError naming the layer.
"""

from typing import Callable, NamedTuple

import jax

from jbp.layer import Layer, check_like, run
from jbp.losses import Loss

GradFn = Callable  # (params, x, y, *, weights, key, train, state, side) -> (loss, grads)


def check_model_and_loss(model, loss, who: str = "", *, per_example: bool = False) -> None:
    """Raise a TypeError unless ``model`` is a Layer and ``loss`` a Loss (with
    ``per_example``: one whose value is the batch mean of its ``per_example``, as the
    per-example functions need); ``who`` prefixes the message."""
    at = f"{who}: " if who else ""
    if not isinstance(model, Layer):
        raise TypeError(f"{at}model must be a jbp Layer (e.g. jbp.mlp(...)), got "
                        f"{type(model).__name__}")
    if per_example and (not isinstance(loss, Loss) or type(loss).value is not Loss.value):
        raise TypeError(f"{at}loss must be a jbp Loss, whose value is the batch mean of "
                        f"per_example(out, target) -> (B,); got {type(loss).__name__}")
    if not isinstance(loss, Loss):
        raise TypeError(f"{at}loss must be a jbp Loss (e.g. jbp.losses.softmax_cross_entropy), "
                        f"got {type(loss).__name__}")


def checked_backward(layer: Layer, params, cache, dy):
    """``layer``'s backward, composites walked child by child, with every ``dparams``
    checked against its params (structure, shapes, dtypes); errors name the layer."""
    if layer.walk is not None:
        dparams, dx = layer.walk(params, cache, dy, checked_backward)
    else:
        dparams, dx = layer.backward(params, cache, dy)
    check_like(f"{layer.name}: backward", "dparams", dparams, params)
    return dparams, dx


class _Received(NamedTuple):
    """What a walk's visit returns for one child: its gradients and the delta it received."""

    dparams: object
    delta: jax.Array


def _visit_recording(child, params, cache, dy):
    dparams, dx = checked_backward(child, params, cache, dy)
    return _Received(dparams, dy), dx


def backprop(model: Layer, loss: Loss, params, x, y, *, weights=None, key=None, train=False,
             state=None, side=None):
    """One hand-written forward and backward pass, with its trace.

    Returns ``(value, grads, deltas)``: the loss C, ∂C/∂params (structured like
    ``params``), and ``deltas``, the gradient each child of a composite model received for
    its output (a tuple with one array per layer of a serial model; ``(∂C/∂out,)`` for a
    layer without a walk): for a dense layer that is the lecture's delta = ∂C/∂z, shape
    ``(B, out)``. For a model that keeps state ``value`` is ``(C, new_state)``.
    """
    check_model_and_loss(model, loss)
    out, cache, new_state = run(model, params, x, key=key, train=train, state=state, side=side)
    value = loss.value(out, y, weights)
    if model.stateful:
        value = (value, new_state)
    dout = loss.grad(out, y, weights)
    if model.walk is None:
        grads, _ = checked_backward(model, params, cache, dout)
        return value, grads, (dout,)
    received, _ = model.walk(params, cache, dout, _visit_recording)
    is_received = lambda r: isinstance(r, _Received)  # noqa: E731
    grads = jax.tree_util.tree_map(lambda r: r.dparams, received, is_leaf=is_received)
    check_like(f"{model.name}: backward", "dparams", grads, params)
    deltas = tuple(r.delta for r in jax.tree_util.tree_leaves(received, is_leaf=is_received))
    return value, grads, deltas


def manual_value_and_grad(model: Layer, loss: Loss) -> GradFn:
    """``f(params, x, y, *, weights=None, key=None, train=False, state=None, side=None) ->
    (C, ∂C/∂params)`` by the hand-written backward pass (``((C, new_state), ∂C/∂params)`` for a
    model that keeps state)."""
    check_model_and_loss(model, loss)

    def value_and_grad(params, x, y, *, weights=None, key=None, train=False, state=None,
                       side=None):
        value, grads, _ = backprop(model, loss, params, x, y, weights=weights, key=key,
                                   train=train, state=state, side=side)
        return value, grads

    return value_and_grad


def autodiff_value_and_grad(model: Layer, loss: Loss) -> GradFn:
    """``f(params, x, y, *, weights=None, key=None, train=False, state=None, side=None) ->
    (C, ∂C/∂params)`` by ``jax.value_and_grad`` of the forward (``((C, new_state), ∂C/∂params)``
    for a model that keeps state)."""
    check_model_and_loss(model, loss)

    def value_and_grad(params, x, y, *, weights=None, key=None, train=False, state=None,
                       side=None):
        def cost(p):
            out, _, new_state = run(model, p, x, key=key, train=train, state=state, side=side)
            return loss.value(out, y, weights), new_state

        (value, new_state), grads = jax.value_and_grad(cost, has_aux=True)(params)
        return ((value, new_state) if model.stateful else value), grads

    return value_and_grad
