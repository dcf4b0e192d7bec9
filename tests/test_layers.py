"""Each layer's hand-written backward equals jax.vjp of its own forward (float32, float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp
from conftest import rtol, cast, rel_err

# (name, layer factory, per-example input shape)
LAYERS = [
    ("dense", lambda: jbp.dense(7), (5,)),
    ("dense_1x1", lambda: jbp.dense(1), (1,)),
    *[(name, factory, (3, 4)) for name, factory in jbp.activations.ACTIVATIONS.items()],
    ("leaky_relu(0.2)", lambda: jbp.leaky_relu(0.2), (6,)),
    ("elu(0.5)", lambda: jbp.elu(0.5), (6,)),
    ("maxout(3)", lambda: jbp.maxout(3), (9,)),
    ("maxout(2)_2d", lambda: jbp.maxout(2), (3, 4)),
    ("flatten", jbp.flatten, (2, 3, 4)),
    ("dropout_eval", lambda: jbp.dropout(0.5), (8,)),
    ("serial", lambda: jbp.serial(jbp.flatten(), jbp.dense(6), jbp.tanh(), jbp.dense(6),
                                  jbp.maxout(2), jbp.dense(2)), (2, 3)),
    ("nested_serial", lambda: jbp.serial(jbp.serial(jbp.dense(4), jbp.gelu()),
                                         jbp.serial(jbp.dense(3))), (5,)),
]


def vjp_pair(layer, params, x, dy, **kwargs):
    """(manual, reference) pairs of (dparams, dx) for cotangent dy."""
    y, cache = layer.forward(params, x, **kwargs)
    manual = layer.backward(params, cache, dy)
    _, vjp = jax.vjp(lambda p, x_: layer.apply(p, x_, **kwargs), params, x)
    return manual, vjp(dy)


def random_case(layer, in_shape, dtype, batch=4, seed=0):
    # numpy draws the data: eager jax.random ops would compile once per shape.
    rng = np.random.default_rng(seed)
    out_shape, params = layer.init(jax.random.key(seed), in_shape)
    params = cast(params, dtype)
    x = jnp.asarray(rng.normal(size=(batch, *in_shape)) * 2, dtype)
    dy = jnp.asarray(rng.normal(size=(batch, *out_shape)), dtype)
    return params, x, dy


@pytest.mark.parametrize("name,factory,in_shape", LAYERS, ids=[c[0] for c in LAYERS])
def test_backward_equals_vjp(name, factory, in_shape, dtype):
    # Jitted (one compile per case); eager and jitted runs are compared at model level.
    layer = factory()
    params, x, dy = random_case(layer, in_shape, dtype)
    (dp, dx), (dp_ref, dx_ref) = jax.jit(vjp_pair, static_argnums=0)(layer, params, x, dy)
    assert jax.tree_util.tree_structure(dp) == jax.tree_util.tree_structure(params)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert rel_err((dp, dx), (dp_ref, dx_ref)) <= rtol(dtype)


def test_init_output_shape_matches_forward():
    for name, factory, in_shape in LAYERS:
        layer = factory()
        out_shape, params = layer.init(jax.random.key(0), in_shape)
        y = jax.eval_shape(layer.apply, params, jnp.zeros((3, *in_shape)))
        assert y.shape == (3, *out_shape), name


@pytest.mark.parametrize("layer,z", [
    (jbp.relu(), [-1.0, 0.0, 2.0]),
    (jbp.leaky_relu(0.1), [-1.0, 0.0, 2.0]),
    (jbp.elu(), [-1.0, 0.0, 2.0]),
    (jbp.maxout(2), [1.0, 1.0, -2.0, 3.0, 0.0, 0.0]),   # ties share the gradient
], ids=["relu", "leaky_relu", "elu", "maxout"])
def test_kinks_follow_jax_convention(layer, z):
    """At z = 0 (and maxout ties) the hand-written derivative picks what jax.vjp picks."""
    x = jnp.asarray([z])
    out_shape, params = layer.init(jax.random.key(0), x.shape[1:])
    dy = jnp.arange(1.0, 1.0 + np.prod(out_shape)).reshape(1, *out_shape)
    (_, dx), (_, dx_ref) = vjp_pair(layer, params, x, dy)
    np.testing.assert_array_equal(dx, dx_ref)


def test_activation_extremes_stay_finite(dtype):
    z = jnp.asarray([[-1e4, -80.0, 0.0, 80.0, 1e4]], dtype)
    for name, factory in jbp.activations.ACTIVATIONS.items():
        layer = factory()
        (_, dx), (_, dx_ref) = jax.jit(vjp_pair, static_argnums=0)(layer, {}, z, jnp.ones_like(z))
        assert np.all(np.isfinite(dx)), name
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-6, atol=1e-30, err_msg=name)


def test_dropout_train_backward_equals_vjp(dtype):
    layer = jbp.dropout(0.3)
    params, x, dy = random_case(layer, (50,), dtype)
    key = jax.random.key(7)
    (_, dx), (_, dx_ref) = vjp_pair(layer, params, x, dy, key=key, train=True)
    assert rel_err(dx, dx_ref) <= rtol(dtype)


def test_dropout_statistics():
    layer = jbp.dropout(0.25)
    x = jnp.ones((200, 100))
    y = layer.apply({}, x, key=jax.random.key(0), train=True)
    kept = np.asarray(y != 0)
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-6)
    np.testing.assert_array_equal(layer.apply({}, x), x)          # evaluation: identity
    y2 = layer.apply({}, x, key=jax.random.key(0), train=True)
    np.testing.assert_array_equal(y, y2)                          # same key, same mask


def test_serial_dropout_uses_distinct_keys():
    model = jbp.serial(jbp.dropout(0.5), jbp.dropout(0.5))
    _, cache = model.forward(((), ()), jnp.ones((64, 64)), key=jax.random.key(3), train=True)
    assert not np.array_equal(cache[0], cache[1])


def test_dense_math_is_the_lecture():
    """∂C/∂W = aᵀ·delta, ∂C/∂b = Σ delta, ∂C/∂a = delta·Wᵀ, checked on tiny integers."""
    layer = jbp.dense(2)
    params = {"W": jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), "b": jnp.array([0.5, -0.5])}
    a = jnp.array([[1.0, 0.0, 2.0]])
    z, cache = layer.forward(params, a)
    np.testing.assert_array_equal(z, [[11.5, 13.5]])
    (grads, da) = layer.backward(params, cache, jnp.array([[1.0, -1.0]]))
    np.testing.assert_array_equal(grads["W"], [[1, -1], [0, 0], [2, -2]])
    np.testing.assert_array_equal(grads["b"], [1, -1])
    np.testing.assert_array_equal(da, [[-1, -1, -1]])


def test_sigmoid_derivative_uses_output():
    layer = jbp.sigmoid()
    z = jnp.array([[0.0, 2.0]])
    a, cache = layer.forward({}, z)
    _, dz = layer.backward({}, cache, jnp.ones_like(z))
    np.testing.assert_allclose(dz, a * (1 - a), rtol=1e-7)
