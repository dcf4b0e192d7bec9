"""Kronecker-factored curvature from the hand-written trace: K-FAC's ``A ⊗ G`` per layer.

Lecture map. A dense layer's gradient for one example is ``ã δᵀ`` (ã = [a, 1], the cached
input with a one for the bias; δ = ∂ℓ/∂z from the backward pass), so the layer's block of
the generalised Gauss-Newton matrix G = Jᵀ H_L J is a sum of Kronecker products
``(ã ãᵀ) ⊗ (δ δᵀ)``, one per example and per column of the loss Hessian's square-root
factor (:mod:`jbp.curvature`). K-FAC (Martens & Grosse, 2015) replaces the expectation of
the products by the product of the expectations::

    A = 1/(B·T) Σ_{i,t} ã_it ã_itᵀ          (from the forward's cache)
    G = Σ_k Σ_{i,t} δ_itk δ_itkᵀ             (from K backward passes, one per column)

so ``GGN_block ≈ A ⊗ G``, exactly for one example and one position. The block is that of
``M = [W.reshape(-1, n_out); b]``, flattened row-major (``vec(M)``), so ``(A ⊗ G) vec(M) =
vec(A M G)`` and a preconditioned gradient is ``A⁻¹ ∇M G⁻¹``.

Weight sharing (``T`` positions: a sequence through dense or attention, a convolution's
output positions) is handled as **KFAC-expand** (Eschenhagen et al., 2023): every position
is one more row, as if it were an example of its own; for convolutions that is KFC
(Grosse & Martens, 2016), whose Ω ⊗ Γ is the same product with the 1/T on the other
factor. It is exact for a linear layer with shared weights under a loss that treats every
position on its own (mean squared error over positions), and an approximation elsewhere.

``kind="exact"`` takes the K columns of the loss Hessian's exact square-root factor (KFLR);
``kind="mc"`` takes ``samples`` cotangents from targets drawn from the model's predictive
distribution (K-FAC's Monte-Carlo Fisher): a label from softmax(logits), a Bernoulli
target from sigmoid(logits), a Gaussian target around the output (variance ½ per element,
whose negative log-likelihood is the squared error). Their mean over samples converges to
the exact factor.

Layers declare their rows in ``PerExampleRule.kronecker`` (``dense``, ``conv`` with
``groups=1``, the four projections of ``attention`` and ``cross_attention``); a layer with
parameters that declares none is named in the error (or left out, ``undeclared="skip"``,
as :func:`jbp.kfac` does for the params it hands to its fallback optimizer).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jbp import losses
from jbp.curvature import loss_hessian_factor
from jbp.grads import check_model_and_loss
from jbp.layer import KroneckerBlock, Layer, PerExampleRule, positive_int, run
from jbp.per_example import trace

KINDS = ("exact", "mc")


class Factors(NamedTuple):
    """One block's factors: ``A (n_in, n_in)`` and ``G (n_out, n_out)``."""

    A: jax.Array
    G: jax.Array


def _undeclared(layer: Layer):
    """The first layer inside ``layer`` with a per-example rule but no Kronecker rows."""
    if layer.walk is not None:
        return next((found for c in layer.layers if (found := _undeclared(c))), None)
    rule = layer.per_example
    return layer if isinstance(rule, PerExampleRule) and rule.kronecker is None else None


def _is_block(x) -> bool:
    return isinstance(x, KroneckerBlock)


def _rows_hook(rule: PerExampleRule, params, cache, delta):
    """At every layer with parameters: its blocks' rows, or None (no declaration)."""
    return None if rule.kronecker is None else rule.kronecker(params, cache, delta)


def _factors(block: KroneckerBlock) -> Factors:
    """One column's ``(A, Σ g gᵀ)`` from a block's rows."""
    a2 = block.a.reshape(-1, block.a.shape[-1])
    g2 = block.g.reshape(-1, block.g.shape[-1])
    return Factors(a2.T @ a2 / a2.shape[0], g2.T @ g2)


def is_factors(x) -> bool:
    """Whether ``x`` is one block's :class:`Factors` (an ``is_leaf`` for factor trees)."""
    return isinstance(x, Factors)


def column_factors(model: Layer, params, cache, cotangent, who: str):
    """The factor tree of one backward pass started from ``cotangent`` (shaped like the
    model's output): every declared block's ``Factors(A, Σ g gᵀ)``, None for undeclared
    layers' params. A does not depend on the cotangent: under ``jax.vmap`` over the
    columns it is computed once."""
    blocks = trace(model, params, cache, cotangent, _rows_hook, who)
    return jax.tree_util.tree_map(_factors, blocks, is_leaf=_is_block)


