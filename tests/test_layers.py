"""Each layer's hand-written backward equals jax.vjp of its own forward (float32, float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp
from conftest import cast, default_compile, rel_err, rtol

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
    ("residual", lambda: jbp.residual(jbp.serial(jbp.dense(4), jbp.tanh(), jbp.dense(5))), (5,)),
    ("parallel_sum", lambda: jbp.parallel(jbp.dense(3), jbp.serial(jbp.dense(4), jbp.relu(),
                                                                   jbp.dense(3))), (5,)),
    ("parallel_concat_nested", lambda: jbp.parallel(
        jbp.dense(2), jbp.residual(jbp.dense(5)), jbp.serial(jbp.dense(3), jbp.silu()),
        combine="concat"), (2, 5)),
]


def vjp_pair(layer, params, x, dy, **kwargs):
    """(manual, reference) pairs of (dparams, dx) for cotangent dy."""
    y, cache, _ = layer.forward(params, x, **kwargs)
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


# jax.nn's own version of every activation: the outside witness, element by element.
JAX_NN = {
    "identity": lambda z: z,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "leaky_relu": jax.nn.leaky_relu,
    "elu": jax.nn.elu,
    "gelu": lambda z: jax.nn.gelu(z, approximate=False),
    "softplus": jax.nn.softplus,
    "silu": jax.nn.silu,
}


def _whole_range(dtype):
    """Every regime of a float type: ±0, subnormal, tiny, the tails, overflow, ±inf, NaN."""
    info = np.finfo(dtype)
    mags = np.concatenate([[0.0, info.smallest_subnormal, info.tiny, 1e-30, 1e-7],
                           np.geomspace(1e-3, 1e3, 61), [17, 18, 19, 20, 30, 40, 88, 89, 100,
                                                         750, 1e4, 1e30, info.max, np.inf]])
    return np.concatenate([-mags, mags, [np.nan]]).astype(dtype)


def _derivative_oracle(name, z):
    """σ′ from outside the library: jax.grad of jax.nn's function in float64. For elu the
    oracle is numpy's e^z: JAX differentiates expm1 as (ans + 1), which cancels in the tail
    (relative error 0.3 at z = -12 in float32), and the hand-written σ′ is the exact one."""
    z64 = np.asarray(z, np.float64)
    if name == "elu":
        with np.errstate(over="ignore"):
            return np.where(z64 > 0, 1.0, np.exp(np.minimum(z64, 0)))
    with jax.enable_x64(True):
        return np.asarray(jax.jit(jax.vmap(jax.grad(JAX_NN[name])))(jnp.asarray(z64)))


@pytest.mark.parametrize("name", list(JAX_NN))
def test_activations_match_jax_nn_element_by_element(name, dtype):
    """Values (NaN and inf included) equal jax.nn's, and in every element the hand-written σ′
    is as close to the float64 truth as jax.grad of jax.nn's function in the same dtype.
    Compiled as a user's program is (XLA's default optimisations: its kernels for tanh and
    exp are what the tails depend on)."""
    layer = jbp.activations.ACTIVATIONS[name]()
    z = jnp.asarray(_whole_range(dtype))

    @jax.jit
    def forward_backward(z):
        a, cache, _ = layer.forward({}, z)
        return (a, layer.backward({}, cache, jnp.ones_like(z))[1], JAX_NN[name](z),
                jax.vmap(jax.grad(JAX_NN[name]))(z))

    with default_compile():
        a, dz, a_jax, dz_jax = forward_backward(z)
        truth = _derivative_oracle(name, z)
    assert a.dtype == dz.dtype == dtype
    np.testing.assert_array_equal(a, a_jax)
    np.testing.assert_array_equal(np.isnan(dz), np.isnan(dz_jax), err_msg=name)
    ok = ~np.isnan(truth)
    err, err_jax = (np.abs(np.asarray(d, np.float64)[ok] - truth[ok]) for d in (dz, dz_jax))
    # float32 is judged against a float64 truth; in float64 the oracle rounds like we do.
    ulps = 8 if dtype == jnp.float32 else 32
    slack = ulps * np.finfo(dtype).eps * np.abs(truth[ok]) + np.finfo(dtype).tiny
    worse = err > err_jax + slack
    assert not worse.any(), (name, np.asarray(z)[ok][worse], err[worse], err_jax[worse])


def test_nan_propagates_through_every_activation_and_the_loss():
    """A NaN weight makes the loss NaN in both gradient paths (relu(NaN) is NaN, as in jax.nn)."""
    x, y = jnp.ones((3, 4)), jnp.array([0, 1, 1])
    models = {name: jbp.serial(jbp.dense(3), jbp.activations.ACTIVATIONS[name](), jbp.dense(2))
              for name in JAX_NN}
    _, params = models["relu"].init(jax.random.key(0), (4,))  # the same shapes for every one
    params = (dict(params[0], W=params[0]["W"].at[0, 0].set(jnp.nan)),) + params[1:]
    makes = (jbp.manual_value_and_grad, jbp.autodiff_value_and_grad)
    got = jax.jit(lambda p: {(name, make.__name__): make(model, jbp.losses.softmax_cross_entropy)(
        p, x, y) for name, model in models.items() for make in makes})(params)  # one compile
    for which, (value, grads) in got.items():
        assert np.isnan(value), which
        assert np.isnan(grads[2]["W"]).any(), which


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
    _, cache, _ = model.forward(((), ()), jnp.ones((64, 64)), key=jax.random.key(3), train=True)
    assert not np.array_equal(cache[0], cache[1])


def test_dense_math_is_the_lecture():
    """∂C/∂W = aᵀ·delta, ∂C/∂b = Σ delta, ∂C/∂a = delta·Wᵀ, checked on tiny integers."""
    layer = jbp.dense(2)
    params = {"W": jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), "b": jnp.array([0.5, -0.5])}
    a = jnp.array([[1.0, 0.0, 2.0]])
    z, cache, _ = layer.forward(params, a)
    np.testing.assert_array_equal(z, [[11.5, 13.5]])
    (grads, da) = layer.backward(params, cache, jnp.array([[1.0, -1.0]]))
    np.testing.assert_array_equal(grads["W"], [[1, -1], [0, 0], [2, -2]])
    np.testing.assert_array_equal(grads["b"], [1, -1])
    np.testing.assert_array_equal(da, [[-1, -1, -1]])


def test_sigmoid_derivative_uses_output():
    layer = jbp.sigmoid()
    z = jnp.array([[0.0, 2.0]])
    a, cache, _ = layer.forward({}, z)
    _, dz = layer.backward({}, cache, jnp.ones_like(z))
    np.testing.assert_allclose(dz, a * (1 - a), rtol=1e-7)
