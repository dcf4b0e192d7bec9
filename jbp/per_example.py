"""Per-example gradients, their norms and variance, from one hand-written backward pass.

The batch loss is a mean, C = (1/B) Σ_i ℓ_i, and every layer here treats the examples of a
batch independently. So if the backward pass starts from B·∂C/∂out (row i is ∂ℓ_i/∂out_i),
the delta a dense layer receives holds, row by row, δ_i = ∂ℓ_i/∂z_i, and with its cached
input a_i the gradient of example i's own loss is the outer product a_i δ_iᵀ (bias: δ_i).
The usual batch gradient aᵀδ sums these outer products; here we keep them apart:

- ``per_example_grads``: ∇ℓ_i for every i, each leaf with a leading batch axis;
- ``per_example_grad_norms``: ‖∇ℓ_i‖ without forming ∇ℓ_i, since for a dense layer
  ‖a_i δ_iᵀ‖²_F = ‖a_i‖²·‖δ_i‖² (plus ‖δ_i‖² for the bias);
- ``per_example_grad_variance``: the variance of ∇ℓ_i over the batch, per parameter,
  from Σ_i (a_i²)(δ_i²)ᵀ = (a²)ᵀδ² and the batch sum aᵀδ;
- ``clipped_grad_mean``: (1/B) Σ_i min(1, c/‖∇ℓ_i‖) ∇ℓ_i, the DP-SGD gradient before noise,
  by a second backward pass whose output cotangent is reweighted per example.

None of this calls ``jax.grad`` or ``jax.vmap``: it is the model's own backward, walked layer
by layer. A layer with parameters needs a :class:`PerExampleRule` (dense has one); a layer
without parameters must be known to keep examples apart (activations, maxout, flatten,
dropout); ``serial`` composites are walked recursively. Anything else raises an error naming
the layer.

>>> import jax, jax.numpy as jnp, jbp
>>> model = jbp.mlp([3, 4, 2])
>>> _, params = model.init(jax.random.key(0), (3,))
>>> x, y = jnp.ones((5, 3)), jnp.array([0, 1, 0, 1, 1])
>>> norms = jbp.per_example_grad_norms(model, jbp.losses.softmax_cross_entropy)(params, x, y)
>>> norms.shape
(5,)
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jbp.layer import Layer
from jbp.losses import Loss


class PerExampleRule(NamedTuple):
    """Per-example quantities of one layer type with parameters.

    Each function takes ``(cache, delta)``: the layer's forward cache and ``delta``, the
    per-example cotangent of its output (row i is ∂ℓ_i/∂(output_i)), shape ``(B, ...)``.
    """

    grads: Callable  # -> pytree like params, each leaf (B, *leaf.shape): ∇ℓ_i
    sq_norms: Callable  # -> (B,): Σ over the layer's parameters of (∂ℓ_i/∂θ)²
    sum_sq: Callable  # -> pytree like params: Σ_i (∂ℓ_i/∂θ)², element-wise


def _dense_grads(a, delta):
    return {"W": a[:, :, None] * delta[:, None, :], "b": delta}


def _dense_sq_norms(a, delta):
    d2 = jnp.sum(delta * delta, axis=1)
    return jnp.sum(a * a, axis=1) * d2 + d2


def _dense_sum_sq(a, delta):
    d2 = delta * delta
    return {"W": (a * a).T @ d2, "b": jnp.sum(d2, axis=0)}


DENSE_RULE = PerExampleRule(_dense_grads, _dense_sq_norms, _dense_sum_sq)
"""Dense layer (cache ``a (B, in)``, delta ``(B, out)``): ∂ℓ_i/∂W = a_i δ_iᵀ, ∂ℓ_i/∂b = δ_i."""

# A layer's kind is the constructor that built its backward, e.g. "jbp.dense.dense".
# Layers with parameters and their rules:
RULES: dict[str, PerExampleRule] = {"jbp.dense.dense": DENSE_RULE}
# Weightless layers that map every example on its own (so per-example deltas stay apart):
EXAMPLEWISE: set[str] = {"jbp.activations.elementwise", "jbp.maxout.maxout",
                         "jbp.flatten.flatten", "jbp.dropout.dropout"}
_SERIAL = "jbp.serial.serial"


def _kind(layer: Layer) -> str:
    fn = layer.backward
    qualname = getattr(fn, "__qualname__", "?").split(".<locals>")[0]
    return f"{getattr(fn, '__module__', '?')}.{qualname}"


def _names(kinds) -> str:
    return ", ".join(sorted(k.rsplit(".", 1)[-1] for k in kinds))


def _unsupported(layer: Layer, where: str, why: str) -> ValueError:
    return ValueError(f"{where} ({layer.name}): {why}; per-example quantities support serial "
                      f"composites of {_names(RULES)} (with parameters) and {_names(EXAMPLEWISE)} "
                      f"(weightless; elementwise builds the activations)")


def _walk(layer: Layer, params, cache, delta, hook, where: str):
    """Run ``layer``'s hand-written backward from the per-example cotangent ``delta``.

    ``hook(rule, cache, delta)`` is called for every layer with parameters. Returns
    ``(dx, results)``: ``results`` mirrors ``params`` (a tuple for a serial, ``{}`` for a
    weightless layer, the hook's value for a layer with parameters).
    """
    kind = _kind(layer)
    if layer.layers:
        if kind != _SERIAL:
            raise _unsupported(layer, where, "composite layers other than serial are not supported")
        results = [None] * len(layer.layers)
        for i in reversed(range(len(layer.layers))):
            delta, results[i] = _walk(layer.layers[i], params[i], cache[i], delta, hook,
                                      f"{where}, sublayer {i}" if where != "model" else f"layer {i}")
        return delta, tuple(results)
    if jax.tree_util.tree_leaves(params):
        if kind not in RULES:
            raise _unsupported(layer, where, "this layer has parameters but no per-example rule")
        # The layer's own backward gives dx; its batch-summed dparams go unused (jit drops them).
        _, dx = layer.backward(params, cache, delta)
        return dx, hook(RULES[kind], cache, delta)
    if kind not in EXAMPLEWISE:
        raise _unsupported(layer, where, "this weightless layer is not known to treat examples "
                                         "independently")
    _, dx = layer.backward(params, cache, delta)
    return dx, params


def _check(model, loss, who: str) -> None:
    if not isinstance(model, Layer):
        raise TypeError(f"{who}: model must be a jbp Layer (e.g. jbp.mlp(...)), got "
                        f"{type(model).__name__}")
    if not isinstance(loss, Loss) or type(loss).value is not Loss.value:
        raise TypeError(f"{who}: loss must be a jbp Loss, whose value is the batch mean of "
                        f"per_example(out, target) -> (B,); got {type(loss).__name__}")


def _forward(model: Layer, loss: Loss, params, x, y, kwargs, who: str):
    """Forward pass and the per-example output cotangent B·∂C/∂out (row i: ∂ℓ_i/∂out_i)."""
    out, cache = model.forward(params, x, **kwargs)
    batch = out.shape[0]
    per_example = jax.eval_shape(loss.per_example, out, y)
    if per_example.shape != (batch,):
        raise ValueError(f"{who}: loss {loss.name!r} must give one loss per example, shape "
                         f"({batch},); its per_example gave {per_example.shape}")
    return cache, loss.grad(out, y) * batch


def trace(model: Layer, params, cache, dout, hook):
    """Walk ``model``'s backward from the per-example output cotangent ``dout``.

    ``hook(rule, cache, delta)`` runs at every layer with parameters; the result mirrors
    ``params``. This is the building block of the functions below and of
    :mod:`jbp.curvature` (which starts from factors of the loss Hessian instead).
    """
    return _walk(model, params, cache, dout, hook, "model")[1]


def _norms(model, params, cache, dout):
    sq = trace(model, params, cache, dout, lambda rule, c, d: rule.sq_norms(c, d))
    return jnp.sqrt(sum(jax.tree_util.tree_leaves(sq), jnp.zeros(dout.shape[0], dout.dtype)))


def per_example_grads(model: Layer, loss: Loss):
    """``f(params, x, y, **kw) -> grads``: ∇ℓ_i, the gradient of example i's own loss.

    Every leaf has shape ``(B, *param_leaf.shape)``; the mean over axis 0 is the batch
    gradient ∂C/∂params (so ∇ℓ_i is *not* scaled by 1/B). ``kw`` (``key=``, ``train=``) go to
    the model's forward.
    """
    who = "per_example_grads"
    _check(model, loss, who)

    def grads(params, x, y, **kwargs):
        cache, dout = _forward(model, loss, params, x, y, kwargs, who)
        return trace(model, params, cache, dout, lambda rule, c, d: rule.grads(c, d))

    return grads


def per_example_grad_norms(model: Layer, loss: Loss):
    """``f(params, x, y, **kw) -> (B,)``: ‖∇ℓ_i‖₂ over all parameters, per example.

    Never forms ∇ℓ_i: a dense layer contributes ‖a_i‖²·‖δ_i‖² + ‖δ_i‖².
    """
    who = "per_example_grad_norms"
    _check(model, loss, who)

    def norms(params, x, y, **kwargs):
        cache, dout = _forward(model, loss, params, x, y, kwargs, who)
        return _norms(model, params, cache, dout)

    return norms


def per_example_grad_variance(model: Layer, loss: Loss, *, ddof: int = 0):
    """``f(params, x, y, **kw) -> (mean, variance)``, both shaped like ``params``.

    ``mean`` is the batch gradient (1/B) Σ_i ∇ℓ_i; ``variance`` is, per parameter,
    Σ_i (∇ℓ_i − mean)² / (B − ddof), computed as (Σ_i ∇ℓ_i² − B·mean²)/(B − ddof) without
    forming ∇ℓ_i (clipped at 0, where round-off would make it slightly negative).
    """
    who = "per_example_grad_variance"
    _check(model, loss, who)
    if not isinstance(ddof, int) or ddof < 0:
        raise ValueError(f"{who}: ddof must be a non-negative int, got {ddof!r}")

    def variance(params, x, y, **kwargs):
        cache, dout = _forward(model, loss, params, x, y, kwargs, who)
        batch = dout.shape[0]
        if batch <= ddof:
            raise ValueError(f"{who}: needs a batch larger than ddof={ddof}, got {batch}")
        sum_sq = trace(model, params, cache, dout, lambda rule, c, d: rule.sum_sq(c, d))
        mean, _ = model.backward(params, cache, dout / batch)
        var = jax.tree_util.tree_map(lambda s, m: jnp.maximum(s - batch * m * m, 0) / (batch - ddof),
                                     sum_sq, mean)
        return mean, var

    return variance


def clipped_grad_mean(model: Layer, loss: Loss, l2_norm_clip: float):
    """``f(params, x, y, **kw) -> (grads, norms)``: the DP-SGD gradient before noise.

    ``grads = (1/B) Σ_i ∇ℓ_i · min(1, l2_norm_clip/‖∇ℓ_i‖)``, shaped like ``params``;
    ``norms (B,)`` are the unclipped ‖∇ℓ_i‖. Two backward passes: one for the norms, one
    whose output cotangent row i is scaled by example i's clip factor (the backward is
    linear in it, so that sums the clipped per-example gradients without forming them).
    """
    who = "clipped_grad_mean"
    _check(model, loss, who)
    if not l2_norm_clip > 0:
        raise ValueError(f"{who}: l2_norm_clip must be positive, got {l2_norm_clip!r}")

    def clipped(params, x, y, **kwargs):
        cache, dout = _forward(model, loss, params, x, y, kwargs, who)
        norms = _norms(model, params, cache, dout)
        factor = 1.0 / jnp.maximum(1.0, norms / l2_norm_clip)
        batch = dout.shape[0]
        scale = (factor / batch).reshape((batch,) + (1,) * (dout.ndim - 1)).astype(dout.dtype)
        grads, _ = model.backward(params, cache, dout * scale)
        return grads, norms

    return clipped
