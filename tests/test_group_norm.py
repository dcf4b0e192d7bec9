"""group_norm, instance_norm, rms_norm and layer_norm's scale/offset switches: each
hand-written backward against jax.vjp (check_layer), against independent witnesses (group
norm with one group is layer_norm over positions and channels; instance_norm is group_norm
with a group per channel; rms_norm is a one-line jnp formula), central differences in a
model; bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp
from conftest import rel_err
from reference_models import assert_three_witnesses_agree

F64 = jnp.float64

CHECKED = [
    ("group_norm_2d", jbp.group_norm(2), (3, 2, 4)),
    ("rms_norm_sequence", jbp.rms_norm(), (3, 5)),
]


@pytest.mark.parametrize("layer,in_shape", [c[1:] for c in CHECKED], ids=[c[0] for c in CHECKED])
def test_check_layer(layer, in_shape):
    """jax.vjp in float64 (1e-12) and float32 (1e-5) at random, zero (constant groups and
    rows) and large inputs, a batch of one, random params; examples kept apart; the
    per-example rule against jax.vjp with one example's cotangent."""
    report = jbp.check_layer(layer, in_shape)
    assert report.ok, str(report)


def _random(shape, keys=("scale", "offset"), seed=0):
    rng = np.random.default_rng(seed)
    params = {k: jnp.asarray(rng.normal(size=shape[-1])) for k in keys}
    x = jnp.asarray(rng.normal(size=(3, *shape)) * 2 + 1)
    return params, x, jnp.asarray(rng.normal(size=x.shape))


@functools.partial(jax.jit, static_argnums=0)
def forward_backward_vjp(layer, params, x, dy):
    """``(y, manual (dparams, dx), jax.vjp's (dparams, dx))``."""
    y, cache, _ = layer.forward(params, x)
    _, vjp = jax.vjp(layer.apply, params, x)
    return y, layer.backward(params, cache, dy), vjp(dy)


def test_one_group_is_layer_norm_over_positions_and_channels():
    """group_norm(1) on (B, T, C) normalises each example's T·C values together: layer_norm
    on (B, T·C) with the per-channel scale and offset tiled over the positions, forward and
    backward (its parameter gradients summed back over the positions)."""
    with jax.enable_x64(True):
        params, x, dy = _random((4, 3))
        y, (dp, dx), _ = forward_backward_vjp(jbp.group_norm(1, dtype=F64), params, x, dy)
        tiled = {k: jnp.tile(v, 4) for k, v in params.items()}
        y_ln, (dp_ln, dx_ln), _ = forward_backward_vjp(
            jbp.layer_norm(dtype=F64), tiled, x.reshape(3, 12), dy.reshape(3, 12))
        summed = {k: v.reshape(4, 3).sum(0) for k, v in dp_ln.items()}
    assert rel_err(y, y_ln.reshape(y.shape)) <= 1e-13
    assert rel_err(dx, dx_ln.reshape(dx.shape)) <= 1e-12
    assert rel_err(dp, summed) <= 1e-12


def test_instance_norm_is_group_norm_with_a_group_per_channel():
    """Bit for bit, forward and backward; and each channel of each example has mean 0 and
    variance 1 (up to eps) at init's scale and offset."""
    with jax.enable_x64(True):
        params, x, dy = _random((5, 3))
        y, (dp, dx), _ = forward_backward_vjp(jbp.instance_norm(dtype=F64), params, x, dy)
        want = forward_backward_vjp(jbp.group_norm(3, dtype=F64), params, x, dy)[:2]
        np.testing.assert_array_equal(y, want[0])
        assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, (dp, dx), want[1]))
        x_hat = (y - params["offset"]) / params["scale"]
        np.testing.assert_allclose(x_hat.mean(axis=1), 0, atol=1e-12)
        np.testing.assert_allclose(x_hat.var(axis=1), 1, atol=1e-4)


def test_rms_norm_is_the_formula_and_its_backward_jax_vjp_of_it():
    """y = scale·x/√(mean(x²) + eps), written in one line of jnp: the forward equals it and
    the hand-written backward equals jax.vjp of that line (float64, 1e-12)."""

    def formula(params, x):
        return params["scale"] * x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)

    @jax.jit
    def both(params, x, dy):
        want, vjp = jax.vjp(formula, params, x)
        return want, vjp(dy)

    with jax.enable_x64(True):
        params, x, dy = _random((2, 6), keys=("scale",))
        y, manual, _ = forward_backward_vjp(jbp.rms_norm(dtype=F64), params, x, dy)
        want, reference = both(params, x, dy)
    assert rel_err(y, want) <= 1e-14 and rel_err(manual, reference) <= 1e-12


