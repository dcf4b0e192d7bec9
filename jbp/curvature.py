"""Curvature through the hand-written backward: Hessian-vector products and the GGN diagonal.

**Hessian-vector products.** The manual gradient is a ``jax.numpy`` function of the
parameters, so ``jax.jvp`` can push a tangent ``v`` through it (forward-over-reverse):
d/dε ∇C(θ + εv) = H v, at about the cost of two gradients, without forming H.

**The generalised Gauss-Newton diagonal.** For C(θ) = L(f(θ)) the GGN is
G = Jᵀ H_L J, with J the Jacobian of the outputs and H_L the Hessian of the loss with
respect to the outputs. H_L is block diagonal over examples, and for the losses below it
has a closed-form square-root factor S (H_L = S Sᵀ, one column per output dimension k). Then
G = Σ_k (Jᵀ S_k)(Jᵀ S_k)ᵀ and diag(G) = Σ_k Σ_i (J_iᵀ S_ik)²: each Jᵀ S_k is a backward
pass started from the cotangent S_k instead of ∂C/∂out, and the per-example squares come
from the same per-layer rules as :mod:`jbp.per_example` (dense: (a²)ᵀ δ²). The K backward
passes run batched with ``jax.vmap`` over k.

Factors of the Hessian of one example's loss ℓ_i (N the number of its output elements);
the batch cost weighs example i by w_i/Σw (1/B by default), so its factor is scaled by
√(w_i/Σw):

- mean squared error: ∂²ℓ_i = (2/N) I, S_k = √(2/N) e_k;
- softmax cross-entropy (logits (B, C)): ∂²ℓ_i = σ(diag p − p pᵀ) with σ = Σ_j y_ij (1 for
  labels, 0 for a padding label), S_k = √(σ p_k) (e_k − p); for logits (B, T, C), the output
  of a sequence model, ℓ_i is the mean over the n_i positions that count, its Hessian is
  block diagonal over positions, and column (t, k) is √(σ_t p_tk / n_i) (e_k − p_t) at
  position t and zero elsewhere: T·C backward passes;
- sigmoid binary cross-entropy: ∂²ℓ_i = diag(s(1 − s))/N, S_k = √(s_k(1 − s_k)/N) e_k.
"""

import math

import jax
import jax.numpy as jnp

from jbp import losses
from jbp.layers.activations import logistic
from jbp.grads import check_model_and_loss, manual_value_and_grad
from jbp.layer import Layer, PerExampleRule, run
from jbp.per_example import like_params, trace


def hvp(model: Layer, loss: losses.Loss):
    """``f(params, x, y, v, *, weights=None, key=None, train=False, state=None, side=None) ->
    H v``: the
    Hessian of C(params) times ``v`` (``state`` for a model with batch_norm; in training mode
    that C normalises with the batch statistics, which depend on the params too).

    ``v`` and the result are shaped like ``params``. Forward-mode ``jax.jvp`` of the
    hand-written gradient (``jbp.manual_value_and_grad``), so the reverse sweep is the
    manual backward.
    """
    check_model_and_loss(model, loss, "hvp", per_example=True)
    grad = manual_value_and_grad(model, loss)

    def hessian_vector_product(params, x, y, v, *, weights=None, key=None, train=False,
                                state=None, side=None):
        tree_p, tree_v = jax.tree_util.tree_structure(params), jax.tree_util.tree_structure(v)
        if tree_p != tree_v:
            raise ValueError(f"hvp: v must be shaped like params; params have structure "
                             f"{tree_p}, v has {tree_v}")
        for p, t in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(v)):
            if p.shape != t.shape:
                raise ValueError(f"hvp: v must be shaped like params; a leaf of shape "
                                 f"{tuple(p.shape)} got a tangent of shape {tuple(t.shape)}")
        v = jax.tree_util.tree_map(lambda p, t: jnp.asarray(t, p.dtype), params, v)
        def g(p):
            return grad(p, x, y, weights=weights, key=key, train=train, state=state,
                        side=side)[1]

        return jax.jvp(g, (params,), (v,))[1]

    return hessian_vector_product


def _eye_factor(scale, out):
    """``S (K, B, *out.shape[1:])`` with ``S[k, i] = scale[i, k] e_k`` (K = features)."""
    batch, k = out.shape[0], math.prod(out.shape[1:])
    eye = jnp.eye(k, dtype=out.dtype)  # (K, K): row k is e_k
    s = scale.reshape(batch, k)
    return (eye[:, None, :] * s.T[:, :, None]).reshape((k,) + out.shape)