def _mc_cotangents(loss: losses.Loss, out, y, weights, key, samples: int):
    """``(samples, B, ...)`` cotangents whose mean outer product is the loss Hessian: the
    per-example gradient at a target drawn from the model's predictive distribution, times
    √(n_i · share_i) (n_i: the elements ℓ_i is a mean over), over √samples."""
    share = loss.shares(out, y, weights)
    if loss is losses.softmax_cross_entropy:
        _, count = losses._targets(out, y)
        labels = y if jnp.issubdtype(y.dtype, jnp.integer) else None

        def draw(k):
            drawn = jax.random.categorical(k, out, axis=-1)
            return drawn if labels is None else jnp.where(labels == losses.IGNORE_LABEL,
                                                          losses.IGNORE_LABEL, drawn)
        n = count
    elif loss is losses.sigmoid_binary_cross_entropy:
        def draw(k):
            return jax.random.bernoulli(k, jax.nn.sigmoid(out)).astype(out.dtype)
        n = jnp.full(out.shape[:1], math.prod(out.shape[1:]), out.dtype)
    elif loss is losses.mean_squared_error:
        def draw(k):
            return out + jax.random.normal(k, out.shape, out.dtype) * math.sqrt(0.5)
        n = jnp.full(out.shape[:1], math.prod(out.shape[1:]), out.dtype)
    else:
        raise ValueError(f"kronecker_factors: kind='mc' has no predictive distribution for "
                         f"loss {loss.name!r}; use kind='exact' or one of "
                         f"softmax_cross_entropy, sigmoid_binary_cross_entropy, "
                         f"mean_squared_error")
    scale = jnp.sqrt(n * share / samples).reshape((-1,) + (1,) * (out.ndim - 1))

    def one(k):
        target = jax.lax.stop_gradient(draw(k))
        return (loss.per_example_grad(out, target) * scale).astype(out.dtype)

    return jax.vmap(one)(jax.random.split(key, samples))


def kronecker_factors(model: Layer, loss: losses.Loss, *, kind: str = "exact",
                      samples: int = 1, undeclared: str = "error"):
    """``f(params, x, y, *, key=None, weights=None, train=False, state=None, side=None)``
    -> a pytree mirroring ``params`` in which every declared block's params (a dense
    layer's ``{"W", "b"}``, each attention projection's) are replaced by its
    :class:`Factors` ``(A, G)``, and the params of an undeclared layer by None.

    Args:
      kind: ``"exact"`` (the loss Hessian's square-root factor, one backward pass per
        output dimension, batched: KFLR) or ``"mc"`` (``samples`` backward passes from
        sampled targets: K-FAC; needs ``key``).
      samples: the number of sampled targets for ``"mc"``.
      undeclared: ``"error"`` refuses a layer with parameters and no Kronecker rows,
        naming it; ``"skip"`` leaves its params out (None).
    """
    who = "kronecker_factors"
    check_model_and_loss(model, loss, who, per_example=True)
    if kind not in KINDS:
        raise ValueError(f"{who}: kind must be one of {KINDS}, got {kind!r}")
    samples = positive_int(samples, "samples", who)
    if undeclared not in ("error", "skip"):
        raise ValueError(f"{who}: undeclared must be 'error' or 'skip', got {undeclared!r}")
    missing = _undeclared(model)
    if missing is not None and undeclared == "error":
        raise ValueError(f"{who}: layer {missing.name} declares no Kronecker factors "
                         f"(PerExampleRule.kronecker); declared: dense, conv (groups=1), "
                         f"attention, cross_attention")

    def factors(params, x, y, *, key=None, weights=None, train=False, state=None, side=None):
        if kind == "mc" and key is None:
            raise ValueError(f"{who}: kind='mc' samples targets: pass key=")
        out, cache, _ = run(model, params, x, key=key, train=train, state=state, side=side)
        if kind == "exact":
            columns = loss_hessian_factor(loss, out, y, weights)
        else:
            columns = _mc_cotangents(loss, out, y, weights, jax.random.fold_in(key, 1), samples)

        stacked = jax.vmap(lambda s: column_factors(model, params, cache, s, who))(columns)
        return jax.tree_util.tree_map(lambda f: Factors(f.A[0], jnp.sum(f.G, axis=0)), stacked,
                                      is_leaf=is_factors)

    return factors
