"""Per-example gradients, their norms and variance, from one hand-written backward pass.

The batch loss is a mean, C = (1/B) Σ_i ℓ_i, and every layer here treats the examples of a
batch independently. So if the backward pass starts from the loss's per-example gradient
(row i is ∂ℓ_i/∂out_i),
the delta a dense layer receives holds, row by row, δ_i = ∂ℓ_i/∂z_i, and with its cached
input a_i the gradient of example i's own loss is the outer product a_i δ_iᵀ (bias: δ_i).
The usual batch gradient aᵀδ sums these outer products; here we keep them apart:

- ``per_example_grads``: ∇ℓ_i for every i, each leaf with a leading batch axis;
- ``per_example_grad_norms``: ‖∇ℓ_i‖ without forming ∇ℓ_i, since for a dense layer
  ‖a_i δ_iᵀ‖²_F = ‖a_i‖²·‖δ_i‖² (plus ‖δ_i‖² for the bias);
- ``per_example_grad_variance``: the variance of ∇ℓ_i over the batch, per parameter, as
  the mean of squared deviations from the mean (two passes over the per-example
  gradients, which XLA fuses into the reductions: stable in float32);
- ``clipped_grad_mean``: (1/B) Σ_i min(1, c/‖∇ℓ_i‖) ∇ℓ_i, the DP-SGD gradient before noise,
  by a second backward pass whose output cotangent is reweighted per example.

None of this calls ``jax.grad`` or ``jax.vmap``: it is the model's own backward, walked layer
by layer. Each layer declares what it needs (``Layer.per_example``, see :mod:`jbp.layer`): a
:class:`PerExampleRule` for a layer with parameters (dense has one), ``EXAMPLEWISE`` for a
weightless layer that maps every example on its own; composites are walked through their
``walk``. A layer that declares nothing is refused with an error naming it. Loss weights are
not taken here: every example counts once. A model with batch_norm needs ``state=`` and
``train=False``: in training mode batch statistics mix the examples (an error says so).

>>> import jax, jax.numpy as jnp, jbp
>>> model = jbp.mlp([3, 4, 2])
>>> _, params = model.init(jax.random.key(0), (3,))
>>> x, y = jnp.ones((5, 3)), jnp.array([0, 1, 0, 1, 1])
>>> norms = jbp.per_example_grad_norms(model, jbp.losses.softmax_cross_entropy)(params, x, y)
>>> norms.shape
(5,)
"""

import jax
import jax.numpy as jnp

from jbp.grads import check_model_and_loss
from jbp.layer import Layer, PerExampleRule, run
from jbp.losses import Loss


def _unsupported(who: str, layer: Layer, why: str) -> ValueError:
    return ValueError(f"{who}: layer {layer.name}: {why}; {who} needs every layer to declare "
                      f"Layer.per_example: a PerExampleRule for a layer with parameters, "
                      f"EXAMPLEWISE for a weightless layer that keeps the examples of a batch "
                      f"apart (see docs/custom_layers.md)")


def _visitor(hook, who: str):
    """The ``visit`` of a per-example walk: ``hook(rule, params, cache, delta)`` at every layer with
    parameters, composites walked through, the layers' own backwards for ``dx``."""

    def visit(layer: Layer, params, cache, delta):
        declared = layer.per_example
        if declared is None:
            raise _unsupported(who, layer, "this layer declares no per-example behaviour")
        if isinstance(declared, PerExampleRule):
            # The layer's own backward gives dx; its batch-summed dparams go unused (jit drops them).
            _, dx = layer.backward(params, cache, delta)
            return hook(declared, params, cache, delta), dx
        if layer.walk is not None:
            return layer.walk(params, cache, delta, visit)
        if jax.tree_util.tree_leaves(params):
            raise _unsupported(who, layer, "this layer has parameters but declares EXAMPLEWISE, not a "
                                      "PerExampleRule")
        _, dx = layer.backward(params, cache, delta)
        return params, dx

    return visit


def _forward(model: Layer, loss: Loss, params, x, y, key, train, state, side, who: str):
    """Forward pass and the per-example output cotangent (row i: ∂ℓ_i/∂out_i)."""
    out, cache, _ = run(model, params, x, key=key, train=train, state=state, side=side)
    batch = out.shape[0]
    per_example = jax.eval_shape(loss.per_example, out, y)
    if per_example.shape != (batch,):
        raise ValueError(f"{who}: loss {loss.name!r} must give one loss per example, shape "
                         f"({batch},); its per_example gave {per_example.shape}")
    return cache, loss.per_example_grad(out, y).astype(out.dtype)


def trace(model: Layer, params, cache, dout, hook, who: str):
    """Walk ``model``'s backward from the per-example output cotangent ``dout``.

    ``hook(rule, params, cache, delta)`` runs at every layer with parameters; the result mirrors
    ``params``. This is the building block of the functions below
    and of :mod:`jbp.curvature` (which starts from factors of the loss Hessian instead).
    """
    return _visitor(hook, who)(model, params, cache, dout)[0]


def rule_grads(rule: PerExampleRule, params, cache, delta):
    """The hook of :func:`trace` that gives every layer's ∇ℓ_i."""
    return rule.grads(params, cache, delta)


