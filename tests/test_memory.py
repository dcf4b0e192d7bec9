"""remat, serial(remat_every=), reversible and reversible_serial: backwards that recompute
what the forward did not keep, against jax.grad and against the same models keeping it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp
from conftest import default_compile, jit, rel_err
from reference_models import random_params
from jbp import bench
from jbp.layers.memory import Inside, invert

CE = jbp.losses.softmax_cross_entropy
KEY = jax.random.key(7)  # dropout's key
F32_DEPTH, F32_BOUND = 32, 1e-4  # float32 reconstruction: 2e-6 to 1.2e-5 over 5 seeds


def _half(dt, width=2, act=jbp.tanh):
    return jbp.serial(jbp.dense(width, dtype=dt), act(), jbp.dense(width, dtype=dt))


def _dense_stack(dt, depth=2):
    """Reversible blocks of dense layers, dropout in G (recomputed with the same key)."""
    blocks = [jbp.reversible(_half(dt), jbp.serial(_half(dt), jbp.dropout(0.3)))
              for _ in range(depth)]
    return jbp.serial(jbp.dense(4, dtype=dt), jbp.reversible_serial(*blocks),
                      jbp.dense(3, dtype=dt))


def _conv_attention(dt):
    """Two stacks: blocks of convolutions, then blocks with attention as F, on (B, T, 4)."""
    conv = [jbp.reversible(jbp.conv(2, 3, dtype=dt),
                           jbp.serial(jbp.conv(2, 3, dtype=dt), jbp.gelu())) for _ in range(2)]
    attention = [jbp.reversible(jbp.attention(1, 2, dtype=dt),
                                jbp.serial(jbp.dense(2, dtype=dt), jbp.gelu()))
                 for _ in range(2)]
    return jbp.serial(jbp.conv(4, 3, dtype=dt), jbp.reversible_serial(*conv),
                      jbp.reversible_serial(*attention), jbp.global_avg_pool(),
                      jbp.dense(3, dtype=dt))


def _remat(dt):
    """Segments of 2 layers recomputed (remat_every) around: a reversible stack of dense
    blocks, remat of a serial with dropout, and a reversible block on its own (which keeps
    its output)."""
    return jbp.serial(jbp.dense(4, dtype=dt), _dense_stack(dt).layers[1],
                      jbp.remat(jbp.serial(jbp.dense(4, dtype=dt), jbp.tanh(), jbp.dropout(0.3))),
                      jbp.reversible(_half(dt), _half(dt, act=jbp.relu)),
                      jbp.dense(3, dtype=dt), remat_every=2)


MODELS = {"dense-remat": (_remat, (3,)), "conv-attention": (_conv_attention, (5, 2)),
          "dense": (_dense_stack, (3,))}


def _case(name, dt, batch=4, seed=0):
    build, in_shape = MODELS[name]
    model = build(dt)
    rng = np.random.default_rng(seed)
    _, params = random_params(model, in_shape, rng, dt)  # numpy draws: no compile per shape
    x = jnp.asarray(rng.normal(size=(batch, *in_shape)), dt)
    return model, params, x, jnp.asarray(rng.integers(0, 3, batch), jnp.int32)


@jit
def _manual_and_autodiff(model, params, x, y):
    kw = {"key": KEY, "train": True}
    return (jbp.manual_value_and_grad(model, CE)(params, x, y, **kw),
            jbp.autodiff_value_and_grad(model, CE)(params, x, y, **kw))


@pytest.mark.parametrize("name", ["dense-remat", "conv-attention"])
def test_manual_equals_autodiff_in_float64(name):
    """Reconstructed and recomputed caches give jax.grad's gradient, for reversible stacks of
    dense, conv and attention blocks and for remat'ed composites (dropout in training mode:
    the recomputation draws the forward's masks again)."""
    with jax.enable_x64(True):
        model, params, x, y = _case(name, jnp.float64)
        (value, grads), (auto_value, auto) = _manual_and_autodiff(model, params, x, y)
        assert abs(value - auto_value) <= 1e-12 * abs(auto_value)
        assert rel_err(grads, auto) <= 1e-12


def keeping(block: jbp.Layer) -> jbp.Layer:
    """``block`` (a reversible one) as a plain coupling that keeps F's and G's caches: the
    same params, the same walk, nothing reconstructed."""
    f, g = block.info

    def forward(params, x, *, key=None, train=False, state=None, side=None):
        x1, x2 = jnp.split(x, 2, axis=-1)
        key_f, key_g = (None, None) if key is None else tuple(jax.random.split(key))
        a, cache_f, _ = f.forward(params[0], x2, key=key_f, train=train, state={}, side={})
        y1 = x1 + a
        b, cache_g, _ = g.forward(params[1], y1, key=key_g, train=train, state={}, side={})
        return jnp.concatenate([y1, x2 + b], axis=-1), Inside(cache_f, cache_g), state

    return block.replace(name=f"keeping({block.name})", forward=forward)


