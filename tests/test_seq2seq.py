"""Encoder–decoder models (jbp.layers.seq2seq): cross-attention's backward against jax.vjp,
jax.nn.dot_product_attention and central differences; check_layer; a padded batch of
(source, target) pairs against each pair alone; bad input named.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp
from conftest import jit, rel_err, rtol
from jbp.layers.seq2seq import cross_attention, decoder_block, encoder_decoder, on_target
from jbp.losses import IGNORE_LABEL

CE = jbp.losses.softmax_cross_entropy
HEADS, HEAD_DIM, D, S, T = 2, 3, 5, 7, 4


def _noisy(tree, dtype, seed=0):
    leaves, structure = jax.tree_util.tree_flatten(tree)
    rng = np.random.default_rng(seed)
    return structure.unflatten([jnp.asarray(np.asarray(a) + 0.3 * rng.normal(size=a.shape), dtype)
                                for a in leaves])


@jit
def _derivatives(layer, params, z, dy, side):
    y, cache, _ = layer.forward(params, z, side=side)
    return y, layer.backward(params, cache, dy), jax.vjp(
        lambda p, z_: layer.apply(p, z_, side=side), params, z)[1](dy)


def test_cross_attention_backward_equals_vjp_and_jax_nn(dtype):
    """Blocks of 3 over S = 7 memory keys (one block padded), source lengths 7, 2, 5: the
    target's output == jax.nn.dot_product_attention with the key mask (≤ 1e-5: its softmax
    is float32), the memory's output is 0; (dparams, dz) == jax.vjp."""
    layer = cross_attention(HEADS, HEAD_DIM, S, block_size=3, dtype=dtype)
    params = _noisy(layer.init(jax.random.key(0), (S + T, D))[1], dtype)
    rng = np.random.default_rng(1)
    z, dy = (jnp.asarray(rng.normal(size=(3, S + T, D)), dtype) for _ in range(2))
    lengths = jnp.array([S, 2, 5])
    y, manual, own = _derivatives(layer, params, z, dy, {"source_lengths": lengths})
    assert rel_err(manual, own) <= rtol(dtype)
    assert not np.asarray(y[:, :S]).any()

    def project(a, name):
        return (a @ params[name]["W"] + params[name].get("b", 0)).reshape(
            a.shape[0], a.shape[1], HEADS, HEAD_DIM)

    m, h = z[:, :S], z[:, S:]
    key_mask = (jnp.arange(S) < lengths[:, None])[:, None, None, :]
    o = jax.nn.dot_product_attention(project(h, "q"), project(m, "k"), project(m, "v"),
                                     mask=jnp.broadcast_to(key_mask, (3, HEADS, T, S)))
    want = o.reshape(3, T, -1) @ params["o"]["W"] + params["o"]["b"]
    assert rel_err(y[:, S:], want) <= 1e-5


def test_cross_attention_check_layer_and_central_differences():
    """check_layer's 16 checks (random params, per-example rule, no autodiff inside the
    backward) without side inputs; float64 central differences with source lengths."""
    assert jbp.check_layer(cross_attention(HEADS, HEAD_DIM, S, block_size=3), (S + T, D)).ok
    with jax.enable_x64(True):
        layer = cross_attention(HEADS, HEAD_DIM, S, block_size=3, dtype=jnp.float64)
        params = _noisy(layer.init(jax.random.key(0), (S + T, D))[1], jnp.float64)
        rng = np.random.default_rng(2)
        z, y = (jnp.asarray(rng.normal(size=(2, S + T, D))) for _ in range(2))
        side = {"source_lengths": jnp.array([3, S])}
        mse = jbp.losses.mean_squared_error
        manual = jit(jbp.manual_value_and_grad(layer, mse))(params, z, y, side=side)[1]
        numeric = jit(jbp.numerical_value_and_grad(layer, mse))(params, z, y, side=side)[1]
        assert rel_err(manual, numeric) <= 1e-7


