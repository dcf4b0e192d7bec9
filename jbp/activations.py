"""Element-wise activations, each written next to its derivative.

Lecture map: the hidden-layer case ∂C/∂z = σ′(z) · ∂C/∂a. Every activation is built by
:func:`elementwise` from ``σ`` and ``σ′(z, a)``; the derivative may use the input ``z``
or the output ``a = σ(z)``, whichever is simpler (the sigmoid's is ``a (1 − a)``).

The cache holds only what the derivative reads (``keep``): the output ``a`` for the
sigmoid, tanh and ReLU (whose mask ``z > 0`` is ``a > 0``), the input ``z`` where the
derivative needs it. In an MLP ``a`` is the next dense layer's cached input anyway, so an
activation that keeps ``a`` adds no memory: with ReLU XLA's compiled temporary memory of a
whole gradient drops below autodiff's, which keeps the pre-activation for its mask.

Shapes: any ``x (B, ...)``; ``y`` has the shape of ``x``; cache ``(z, a)``, with ``None``
in place of the one not kept.
"""

import math

import jax.numpy as jnp
from jax.scipy.special import erf

from jbp.layer import Layer, as_shape, check_empty_params


def elementwise(name: str, sigma, dsigma, *, keep: str = "za") -> Layer:
    """A weightless layer ``a = sigma(z)`` whose backward is ``dz = dsigma(z, a) * da``.

    ``keep`` says what the cache holds for ``dsigma``: ``"za"`` (both), ``"z"`` or ``"a"``;
    ``dsigma`` then receives ``None`` for the one not kept.
    """
    if keep not in ("za", "z", "a"):
        raise ValueError(f"elementwise({name!r}): keep must be 'za', 'z' or 'a', got {keep!r}")

    def init(key, in_shape):
        return as_shape(in_shape, name), {}

    def forward(params, z, **_):
        check_empty_params(params, name)
        a = sigma(z)
        return a, (z if "z" in keep else None, a if "a" in keep else None)

    def backward(params, cache, da):
        z, a = cache
        return {}, dsigma(z, a) * da

    return Layer(name, init, forward, backward)


def logistic(z):
    """The logistic function 1/(1 + e^−z), as 0.5 (1 + tanh(z/2)): no overflow for large |z|."""
    return 0.5 * (1.0 + jnp.tanh(0.5 * z))


def _softplus(z):
    return jnp.logaddexp(z, 0.0)


def _phi(z):
    """Standard normal CDF Φ(z)."""
    return 0.5 * (1.0 + erf(z / math.sqrt(2.0)))


def identity() -> Layer:
    return elementwise("identity", lambda z: z, lambda z, a: jnp.ones_like(z))


def sigmoid() -> Layer:
    return elementwise("sigmoid", logistic, lambda z, a: a * (1 - a), keep="a")


def tanh() -> Layer:
    return elementwise("tanh", jnp.tanh, lambda z, a: 1 - a * a, keep="a")


def relu() -> Layer:
    # where(z > 0, ...) rather than maximum(z, 0): at z = 0 both derivatives are then 0.
    # The mask z > 0 equals a > 0 (also for z = NaN), so the cache needs only a.
    return elementwise("relu", lambda z: jnp.where(z > 0, z, 0),
                       lambda z, a: (a > 0).astype(a.dtype), keep="a")


def leaky_relu(negative_slope: float = 0.01) -> Layer:
    s = negative_slope
    return elementwise(f"leaky_relu({s})",
                       lambda z: jnp.where(z >= 0, z, s * z),
                       lambda z, a: jnp.where(z >= 0, 1.0, s).astype(z.dtype))


def elu(alpha: float = 1.0) -> Layer:
    # a = alpha (e^z − 1) for z <= 0, so σ′ = a + alpha there. The inner where keeps
    # expm1 from overflowing on the branch that is not taken.
    return elementwise(f"elu({alpha})",
                       lambda z: jnp.where(z > 0, z, alpha * jnp.expm1(jnp.where(z > 0, 0, z))),
                       lambda z, a: jnp.where(z > 0, 1.0, a + alpha).astype(z.dtype))


def gelu() -> Layer:
    """Exact GELU, z·Φ(z); σ′ = Φ(z) + z·φ(z)."""
    inv_sqrt_2pi = 1.0 / math.sqrt(2.0 * math.pi)
    return elementwise("gelu", lambda z: z * _phi(z),
                       lambda z, a: _phi(z) + z * inv_sqrt_2pi * jnp.exp(-0.5 * z * z))


def softplus() -> Layer:
    return elementwise("softplus", _softplus, lambda z, a: logistic(z))


def silu() -> Layer:
    """SiLU (swish), z·s(z); σ′ = s (1 + z (1 − s))."""

    def dsilu(z, a):
        s = logistic(z)
        return s * (1 + z * (1 - s))

    return elementwise("silu", lambda z: z * logistic(z), dsilu)


ACTIVATIONS = {
    "identity": identity,
    "sigmoid": sigmoid,
    "tanh": tanh,
    "relu": relu,
    "leaky_relu": leaky_relu,
    "elu": elu,
    "gelu": gelu,
    "softplus": softplus,
    "silu": silu,
}


def get(name) -> Layer:
    """The activation layer called ``name`` (a Layer passes through unchanged)."""
    if isinstance(name, Layer):
        return name
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid names: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()
