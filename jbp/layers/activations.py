"""Element-wise activations, each written next to its derivative.

Lecture map: the hidden-layer case ∂C/∂z = σ′(z) · ∂C/∂a. Every activation is built by
:func:`elementwise` from ``σ`` and ``σ′(z, a)``; the derivative may use the input ``z``
or the output ``a = σ(z)``, whichever is simpler (the sigmoid's is ``a (1 − a)``).

The forwards are ``jax.nn``'s own functions (relu: the same values, as a select), so values,
NaN propagation and accuracy in the tails are exactly JAX's (``relu(NaN)`` is NaN, ``sigmoid(-20)`` is 2.06e-9 in float32);
the derivatives are written here and tested element by element against ``jax.grad`` of
``jax.nn`` over the whole float range. At kinks they pick what JAX picks (ReLU′(0) = 0).

The cache holds only what the derivative reads (``keep``): the output ``a`` for the
sigmoid, tanh and ReLU (whose mask ``z > 0`` is ``a > 0``), the input ``z`` where the
derivative needs it. In an MLP ``a`` is the next dense layer's cached input anyway, so an
activation that keeps ``a`` adds no memory.

Shapes: any ``x``; ``y`` has the shape of ``x``; cache ``(z, a)``, with ``None`` in place of
the one not kept.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import erfc

from jbp.layer import EXAMPLEWISE, Layer, as_shape, constructor


class Activation(NamedTuple):
    """What an activation tells other code (its ``Layer.info``)."""

    gain: float  # the weight scale that keeps activations' variance through it (init_gain)


@constructor
def elementwise(name: str, sigma, dsigma, *, keep: str = "za", gain: float = 1.0) -> Layer:
    """A weightless layer ``a = sigma(z)`` whose backward is ``dz = dsigma(z, a) * da``.

    ``keep`` says what the cache holds for ``dsigma``: ``"za"`` (both), ``"z"`` or ``"a"``;
    ``dsigma`` then receives ``None`` for the one not kept. ``dz`` gets ``z``'s dtype.
    ``gain``: the init gain of a dense layer before it (He: √2 for the rectifiers).
    """
    if keep not in ("za", "z", "a"):
        raise ValueError(f"elementwise({name!r}): keep must be 'za', 'z' or 'a', got {keep!r}")

    def init(key, in_shape):
        return as_shape(in_shape, name), {}

    def forward(params, z, *, key=None, train=False, state=None, side=None):
        a = sigma(z)
        return a, (z if "z" in keep else None, a if "a" in keep else None), state

    def backward(params, cache, da):
        z, a = cache
        dz = dsigma(z, a) * da
        return {}, dz.astype((a if z is None else z).dtype)

    return Layer(name, init, forward, backward, per_example=EXAMPLEWISE, info=Activation(gain))


logistic = jax.nn.sigmoid
"""The logistic function 1/(1 + e^−z): ``jax.nn.sigmoid`` (accurate in both tails)."""


@constructor
def identity() -> Layer:
    return elementwise("identity", lambda z: z, lambda z, a: jnp.ones_like(a), keep="a")


@constructor
def sigmoid() -> Layer:
    return elementwise("sigmoid", jax.nn.sigmoid, lambda z, a: a * (1 - a), keep="a")


@constructor
def tanh() -> Layer:
    return elementwise("tanh", jnp.tanh, lambda z, a: 1 - a * a, keep="a")


@constructor
def relu() -> Layer:
    # jax.nn.relu's values and derivative, written as a select (plus a NaN term that carries
    # no derivative) rather than jax.nn.relu's maximum: XLA then keeps only a, and the manual
    # gradient of an MLP needs less temporary memory (docs/performance.md, "Measurements
    # behind design choices"). σ′ = 1 where z > 0, else 0 (also at z = 0 and at NaN, as
    # jax.grad of jax.nn.relu); the mask z > 0 equals a > 0.
    def forward(z):
        return jnp.where(z > 0, z, 0) + jnp.where(jnp.isnan(z), jnp.nan, 0).astype(z.dtype)

    return elementwise("relu", forward, lambda z, a: (a > 0).astype(a.dtype), keep="a",
                       gain=math.sqrt(2.0))


@constructor
def leaky_relu(negative_slope: float = 0.01) -> Layer:
    s = negative_slope
    return elementwise(f"leaky_relu({s})", lambda z: jax.nn.leaky_relu(z, s),
                       lambda z, a: jnp.where(z >= 0, 1.0, s).astype(z.dtype), keep="z",
                       gain=math.sqrt(2.0 / (1.0 + s * s)))


@constructor
def elu(alpha: float = 1.0) -> Layer:
    # σ′ = alpha e^z for z <= 0, from z: a + alpha would round to 0 in the far tail.
    return elementwise(f"elu({alpha})", lambda z: jax.nn.elu(z, alpha),
                       lambda z, a: jnp.where(z > 0, 1.0, alpha * jnp.exp(jnp.minimum(z, 0))),
                       keep="z", gain=math.sqrt(2.0))


@constructor
def gelu() -> Layer:
    """Exact GELU, z·Φ(z); σ′ = Φ(z) + z·φ(z), with Φ(z) = erfc(−u)/2 and
    φ(z) = e^(−u²)/√(2π) for u = z/√2 (erfc keeps Φ accurate in the lower tail)."""
    inv_sqrt_2pi = 1.0 / math.sqrt(2.0 * math.pi)

    def dgelu(z, a):
        u = z * math.sqrt(0.5)
        return 0.5 * erfc(-u) + z * inv_sqrt_2pi * jnp.exp(-u * u)

    return elementwise("gelu", lambda z: jax.nn.gelu(z, approximate=False), dgelu, keep="z",
                       gain=math.sqrt(2.0))


@constructor
def softplus() -> Layer:
    """log(1 + e^z); σ′ = logistic(z)."""
    return elementwise("softplus", jax.nn.softplus, lambda z, a: logistic(z), keep="z")


@constructor
def silu() -> Layer:
    """SiLU (swish), z·s(z) with s the logistic; σ′ = s (1 + z (1 − s))."""

    def dsilu(z, a):
        s = logistic(z)
        return s * (1 + z * (1 - s))

    return elementwise("silu", jax.nn.silu, dsilu, keep="z", gain=math.sqrt(2.0))


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