V, MAX_LEN, WIDTH = 6, 12, 4


def _translator(source_length, dtype=jnp.float64):
    """embedding → positions → transformer block (source); embedding → positions (target);
    one decoder block; dense logits. Its params do not depend on source_length."""
    encoder = jbp.serial(jbp.embedding(V, WIDTH, dtype=dtype),
                         jbp.positional_embedding(MAX_LEN, dtype=dtype),
                         jbp.transformer_block(WIDTH, 2, 2, 6, block_size=2, dtype=dtype))
    embed = jbp.serial(jbp.embedding(V, WIDTH, dtype=dtype),
                       jbp.positional_embedding(MAX_LEN, dtype=dtype))
    decoder = decoder_block(WIDTH, 2, 2, 6, source_length, block_size=2, dtype=dtype)
    return jbp.serial(encoder_decoder(encoder, embed, decoder, source_length),
                      jbp.dense(V, dtype=dtype))


@jit
def _gradients(model, params, x, y, side):
    return (jbp.manual_value_and_grad(model, CE)(params, x, y, side=side),
            jbp.autodiff_value_and_grad(model, CE)(params, x, y, side=side),
            CE.weights(model.apply(params, x, side=side), y))


@jit
def _autodiff(model, params, x, y):
    return jbp.autodiff_value_and_grad(model, CE)(params, x, y)


def test_a_padded_translation_batch_equals_each_pair_alone():
    """Sources of lengths 5, 1 padded to S = 5 and targets of lengths 1, 3 padded to T = 3
    (labels with IGNORE_LABEL), float64: manual == jax.grad ≤ 1e-12; the loss and gradient
    == the weighted sum over each pair run alone in a model built for its own source
    length; other tokens in the padding change nothing. (The per-example functions reach
    cross_attention's rule in check_layer, and walk encoder_decoder as any composite.)"""
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        s_len, t_len = [5, 1], [1, 3]
        src, _ = jbp.data.pad_sequences([rng.integers(0, V, n) for n in s_len])
        tgt, _ = jbp.data.pad_sequences([rng.integers(0, V, n) for n in t_len])
        labels, _ = jbp.data.pad_sequences([rng.integers(0, V, n) for n in t_len],
                                           value=IGNORE_LABEL)
        model = _translator(5)
        params = _noisy(model.init(jax.random.key(0), (8,))[1], jnp.float64)
        side = {"source_lengths": jnp.array(s_len), "lengths": jnp.array(t_len)}
        x = jnp.asarray(np.concatenate([src, tgt], axis=1))
        (value, grads), (auto_value, auto), w = _gradients(model, params, x,
                                                           jnp.asarray(labels), side)
        assert abs(value - auto_value) <= 1e-12 * abs(auto_value)
        assert rel_err(grads, auto) <= 1e-12
        alone = []
        for i, (n, k) in enumerate(zip(s_len, t_len)):
            pair = jnp.asarray(np.concatenate([src[i, :n], tgt[i, :k]]))[None]
            alone.append(_autodiff(_translator(n), params, pair, jnp.asarray(labels[i:i + 1, :k])))
        w = np.asarray(w) / np.sum(w)  # C = Σ_i w_i ℓ_i / Σ_i w_i
        assert abs(float(value) - sum(wi * float(a[0]) for wi, a in zip(w, alone))) \
            <= 1e-12 * abs(float(value))
        want = jax.tree_util.tree_map(lambda *g: sum(wi * gi for wi, gi in zip(w, g)),
                                      *[a[1] for a in alone])
        assert rel_err(grads, want) <= 1e-10
        pad = np.concatenate([np.arange(5)[None] >= np.array(s_len)[:, None],
                              np.arange(3)[None] >= np.array(t_len)[:, None]], axis=1)
        (value2, grads2), _, _ = _gradients(model, params, jnp.where(pad, V - 1, x),
                                            jnp.asarray(labels), side)
        assert abs(value2 - value) <= 1e-12 * abs(value) and rel_err(grads2, grads) <= 1e-12


