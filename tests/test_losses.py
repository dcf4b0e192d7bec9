"""Each loss's hand-written ∂C/∂out equals jax.grad of its value; extreme logits stay finite."""

import functools

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
    got, want, per_example, value = _all_of(loss, out, y)
    assert got.shape == out.shape and got.dtype == out.dtype
    assert rel_err(got, want) <= rtol(dtype)
    assert per_example.shape == (shape[0],)
    np.testing.assert_allclose(np.mean(per_example), value, rtol=1e-6)


@functools.partial(jax.jit, static_argnums=0)
def _all_of(loss, out, y):
    """The hand-written grad, jax.grad of the value, the per-example losses and the value:
    one compiled program (each eager op would compile one of its own)."""
    return loss.grad(out, y), jax.grad(loss.value)(out, y), loss.per_example(out, y), \
        loss.value(out, y)


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
    grad, autodiff, _, value = _all_of(CE, logits, labels)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    # Exactly: example 0 costs 2·scale, example 1 costs 2·scale + log 2.
    np.testing.assert_allclose(value, (4 * scale + np.log(2)) / 2, rtol=1e-6)
    np.testing.assert_allclose(grad, autodiff, rtol=1e-6, atol=1e-30)
    b_grad, _, _, b = _all_of(BCE, logits, jnp.ones_like(logits))
    assert np.isfinite(b) and np.all(np.isfinite(b_grad))


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


def _ce_paths(logits, labels, weights=None):
    """Value and ∂C/∂logits by the hand-written gradient and by jax.grad, under jit (where
    labels are traced and cannot be checked)."""

    @jax.jit
    def paths(logits, labels, weights):
        return ((CE.value(logits, labels, weights), CE.grad(logits, labels, weights)),
                jax.value_and_grad(CE.value)(logits, labels, weights))

    return paths(logits, labels, weights)


def test_every_label_valid_or_not_gives_the_same_value_and_gradient_under_jit():
    """Before: one_hot(-1) is all zeros, the manual gradient (p − 0)/B and jax.grad's 0
    disagreed (relative 1.9) while the values agreed. Now an invalid label makes the loss and
    every gradient NaN in both paths; IGNORE_LABEL is padding; eagerly both raise."""
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
    for bad in (-1, 3, 7, -101):
        labels = jnp.array([0, bad, 2, 1])
        (value, grad), (auto_value, auto_grad) = _ce_paths(logits, labels)
        assert np.isnan(value) and np.isnan(auto_value)
        np.testing.assert_array_equal(np.isnan(grad), np.isnan(auto_grad))
        assert np.isnan(grad[1]).all()
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) for 3 classes \(or be "
                                             r"IGNORE_LABEL=-100\), got \[" + str(bad) + r"\]"):
            CE.value(logits, labels)


def test_padding_labels_and_weights_match_optax(dtype):
    """IGNORE_LABEL examples cost nothing and the mean is over the rest, as optax's `where`
    and PyTorch's ignore_index give; weights make a weighted mean."""
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(6, 4)) * 3, dtype)
    labels = jnp.array([0, jbp.losses.IGNORE_LABEL, 3, 1, jbp.losses.IGNORE_LABEL, 2])
    (value, grad), (auto_value, auto_grad) = _ce_paths(logits, labels)
    keep = labels != jbp.losses.IGNORE_LABEL
    per = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(keep, labels, 0))
    np.testing.assert_allclose(value, jnp.sum(jnp.where(keep, per, 0)) / 4, rtol=rtol(dtype))
    np.testing.assert_allclose(value, auto_value, rtol=rtol(dtype))
    assert rel_err(grad, auto_grad) <= rtol(dtype) and not grad[~keep].any()
    w = jnp.asarray(rng.uniform(size=6), dtype)
    (value, grad), (auto_value, auto_grad) = _ce_paths(logits, labels, w)
    np.testing.assert_allclose(value, jnp.sum(w * jnp.where(keep, per, 0)) / jnp.sum(w * keep),
                               rtol=10 * rtol(dtype))
    assert rel_err(grad, auto_grad) <= rtol(dtype)
    (value, grad), _ = _ce_paths(logits, labels, jnp.zeros(6, dtype))
    assert value == 0 and not grad.any()  # nothing counts: C = 0, not 0/0


def test_sequence_logits_with_padding_positions():
    """Logits (B, T, C), labels (B, T): an example's loss is the mean over its positions that
    count; both gradient paths agree, a model with dense on (B, T, in) included."""
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, (3, 5)))
    labels = labels.at[0, 3:].set(jbp.losses.IGNORE_LABEL).at[2].set(jbp.losses.IGNORE_LABEL)
    (value, grad), (auto_value, auto_grad) = _ce_paths(logits, labels)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    want = (jnp.mean(per_token[0, :3]) + jnp.mean(per_token[1])) / 2  # example 2 is all padding
    np.testing.assert_allclose(value, want, rtol=1e-6)
    np.testing.assert_allclose(value, auto_value, rtol=1e-6)
    assert rel_err(grad, auto_grad) <= 1e-5


def test_sigmoid_losses_match_jax_in_the_tails_element_by_element(dtype):
    """Before: a logistic through tanh returned exactly 0 below z ≈ −18 in float32, so the
    BCE gradient there was −y/N instead of (σ(z) − y)/N (relative error 1.0)."""
    z = jnp.asarray([[-100.0, -40.0, -20.0, -18.0, -5.0, 0.0, 5.0, 18.0, 20.0, 40.0, 100.0]], dtype)
    for y in (jnp.zeros_like(z), jnp.ones_like(z), jnp.full_like(z, 0.3)):
        got = BCE.grad(z, y)
        want = jax.grad(lambda z: jnp.mean(optax.sigmoid_binary_cross_entropy(z, y)))(z)
        np.testing.assert_allclose(got, want, rtol=8 * np.finfo(dtype).eps,
                                   atol=np.finfo(dtype).tiny)
        np.testing.assert_allclose(BCE.per_example(z, y),
                                   jnp.mean(optax.sigmoid_binary_cross_entropy(z, y), axis=1),
                                   rtol=8 * np.finfo(dtype).eps)
    assert float(BCE.grad(z, jnp.zeros_like(z))[0, 2]) * z.size == pytest.approx(2.0611537e-9,
                                                                                rel=1e-6)


def test_weights_are_checked():
    logits, labels = jnp.ones((3, 2)), jnp.array([0, 1, 0])
    with pytest.raises(ValueError, match=r"weights must have shape \(batch,\) = \(3,\), got \(2,\)"):
        CE.value(logits, labels, jnp.ones(2))
    with pytest.raises(ValueError, match="weights must be non-negative"):
        CE.grad(logits, labels, jnp.array([1.0, -1.0, 1.0]))
