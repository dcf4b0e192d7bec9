"""Losses: the cost C and, written by hand, ∂C/∂out — the lecture's output-layer case.

A :class:`Loss` holds ``per_example(out, target) -> (B,)``, ``value = mean(per_example)``
and ``grad(out, target) -> ∂C/∂out`` (shape of ``out``, the 1/B of the mean included).
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jbp.activations import logistic


class Loss(NamedTuple):
    """A cost that is the batch mean of per-example losses, with its hand-written gradient."""

    name: str
    per_example: Callable  # (out, target) -> (B,)
    grad: Callable  # (out, target) -> dC/dout, shape of out

    def value(self, out, target) -> jax.Array:
        """C = mean over the batch of ``per_example(out, target)``."""
        return jnp.mean(self.per_example(out, target))


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_batch(out, target, who):
    if out.ndim < 1 or target.ndim < 1 or out.shape[0] != target.shape[0]:
        raise ValueError(f"{who}: output and target must share the batch dimension, got "
                         f"{tuple(out.shape)} and {tuple(target.shape)}")


def _onehot_targets(logits, target, who):
    """Targets as probabilities (B, C): integer labels (B,) are one-hot encoded."""
    if logits.ndim != 2:
        raise ValueError(f"{who}: expected logits of shape (batch, classes), got {tuple(logits.shape)}")
    _check_batch(logits, target, who)
    n_classes = logits.shape[1]
    if jnp.issubdtype(target.dtype, jnp.integer):
        if target.ndim != 1:
            raise ValueError(f"{who}: integer labels must have shape (batch,), got {tuple(target.shape)}")
        if _is_concrete(target):
            t = np.asarray(target)
            if t.size and (t.min() < 0 or t.max() >= n_classes):
                raise ValueError(f"{who}: labels must lie in [0, {n_classes}) for {n_classes} "
                                 f"classes, got values from {t.min()} to {t.max()}")
        return jax.nn.one_hot(target, n_classes, dtype=logits.dtype)
    if target.shape != logits.shape:
        raise ValueError(f"{who}: one-hot/probability targets must have the logits' shape "
                         f"{tuple(logits.shape)}, got {tuple(target.shape)}")
    return target.astype(logits.dtype)


def _log_softmax(z):
    shifted = z - jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))


def _softmax_ce_per_example(logits, target):
    y = _onehot_targets(logits, target, "softmax_cross_entropy")
    return -jnp.sum(y * _log_softmax(logits), axis=-1)


def _softmax_ce_grad(logits, target):
    y = _onehot_targets(logits, target, "softmax_cross_entropy")
    p = jnp.exp(_log_softmax(logits))
    if jnp.issubdtype(target.dtype, jnp.integer):
        return (p - y) / logits.shape[0]
    # For probability targets that do not sum to 1 the general form is p·Σy − y.
    return (p * jnp.sum(y, axis=-1, keepdims=True) - y) / logits.shape[0]


softmax_cross_entropy = Loss("softmax_cross_entropy", _softmax_ce_per_example, _softmax_ce_grad)
"""Softmax cross-entropy on logits (B, C); targets: int labels (B,) or one-hot (B, C).

∂C/∂z = (softmax(z) − y)/B, computed through log-sum-exp, finite for logits of ±1e4."""


def _check_same_shape(out, target, who):
    _check_batch(out, target, who)
    if out.shape != target.shape:
        raise ValueError(f"{who}: target must have the output's shape {tuple(out.shape)}, "
                         f"got {tuple(target.shape)}")


def _per_example_mean(x):
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def _mse_per_example(out, target):
    _check_same_shape(out, target, "mean_squared_error")
    return _per_example_mean((out - target) ** 2)


def _mse_grad(out, target):
    _check_same_shape(out, target, "mean_squared_error")
    return 2.0 * (out - target) / out.size


mean_squared_error = Loss("mean_squared_error", _mse_per_example, _mse_grad)
"""Mean squared error over all elements: C = mean((out − y)²); ∂C/∂out = 2(out − y)/N."""


def _bce_per_example(logits, target):
    _check_same_shape(logits, target, "sigmoid_binary_cross_entropy")
    # −y log s(z) − (1 − y) log(1 − s(z)) = softplus(z) − y z, stably.
    return _per_example_mean(jnp.logaddexp(logits, 0.0) - target * logits)


def _bce_grad(logits, target):
    _check_same_shape(logits, target, "sigmoid_binary_cross_entropy")
    return (logistic(logits) - target) / logits.size


sigmoid_binary_cross_entropy = Loss("sigmoid_binary_cross_entropy", _bce_per_example, _bce_grad)
"""Binary cross-entropy on logits, targets in [0, 1] of the logits' shape, mean over all
elements; ∂C/∂z = (sigmoid(z) − y)/N."""

LOSSES = {loss.name: loss for loss in (softmax_cross_entropy, mean_squared_error,
                                       sigmoid_binary_cross_entropy)}


def get(name) -> Loss:
    """The loss called ``name`` (a Loss passes through unchanged)."""
    if isinstance(name, Loss):
        return name
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}")
    return LOSSES[name]