def test_an_encoder_decoder_through_every_function_built_on_the_backward(tmp_path):
    """float64, the padded translator with source and target lengths: jax.grad through
    as_custom_vjp == jax.grad; per-example gradients == vmap of jax.grad on each pair with
    its lengths; hvp == jvp of jax.grad; and the model saved and loaded is the same model.
    (ggn_diagonal walks the model as the per-example functions do.)"""
    with jax.enable_x64(True):
        model = _translator(3)
        params = _noisy(model.init(jax.random.key(0), (5,))[1], jnp.float64)
        rng = np.random.default_rng(4)
        x = jnp.asarray(rng.integers(0, V, (2, 5)))
        y = jnp.asarray([[1, IGNORE_LABEL], [2, 3]])
        s_len, t_len = jnp.array([3, 1]), jnp.array([1, 2])
        side = {"source_lengths": s_len, "lengths": t_len}
        v = _noisy(params, jnp.float64, seed=5)
        custom = jbp.as_custom_vjp(model)

        def cost(p):
            return CE.value(model.apply(p, x, side=side), y)

        @jit
        def run(params):
            def one(p, x_i, y_i, s_i, t_i):
                one_side = {"source_lengths": s_i[None], "lengths": t_i[None]}
                return jax.grad(lambda q: CE.value(model.apply(q, x_i[None], side=one_side),
                                                   y_i[None]))(p)

            return ((jax.grad(lambda p: CE.value(custom(p, x, side=side), y))(params),
                     jax.grad(cost)(params)),
                    (jbp.per_example_grads(model, CE)(params, x, y, side=side),
                     jax.vmap(one, in_axes=(None, 0, 0, 0, 0))(params, x, y, s_len, t_len)),
                    (jbp.hvp(model, CE)(params, x, y, v, side=side),
                     jax.jvp(jax.grad(cost), (params,), (v,))[1]))

        for got, want in run(params):
            assert rel_err(got, want) <= 1e-10
        jbp.save_model(tmp_path / "translator.npz", model, params)
        loaded, loaded_params, _ = jbp.load_model(tmp_path / "translator.npz")
        assert loaded == model
        assert rel_err(loaded_params, params) == 0


def test_bad_input_is_named():
    layer = cross_attention(1, 2, 3)
    with pytest.raises(ValueError, match=r"cross_attention\(1, 2, 3\): expects a per-example "
                                         r"shape \(S \+ T, \.\.\.\) with the source's S = 3"):
        layer.init(jax.random.key(0), (3, 4))
    params = layer.init(jax.random.key(0), (5, 4))[1]
    with pytest.raises(ValueError, match=r"expected input of shape \(B, S \+ T, d_model\)"):
        layer.apply(params, jnp.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=r"cross_attention\(1, 2, 3\): expected input of shape "
                                         r"\(B, S \+ T, d_model\) .*d_model = 4.*got \(2, 5, 6\)"):
        layer.apply(params, jnp.ones((2, 5, 6)))
    with pytest.raises(ValueError, match=r"'source_lengths' must lie in \[1, T\] = \[1, 3\]"):
        layer.apply(params, jnp.ones((2, 5, 4)), side={"source_lengths": jnp.array([1, 4])})
    with pytest.raises(ValueError, match="on_target.*must keep the features"):
        on_target(jbp.dense(3), 2).init(jax.random.key(0), (4, 5))
    with pytest.raises(ValueError, match=r"encoder_decoder.*the encoder gives \(2, 3\)"):
        encoder_decoder(jbp.dense(3), jbp.dense(4), jbp.dense(4), 2).init(
            jax.random.key(0), (5, 2))
    with pytest.raises(TypeError, match="encoder_decoder: decoder must be a Layer"):
        encoder_decoder(jbp.dense(3), jbp.dense(3), "decoder", 2)
