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

from jbp.layer import (Layer, PerExampleRule, as_shape, cast_like, check_array, constructor,
                       per_example_rows)


def _rows(a):
    """``a (..., n)`` as a matrix ``(rows, n)``: every leading axis becomes a row."""
    return a.reshape(-1, a.shape[-1])


def _grads(a, delta):
    a3, d3 = per_example_rows(a), per_example_rows(delta)
    return {"W": jnp.einsum("bti,bto->bio", a3, d3), "b": jnp.sum(d3, axis=1)}


_FORMED = PerExampleRule(_grads)  # sums over the formed ∇ℓ_i


def _sq_norms(a, delta):
    a3, d3 = per_example_rows(a), per_example_rows(delta)
    if a3.shape[1] != 1:  # several positions per example: ∇ℓ_i is not rank one
        return _FORMED.squared_norms(a, delta)
    a2, d2 = jnp.sum(a3[:, 0] ** 2, axis=1), jnp.sum(d3[:, 0] ** 2, axis=1)
    return a2 * d2 + d2  # ‖a_i δ_iᵀ‖²_F = ‖a_i‖²·‖δ_i‖², plus the bias' ‖δ_i‖²


def _sum_sq(a, delta):
    a3, d3 = per_example_rows(a), per_example_rows(delta)
    if a3.shape[1] != 1:
        return _FORMED.sum_of_squares(a, delta)
    a1, d1 = a3[:, 0], d3[:, 0]
    return {"W": (a1 * a1).T @ (d1 * d1), "b": jnp.sum(d1 * d1, axis=0)}


RULE = PerExampleRule(_grads, _sq_norms, _sum_sq)
"""∂ℓ_i/∂W = a_i δ_iᵀ (summed over example i's positions), ∂ℓ_i/∂b = δ_i."""


@constructor
def dense(out_features: int, *, gain: float = 1.0, dtype=jnp.float32) -> Layer:
    """A dense layer with ``out_features`` outputs.

    Params: ``{"W": (in, out), "b": (out,)}``; ``W`` is drawn from N(0, gain²/in) (LeCun
    normal for ``gain=1``, He normal for ``gain=√2``), ``b`` starts at zero.

    Shapes: ``x (..., in) -> z (..., out)``; cache ``a = x``.
    """
    if not isinstance(out_features, int) or isinstance(out_features, bool) or out_features <= 0:
        raise ValueError(f"dense: out_features must be a positive int, got {out_features!r}")
    if not (isinstance(gain, (int, float)) and gain > 0):
        raise ValueError(f"dense: gain must be a positive number, got {gain!r}")
    who = f"dense({out_features})"

    def init(key, in_shape):
        shape = as_shape(in_shape, who)
        if not shape:
            raise ValueError(f"{who}: expects a per-example shape (..., features), got ()")
        n_in = shape[-1]
        W = jax.random.normal(key, (n_in, out_features), dtype) * (gain / n_in**0.5)
        return shape[:-1] + (out_features,), {"W": W, "b": jnp.zeros((out_features,), dtype)}

    def check_params(params):
        if not isinstance(params, dict) or set(params) != {"W", "b"}:
            got = sorted(params) if isinstance(params, dict) else type(params).__name__
            raise TypeError(f"{who}: params must be a dict with keys ['W', 'b'], got {got}")
        W, b = params["W"], params["b"]
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
        z = a @ params["W"] + params["b"]
        return z, a

    def backward(params, a, delta):
        W, b = params["W"], params["b"]
        dW = _rows(a).T @ _rows(delta)
        db = jnp.sum(_rows(delta), axis=0)
        da = delta @ W.T
        return {"W": dW.astype(W.dtype), "b": db.astype(b.dtype)}, cast_like(da, a)

    return Layer(who, init, forward, backward, per_example=RULE)