def _without(model: jbp.Layer) -> jbp.Layer:
    """The same model (the same params) without remat and reversible: every cache kept."""
    def plain(layer):
        if layer.spec is not None and layer.spec.constructor == "remat":
            return plain(layer.layers[0])
        if layer.spec is not None and layer.spec.constructor == "reversible_serial":
            return jbp.serial(*[keeping(b) for b in layer.layers])
        if layer.spec is not None and layer.spec.constructor == "serial":
            return jbp.serial(*[plain(c) for c in layer.layers])
        return layer

    return plain(model)


def test_recomputed_caches_equal_the_forwards_in_float64():
    """The caches the walk hands to every block, reconstructed from the stack's output, are
    the ones the forward computed, to float64 rounding; so is the stack's input."""
    with jax.enable_x64(True):
        model, params, x, _ = _case("dense", jnp.float64)
        stack, p = model.layers[1], params[1]
        h = model.layers[0].apply(params[0], x)

        @jit
        def both(p, h):
            y, kept, _ = stack.forward(p, h, key=KEY, train=True)
            seen = []
            stack.walk(p, kept, jnp.ones_like(y),
                       lambda child, cp, cache, dy: (seen.append(cache),
                                                     child.backward(cp, cache, dy))[1])
            _, caches, _ = _without(stack).forward(p, h, key=KEY, train=True)
            return seen[::-1], list(caches), invert(stack, p, y, key=KEY, train=True)

        seen, kept, rebuilt = both(p, h)
        assert rel_err(seen, kept) <= 1e-14 and rel_err(rebuilt, h) <= 1e-14


def test_float32_reconstruction_error_is_bounded():
    """32 blocks of dense(4)-tanh-dense(4) (weights N(0, 1/fan_in), biases N(0, 0.3²)),
    float32: the input rebuilt from the output is off by 2e-6 to 1.2e-5 relative over 5
    seeds; it grows with depth (≈4e-7 at 8 blocks, 1e-5 to 4e-5 at 64; larger in the
    experiment's wider blocks: docs/performance.md)."""
    stack = jbp.reversible_serial(*[jbp.reversible(_half(jnp.float32, 4),
                                                   _half(jnp.float32, 4))
                                    for _ in range(F32_DEPTH)])
    rng = np.random.default_rng(0)
    _, params = random_params(stack, (8,), rng, jnp.float32)
    x = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    rebuilt = invert(stack, params, stack.apply(params, x))  # eager: no compile of 32 blocks
    err = float(jnp.linalg.norm(rebuilt - x) / jnp.linalg.norm(x))
    assert 0 < err <= F32_BOUND


def test_functions_built_on_the_backward_equal_the_model_keeping_everything():
    """Per-example norms, the GGN diagonal, hvp and as_custom_vjp's gradient of a model with
    all four equal those of the same model without them (float64)."""
    with jax.enable_x64(True):
        model = jbp.serial(_small(jnp.float64), jbp.dense(2, dtype=jnp.float64))
        rng = np.random.default_rng(0)
        _, params = random_params(model, (4,), rng, jnp.float64)
        x, y = jnp.asarray(rng.normal(size=(4, 4))), jnp.array([0, 1, 1, 0])
        reference = _without(model)
        assert reference != model

        @jit
        def quantities(model, params, x, y):
            kw = {"key": KEY, "train": True}
            apply = jbp.as_custom_vjp(model)
            return (jbp.per_example_grad_norms(model, CE)(params, x, y, **kw),
                    jbp.ggn_diagonal(model, CE)(params, x, y, **kw),
                    jbp.hvp(model, CE)(params, x, y, params, **kw),
                    jax.grad(lambda p: CE.value(apply(p, x, **kw), y))(params))

        got, want = quantities(model, params, x, y), quantities(reference, params, x, y)
        for g, w in zip(got, want):
            assert rel_err(g, w) <= 1e-12


def _small(dt=jnp.float32):
    """All four in a few layers, (B, 4) -> (B, 4); no dropout (MODELS have it), which is
    compiled once per recomputation, and that is slow."""
    block = jbp.reversible(jbp.dense(2, dtype=dt), jbp.serial(jbp.dense(2, dtype=dt), jbp.gelu()))
    return jbp.serial(jbp.reversible_serial(block), jbp.remat(jbp.dense(4, dtype=dt)),
                      jbp.gelu(), jbp.reversible(jbp.dense(2, dtype=dt), jbp.dense(2, dtype=dt)),
                      remat_every=2)


def test_check_layer_passes():
    """Against jax.vjp in float64 and float32, at init's and at random params."""
    block = jbp.reversible(jbp.dense(2), jbp.serial(jbp.dense(2), jbp.tanh()))
    layer = jbp.serial(jbp.reversible_serial(block), jbp.remat(jbp.dense(4)), remat_every=1)
    report = jbp.check_layer(layer, (4,))
    assert report.ok, str(report)


