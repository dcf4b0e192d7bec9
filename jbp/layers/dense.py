"""The dense (fully connected) layer: ``z = a @ W + b``.

Lecture map: the forward pass caches ``a`` because ∂z/∂w = a; the backward pass gets
``delta = ∂C/∂z`` and returns ∂C/∂W = aᵀ·delta, ∂C/∂b = Σ_batch delta and
∂C/∂a = delta·Wᵀ (the "Σ w ∂C/∂z′" of the hidden-layer case).

Leading axes: ``a`` may be ``(B, in)``, ``(B, T, in)`` (a sequence), or a single example
``(in,)`` (so ``jax.vmap`` over examples works); the layer acts on the last axis and the
backward sums ∂C/∂W and ∂C/∂b over every other axis.
"""

import jax
import jax.numpy as jnp

from jbp.init import constant, normal
from jbp.layer import (Layer, PerExampleRule, as_shape, cast_like, check_array, constructor,
                       param_dtype, per_example_rows, positive_int)


def _rows(a):
    """``a (..., n)`` as a matrix ``(rows, n)``: every leading axis becomes a row."""
    return a.reshape(-1, a.shape[-1])


def _rule(use_bias: bool) -> PerExampleRule:
    """∂ℓ_i/∂W = a_i δ_iᵀ (summed over example i's positions), ∂ℓ_i/∂b = δ_i (if a bias)."""

    def grads(a, delta):
        a3, d3 = per_example_rows(a), per_example_rows(delta)
        g = {"W": jnp.einsum("bti,bto->bio", a3, d3)}
        return {**g, "b": jnp.sum(d3, axis=1)} if use_bias else g

    formed = PerExampleRule(grads)  # sums over the formed ∇ℓ_i

    def sq_norms(a, delta):
        a3, d3 = per_example_rows(a), per_example_rows(delta)
        if a3.shape[1] != 1:  # several positions per example: ∇ℓ_i is not rank one
            return formed.squared_norms(a, delta)
        a2, d2 = jnp.sum(a3[:, 0] ** 2, axis=1), jnp.sum(d3[:, 0] ** 2, axis=1)
        # ‖a_i δ_iᵀ‖²_F = ‖a_i‖²·‖δ_i‖², plus the bias' ‖δ_i‖²
        return a2 * d2 + d2 if use_bias else a2 * d2

    def sum_sq(a, delta):
        a3, d3 = per_example_rows(a), per_example_rows(delta)
        if a3.shape[1] != 1:
            return formed.sum_of_squares(a, delta)
        a1, d1 = a3[:, 0], d3[:, 0]
        s = {"W": (a1 * a1).T @ (d1 * d1)}
        return {**s, "b": jnp.sum(d1 * d1, axis=0)} if use_bias else s

    return PerExampleRule(grads, sq_norms, sum_sq)


RULE = _rule(True)
"""∂ℓ_i/∂W = a_i δ_iᵀ (summed over example i's positions), ∂ℓ_i/∂b = δ_i."""


@constructor
def dense(out_features: int, *, use_bias: bool = True, gain: float = 1.0,
          dtype=jnp.float32) -> Layer:
    """A dense layer with ``out_features`` outputs.

    Params: ``{"W": (in, out), "b": (out,)}``; ``W`` is drawn from N(0, gain²/in) (LeCun
    normal for ``gain=1``, He normal for ``gain=√2``), ``b`` starts at zero.
    ``use_bias=False`` leaves ``b`` out (``{"W": (in, out)}``): what to write before a
    batch norm, whose shift would make a bias' gradient exactly zero.

    Shapes: ``x (..., in) -> z (..., out)``; cache ``a = x``.
    """
    out_features = positive_int(out_features, "out_features", "dense")
    if not (isinstance(gain, (int, float)) and gain > 0):
        raise ValueError(f"dense: gain must be a positive number, got {gain!r}")
    if not isinstance(use_bias, bool):
        raise TypeError(f"dense: use_bias must be a bool, got {use_bias!r}")
    who = f"dense({out_features})"
    keys = ["W", "b"] if use_bias else ["W"]

    def init(key, in_shape):
        shape = as_shape(in_shape, who)
        if not shape:
            raise ValueError(f"{who}: expects a per-example shape (..., features), got ()")
        n_in, dt = shape[-1], param_dtype(dtype, who)
        W = normal(key, (n_in, out_features), dt, scale=gain / n_in**0.5)
        params = {"W": W, "b": constant(0, (out_features,), dt)}
        return shape[:-1] + (out_features,), {k: params[k] for k in keys}

    def check_params(params):
        if not isinstance(params, dict) or set(params) != set(keys):
            got = sorted(params) if isinstance(params, dict) else type(params).__name__
            raise TypeError(f"{who}: params must be a dict with keys {keys}, got {got}")
        W, b = params["W"], params.get("b", jnp.zeros(out_features))
        if W.ndim != 2 or W.shape[1] != out_features or b.shape != (out_features,):
            raise ValueError(f"{who}: expected W of shape (in, {out_features}) and b of shape "
                             f"({out_features},), got W {tuple(W.shape)} and b {tuple(b.shape)}")

    def forward(params, x, *, key=None, train=False):
        check_params(params)
        check_array(x, who)
        n_in = params["W"].shape[0]
        if x.ndim < 1 or x.shape[-1] != n_in:
            raise ValueError(f"{who}: expected input of shape (..., {n_in}) (batch and any "
                             f"leading axes, then {n_in} features), got {tuple(x.shape)}")
        a = x
        z = a @ params["W"]
        return (z + params["b"] if use_bias else z), a

    def backward(params, a, delta):
        W = params["W"]
        grads = {"W": (_rows(a).T @ _rows(delta)).astype(W.dtype)}
        if use_bias:
            grads["b"] = jnp.sum(_rows(delta), axis=0).astype(params["b"].dtype)
        da = delta @ W.T
        return grads, cast_like(da, a)

    return Layer(who, init, forward, backward, per_example=RULE if use_bias else _rule(False))
