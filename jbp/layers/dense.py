"""The dense (fully connected) layer: ``z = a @ W + b``.

Lecture map: the forward pass caches ``a`` because ∂z/∂w = a; the backward pass gets
``delta = ∂C/∂z`` and returns ∂C/∂W = aᵀ·delta, ∂C/∂b = Σ_batch delta and
∂C/∂a = delta·Wᵀ (the "Σ w ∂C/∂z′" of the hidden-layer case).

Leading axes: ``a`` may be ``(B, in)``, ``(B, T, in)`` (a sequence), or a single example
``(in,)`` (so ``jax.vmap`` over examples works); the layer acts on the last axis and the
backward sums ∂C/∂W and ∂C/∂b over every other axis.
"""

import jax.numpy as jnp

from jbp.init import constant, normal
from jbp.layer import (Layer, PerExampleRule, as_shape, boolean, cast_like, constructor,
                       kronecker_rows, param_dtype, per_example_rows, positive_int,
                       positive_number)


def _rows(a):
    """``a (..., n)`` as a matrix ``(rows, n)``: every leading axis becomes a row."""
    return a.reshape(-1, a.shape[-1])


def _rule(use_bias: bool) -> PerExampleRule:
    """∂ℓ_i/∂W = a_i δ_iᵀ (summed over example i's positions), ∂ℓ_i/∂b = δ_i (if a bias)."""

    def grads(params, a, delta):
        a3, d3 = per_example_rows(a), per_example_rows(delta)
        g = {"W": jnp.einsum("bti,bto->bio", a3, d3)}
        return {**g, "b": jnp.sum(d3, axis=1)} if use_bias else g

    formed = PerExampleRule(grads)  # sums over the formed ∇ℓ_i

    def sq_norms(params, a, delta):
        a3, d3 = per_example_rows(a), per_example_rows(delta)
        if a3.shape[1] != 1:  # several positions per example: ∇ℓ_i is not rank one
            return formed.squared_norms(params, a, delta)
        a2, d2 = jnp.sum(a3[:, 0] ** 2, axis=1), jnp.sum(d3[:, 0] ** 2, axis=1)
        # ‖a_i δ_iᵀ‖²_F = ‖a_i‖²·‖δ_i‖², plus the bias' ‖δ_i‖²
        return a2 * d2 + d2 if use_bias else a2 * d2

    def sum_sq(params, a, delta):
        a3, d3 = per_example_rows(a), per_example_rows(delta)
        if a3.shape[1] != 1:
            return formed.sum_of_squares(params, a, delta)
        a1, d1 = a3[:, 0], d3[:, 0]
        s = {"W": (a1 * a1).T @ (d1 * d1)}
        return {**s, "b": jnp.sum(d1 * d1, axis=0)} if use_bias else s

    def kronecker(params, a, delta):
        return kronecker_rows(a, delta, use_bias)

    return PerExampleRule(grads, sq_norms, sum_sq, kronecker)


RULE = _rule(True)
"""∂ℓ_i/∂W = a_i δ_iᵀ (summed over example i's positions), ∂ℓ_i/∂b = δ_i; Kronecker rows
``[a, 1]`` and δ at every position (KFAC-expand over a sequence's positions)."""


@constructor
def dense(out_features: int, *, use_bias: bool = True, gain: float = 1.0,
          dtype=jnp.float32) -> Layer:
    """A dense layer with ``out_features`` outputs: ``z = a @ W + b``.

    Args:
      out_features: the number of outputs.
      use_bias: ``False`` leaves ``b`` out: what to write before a batch norm, whose shift
        would make a bias' gradient exactly zero.
      gain: ``W`` ~ N(0, gain²/in): LeCun normal for 1, He normal for √2.
      dtype: of the params.

    Params: ``{"W": (in, out), "b": (out,)}`` (``b`` starts at zero).
    Shapes: ``a (..., in) -> z (..., out)``. Cache: ``a`` (∂z/∂W).
    Per example: ∂ℓ_i/∂W = a_i δ_iᵀ, ∂ℓ_i/∂b = δ_i (:data:`RULE`).
    """
    out_features = positive_int(out_features, "out_features", "dense")
    gain = positive_number(gain, "gain", "dense")
    use_bias = boolean(use_bias, "use_bias", "dense")
    who = f"dense({out_features})"

    def init(key, in_shape):
        shape = as_shape(in_shape, who, min_ndim=1, layout="(..., features)")
        n_in, dt = shape[-1], param_dtype(dtype, who)
        params = {"W": normal(key, (n_in, out_features), dt, scale=gain / n_in**0.5)}
        if use_bias:
            params["b"] = constant(0, (out_features,), dt)
        return shape[:-1] + (out_features,), params

    def forward(params, a, *, key=None, train=False, state=None, side=None):
        n_in = params["W"].shape[0]
        if a.ndim < 1 or a.shape[-1] != n_in:
            raise ValueError(f"{who}: expected input of shape (..., {n_in}) (batch and any "
                             f"leading axes, then {n_in} features), got {tuple(a.shape)}")
        z = a @ params["W"]
        return (z + params["b"] if use_bias else z), a, state

    def backward(params, a, delta):
        grads = {"W": (_rows(a).T @ _rows(delta)).astype(params["W"].dtype)}
        if use_bias:
            grads["b"] = jnp.sum(_rows(delta), axis=0).astype(params["b"].dtype)
        return grads, cast_like(delta @ params["W"].T, a)

    return Layer(who, init, forward, backward, per_example=RULE if use_bias else _rule(False))
