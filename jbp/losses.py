"""Losses: the cost C and, written by hand, ∂C/∂out — the lecture's output-layer case.

A :class:`Loss` is written per example: ``per_example(out, target) -> ℓ (B,)`` and, by
hand, ``per_example_grad(out, target)``, whose row i is ∂ℓ_i/∂out_i. The batch cost is
their weighted mean,

    C = Σ_i w_i ℓ_i / Σ_i w_i,      ∂C/∂out_i = (w_i / Σ_j w_j) ∂ℓ_i/∂out_i,

with weights ``w`` (B,) that default to 1 (so C is the plain mean and ∂C/∂out carries the
1/B). ``value`` and ``grad`` take the optional ``weights``; all-zero weights give C = 0.

Integer labels for :data:`softmax_cross_entropy`: a label equal to :data:`IGNORE_LABEL`
(-100, as in PyTorch) marks padding: it costs nothing, gets a zero gradient and its example
weight 0 (the mean is over the other examples). Any other label outside ``[0, classes)`` is
an error: a ValueError where the labels are concrete, and under ``jit`` (where they are
not) a NaN loss and NaN gradients in every gradient path alike, so the mistake surfaces
(``jbp.fit`` stops at the first non-finite loss) instead of training on a wrong label.
"""

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jbp.layers.activations import logistic

IGNORE_LABEL = -100
"""The integer label that marks padding (an example or position that does not count)."""


class Loss(NamedTuple):
    """A cost that is the weighted mean of per-example losses, with its hand-written gradient.

    ``per_example(out, target) -> (B,)``; ``per_example_grad(out, target)`` has ``out``'s
    shape, row i = ∂ℓ_i/∂out_i; ``default_weights(out, target) -> (B,)`` or None (ones).
    """

    name: str
    per_example: Callable
    per_example_grad: Callable
    default_weights: Callable | None = None

    def weights(self, out, target, weights=None) -> jax.Array:
        """The example weights (B,): ``weights`` (checked) times the loss's own defaults."""
        batch = out.shape[0]
        w = jnp.ones((batch,), out.dtype) if self.default_weights is None else (
            self.default_weights(out, target).astype(out.dtype))
        if weights is None:
            return w
        if not hasattr(weights, "shape") or tuple(weights.shape) != (batch,):
            got = tuple(weights.shape) if hasattr(weights, "shape") else type(weights).__name__
            raise ValueError(f"{self.name}: weights must have shape (batch,) = ({batch},), "
                             f"got {got}")
        if _is_concrete(weights) and np.any(np.asarray(weights) < 0):
            raise ValueError(f"{self.name}: weights must be non-negative")
        return w * weights.astype(out.dtype)

    def shares(self, out, target, weights=None) -> jax.Array:
        """Each example's share of the cost (B,): w_i / Σ_j w_j, all 0 if every weight is 0."""
        w = self.weights(out, target, weights)
        total = jnp.sum(w)
        return w / jnp.where(total > 0, total, 1)

    def value(self, out, target, weights=None) -> jax.Array:
        """C = Σ_i w_i ℓ_i / Σ_i w_i (the mean over the batch for default weights)."""
        return jnp.sum(self.shares(out, target, weights) * self.per_example(out, target))

    def grad(self, out, target, weights=None) -> jax.Array:
        """∂C/∂out (shape and dtype of ``out``): row i is (w_i/Σw) ∂ℓ_i/∂out_i."""
        share = self.shares(out, target, weights)
        g = self.per_example_grad(out, target) * share.reshape((-1,) + (1,) * (out.ndim - 1))
        return g.astype(out.dtype)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_batch(out, target, who):
    for name, a in (("output", out), ("target", target)):
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise TypeError(f"{who}: {name} must be an array, got {type(a).__name__}")
    if out.ndim < 1 or target.ndim < 1 or out.shape[0] != target.shape[0]:
        raise ValueError(f"{who}: output and target must share the batch dimension, got "
                         f"{tuple(out.shape)} and {tuple(target.shape)}")


def _per_example_mean(x):
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


# ---------------------------------------------------------------------------- softmax CE

_CE = "softmax_cross_entropy"


