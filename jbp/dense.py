"""The dense (fully connected) layer: ``z = a @ W + b``.

Lecture map: the forward pass caches ``a`` because ∂z/∂w = a; the backward pass gets
``delta = ∂C/∂z`` and returns ∂C/∂W = aᵀ·delta, ∂C/∂b = Σ_batch delta and
∂C/∂a = delta·Wᵀ (the "Σ w ∂C/∂z′" of the hidden-layer case).
"""

import jax
import jax.numpy as jnp

from jbp.layer import Layer, as_shape, check_input


def dense(out_features: int, *, gain: float = 1.0, dtype=jnp.float32) -> Layer:
    """A dense layer with ``out_features`` outputs.

    Params: ``{"W": (in, out), "b": (out,)}``; ``W`` is drawn from N(0, gain²/in) (LeCun
    normal for ``gain=1``, He normal for ``gain=√2``), ``b`` starts at zero.

    Shapes: ``x (B, in) -> z (B, out)``; cache ``a = x (B, in)``.
    """
    if not isinstance(out_features, int) or isinstance(out_features, bool) or out_features <= 0:
        raise ValueError(f"dense: out_features must be a positive int, got {out_features!r}")
    if not gain > 0:
        raise ValueError(f"dense: gain must be positive, got {gain!r}")
    who = f"dense({out_features})"

    def init(key, in_shape):
        shape = as_shape(in_shape, who)
        if len(shape) != 1:
            raise ValueError(f"{who}: expects a per-example shape (features,), got {shape}; "
                             f"put flatten() before it")
        (n_in,) = shape
        W = jax.random.normal(key, (n_in, out_features), dtype) * (gain / n_in**0.5)
        return (out_features,), {"W": W, "b": jnp.zeros((out_features,), dtype)}

    def check_params(params):
        if not isinstance(params, dict) or set(params) != {"W", "b"}:
            got = sorted(params) if isinstance(params, dict) else type(params).__name__
            raise TypeError(f"{who}: params must be a dict with keys ['W', 'b'], got {got}")
        W, b = params["W"], params["b"]
        if W.ndim != 2 or W.shape[1] != out_features or b.shape != (out_features,):
            raise ValueError(f"{who}: expected W of shape (in, {out_features}) and b of shape "
                             f"({out_features},), got W {tuple(W.shape)} and b {tuple(b.shape)}")

    def forward(params, x, **_):
        check_params(params)
        check_input(x, (params["W"].shape[0],), who)
        a = x
        z = a @ params["W"] + params["b"]
        return z, a

    def backward(params, a, delta):
        dW = a.T @ delta
        db = jnp.sum(delta, axis=0)
        da = delta @ params["W"].T
        return {"W": dW, "b": db}, da

    return Layer(who, init, forward, backward)