def _mse_factor(out, target):
    losses._check_same_shape(out, target, "ggn_diagonal(mean_squared_error)")
    n = math.prod(out.shape[1:])
    return _eye_factor(jnp.full(out.shape, math.sqrt(2.0 / n), out.dtype), out)


def _bce_factor(logits, target):
    losses._check_same_shape(logits, target, "ggn_diagonal(sigmoid_binary_cross_entropy)")
    s_s = logistic(logits) * logistic(-logits)  # s(1 − s), without cancelling in the tails
    return _eye_factor(jnp.sqrt(s_s / math.prod(logits.shape[1:])), logits)


def _softmax_ce_factor(logits, target):
    y, count = losses._targets(logits, target)
    p = jax.nn.softmax(logits, axis=-1)
    batch, k = logits.shape[0], logits.shape[-1]
    positions = math.prod(logits.shape[1:-1])  # T for (B, T, C) logits, 1 for (B, C)
    # ℓ_i is the mean over the positions that count: position t's block is σ_it/count_i ·
    # (diag p − p pᵀ), with σ_it 1 for a label and 0 for padding
    sigma = jnp.sum(y, axis=-1) / jnp.where(count > 0, count, 1).reshape(
        (batch,) + (1,) * (logits.ndim - 2))
    p3 = p.reshape(batch, positions, k)
    scale = jnp.sqrt(sigma.reshape(batch, positions, 1) * p3)  # (B, T, K)
    eye_k, eye_t = jnp.eye(k, dtype=logits.dtype), jnp.eye(positions, dtype=logits.dtype)
    # column (t, k): S[(t, k), i, t', :] = δ_tt' scale[i, t, k] (e_k − p_it)
    core = (jnp.transpose(scale, (1, 2, 0))[..., None]
            * (eye_k[None, :, None, :] - jnp.transpose(p3, (1, 0, 2))[:, None]))  # (T, K, B, K)
    s = eye_t[:, None, None, :, None] * core[:, :, :, None, :]  # (T, K, B, T, K)
    return s.reshape((positions * k,) + logits.shape)


HESSIAN_FACTORS = {
    losses.mean_squared_error: _mse_factor,
    losses.softmax_cross_entropy: _softmax_ce_factor,
    losses.sigmoid_binary_cross_entropy: _bce_factor,
}
"""Square-root factors of the per-example loss Hessians, ``(out, target) -> S (K, B, ...)``."""


def _factor_for(loss: losses.Loss):
    if loss not in HESSIAN_FACTORS:
        raise ValueError(f"ggn_diagonal: no square-root Hessian factor for loss {loss.name!r}; "
                         f"supported: {', '.join(lo.name for lo in HESSIAN_FACTORS)}")
    per_example = HESSIAN_FACTORS[loss]

    def factor(out, target, weights=None):
        share = jnp.sqrt(loss.shares(out, target, weights))
        return per_example(out, target) * share.reshape((1, -1) + (1,) * (out.ndim - 1))

    return factor


def loss_hessian_factor(loss: losses.Loss, out, target, weights=None):
    """``S (K, B, *out.shape[1:])`` with Σ_k S[k, i] S[k, i]ᵀ = ∂²C/∂out_i² for every example."""
    return _factor_for(loss)(out, target, weights)


def ggn_diagonal(model: Layer, loss: losses.Loss):
    """``f(params, x, y, *, weights=None, key=None, train=False, state=None, side=None) ->
    diag(G)``,
    shaped like ``params``: the exact diagonal of the
    generalised Gauss-Newton matrix Jᵀ H_L J of the batch loss C.

    One hand-written backward pass per output dimension (batched with ``jax.vmap``), each
    started from a column of the square-root factor of H_L. Supported losses: mean squared
    error, softmax cross-entropy, sigmoid binary cross-entropy; layers as in
    :mod:`jbp.per_example` (batch_norm in evaluation mode only: the factor is per example).
    """
    check_model_and_loss(model, loss, "ggn_diagonal", per_example=True)
    sqrt_hessian = _factor_for(loss)

    def diagonal(params, x, y, *, weights=None, key=None, train=False, state=None, side=None):
        out, cache, _ = run(model, params, x, key=key, train=train, state=state, side=side)
        factor = sqrt_hessian(out, y, weights)

        def squares(s):
            return trace(model, params, cache, s, PerExampleRule.sum_of_squares, "ggn_diagonal")

        per_column = jax.vmap(squares)(factor)
        return like_params(jax.tree_util.tree_map(lambda leaf: jnp.sum(leaf, axis=0), per_column),
                           params)

    return diagonal
