"""K-FAC as an optax transformation: the gradient preconditioned by ``(A ⊗ G + λI)⁻¹``.

For every block that a layer declares (:mod:`jbp.kronecker`: a dense layer's ``[W; b]``,
a convolution's, each attention projection's) the update is::

    A, G ← decay·(A, G) + (1 − decay)·(this batch's factors)       (moving averages)
    A = Q_A Λ_A Q_Aᵀ,  G = Q_G Λ_G Q_Gᵀ                             (every inverse_every steps)
    P = Q_A [ (Q_Aᵀ ∇M Q_G) / (λ_A λ_Gᵀ + damping) ] Q_Gᵀ            ((A ⊗ G + damping·I)⁻¹ vec ∇M)
    v ← momentum·v + P,  update = −learning_rate · s · v

with ``s = min(1, √(kl_clip / (learning_rate² Σ_blocks ⟨v, ∇M⟩)))``: K-FAC's KL clipping
(Ba, Grosse & Martens, 2017), which bounds the step's predicted change of the model's
output distribution, ``η² vᵀ F v``, so that a learning rate too large for the curvature
(early steps, directions the damping leaves almost flat) does not blow up.

The damping is added to the Kronecker product, not to each factor: in the factors'
eigenbases ``A ⊗ G + λI`` is diagonal, so this is its exact inverse (the factored
``(A + √λ I) ⊗ (G + √λ I)`` of the K-FAC paper is the cheaper approximation of it that
this form makes unnecessary). Every other param (norms, embeddings, recurrent weights)
goes to ``fallback`` (Adam by default).

The transformation needs the batch: its ``update`` takes ``x`` and ``y`` (and ``key``,
``side``) as extra arguments, which ``jbp.fit`` passes to a :class:`KFAC` on its own; on a
mesh the factors of the sharded batch are reduced over the data axis by XLA, as the
gradient is. The factors are computed in evaluation mode (no dropout).
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jbp import losses
from jbp.grads import check_model_and_loss
from jbp.kronecker import KINDS, Factors, column_factors, is_factors, kronecker_factors
from jbp.layer import Layer, as_shape, positive_int, run


class Eigen(NamedTuple):
    """The eigendecompositions of one block's factors."""

    QA: jax.Array
    lA: jax.Array
    QG: jax.Array
    lG: jax.Array


class KFACState(NamedTuple):
    count: jax.Array  # int32: updates done
    factors: Any  # the moving averages: Factors per block, None elsewhere
    eigen: Any  # Eigen per block, None elsewhere
    velocity: Any  # like params (the preconditioned direction's momentum)
    fallback: Any  # the fallback transformation's state


class KFAC(optax.GradientTransformationExtraArgs):
    """An optax transformation whose ``update`` takes the batch: ``update(grads, state,
    params, *, x, y, key=None, side=None)`` (see :func:`kfac`)."""


def _to_matrix(block):
    """``{"W": (..., out), "b": (out,)}`` → ``M (n_in, out)``, the bias as the last row."""
    W = block["W"]
    M = W.reshape(-1, W.shape[-1])
    return jnp.concatenate([M, block["b"][None]], axis=0) if "b" in block else M


def _from_matrix(M, like):
    W = like["W"]
    rows = math.prod(W.shape[:-1])
    out = {"W": M[:rows].reshape(W.shape).astype(W.dtype)}
    if "b" in like:
        out["b"] = M[rows].astype(like["b"].dtype)
    return out


def _eigen(f: Factors) -> Eigen:
    lA, QA = jnp.linalg.eigh(f.A)
    lG, QG = jnp.linalg.eigh(f.G)
    return Eigen(QA, jnp.maximum(lA, 0), QG, jnp.maximum(lG, 0))


def _precondition(e: Eigen, grad_block, damping):
    M = _to_matrix(grad_block)
    core = (e.QA.T @ M @ e.QG) / (e.lA[:, None] * e.lG[None, :] + damping)
    return _from_matrix(e.QA @ core @ e.QG.T, grad_block)