@pytest.mark.parametrize("scale,offset", [(True, False), (False, True), (False, False)])
def test_layer_norm_switches(scale, offset):
    """The params hold what is switched on (none: {} and any width, declared EXAMPLEWISE);
    y = x̂·scale + offset with what is there; the backward equals jax.vjp (float64)."""
    layer = jbp.layer_norm(scale=scale, offset=offset, dtype=F64)
    keys = tuple(k for k, on in (("scale", scale), ("offset", offset)) if on)
    with jax.enable_x64(True):
        _, params = layer.init(jax.random.key(0), (5,))
        assert set(params) == set(keys)
        params, x, dy = _random((5,), keys)
        y, manual, reference = forward_backward_vjp(layer, params, x, dy)
        x_hat = forward_backward_vjp(jbp.layer_norm(dtype=F64), {"scale": jnp.ones(5),
                                                                "offset": jnp.zeros(5)}, x, dy)[0]
        want = x_hat * params.get("scale", 1) + params.get("offset", 0)
    assert rel_err(y, want) <= 1e-14
    assert rel_err(manual, reference) <= 1e-12
    assert (layer.per_example == jbp.EXAMPLEWISE) == (not keys)


def test_a_model_of_every_new_norm_equals_autodiff_and_central_differences():
    """conv → group_norm → relu → instance_norm → rms_norm → layer_norm(scale=False) →
    global average → dense, in float64, params away from init's ones and zeros: backprop ==
    jax.grad (≤ 1e-12) == central differences."""
    with jax.enable_x64(True):
        model = jbp.serial(jbp.conv(4, 2, dtype=F64), jbp.group_norm(2, dtype=F64), jbp.relu(),
                           jbp.instance_norm(dtype=F64), jbp.rms_norm(dtype=F64),
                           jbp.layer_norm(scale=False, dtype=F64), jbp.global_avg_pool(),
                           jbp.dense(2, dtype=F64))
        _, params = model.init(jax.random.key(0), (4, 2))
        rng = np.random.default_rng(0)
        params = jax.tree_util.tree_map(lambda p: p + 0.3 * rng.normal(size=p.shape), params)
        x, y = jnp.asarray(rng.normal(size=(3, 4, 2))), jnp.asarray([0, 1, 1])
        assert_three_witnesses_agree(model, jbp.losses.softmax_cross_entropy, params, x, y)


def test_bad_input_is_refused_naming_the_layer():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"group_norm: groups must be a positive int, got 0"):
        jbp.group_norm(0)
    with pytest.raises(ValueError, match=r"group_norm\(4\): the input's 6 channels must be "
                                         r"divisible by groups=4"):
        jbp.group_norm(4).init(key, (3, 6))
    _, params = jbp.group_norm(2).init(key, (3, 4))
    with pytest.raises(ValueError, match=r"group_norm\(2\): expected input of shape \(batch, "
                                         r"\.\.\., 4\) \(the last axis is normalised; the params "
                                         r"have 4 features\), got \(3, 5\)"):
        jax.eval_shape(jbp.group_norm(2).apply, params, jax.ShapeDtypeStruct((3, 5), jnp.float32))
    with pytest.raises(ValueError, match=r"instance_norm: expected input of shape \(batch, "):
        jax.eval_shape(jbp.instance_norm().apply, params, jax.ShapeDtypeStruct((4,), jnp.float32))
    with pytest.raises(ValueError, match=r"rms_norm: eps must be a positive number"):
        jbp.rms_norm(eps=0)
    with pytest.raises(ValueError, match=r"group_norm\(2, eps=-1\): eps must be a positive"):
        jbp.group_norm(2, eps=-1)
    with pytest.raises(TypeError, match=r"layer_norm: scale must be a bool, got 'no'"):
        jbp.layer_norm(scale="no")
    with pytest.raises(TypeError, match=r"rms_norm: params must be a dict with the key "
                                        r"\['scale'\], got \['offset', 'scale'\]"):
        jbp.rms_norm().apply({"scale": jnp.ones(4), "offset": jnp.ones(4)}, jnp.ones((2, 4)))
    assert repr(jbp.group_norm(2, eps=1e-3)) == "group_norm(2, eps=0.001)"
    assert repr(jbp.layer_norm(offset=False)) == "layer_norm(offset=False)"
    assert jbp.instance_norm() == jbp.instance_norm() != jbp.group_norm(1)
