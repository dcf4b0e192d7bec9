"""Layer normalisation: ``y = scale · (x − μ)/√(σ² + eps) + offset`` over the last axis.

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

import jax
import jax.numpy as jnp

from jbp.layer import (Layer, PerExampleRule, as_shape, cast_like, check_array, constructor,
                       per_example_rows)


def _grads(cache, delta):
    x_hat, _ = cache
    x3, d3 = per_example_rows(x_hat), per_example_rows(delta)
    return {"scale": jnp.sum(d3 * x3, axis=1), "offset": jnp.sum(d3, axis=1)}


RULE = PerExampleRule(_grads)
"""∂ℓ_i/∂scale = Σ_t δ_it·x̂_it, ∂ℓ_i/∂offset = Σ_t δ_it (t: example i's positions); the
norms and sums of squares default to sums over these (B, n) arrays, which are small."""


@constructor
def layer_norm(*, eps: float = 1e-5, dtype=jnp.float32) -> Layer:
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
      eps: added to the variance, a positive number.
      dtype: of the params.

    Params ``{"scale": (n,), "offset": (n,)}``; ``x (..., n) -> y (..., n)`` in the dtype of
    ``x`` and the params promoted (as dense); ``dx`` in ``x``'s dtype, the parameter
    gradients in the params'.
    """
    if (isinstance(eps, bool) or not isinstance(eps, (int, float))
            or not math.isfinite(eps) or eps <= 0):
        raise ValueError(f"layer_norm: eps must be a positive number (it keeps 1/√(σ² + eps) "
                         f"finite for a constant row), got {eps!r}")
    who = "layer_norm"

    def init(key, in_shape):
        shape = as_shape(in_shape, who)
        if not shape:
            raise ValueError(f"{who}: expects a per-example shape (..., features), got ()")
        n = shape[-1]
        return shape, {"scale": jnp.ones((n,), dtype), "offset": jnp.zeros((n,), dtype)}

    def check_params(params):
        if not isinstance(params, dict) or set(params) != {"scale", "offset"}:
            got = sorted(params) if isinstance(params, dict) else type(params).__name__
            raise TypeError(f"{who}: params must be a dict with keys ['offset', 'scale'], "
                            f"got {got}")
        scale, offset = params["scale"], params["offset"]
        if scale.ndim != 1 or offset.shape != scale.shape:
            raise ValueError(f"{who}: expected scale and offset of one shape (n,), got scale "
                             f"{tuple(scale.shape)} and offset {tuple(offset.shape)}")

    def forward(params, x, *, key=None, train=False):
        check_params(params)
        check_array(x, who)
        n = params["scale"].shape[0]
        if x.ndim < 1 or x.shape[-1] != n:
            raise ValueError(f"{who}: expected input of shape (..., {n}) (the last axis is "
                             f"normalised; the params have {n} features), got {tuple(x.shape)}")
        mu = jnp.mean(x, axis=-1, keepdims=True)
        d = x - mu
        var = jnp.mean(d * d, axis=-1, keepdims=True)
        r = jax.lax.rsqrt(var + jnp.asarray(eps, var.dtype))
        x_hat = d * r
        y = params["scale"] * x_hat + params["offset"]
        return y, (x_hat, r)

    def backward(params, cache, dy):
        x_hat, r = cache
        scale, offset = params["scale"], params["offset"]
        dscale = jnp.sum((dy * x_hat).reshape(-1, dy.shape[-1]), axis=0)
        doffset = jnp.sum(dy.reshape(-1, dy.shape[-1]), axis=0)
        g = scale * dy                                               # ∂C/∂x̂
        mean_g = jnp.mean(g, axis=-1, keepdims=True)
        mean_gx = jnp.mean(g * x_hat, axis=-1, keepdims=True)
        dx = r * (g - mean_g - x_hat * mean_gx)                      # the three-term formula
        return ({"scale": dscale.astype(scale.dtype), "offset": doffset.astype(offset.dtype)},
                cast_like(dx, x_hat))

    return Layer(who, init, forward, backward, per_example=RULE)
