"""residual and parallel: fan-out and fan-in with a hand-written backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp
from conftest import rel_err
from reference_models import assert_three_witnesses_agree

CE = jbp.losses.softmax_cross_entropy


def _resnet(dtype=jnp.float32):
    block = jbp.serial(jbp.dense(6, dtype=dtype), jbp.tanh(), jbp.dense(6, dtype=dtype))
    inception = jbp.parallel(jbp.dense(2, dtype=dtype),
                             jbp.serial(jbp.dense(3, dtype=dtype), jbp.relu()),
                             jbp.residual(jbp.dense(6, dtype=dtype)), combine="concat")
    return jbp.serial(jbp.dense(6, dtype=dtype), jbp.residual(block), jbp.relu(),
                      jbp.residual(jbp.residual(block)), inception, jbp.gelu(),
                      jbp.parallel(jbp.dense(3, dtype=dtype), jbp.dense(3, dtype=dtype)))


@pytest.mark.parametrize("layer,in_shape", [
    (jbp.residual(jbp.serial(jbp.dense(4), jbp.sigmoid(), jbp.dense(3))), (3,)),
    (jbp.parallel(jbp.dense(2), jbp.residual(jbp.dense(4)), combine="concat"), (2, 4)),
], ids=["residual", "parallel-concat"])
def test_check_layer(layer, in_shape):
    """jax.vjp in float64 and float32 at random, zero and large inputs and a batch of one;
    examples kept apart; per-example gradients of the layers inside."""
    report = jbp.check_layer(layer, in_shape)
    assert report.ok, str(report)


def test_deep_branching_model_manual_equals_autodiff_equals_finite_differences():
    with jax.enable_x64(True):
        model = _resnet(jnp.float64)
        _, params = model.init(jax.random.key(0), (4,))
        rng = np.random.default_rng(0)
        x, y = jnp.asarray(rng.normal(size=(5, 4))), jnp.array([0, 1, 2, 1, 0])

        deltas = assert_three_witnesses_agree(model, CE, params, x, y)
        assert len(deltas) == len(model.layers)


def test_the_identity_path_adds_its_delta():
    """With a block that outputs zeros, ∂C/∂x = ∂C/∂y + blockʼs ∂C/∂x = dy + dy·Wᵀ (W = 0)."""
    layer = jbp.residual(jbp.dense(3))
    params = {"W": jnp.zeros((3, 3)), "b": jnp.zeros(3)}
    x, dy = jnp.ones((2, 3)), jnp.arange(6.0).reshape(2, 3)
    y, cache, _ = layer.forward(params, x)
    dparams, dx = layer.backward(params, cache, dy)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(dx, dy)
    np.testing.assert_array_equal(dparams["W"], x.T @ dy)


def test_per_example_functions_reach_inside_branches():
    model = _resnet()
    _, params = model.init(jax.random.key(1), (4,))
    rng = np.random.default_rng(1)
    x, y = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32), jnp.array([0, 1, 2, 1, 0, 2])

    @jax.jit
    def both(params):
        ref = jax.vmap(jax.grad(lambda p, xi, yi: CE.value(model.apply(p, xi[None]), yi[None])),
                       in_axes=(None, 0, 0))(params, x, y)
        return ref, jbp.per_example_grads(model, CE)(params, x, y)

    ref, got = both(params)
    assert rel_err(got, ref) <= 1e-5


def test_bad_branches_get_clear_errors():
    with pytest.raises(ValueError, match=r"residual\(dense\(3\)\): the block must keep the "
                                         r"per-example shape \(4,\).*gives \(3,\)"):
        jbp.residual(jbp.dense(3)).init(jax.random.key(0), (4,))
    with pytest.raises(ValueError, match=r"combine='sum' needs equal shapes; the branches give "
                                         r"\(2,\), \(3,\)"):
        jbp.parallel(jbp.dense(2), jbp.dense(3)).init(jax.random.key(0), (4,))
    with pytest.raises(ValueError, match=r"shapes equal but for the last axis"):
        jbp.parallel(jbp.flatten(), jbp.dense(3), combine="concat").init(jax.random.key(0), (2, 4))
    with pytest.raises(ValueError, match=r"combine must be one of \('sum', 'concat'\), got 'max'"):
        jbp.parallel(jbp.dense(2), combine="max")
    with pytest.raises(TypeError, match="parallel: branch 1 must be a Layer, got str"):
        jbp.parallel(jbp.dense(2), "relu")
    with pytest.raises(ValueError, match="parallel: needs at least one branch"):
        jbp.parallel()
    assert jbp.parallel(jbp.dense(2), jbp.relu()) == jbp.parallel(jbp.dense(2), jbp.relu())
    assert repr(jbp.parallel(jbp.dense(2), combine="concat")) == "parallel(dense(2), combine='concat')"