def _targets(logits, target):
    """``(y, count)``: targets as probabilities (B, ..., C), all NaN at an invalid label (so
    the loss and both gradients are NaN there), and the positions that count per example."""
    if logits.ndim < 2:
        raise ValueError(f"{_CE}: expected logits of shape (batch, ..., classes), got "
                         f"{tuple(logits.shape)}")
    _check_batch(logits, target, _CE)
    positions, n_classes = logits.shape[:-1], logits.shape[-1]
    if not jnp.issubdtype(target.dtype, jnp.integer):
        if target.shape != logits.shape:
            raise ValueError(f"{_CE}: labels must be integers of shape {tuple(positions)} (or "
                             f"one-hot/probability targets of shape {tuple(logits.shape)}); got "
                             f"{target.dtype} of shape {tuple(target.shape)}")
        count = jnp.full(positions[:1], math.prod(positions[1:]), logits.dtype)
        return target.astype(logits.dtype), count
    if target.shape != positions:
        raise ValueError(f"{_CE}: integer labels must have shape {tuple(positions)} for logits "
                         f"{tuple(logits.shape)}, got {tuple(target.shape)}")
    if _is_concrete(target):
        t = np.asarray(target)
        bad = ((t < 0) | (t >= n_classes)) & (t != IGNORE_LABEL)
        if bad.any():
            raise ValueError(f"{_CE}: labels must lie in [0, {n_classes}) for {n_classes} "
                             f"classes (or be IGNORE_LABEL={IGNORE_LABEL}), got "
                             f"{t[bad][:5].tolist()}")
    valid = (target >= 0) & (target < n_classes)
    invalid = ~valid & (target != IGNORE_LABEL)
    y = jax.nn.one_hot(target, n_classes, dtype=logits.dtype)  # all zero for padding
    y = jnp.where(invalid[..., None], jnp.nan, y)
    count = jnp.sum(valid.reshape(valid.shape[0], -1), axis=1).astype(logits.dtype)
    return y, count


def _per_position(x, count):
    """Σ over an example's positions of ``x (B, ...)`` / its count (0 where nothing counts)."""
    total = jnp.sum(x.reshape(x.shape[0], -1), axis=1)
    return total / jnp.where(count > 0, count, 1)


def _ce_per_example(logits, target):
    y, count = _targets(logits, target)
    nll = -jnp.sum(y * jax.nn.log_softmax(logits, axis=-1), axis=-1)
    return _per_position(nll, count)


def _ce_per_example_grad(logits, target):
    y, count = _targets(logits, target)
    p = jax.nn.softmax(logits, axis=-1)
    # ∂/∂z of −Σ_k y_k log p_k is p·Σy − y: the lecture's p − y for one-hot y, 0 for padding.
    g = p * jnp.sum(y, axis=-1, keepdims=True) - y
    return g / jnp.where(count > 0, count, 1).reshape((-1,) + (1,) * (logits.ndim - 1))


def _ce_weights(logits, target):
    return (_targets(logits, target)[1] > 0).astype(logits.dtype)


softmax_cross_entropy = Loss(_CE, _ce_per_example, _ce_per_example_grad, _ce_weights)
"""Softmax cross-entropy on logits (B, ..., C); targets: int labels (B, ...) or one-hot /
probabilities (B, ..., C). With several positions per example, ℓ_i is the mean over the
positions that count. ∂ℓ/∂z = softmax(z) − y per position, through ``jax.nn``'s stable
log-softmax (finite for logits of ±1e4)."""


# ---------------------------------------------------------------------------- MSE, BCE

def _check_same_shape(out, target, who):
    _check_batch(out, target, who)
    if out.shape != target.shape:
        raise ValueError(f"{who}: target must have the output's shape {tuple(out.shape)}, "
                         f"got {tuple(target.shape)}")


def _elements(out):
    return math.prod(out.shape[1:])


def _mse_per_example(out, target):
    _check_same_shape(out, target, "mean_squared_error")
    return _per_example_mean((out - target) ** 2)


def _mse_per_example_grad(out, target):
    _check_same_shape(out, target, "mean_squared_error")
    return 2.0 * (out - target) / _elements(out)


mean_squared_error = Loss("mean_squared_error", _mse_per_example, _mse_per_example_grad)
"""Mean squared error: ℓ_i = mean over example i's elements of (out − y)²;
∂ℓ_i/∂out_i = 2(out_i − y_i)/N with N elements per example."""


def _bce_per_example(logits, target):
    _check_same_shape(logits, target, "sigmoid_binary_cross_entropy")
    # −y log s(z) − (1 − y) log(1 − s(z)) = y softplus(−z) + (1 − y) softplus(z): both terms
    # keep their digits in both tails (softplus(z) − y z would cancel to 0 for large z).
    z, y = logits, target
    return _per_example_mean(y * jax.nn.softplus(-z) + (1 - y) * jax.nn.softplus(z))


def _bce_per_example_grad(logits, target):
    _check_same_shape(logits, target, "sigmoid_binary_cross_entropy")
    # s(z) − y, written as (1 − y) s(z) − y s(−z): exact in both tails (1 − s(z) = s(−z)).
    z, y = logits, target
    return ((1 - y) * logistic(z) - y * logistic(-z)) / _elements(logits)


sigmoid_binary_cross_entropy = Loss("sigmoid_binary_cross_entropy", _bce_per_example,
                                    _bce_per_example_grad)
"""Binary cross-entropy on logits, targets in [0, 1] of the logits' shape, mean over example
i's elements; ∂ℓ_i/∂z = (sigmoid(z) − y)/N with N elements per example, accurate in both
tails (it matches optax's gradient element by element)."""

LOSSES = {loss.name: loss for loss in (softmax_cross_entropy, mean_squared_error,
                                       sigmoid_binary_cross_entropy)}


def get(name) -> Loss:
    """The loss called ``name`` (a Loss passes through unchanged)."""
    if isinstance(name, Loss):
        return name
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}")
    return LOSSES[name]