def like_params(tree, params):
    """``tree`` (structured like ``params``) in the params' dtypes."""
    return jax.tree_util.tree_map(lambda t, p: t.astype(p.dtype), tree, params)


def _norms(model, params, cache, dout, who):
    sq = trace(model, params, cache, dout, PerExampleRule.squared_norms, who)
    return jnp.sqrt(sum(jax.tree_util.tree_leaves(sq), jnp.zeros(dout.shape[0], dout.dtype)))


def per_example_grads(model: Layer, loss: Loss):
    """``f(params, x, y, *, key=None, train=False, state=None, side=None) -> grads``: ∇ℓ_i, the gradient of example i's own loss.

    Every leaf has shape ``(B, *param_leaf.shape)``; the mean over axis 0 is the batch
    gradient ∂C/∂params (so ∇ℓ_i is *not* scaled by 1/B). ``key`` and ``train`` go to the
    model's forward.
    """
    who = "per_example_grads"
    check_model_and_loss(model, loss, who, per_example=True)

    def grads(params, x, y, *, key=None, train=False, state=None, side=None):
        cache, dout = _forward(model, loss, params, x, y, key, train, state, side, who)
        return like_params(trace(model, params, cache, dout, rule_grads, who), params)

    return grads


def per_example_grad_norms(model: Layer, loss: Loss):
    """``f(params, x, y, *, key=None, train=False, state=None, side=None) -> (B,)``: ‖∇ℓ_i‖₂ over all parameters, per example.

    Never forms ∇ℓ_i: a dense layer contributes ‖a_i‖²·‖δ_i‖² + ‖δ_i‖².
    """
    who = "per_example_grad_norms"
    check_model_and_loss(model, loss, who, per_example=True)

    def norms(params, x, y, *, key=None, train=False, state=None, side=None):
        cache, dout = _forward(model, loss, params, x, y, key, train, state, side, who)
        return _norms(model, params, cache, dout, who)

    return norms


def per_example_grad_variance(model: Layer, loss: Loss, *, ddof: int = 0):
    """``f(params, x, y, *, key=None, train=False, state=None, side=None) -> (mean, variance)``, both shaped like ``params``.

    ``mean`` is the batch gradient (1/B) Σ_i ∇ℓ_i; ``variance`` is, per parameter,
    Σ_i (∇ℓ_i − mean)² / (B − ddof), the deviations taken before squaring (a one-pass
    Σ∇ℓ_i² − B·mean² loses every digit in float32 when the examples agree).
    """
    who = "per_example_grad_variance"
    check_model_and_loss(model, loss, who, per_example=True)
    if not isinstance(ddof, int) or ddof < 0:
        raise ValueError(f"{who}: ddof must be a non-negative int, got {ddof!r}")

    def mean(rule, p, cache, delta):
        return jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), rule.grads(p, cache, delta))

    def sq_dev(rule, p, cache, delta):
        g = rule.grads(p, cache, delta)
        return jax.tree_util.tree_map(lambda leaf: jnp.sum((leaf - jnp.mean(leaf, axis=0)) ** 2,
                                                           axis=0), g)

    def variance(params, x, y, *, key=None, train=False, state=None, side=None):
        cache, dout = _forward(model, loss, params, x, y, key, train, state, side, who)
        batch = dout.shape[0]
        if batch <= ddof:
            raise ValueError(f"{who}: needs a batch larger than ddof={ddof}, got {batch}")
        m = trace(model, params, cache, dout, mean, who)
        v = jax.tree_util.tree_map(lambda s: s / (batch - ddof),
                                   trace(model, params, cache, dout, sq_dev, who))
        return like_params(m, params), like_params(v, params)

    return variance


def clipped_grad_mean(model: Layer, loss: Loss, l2_norm_clip: float):
    """``f(params, x, y, *, key=None, train=False, state=None, side=None) -> (grads, norms)``: the DP-SGD gradient before noise.

    ``grads = (1/B) Σ_i ∇ℓ_i · min(1, l2_norm_clip/‖∇ℓ_i‖)``, shaped like ``params``;
    ``norms (B,)`` are the unclipped ‖∇ℓ_i‖. Two backward passes: one for the norms, one
    whose output cotangent row i is scaled by example i's clip factor (the backward is
    linear in it, so that sums the clipped per-example gradients without forming them).
    """
    who = "clipped_grad_mean"
    check_model_and_loss(model, loss, who, per_example=True)
    if not l2_norm_clip > 0:
        raise ValueError(f"{who}: l2_norm_clip must be positive, got {l2_norm_clip!r}")

    def clipped(params, x, y, *, key=None, train=False, state=None, side=None):
        cache, dout = _forward(model, loss, params, x, y, key, train, state, side, who)
        norms = _norms(model, params, cache, dout, who)
        factor = 1.0 / jnp.maximum(1.0, norms / l2_norm_clip)
        batch = dout.shape[0]
        scale = (factor / batch).reshape((batch,) + (1,) * (dout.ndim - 1)).astype(dout.dtype)
        grads, _ = model.backward(params, cache, dout * scale)
        return grads, norms

    return clipped
