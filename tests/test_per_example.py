"""Per-example gradients, norms, variance and clipped means from the hand-written backward
equal the same quantities from jax.vmap(jax.grad(...)), for every layer type and loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp
from reference_models import BATCH, TOL, L, case, flat_norms, rel_err, reference_per_example_grads

LOSSES = [L.softmax_cross_entropy, L.mean_squared_error, L.sigmoid_binary_cross_entropy]


CLIPS = (1e-3, 0.5, 1e3)  # clip every, some, no example


def _check_all_quantities(name, dtype, loss=L.softmax_cross_entropy):
    model, params, x, y, kw = case(name, dtype, loss)

    @jax.jit  # one compile for all quantities: much cheaper than eager dispatch of each op
    def quantities(params, x, y):
        return (reference_per_example_grads(model, loss, params, x, y, kw),
                jbp.per_example_grads(model, loss)(params, x, y, **kw),
                jbp.per_example_grad_norms(model, loss)(params, x, y, **kw),
                jbp.per_example_grad_variance(model, loss)(params, x, y, **kw),
                jbp.per_example_grad_variance(model, loss, ddof=1)(params, x, y, **kw)[1],
                jbp.manual_value_and_grad(model, loss)(params, x, y, **kw)[1],
                [jbp.clipped_grad_mean(model, loss, c)(params, x, y, **kw) for c in CLIPS])

    ref, grads, norms, (mean, var), var1, batch_grad, clipped = quantities(params, x, y)
    tol = TOL[dtype]
    assert rel_err(grads, ref) <= tol
    assert norms.shape == (BATCH,) and norms.dtype == dtype
    ref_norms = flat_norms(ref)
    assert rel_err(norms, ref_norms) <= tol
    assert rel_err(mean, jax.tree_util.tree_map(lambda g: jnp.mean(g, 0), ref)) <= tol
    # The mean of the per-example gradients is the batch gradient of the manual backward.
    assert rel_err(mean, batch_grad) <= tol
    assert rel_err(var, jax.tree_util.tree_map(lambda g: jnp.var(g, 0), ref)) <= 10 * tol
    assert rel_err(var1, jax.tree_util.tree_map(lambda g: jnp.var(g, 0, ddof=1), ref)) <= 10 * tol
    for clip, (clipped_mean, clip_norms) in zip(CLIPS, clipped):
        factor = 1.0 / jnp.maximum(1.0, ref_norms / clip)
        want = jax.tree_util.tree_map(
            lambda g: jnp.mean(g * factor.reshape((-1,) + (1,) * (g.ndim - 1)), 0), ref)
        assert rel_err(clip_norms, ref_norms) <= tol
        assert rel_err(clipped_mean, want) <= tol


# Every layer type: the activations together in one chain (one compile, not nine), the
# others on their own; "mixed" puts them all in one model.
@pytest.mark.parametrize("name", ["activations", "dense", "maxout", "flatten", "dropout-eval",
                                  "dropout-key", "mixed"])
def test_every_layer_type_matches_vmap_grad_float64(name):
    with jax.enable_x64(True):
        _check_all_quantities(name, jnp.float64)


def test_every_kind_of_layer_float32():
    _check_all_quantities("mixed", jnp.float32)


@pytest.mark.parametrize("loss", LOSSES[1:], ids=lambda lo: lo.name)
def test_other_losses_match_vmap_grad(loss):
    with jax.enable_x64(True):
        _check_all_quantities("tanh", jnp.float64, loss)


def test_nested_serial_and_a_batch_of_one():
    with jax.enable_x64(True):
        inner = jbp.serial(jbp.dense(6, dtype=jnp.float64), jbp.sigmoid())
        model = jbp.serial(inner, jbp.dense(3, dtype=jnp.float64))
        _, params = model.init(jax.random.key(0), (4,))
        loss = L.softmax_cross_entropy

        @jax.jit
        def both(params, x, y):
            return (reference_per_example_grads(model, loss, params, x, y, {}),
                    jbp.per_example_grads(model, loss)(params, x, y),
                    jbp.per_example_grad_norms(model, loss)(params, x, y))

        for batch in (BATCH, 1):
            x, y = jax.random.normal(jax.random.key(1), (batch, 4), jnp.float64), jnp.arange(batch) % 3
            ref, grads, norms = both(params, x, y)
            assert rel_err(grads, ref) <= 1e-10
            assert norms.shape == (batch,) and rel_err(norms, flat_norms(ref)) <= 1e-10


# --- clear errors --------------------------------------------------------------------------

def _mixing_layer():
    """A weightless layer that mixes examples (subtracts the batch mean): not supported."""
    return jbp.Layer("centre", lambda key, s: (s, {}),
                     lambda p, x, **_: (x - jnp.mean(x, 0), None),
                     lambda p, c, dy: ({}, dy - jnp.mean(dy, 0)))


def _scale_layer():
    """A layer with a parameter and no per-example rule."""
    return jbp.Layer("scale", lambda key, s: (s, {"s": jnp.ones(())}),
                     lambda p, x, **_: (x * p["s"], x),
                     lambda p, x, dy: ({"s": jnp.sum(x * dy)}, dy * p["s"]))


@pytest.mark.parametrize("layer, message", [
    (_mixing_layer(), r"layer centre: this layer declares no per-example behaviour.*\n"
                      r"in the backward of layer 1 \(centre\)"),
    (_scale_layer(), r"layer scale: this layer declares no per-example behaviour"),
])
def test_unsupported_layers_are_named(layer, message):
    model = jbp.serial(jbp.dense(3), layer, jbp.dense(2))
    _, params = model.init(jax.random.key(0), (4,))
    x, y = jnp.ones((2, 4)), jnp.array([0, 1])
    for make in (jbp.per_example_grads, jbp.per_example_grad_norms, jbp.per_example_grad_variance):
        with pytest.raises(ValueError, match=message):
            make(model, L.softmax_cross_entropy)(params, x, y)


def test_losses_that_are_not_means_of_per_example_losses_are_refused():
    model = jbp.mlp([4, 3])
    _, params = model.init(jax.random.key(0), (4,))
    x, y = jnp.ones((2, 4)), jnp.array([0, 1])

    class SumLoss(jbp.Loss):
        def value(self, out, target):
            return jnp.sum(self.per_example(out, target))

    summed = SumLoss(*L.softmax_cross_entropy)
    with pytest.raises(TypeError, match="batch mean of per_example"):
        jbp.per_example_grads(model, summed)
    with pytest.raises(TypeError, match="must be a jbp Loss"):
        jbp.per_example_grad_norms(model, lambda out, t: jnp.mean(out))
    scalar = jbp.Loss("total", lambda out, t: jnp.sum(out), lambda out, t: jnp.ones_like(out))
    with pytest.raises(ValueError, match=r"one loss per example, shape \(2,\); its per_example gave \(\)"):
        jbp.per_example_grad_norms(model, scalar)(params, x, y)


def test_bad_arguments():
    model = jbp.mlp([4, 3])
    with pytest.raises(TypeError, match="model must be a jbp Layer"):
        jbp.per_example_grads("mlp", L.softmax_cross_entropy)
    with pytest.raises(ValueError, match="l2_norm_clip must be positive"):
        jbp.clipped_grad_mean(model, L.softmax_cross_entropy, 0.0)
    with pytest.raises(ValueError, match="ddof"):
        jbp.per_example_grad_variance(model, L.softmax_cross_entropy, ddof=-1)
    _, params = model.init(jax.random.key(0), (4,))
    with pytest.raises(ValueError, match="batch larger than ddof=1"):
        jbp.per_example_grad_variance(model, L.softmax_cross_entropy, ddof=1)(
            params, jnp.ones((1, 4)), jnp.array([0]))


def test_variance_is_accurate_in_float32_on_a_batch_of_similar_examples():
    """Before: Σg² − B·mean² in one pass was off by 10–70% in float32 (entries clipped to 0)
    when the examples' gradients nearly agree. Reference: vmap(grad) and numpy in float64."""
    model = jbp.mlp([8, 16, 3], "tanh")
    _, params = model.init(jax.random.key(0), (8,))
    rng = np.random.default_rng(0)
    x = jnp.asarray(1.0 + 1e-3 * rng.normal(size=(64, 8)), jnp.float32)  # nearly one example
    y = jnp.zeros(64, jnp.int32)
    loss = L.softmax_cross_entropy
    _, var = jax.jit(jbp.per_example_grad_variance(model, loss))(params, x, y)
    ref = reference_per_example_grads(model, loss, params, x, y, {})
    want = jax.tree_util.tree_map(lambda g: np.var(np.asarray(g, np.float64), axis=0), ref)
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(var))
    assert rel_err(var, want) <= 1e-3
