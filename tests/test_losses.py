"""Each loss's hand-written ∂C/∂out equals jax.grad of its value; extreme logits stay finite."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbp
from conftest import rel_err, rtol

CE, MSE, BCE = (jbp.losses.softmax_cross_entropy, jbp.losses.mean_squared_error,
                jbp.losses.sigmoid_binary_cross_entropy)


def targets(loss, rng, shape, dtype, one_hot=False):
    if loss is CE:
        labels = rng.integers(0, shape[1], size=shape[0])
        return jax.nn.one_hot(labels, shape[1], dtype=dtype) if one_hot else jnp.asarray(labels)
    if loss is MSE:
        return jnp.asarray(rng.normal(size=shape), dtype)
    return jnp.asarray(rng.uniform(size=shape), dtype)


@pytest.mark.parametrize("loss,one_hot", [(CE, False), (CE, True), (MSE, False), (BCE, False)],
                         ids=["ce_labels", "ce_onehot", "mse", "bce"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (7, 3), (33, 10)])
def test_grad_equals_autodiff(loss, one_hot, shape, dtype):
    rng = np.random.default_rng(sum(shape))
    out = jnp.asarray(rng.normal(size=shape) * 3, dtype)
    y = targets(loss, rng, shape, dtype, one_hot)
    got = jax.jit(loss.grad)(out, y)
    want = jax.jit(jax.grad(loss.value))(out, y)
    assert got.shape == out.shape and got.dtype == out.dtype
    assert rel_err(got, want) <= rtol(dtype)
    per_example = loss.per_example(out, y)
    assert per_example.shape == (shape[0],)
    np.testing.assert_allclose(jnp.mean(per_example), loss.value(out, y), rtol=1e-6)


def test_cross_entropy_matches_optax():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(16, 10)) * 4, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, size=16))
    want = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    np.testing.assert_allclose(CE.per_example(logits, labels), want, rtol=1e-5)


def test_bce_matches_optax():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(16, 3)) * 4, jnp.float32)
    y = jnp.asarray(rng.uniform(size=(16, 3)), jnp.float32)
    want = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y), axis=1)
    np.testing.assert_allclose(BCE.per_example(logits, y), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [1e2, 1e3, 1e4])
def test_extreme_logits_stay_finite(scale, dtype):
    logits = jnp.asarray([[scale, -scale, 0.0], [-scale, scale, scale]], dtype)
    labels = jnp.array([1, 0])
    value, grad = CE.value(logits, labels), CE.grad(logits, labels)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    # Exactly: example 0 costs 2·scale, example 1 costs 2·scale + log 2.
    np.testing.assert_allclose(value, (4 * scale + np.log(2)) / 2, rtol=1e-6)
    np.testing.assert_allclose(grad, jax.grad(CE.value)(logits, labels), rtol=1e-6, atol=1e-30)
    b = BCE.value(logits, jnp.ones_like(logits))
    assert np.isfinite(b) and np.all(np.isfinite(BCE.grad(logits, jnp.ones_like(logits))))


def test_extreme_logits_through_a_model():
    model = jbp.serial(jbp.dense(3))
    params = {"W": jnp.array([[1e4, -1e4, 0.0]]), "b": jnp.zeros(3)}
    x, y = jnp.array([[1.0], [-1.0]]), jnp.array([1, 2])
    for make in (jbp.manual_value_and_grad, jbp.autodiff_value_and_grad):
        value, grads = jax.jit(make(model, CE))((params,), x, y)
        assert np.isfinite(value)
        assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


def test_probability_targets_that_do_not_sum_to_one():
    """The general ∂C/∂z = p·Σy − y also holds for unnormalised targets."""
    logits = jnp.array([[0.5, -1.0, 2.0]])
    y = jnp.array([[0.2, 0.3, 0.1]])
    np.testing.assert_allclose(CE.grad(logits, y), jax.grad(CE.value)(logits, y), rtol=1e-6)
