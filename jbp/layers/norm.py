"""Normalisation: ``y = scale · (x − μ)/√(σ² + eps) + offset``.

``layer_norm`` takes μ and σ² over the last axis of each row (``rms_norm`` no μ, σ² the
mean square, no offset); ``group_norm`` per example over every position and a group of
channels (``instance_norm``: one channel a group); ``batch_norm`` per channel (the last
axis) over the batch and every position, and keeps running statistics as state (see
:func:`batch_norm` and docs/state.md). All share :func:`normalise` and
:func:`normalise_backward`, over their own axes. The rest of this docstring is
layer_norm's; the others' backward is the same formula with the means taken over their
axes (rms_norm's without the mean term).

Lecture map: a layer whose output mixes the features of one position, so the backward is
the lecture's "Σ over everything a neuron feeds" *inside* one layer: each ``x_k`` feeds
every ``x̂_j`` of its row through μ and σ². Written out, that sum collapses to the
**three-term formula** (derived step by step in :func:`layer_norm`'s docstring)::

    g  = scale · dy                                   (∂C/∂x̂)
    dx = r · (g − mean(g) − x̂ · mean(g · x̂))          r = 1/√(σ² + eps), means over the row

The forward caches ``x̂`` and ``r``; nothing else is needed (not ``x``, not μ).

Shapes: ``x (..., n)``: a batch ``(B, n)``, a sequence ``(B, T, n)``, any leading axes, or a
single example ``(n,)``; ``y`` has ``x``'s shape. Params ``{"scale": (n,), "offset": (n,)}``
(ones and zeros). Cache ``(x̂ (..., n), r (..., 1))``. The backward sums ∂C/∂scale and
∂C/∂offset over every leading axis.

Per example: the statistics are per row, so examples stay apart; ∂ℓ_i/∂scale = Σ over
example i's positions of δ·x̂ and ∂ℓ_i/∂offset = Σ δ (:data:`RULE`).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jbp.init import constant
from jbp.layer import (EXAMPLEWISE, Layer, PerExampleRule, as_shape, boolean, call_text,
                       cast_like, constructor, param_dtype, per_example_rows, positive_int)


AFFINE = ("scale", "offset")


def _affine_rule(keys=AFFINE) -> PerExampleRule:
    """∂ℓ_i/∂scale = Σ_t δ_it·x̂_it, ∂ℓ_i/∂offset = Σ_t δ_it (t: example i's positions), for
    the params in ``keys``."""

    def grads(params, cache, delta):
        x_hat, _ = cache
        x3, d3 = per_example_rows(x_hat), per_example_rows(delta)
        g = {"scale": jnp.sum(d3 * x3, axis=1)} if "scale" in keys else {}
        return {**g, "offset": jnp.sum(d3, axis=1)} if "offset" in keys else g

    return PerExampleRule(grads)


RULE = _affine_rule()
"""∂ℓ_i/∂scale = Σ_t δ_it·x̂_it, ∂ℓ_i/∂offset = Σ_t δ_it (t: example i's positions); the
norms and sums of squares default to sums over these (B, n) arrays, which are small."""
_grads = RULE.grads


def check_eps(eps, who: str) -> None:
    if (isinstance(eps, bool) or not isinstance(eps, (int, float))
            or not math.isfinite(eps) or eps <= 0):
        raise ValueError(f"{who}: eps must be a positive number (it keeps 1/√(σ² + eps) "
                         f"finite for a constant input), got {eps!r}")


def _scale_and_offset(who: str, dtype, keys=AFFINE, check=None):
    """The ``init`` of a normalisation over the last axis: scale ones, offset zeros, (n,),
    those of ``keys``; ``check(n)`` vets the width."""

    def init(key, in_shape):
        shape = as_shape(in_shape, who, min_ndim=1, layout="(..., features)")
        n, dt = shape[-1], param_dtype(dtype, who)
        if check is not None:
            check(n)
        start = {"scale": 1, "offset": 0}
        return shape, {k: constant(start[k], (n,), dt) for k in keys}

    return init


def normalise(x, axes, eps, center: bool = True):
    """``(x̂, r)`` over ``axes`` of ``x`` (kept, of length 1): ``r = 1/√(σ² + eps)`` and
    ``x̂ = (x − μ)·r``, σ² the mean of squared deviations (two passes); ``center=False``:
    no μ, σ² the mean square (RMSNorm)."""
    d = x - jnp.mean(x, axis=axes, keepdims=True) if center else x
    var = jnp.mean(d * d, axis=axes, keepdims=True)
    r = jax.lax.rsqrt(var + jnp.asarray(eps, var.dtype))
    return d * r, r


def normalise_backward(g, x_hat, r, axes, center: bool = True):
    """∂C/∂x from ``g = ∂C/∂x̂``: the three-term formula ``r·(g − mean g − x̂·mean(g·x̂))``,
    means over ``axes``; ``center=False`` (no μ in the forward): ``r·(g − x̂·mean(g·x̂))``."""
    mean_gx = jnp.mean(g * x_hat, axis=axes, keepdims=True)
    if not center:
        return r * (g - x_hat * mean_gx)
    return r * (g - jnp.mean(g, axis=axes, keepdims=True) - x_hat * mean_gx)


def _affine(params, x_hat):
    """``scale · x̂ + offset``, with those of the two that ``params`` holds."""
    y = params["scale"] * x_hat if "scale" in params else x_hat
    return y + params["offset"] if "offset" in params else y


def _affine_backward(params, x_hat, dy):
    """``(dparams, g)``: ∂C/∂scale = Σ dy·x̂ and ∂C/∂offset = Σ dy over every leading axis
    (those ``params`` holds), and ``g = ∂C/∂x̂ = scale · dy``."""
    grads, n = {}, dy.shape[-1]
    if "scale" in params:
        grads["scale"] = jnp.sum((dy * x_hat).reshape(-1, n), axis=0).astype(params["scale"].dtype)
    if "offset" in params:
        grads["offset"] = jnp.sum(dy.reshape(-1, n), axis=0).astype(params["offset"].dtype)
    return grads, (params["scale"] * dy if "scale" in params else dy)


def _check_width(who, params, x, batched=False):
    """The input's last axis against the params' width (a layer without params takes any)."""
    widths = [v.shape[0] for v in params.values()]
    lead = "batch, ..., " if batched else "..., "
    if x.ndim < 1 + batched or (widths and x.shape[-1] != widths[0]):
        n = widths[0] if widths else "n"
        raise ValueError(f"{who}: expected input of shape ({lead}{n}) (the last axis is "
                         f"normalised; the params have {n} features), got {tuple(x.shape)}")


def _last_axis_norm(who: str, center: bool, keys, eps, dtype) -> Layer:
    """layer_norm and rms_norm: the statistics of every row (the last axis)."""
    check_eps(eps, who)

    def forward(params, x, *, key=None, train=False, state=None, side=None):
        _check_width(who, params, x)
        x_hat, r = normalise(x, -1, eps, center)
        return _affine(params, x_hat), (x_hat, r), state

    def backward(params, cache, dy):
        x_hat, r = cache
        grads, g = _affine_backward(params, x_hat, dy)
        return grads, cast_like(normalise_backward(g, x_hat, r, -1, center), x_hat)

    return Layer(who, _scale_and_offset(who, dtype, keys), forward, backward,
                 per_example=_affine_rule(keys) if keys else EXAMPLEWISE)


@constructor
def layer_norm(*, scale: bool = True, offset: bool = True, eps: float = 1e-5,
               dtype=jnp.float32) -> Layer:
    """Layer normalisation over the last axis, with a learnable scale and offset.

    Forward, for one row ``x`` of ``n`` features (every leading axis is a row)::

        μ  = (1/n) Σ_j x_j
        d  = x − μ                      (the deviations)
        σ² = (1/n) Σ_j d_j²             (two passes: the mean of squared deviations, not
                                         E[x²] − μ², which cancels catastrophically)
        r  = 1/√(σ² + eps)
        x̂  = d · r
        y  = scale · x̂ + offset

    Backward, given ``dy = ∂C/∂y``:

    - ``∂C/∂offset = Σ dy`` and ``∂C/∂scale = Σ dy · x̂``, summed over every leading axis
      (the same sum over the batch as the dense layer's bias).
    - ``g = ∂C/∂x̂ = scale · dy``. Every ``x̂_j`` depends on every ``x_k`` of the row, so
      ``∂C/∂x_k = Σ_j g_j ∂x̂_j/∂x_k``. Four steps:

      1. ``∂d_j/∂x_k = δ_jk − 1/n`` (μ moves with every ``x_k``).
      2. ``∂σ²/∂x_k = (2/n) Σ_j d_j (δ_jk − 1/n) = (2/n) d_k``, because ``Σ_j d_j = 0``;
         so ``∂r/∂x_k = −½ (σ² + eps)^(−3/2) · (2/n) d_k = −r³ d_k / n``.
      3. ``∂x̂_j/∂x_k = r (δ_jk − 1/n) + d_j ∂r/∂x_k = r (δ_jk − 1/n − x̂_j x̂_k / n)``.
      4. ``∂C/∂x_k = Σ_j g_j · r (δ_jk − 1/n − x̂_j x̂_k / n)
         = r (g_k − mean(g) − x̂_k · mean(g · x̂))``: the three-term formula.

      Read it as a projection: the gradient loses its mean (shifting a row changes
      nothing) and its component along ``x̂`` (scaling a row changes nothing, exactly so
      for ``eps`` → 0), and the rest is divided by the row's standard deviation. It costs
      two row means, not an ``n × n`` Jacobian.

    A row of one feature (``n = 1``) or a constant row has ``d = 0``: ``x̂ = 0``, ``y =
    offset``, and ``dx = r (g − mean(g))`` with ``r = 1/√eps``; ``eps > 0`` keeps it finite.

    Args:
      scale: False leaves ``scale`` out (y = x̂ + offset; g = dy).
      offset: False leaves ``offset`` out (what to write before a layer with a bias).
      eps: added to the variance, a positive number.
      dtype: of the params.

    Params ``{"scale": (n,), "offset": (n,)}`` (those switched on; ``{}`` for neither, and
    the layer then takes any width); ``x (..., n) -> y (..., n)`` in the dtype of ``x``
    and the params promoted (as dense); ``dx`` in ``x``'s dtype, the parameter gradients in
    the params'.
    """
    keys = tuple(k for k, on in zip(AFFINE, (boolean(scale, "scale", "layer_norm"),
                                             boolean(offset, "offset", "layer_norm"))) if on)
    return _last_axis_norm("layer_norm", True, keys, eps, dtype)


@constructor
def rms_norm(*, eps: float = 1e-6, dtype=jnp.float32) -> Layer:
    """RMS normalisation over the last axis (Zhang & Sennrich 2019; the norm of LLaMA and
    most recent transformers): ``y = scale · x / √(mean(x²) + eps)``, no mean taken out and
    no offset.

    Backward: layer_norm's derivation without μ (``∂d_j/∂x_k = δ_jk``): with
    ``r = 1/√(mean(x²) + eps)``, ``x̂ = x·r`` and ``g = scale · dy``,
    ``∂x̂_j/∂x_k = r (δ_jk − x̂_j x̂_k / n)``, so the formula loses its mean term::

        dx = r · (g − x̂ · mean(g · x̂))          ∂C/∂scale = Σ dy · x̂

    Args:
      eps: added to the mean square, a positive number.
      dtype: of the params.

    Params ``{"scale": (n,)}`` (ones); ``x (..., n) -> y (..., n)``; cache ``(x̂, r)``.
    Per example: ∂ℓ_i/∂scale = Σ over example i's positions of δ·x̂.
    """
    return _last_axis_norm("rms_norm", False, ("scale",), eps, dtype)


def _group_norm(who: str, groups, eps, dtype) -> Layer:
    """group_norm (``groups`` an int) and instance_norm (None: one group per channel)."""
    check_eps(eps, who)

    def check(c):
        if c % (groups or c):
            raise ValueError(f"{who}: the input's {c} channels must be divisible by "
                             f"groups={groups}")

    def grouped(a):  # (B, ..., C) -> (B, positions, G, C/G)
        c = a.shape[-1]
        return a.reshape(a.shape[0], -1, groups or c, c // (groups or c))

    def forward(params, x, *, key=None, train=False, state=None, side=None):
        _check_width(who, params, x, batched=True)
        check(x.shape[-1])
        x_hat, r = normalise(grouped(x), (1, 3), eps)
        x_hat = x_hat.reshape(x.shape)
        return _affine(params, x_hat), (x_hat, r), state

    def backward(params, cache, dy):
        x_hat, r = cache
        grads, g = _affine_backward(params, x_hat, dy)
        dx = normalise_backward(grouped(g), grouped(x_hat), r, (1, 3)).reshape(dy.shape)
        return grads, cast_like(dx, x_hat)

    return Layer(who, _scale_and_offset(who, dtype, check=check), forward, backward,
                 per_example=RULE)


@constructor
def group_norm(groups: int, *, eps: float = 1e-5, dtype=jnp.float32) -> Layer:
    """Group normalisation (Wu & He 2018), channels last: the C channels in ``groups``
    groups of C/G, each example normalised per group over every position and the group's
    channels; a learnable scale and offset per channel.

    With the statistics of a group of m = positions · C/G values of one example, forward
    and backward are layer_norm's (the three-term formula, means over the group)::

        x̂ = (x − μ_g)·r_g,  y = scale · x̂ + offset
        dx = r_g · (g − mean_g(g) − x̂ · mean_g(g · x̂)),  g = scale · dy

    ``groups = 1``: layer_norm over positions and channels together (with a per-channel
    scale); ``groups = C``: :func:`instance_norm`. Unlike batch norm, nothing mixes the
    examples: no state, the same in training and evaluation, any batch size.

    Args:
      groups: G, dividing the input's channels.
      eps: added to the variance, a positive number.
      dtype: of the params.

    Params ``{"scale": (C,), "offset": (C,)}``; ``x (B, ..., C) -> y`` of its shape (the
    axes between batch and channels are positions: none, W, or H and W); cache ``(x̂, r)``.
    Per example: ∂ℓ_i/∂scale = Σ over example i's positions of δ·x̂, ∂ℓ_i/∂offset = Σ δ.
    Padding positions of a padded batch count in the statistics (it reads no ``lengths``).
    """
    groups = positive_int(groups, "groups", "group_norm")
    return _group_norm(call_text(group_norm, groups, eps=eps), groups, eps, dtype)


@constructor
def instance_norm(*, eps: float = 1e-5, dtype=jnp.float32) -> Layer:
    """Instance normalisation (Ulyanov et al. 2016): :func:`group_norm` with one group per
    channel, each channel of each example normalised over its positions.

    Params ``{"scale": (C,), "offset": (C,)}``; ``x (B, ..., C) -> y`` of its shape.
    """
    return _group_norm("instance_norm", None, eps, dtype)


# ---------------------------------------------------------------------------- batch norm

class BatchStats(NamedTuple):
    """batch_norm's cache in training mode: normalised with the batch's own statistics."""

    x_hat: jax.Array  # x's shape
    r: jax.Array  # (C,): 1/√(σ² + eps) of the batch


class RunningStats(NamedTuple):
    """batch_norm's cache in evaluation mode: normalised with the running statistics."""

    x_hat: jax.Array
    r: jax.Array  # (C,): 1/√(running var + eps)


def _batch_norm_grads(params, cache, delta):
    if isinstance(cache, BatchStats):
        raise ValueError("batch_norm: in training mode it normalises with the statistics of "
                         "the whole batch, so every example's output depends on every other "
                         "example's input and a per-example gradient is not defined; use "
                         "train=False (the running statistics keep examples apart)")
    return _grads(params, cache, delta)


BATCH_NORM_RULE = PerExampleRule(_batch_norm_grads)
"""In evaluation mode ∂ℓ_i/∂scale = Σ_t δ_it·x̂_it and ∂ℓ_i/∂offset = Σ_t δ_it (t: example
i's positions), as for layer_norm; in training mode an error (the batch statistics mix the
examples)."""


@constructor
def batch_norm(momentum: float = 0.9, *, eps: float = 1e-5, dtype=jnp.float32) -> Layer:
    """Batch normalisation over every axis but the last (channels-last: ``(B, C)``,
    ``(B, W, C)``, ``(B, H, W, C)``), with a learnable scale and offset and running statistics
    kept as state.

    Training mode (``train=True``) normalises each channel with the mean μ and (biased,
    two-pass) variance σ² of its m values in the batch (m = B · positions), exactly as
    layer_norm does over a row; the new state moves the running statistics towards them::

        mean ← momentum · mean + (1 − momentum) · μ
        var  ← momentum · var  + (1 − momentum) · σ²

    (Flax's convention: ``momentum`` is the weight of the old value.) Evaluation mode
    normalises with the running statistics and leaves the state as it is.

    Backward. Training: the three-term formula of :func:`layer_norm`, with the means over the
    m values of a channel instead of the features of a row (every ``x`` of a channel feeds
    every ``x̂`` of it through μ and σ²)::

        g  = scale · dy
        dx = r · (g − mean(g) − x̂ · mean(g · x̂))        means over batch and positions

    Evaluation: μ and σ² are constants, so ``dx = r · scale · dy``. In both,
    ``∂C/∂scale = Σ dy · x̂`` and ``∂C/∂offset = Σ dy`` over batch and positions. The running
    statistics get no gradient: they are state, not params.

    Args:
      momentum: in [0, 1].
      eps: added to the variance, a positive number.
      dtype: of the params and the state.

    Params ``{"scale": (C,), "offset": (C,)}``; state ``{"mean": (C,), "var": (C,)}`` (zeros and
    ones, from ``init_state``). Training mode needs more than one value per channel (batch ×
    positions > 1: one example of several positions is enough). An integer input (raw uint8
    images) is normalised in the params' floating dtype.
    """
    if (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
            or not 0 <= momentum <= 1):
        raise ValueError(f"batch_norm: momentum must be a number in [0, 1] (the weight of the "
                         f"old running statistics), got {momentum!r}")
    check_eps(eps, "batch_norm")
    who = "batch_norm"
    init = _scale_and_offset(who, dtype)

    def init_state(in_shape):
        n, dt = as_shape(in_shape, who)[-1], param_dtype(dtype, who)
        return {"mean": constant(0, (n,), dt), "var": constant(1, (n,), dt)}

    def forward(params, x, *, key=None, train=False, state=None, side=None):
        n = params["scale"].shape[0]
        if x.ndim < 2 or x.shape[-1] != n:
            raise ValueError(f"{who}: expected input of shape (batch, ..., {n}) (channels last; "
                             f"the params have {n} channels), got {tuple(x.shape)}")
        axes = tuple(range(x.ndim - 1))
        if not jnp.issubdtype(x.dtype, jnp.inexact):  # raw integer images: compute in floats
            x = x.astype(jnp.result_type(float, params["scale"].dtype))
        if not train:
            r = jax.lax.rsqrt(state["var"] + eps).astype(x.dtype)
            x_hat = (x - state["mean"].astype(x.dtype)) * r
            return params["scale"] * x_hat + params["offset"], RunningStats(x_hat, r), state
        values = math.prod(x.shape[:-1])
        if values <= 1:
            raise ValueError(f"{who}: training mode needs more than one value per channel "
                             f"(batch × positions; the statistics of one value normalise it to "
                             f"zero, of none are undefined), got input of shape "
                             f"{tuple(x.shape)}")
        mu = jnp.mean(x, axis=axes)
        d = x - mu
        var = jnp.mean(d * d, axis=axes)
        r = jax.lax.rsqrt(var + jnp.asarray(eps, var.dtype))
        x_hat = d * r
        new_state = {k: (momentum * state[k] + (1 - momentum) * v.astype(state[k].dtype))
                     for k, v in (("mean", mu), ("var", var))}
        return params["scale"] * x_hat + params["offset"], BatchStats(x_hat, r), new_state

    def backward(params, cache, dy):
        x_hat, r = cache
        scale, offset = params["scale"], params["offset"]
        axes = tuple(range(dy.ndim - 1))
        dscale, doffset = jnp.sum(dy * x_hat, axis=axes), jnp.sum(dy, axis=axes)
        g = scale * dy                                               # ∂C/∂x̂
        if isinstance(cache, BatchStats):                            # the three-term formula
            dx = normalise_backward(g, x_hat, r, axes)
        else:
            dx = r * g
        return ({"scale": dscale.astype(scale.dtype), "offset": doffset.astype(offset.dtype)},
                cast_like(dx, x_hat))

    return Layer(who, init, forward, backward, per_example=BATCH_NORM_RULE, init_state=init_state)
