"""jbp.init: normal gives jax.random.normal's values bit for bit, whatever the path it
takes; constant gives jnp.full's."""

import jax
import jax.numpy as jnp
import numpy as np

from jbp.init import constant, normal

SHAPES = [(3,), (4,), (5, 7), (2, 3, 2), (0, 3)]  # below and at a power of two, n-D, empty


def _assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def _reference(key, dtype):
    return jax.jit(lambda k: [jax.random.normal(k, s, dtype) for s in SHAPES])(key)


def test_normal_is_jax_random_normal():
    """Eager (a prefix of a power-of-two draw) and traced (jax.random.normal itself), a raw
    key too; eager in the half types and float64 too."""
    key = jax.random.key(3)
    want = _reference(key, jnp.float32)
    _assert_same([normal(key, s, jnp.float32) for s in SHAPES], want)
    _assert_same(jax.jit(lambda k: [normal(k, s, jnp.float32) for s in SHAPES])(key), want)
    _assert_same([normal(key, SHAPES[2], jnp.float32, scale=0.3)], [want[2] * 0.3])
    raw = jax.random.PRNGKey(4)
    _assert_same([normal(raw, (5, 7), jnp.float32)], [jax.random.normal(raw, (5, 7))])
    for dtype in (jnp.bfloat16, jnp.float16):
        _assert_same([normal(key, s, dtype) for s in SHAPES[1:3]],
                     [jax.random.normal(key, s, dtype) for s in SHAPES[1:3]])
    with jax.enable_x64(True):
        _assert_same([normal(key, (9, 10), jnp.float64)],
                     [jax.random.normal(key, (9, 10), jnp.float64)])


def test_normal_without_the_partitionable_threefry():
    """There a draw is not the prefix of a longer one: jax.random.normal is called."""
    saved = jax.config.jax_threefry_partitionable
    try:
        jax.config.update("jax_threefry_partitionable", False)
        key = jax.random.key(6)
        _assert_same([normal(key, (5, 7), jnp.float32)], [jax.random.normal(key, (5, 7))])
    finally:
        jax.config.update("jax_threefry_partitionable", saved)


def test_constant_is_jnp_full():
    for dtype in (jnp.float32, jnp.bfloat16):
        got = constant(1, (3,), dtype)
        assert got.dtype == dtype and isinstance(got, jax.Array)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.ones(3, np.float32))