def kfac(model: Layer, loss: losses.Loss, in_shape, *, learning_rate=1e-2,
         damping: float = 1e-3, decay: float = 0.95, inverse_every: int = 10,
         momentum: float = 0.0, kl_clip: float | None = 1e-2, kind: str = "exact",
         samples: int = 1, fallback: optax.GradientTransformation | None = None) -> KFAC:
    """K-FAC for ``model`` and ``loss`` (see the module docstring).

    Args:
      in_shape: the model's per-example input shape (the blocks' sizes follow from it).
      learning_rate: a positive number or an optax schedule (``count -> rate``).
      damping: λ > 0, added to ``A ⊗ G`` before inverting.
      decay: the moving averages' weight of the old factors, in [0, 1).
      inverse_every: recompute the eigendecompositions every this many updates.
      momentum: in [0, 1); 0 for none.
      kl_clip: the bound on ``η² vᵀ F v`` (None: no clipping).
      kind, samples: as :func:`jbp.kronecker_factors` (``"exact"``: KFLR; ``"mc"``:
        sampled targets, drawn with ``update``'s ``key``).
      fallback: the transformation of every param outside a block (default Adam at 1e-3).
    """
    who = "kfac"
    check_model_and_loss(model, loss, who, per_example=True)
    in_shape = as_shape(in_shape, who)
    if model.stateful:
        raise ValueError(f"{who}: {model.name} keeps state (batch_norm): its batch statistics "
                         f"mix the examples, which K-FAC's factors assume apart")
    for name, value, low, high in (("damping", damping, 0, math.inf), ("decay", decay, 0, 1),
                                   ("momentum", momentum, 0, 1)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
            low < value < high if name == "damping" else low <= value < high)
        if not ok:
            span = "> 0" if name == "damping" else f"in [{low}, {high})"
            raise ValueError(f"{who}: {name} must be a number {span}, got {value!r}")
    if not callable(learning_rate) and not (isinstance(learning_rate, (int, float))
                                            and not isinstance(learning_rate, bool)
                                            and learning_rate > 0):
        raise ValueError(f"{who}: learning_rate must be a positive number or a schedule, got "
                         f"{learning_rate!r}")
    if kl_clip is not None and not (isinstance(kl_clip, (int, float))
                                    and not isinstance(kl_clip, bool) and kl_clip > 0):
        raise ValueError(f"{who}: kl_clip must be a number > 0 or None, got {kl_clip!r}")
    inverse_every = positive_int(inverse_every, "inverse_every", who)
    if kind not in KINDS:
        raise ValueError(f"{who}: kind must be one of {KINDS}, got {kind!r}")
    batch_factors = kronecker_factors(model, loss, kind=kind, samples=samples, undeclared="skip")
    rate = learning_rate if callable(learning_rate) else (lambda count: learning_rate)

    def factor_shapes(params):
        def shapes(p):
            x = jnp.zeros((1, *in_shape), jnp.result_type(*jax.tree_util.tree_leaves(p)))
            out, cache, _ = run(model, p, x)
            return column_factors(model, p, cache, jnp.zeros_like(out), who)
        return jax.eval_shape(shapes, params)

    def outside_blocks(params):
        """True at every param leaf that no block preconditions: what the fallback sees
        (it keeps no state for, and spends no work on, the blocks' params)."""
        return jax.tree_util.tree_map(
            lambda f, p: jax.tree_util.tree_map(lambda _: f is None, p),
            factor_shapes(params), params, is_leaf=lambda t: t is None or is_factors(t))

    fallback = optax.masked(optax.adam(1e-3) if fallback is None else fallback,
                            outside_blocks)

    def init(params):
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                       factor_shapes(params))
        eigen = jax.tree_util.tree_map(lambda f: _eigen(Factors(jnp.eye(len(f.A), dtype=f.A.dtype),
                                                                jnp.eye(len(f.G), dtype=f.G.dtype))),
                                       zeros, is_leaf=is_factors)
        return KFACState(jnp.zeros((), jnp.int32), zeros, eigen,
                         jax.tree_util.tree_map(jnp.zeros_like, params), fallback.init(params))

    def update(grads, state, params=None, *, x=None, y=None, key=None, side=None, **_):
        if params is None or x is None or y is None:
            raise ValueError(f"{who}: update needs params and the batch: update(grads, state, "
                             f"params, x=x, y=y) (jbp.fit passes them)")
        new = jax.tree_util.tree_map(lambda b, old: b.astype(old.dtype),
                                     batch_factors(params, x, y, key=key, side=side),
                                     state.factors)
        count = state.count + 1
        first = count == 1
        averaged = jax.tree_util.tree_map(
            lambda old, b: jnp.where(first, b, decay * old + (1 - decay) * b),
            state.factors, new)
        eigen = jax.lax.cond((count - 1) % inverse_every == 0,
                             lambda: jax.tree_util.tree_map(_eigen, averaged, is_leaf=is_factors),
                             lambda: state.eigen)
        fallback_updates, fallback_state = fallback.update(grads, state.fallback, params)
        step = -rate(count)

        def block_velocity(e, g, v):
            if e is None:  # not in a block: the fallback's
                return None
            return jax.tree_util.tree_map(lambda vi, pi: momentum * vi + pi, v,
                                          _precondition(e, g, damping))

        is_eigen = lambda t: t is None or isinstance(t, Eigen)  # noqa: E731
        velocity = jax.tree_util.tree_map(block_velocity, eigen, grads, state.velocity,
                                          is_leaf=is_eigen)
        scale = step
        if kl_clip is not None:  # η² Σ ⟨v, ∇⟩ over the blocks: the step's predicted KL
            products = jax.tree_util.tree_map(
                lambda v, g: sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(v),
                                                                 jax.tree_util.tree_leaves(g))),
                velocity, grads, is_leaf=lambda t: t is None)
            kl = step * step * sum(jax.tree_util.tree_leaves(products), jnp.zeros(()))
            scale = step * jnp.minimum(1.0, jnp.sqrt(kl_clip / jnp.maximum(kl, 1e-30)))

        def block_update(v, fb):
            if v is None:
                return fb
            return jax.tree_util.tree_map(lambda vi: (scale * vi).astype(vi.dtype), v)

        updates = jax.tree_util.tree_map(block_update, velocity, fallback_updates,
                                         is_leaf=lambda t: t is None)
        velocity = jax.tree_util.tree_map(lambda v, old: old if v is None else v, velocity,
                                          state.velocity, is_leaf=lambda t: t is None)
        return updates, KFACState(count, averaged, eigen, velocity, fallback_state)

    return KFAC(init, update)
