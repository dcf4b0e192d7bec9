"""Initial params at a fraction of the compile cost of ``jax.random.normal`` and ``jnp.zeros``.

``init`` runs eagerly, and eagerly every new shape is a new XLA program: on a 2-core CPU a
normal draw of a shape not seen before compiles in about 0.2 s (the threefry hash), more
than the rest of a small model's ``init`` together. Building models of many sizes (a sweep
over widths, random architectures in the tests) pays it for every weight shape.

With JAX's partitionable threefry (the default), element ``i`` of a draw depends only on the
key and on ``i``, not on the shape: a draw of ``n`` numbers is the first ``n`` of any longer
draw with the same key. :func:`normal` therefore draws a vector whose length is the next
power of two (one compiled program per power of two) and takes its first ``n`` numbers in
the requested shape (a slice and a reshape: a small program; its compile time is in
docs/performance.md, "Measurements behind design choices"). The values
are bit for bit ``jax.random.normal(key, shape, dtype)``'s (tested), times ``scale`` if
given; where that would not hold (another PRNG implementation, the non-partitionable
threefry, a traced key), it simply calls ``jax.random.normal``.

:func:`constant` (biases of zeros, scales of ones) fills the array on the host and moves it
over, where ``jnp.zeros`` would compile a broadcast for every new size.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def normal(key, shape, dtype, scale=None):
    """``jax.random.normal(key, shape, dtype)`` (``* scale``, a Python number, if given),
    drawn as described in the module docstring."""
    shape = tuple(shape)
    n = math.prod(shape)
    if n == 0 or isinstance(key, jax.core.Tracer) or not _prefix_stable(key):
        z = jax.random.normal(key, shape, dtype)
        return z if scale is None else z * scale
    vector = _normal_vector(key, 1 << (n - 1).bit_length(), dtype)
    return _first(vector, shape, jnp.asarray(1 if scale is None else scale, dtype))


def constant(value, shape, dtype):
    """``jnp.full(shape, value, dtype)`` for a small param (a bias, a scale), without a compile:
    filled by NumPy and put on the default device."""
    return jnp.asarray(np.full(shape, value, dtype))


def _prefix_stable(key) -> bool:
    if not jax.config.jax_threefry_partitionable:
        return False
    try:
        return str(jax.random.key_impl(key)) == "threefry2x32"
    except (TypeError, ValueError):
        return False


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal_vector(key, size: int, dtype):
    return jax.random.normal(key, (size,), dtype)


@functools.partial(jax.jit, static_argnums=1)
def _first(vector, shape, scale):
    return vector[:math.prod(shape)].reshape(shape) * scale