def test_fit_on_a_mesh_takes_the_step_of_the_model_keeping_everything():
    """One full-batch SGD step of fit(mesh="auto") is the step the plain model's gradient
    gives (fit without a mesh runs in the experiment's quick test)."""
    model = jbp.serial(_small(), jbp.dense(3))
    rng = np.random.default_rng(0)
    _, params = random_params(model, (4,), rng, jnp.float32)
    x, y = rng.normal(size=(32, 4)).astype(np.float32), rng.integers(0, 3, 32)
    trained, _ = jbp.fit(model, CE, params, (x, y), key=jax.random.key(1), optimizer="sgd",
                         learning_rate=0.1, epochs=1, batch_size=32, progress=False,
                         loop="python", mesh="auto")
    grads = jit(jbp.manual_value_and_grad(_without(model), CE))(params, x, y)[1]
    step = jax.tree_util.tree_map(lambda p, g: np.asarray(p) - 0.1 * np.asarray(g), params,
                                  grads)
    assert rel_err(trained, step) <= 1e-6


def test_memory_stays_flat_with_depth_and_remat_keeps_less():
    """XLA's temporary memory of the training gradient (default compile): a reversible stack
    needs about the same at 2 and 5 blocks; with remat_every the residual net needs less than
    without (the recomputation waits for the delta instead of running in the forward)."""
    x, y = jnp.ones((64, 8)), jnp.zeros(64, jnp.int32)

    def temp(model):
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), (8,))[1])
        grad = jbp.manual_value_and_grad(model, CE)
        return bench.compiled_stats(bench.compile_timed(grad, params, x, y)[0])[
            "memory"]["temp_bytes"]

    def residual(depth, **kw):
        blocks = [jbp.residual(jbp.serial(jbp.dense(8), jbp.tanh())) for _ in range(depth)]
        return jbp.serial(*blocks, jbp.dense(3), **kw)

    def reversible(depth):
        return jbp.serial(jbp.reversible_serial(*[
            jbp.reversible(jbp.dense(4), jbp.serial(jbp.dense(4), jbp.tanh()))
            for _ in range(depth)]), jbp.dense(3))

    with default_compile():
        assert temp(reversible(5)) <= 1.2 * temp(reversible(2))
        assert temp(residual(4, remat_every=2)) < 0.7 * temp(residual(4))  # 12288 vs 19200


def test_bad_input_is_refused_naming_the_layer():
    key = jax.random.key(0)
    block = jbp.reversible(jbp.dense(2), jbp.dense(2))
    with pytest.raises(ValueError, match=r"reversible\(dense\(2\), dense\(2\)\): splits the "
                                         r"channels .* even number .* \(5,\)"):
        block.init(key, (5,))
    with pytest.raises(ValueError, match=r"reversible\(dense\(3\), dense\(2\)\): dense\(3\) "
                                         r"must keep the shape of a half \(2,\).*gives \(3,\)"):
        jbp.reversible(jbp.dense(3), jbp.dense(2)).init(key, (4,))
    _, params = block.init(key, (4,))
    with pytest.raises(ValueError, match=r"reversible\(dense\(2\), dense\(2\)\): splits the "
                                         r"channels"):
        block.forward(params, jnp.ones((2, 5)))  # the forward checks it too
    with pytest.raises(ValueError, match=r"reversible\(dense\(2\), batch_norm\): "
                                         r"batch_norm keeps state"):
        jbp.reversible(jbp.dense(2), jbp.batch_norm())
    with pytest.raises(ValueError, match=r"remat\(batch_norm\): batch_norm keeps state"):
        jbp.remat(jbp.batch_norm())
    with pytest.raises(ValueError, match="batch_norm.* keeps state"):
        jbp.serial(jbp.dense(2), jbp.batch_norm(), remat_every=1)
    with pytest.raises(TypeError, match=r"reversible_serial: block 1 \(dense\(4\)\) must be a "
                                        r"jbp.reversible\(F, G\) block"):
        jbp.reversible_serial(block, jbp.dense(4))
    with pytest.raises(ValueError, match="serial: remat_every must be a positive int or "
                                         "'sqrt', got 0"):
        jbp.serial(jbp.dense(2), remat_every=0)
    with pytest.raises(TypeError, match="remat: argument 0 must be a Layer, got str"):
        jbp.remat("dense")
    assert repr(jbp.serial(jbp.dense(2), jbp.relu(), remat_every="sqrt")) == \
        "serial(dense(2), relu(), remat_every='sqrt')"
    assert jbp.remat(jbp.dense(2)) == jbp.remat(jbp.dense(2)) != jbp.dense(2)
