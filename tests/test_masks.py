"""Side inputs for padded sequences (jbp.masks): attention masks and recurrent lengths.

The property users need, padding invariance: a padded batch gives every real position the
output, and the params the gradient, of running each sequence alone at its own length, and
what the padding holds changes nothing. Beside it, the hand-written backward with masks ==
jax.vjp of the same forward (float64 ≤ 1e-12, float32 ≤ 1e-5) == central differences, the
attention output == jax.nn.dot_product_attention with the same mask, every function built
on the backward takes ``side``, and bad side inputs are refused naming the layer.

Shapes are tiny and each jitted function is shared: compiles are the cost.
"""

import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import jbp
from conftest import default_compile, jit, load_script, rel_err, rtol
from jbp.losses import IGNORE_LABEL

CE = jbp.losses.softmax_cross_entropy
HEADS, HEAD_DIM, D, T, BLOCK = 2, 3, 5, 10, 4  # T not a multiple of the block


def _noisy(params, dtype, seed=0):
    """Init's params plus N(0, 0.3²) noise on every leaf (zero biases would hide a bias
    gradient), in ``dtype``."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    return tree.unflatten([jnp.asarray(np.asarray(a) + 0.3 * rng.normal(size=a.shape), dtype)
                           for a in leaves])


def _params(layer, in_shape, dtype):
    return _noisy(layer.init(jax.random.key(0), in_shape)[1], dtype)


# ---------------------------------------------------------------------------- attention

def _attention_sides(b, t):
    rng = np.random.default_rng(1)
    key_mask = rng.random((b, t)) < 0.6
    key_mask[1] = False  # every key of example 1 masked: all its rows are empty
    attention_mask = rng.random((b, HEADS, t, t)) < 0.5
    attention_mask[0, 1, 3] = False  # one empty row
    return {  # name: (causal, side)
        "lengths-causal": (True, {"lengths": jnp.array([t, 3, 1, 7])}),
        "key-mask": (False, {"key_mask": jnp.asarray(key_mask)}),
        "mask-and-lengths-causal": (True, {"attention_mask": jnp.asarray(attention_mask),
                                           "lengths": jnp.array([t, 1, 6, 9])}),
    }


@jit
def _attention_derivatives(layer, params, x, dy, side):
    y, cache, _ = layer.forward(params, x, side=side)
    manual = layer.backward(params, cache, dy)
    own = jax.vjp(lambda p, x_: layer.apply(p, x_, side=side), params, x)[1](dy)
    return y, cache, manual, own


def _reference_attention(params, x, side, causal, softmax):
    """The mask built in full, ``softmax(q, k, v, mask) -> (B, T, H, Dh)`` over it; rows
    without a key: 0."""
    b, t, _ = x.shape
    mask = jnp.ones((b, 1, t, t), bool)
    if "lengths" in side:
        mask &= (jnp.arange(t) < side["lengths"][:, None])[:, None, None, :]
    if "key_mask" in side:
        mask &= side["key_mask"][:, None, None, :]
    if "attention_mask" in side:
        mask &= side["attention_mask"]
    if causal:
        mask &= jnp.tril(jnp.ones((t, t), bool))

    def project(name):
        a = x @ params[name]["W"] + params[name].get("b", 0)
        return a.reshape(b, t, HEADS, HEAD_DIM)                            # (B, T, H, Dh)

    o = softmax(project("q"), project("k"), project("v"), jnp.broadcast_to(mask, (b, HEADS, t, t)))
    o = jnp.where(jnp.any(mask, -1).transpose(0, 2, 1)[..., None], o, 0)   # (B, T, H, ·)
    return o.reshape(b, t, -1) @ params["o"]["W"] + params["o"]["b"]


def _plain_softmax(q, k, v, mask):
    """The textbook masked attention: full scores, −∞ where masked, jax.nn.softmax."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", jnp.where(mask, p, 0), v)


def _jax_nn(q, k, v, mask):
    """jax.nn.dot_product_attention, whose XLA path takes its softmax in float32."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


@pytest.mark.parametrize("case", ["lengths-causal", "key-mask", "mask-and-lengths-causal"])
def test_masked_attention_backward_equals_vjp(case, dtype):
    """Blocks of 4 over T = 10, B = 4: the output == a plain masked softmax attention and
    jax.nn.dot_product_attention (≤ 1e-5: its softmax is float32) with the same mask (rows
    with no key: 0, not NaN); (dparams, dx) == jax.vjp of the forward."""
    causal, side = _attention_sides(4, T)[case]
    layer = jbp.attention(HEADS, HEAD_DIM, causal=causal, block_size=BLOCK, dtype=dtype)
    params = _params(layer, (T, D), dtype)
    rng = np.random.default_rng(2)
    x, dy = (jnp.asarray(rng.normal(size=(4, T, D)), dtype) for _ in range(2))
    y, cache, manual, own = _attention_derivatives(layer, params, x, dy, side)
    assert not np.isnan(np.asarray(y)).any()
    assert rel_err(y, _reference_attention(params, x, side, causal, _plain_softmax)) \
        <= 10 * rtol(dtype)
    assert rel_err(y, _reference_attention(params, x, side, causal, _jax_nn)) <= 1e-5
    assert rel_err(manual, own) <= rtol(dtype)
    empty = np.asarray(cache.l == 0)                                       # (B, H, T)
    assert empty.any() == (case != "lengths-causal")
    if case == "key-mask":  # example 1 has no real key: nothing reaches its input
        assert not np.asarray(manual[1][1]).any()


def test_masked_attention_central_differences():
    """float64: the manual gradient of a masked, causal attention == central differences."""
    with jax.enable_x64(True):
        causal, side = _attention_sides(4, T)["mask-and-lengths-causal"]
        layer = jbp.attention(HEADS, HEAD_DIM, causal=causal, block_size=BLOCK,
                              dtype=jnp.float64)
        params = _params(layer, (T, D), jnp.float64)
        rng = np.random.default_rng(3)
        x, y = (jnp.asarray(rng.normal(size=(4, T, D))) for _ in range(2))
        mse = jbp.losses.mean_squared_error
        manual = jit(jbp.manual_value_and_grad(layer, mse))(params, x, y, side=side)[1]
        numeric = jit(jbp.numerical_value_and_grad(layer, mse))(params, x, y, side=side)[1]
        assert rel_err(manual, numeric) <= 1e-7


def test_a_padding_mask_forms_no_t_by_t_array():
    """With lengths, no array of the manual gradient's jaxpr (scan bodies included) has two
    axes of length T: the mask is cut into key blocks with the keys."""
    t = 7
    layer = jbp.attention(HEADS, HEAD_DIM, causal=True, block_size=2)
    params = layer.init(jax.random.key(0), (t, D))[1]
    x = jnp.ones((1, t, D))

    def shapes(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (v.aval.shape for v in eqn.outvars)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from shapes(sub)

    grad = jbp.manual_value_and_grad(layer, jbp.losses.mean_squared_error)
    jaxpr = jax.make_jaxpr(lambda p, a, n: grad(p, a, a, side={"lengths": n}))(
        params, x, jnp.array([4])).jaxpr
    assert [s for s in shapes(jaxpr) if list(s).count(t) >= 2] == []


# ---------------------------------------------------------------------------- padding invariance

def _language_model(dtype):
    return jbp.serial(jbp.embedding(6, 4, dtype=dtype), jbp.positional_embedding(8, dtype=dtype),
                      jbp.transformer_block(4, 2, 2, 6, causal=True, block_size=2, dtype=dtype),
                      jbp.dense(6, dtype=dtype))


def _classifier(make, dtype):
    return jbp.serial(jbp.bidirectional(make(3, return_sequences=False, dtype=dtype)),
                      jbp.dense(2, dtype=dtype))


def _tagger(make, dtype):
    return jbp.serial(make(3, reverse=True, initial_state="learned", dtype=dtype),
                      jbp.dense(2, dtype=dtype))


@jit
def _both_gradients(model, params, x, y, side):
    """``((C, grads) manual, (C, grads) autodiff, the model's output)``."""
    return (jbp.manual_value_and_grad(model, CE)(params, x, y, side=side),
            jbp.autodiff_value_and_grad(model, CE)(params, x, y, side=side),
            model.apply(params, x, side=side))


@jit
def _alone(model, params, x, y):
    """One example, no padding: its outputs, loss, gradient and loss weight."""
    value, grads = jbp.autodiff_value_and_grad(model, CE)(params, x, y)
    out = model.apply(params, x)
    return out, value, grads, CE.weights(out, y)


def _check_padding_invariance(model, params, x, y, lengths, garbage):
    """The padded batch (manual and autodiff, float64) against each sequence alone, and
    against the same batch with ``garbage`` in its padding."""
    side = {"lengths": jnp.asarray(lengths)}
    (value, grads), (auto_value, auto), out = _both_gradients(model, params, x, y, side)
    assert abs(value - auto_value) <= 1e-12 * abs(auto_value)
    assert rel_err(grads, auto) <= 1e-12
    # C = Σ_i w_i ℓ_i / Σ_i w_i, with ℓ_i and w_i from example i run alone at its length
    sequences = y.ndim == 2
    alone = [_alone(model, params, x[i:i + 1, :n], y[i:i + 1, :n] if sequences else y[i:i + 1])
             for i, n in enumerate(lengths)]
    w = np.array([float(a[3][0]) for a in alone])
    want_value = sum(wi * float(a[1]) for wi, a in zip(w, alone)) / w.sum()
    want = jax.tree_util.tree_map(lambda *g: sum(wi * gi for wi, gi in zip(w, g)) / w.sum(),
                                  *[a[2] for a in alone])
    assert abs(float(value) - want_value) <= 1e-12 * abs(want_value)
    assert rel_err(grads, want) <= 1e-10
    for i, (n, a) in enumerate(zip(lengths, alone)):
        real = out[i, :n] if sequences else out[i]
        assert rel_err(real, a[0][0]) <= 1e-12
    # whatever the padding holds: the same outputs at the real positions, loss, gradients
    padded = np.arange(x.shape[1])[None, :] >= np.asarray(lengths)[:, None]
    x2 = jnp.where(padded.reshape(padded.shape + (1,) * (x.ndim - 2)), garbage, x)
    (value2, grads2), _, _ = _both_gradients(model, params, x2, y, side)
    assert abs(value2 - value) <= 1e-12 * abs(value)
    assert rel_err(grads2, grads) <= 1e-12


def test_a_padded_language_model_equals_each_sequence_alone():
    """embedding → positions → causal transformer block → dense on ids padded to T = 5
    (blocks of 2), labels padded with IGNORE_LABEL: lengths 5 and 1."""
    with jax.enable_x64(True):
        model = _language_model(jnp.float64)
        params = _params(model, (5,), jnp.float64)
        rng = np.random.default_rng(4)
        lengths = [5, 1]
        ids, _ = jbp.data.pad_sequences([rng.integers(0, 6, n) for n in lengths])
        labels, _ = jbp.data.pad_sequences([rng.integers(0, 6, n) for n in lengths],
                                           value=IGNORE_LABEL)
        _check_padding_invariance(model, params, jnp.asarray(ids), jnp.asarray(labels),
                                  lengths, garbage=5)


@pytest.mark.parametrize("make", [jbp.gru, jbp.lstm], ids=["gru", "lstm"])
def test_padded_recurrent_layers_equal_each_sequence_alone(make):
    """A bidirectional classifier (the state at each example's last real step, and the
    reversed run from it), and for the LSTM a reversed tagger with a learned initial state,
    on features padded to T = 6, lengths 6 and 1; 1e4 in the padding changes nothing. (The
    masking is the scan's, one code for every cell: a cell with one state and one with two
    stand for the three; each is checked against jax.grad with lengths below.)"""
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        lengths = [6, 1]
        x, _ = jbp.data.pad_sequences([rng.normal(size=(n, 2)) for n in lengths])
        cases = [(_classifier(make, jnp.float64), np.array([0, 1]))]
        if make is jbp.lstm:  # two states through the padding, run in reverse from a learned start
            cases.append((_tagger(make, jnp.float64), jbp.data.pad_sequences(
                [rng.integers(0, 2, n) for n in lengths], value=IGNORE_LABEL)[0]))
        for model, y in cases:
            params = _params(model, (6, 2), jnp.float64)
            _check_padding_invariance(model, params, jnp.asarray(x), jnp.asarray(y), lengths,
                                      garbage=1e4)


def test_recurrent_lengths_float32_and_central_differences():
    """float32 manual == autodiff ≤ 1e-5 for each cell with lengths (and, under jit, with
    lengths outside [1, T]); float64 manual == central differences for the bidirectional
    GRU classifier; outputs past a length are 0."""
    rng = np.random.default_rng(6)
    lengths = jnp.array([5, 2, 1, 4])
    x = rng.normal(size=(4, 5, 2))
    y = jnp.array([0, 1, 1, 0])
    for make in (jbp.rnn, jbp.gru, jbp.lstm):
        model = _classifier(make, jnp.float32)
        params = _params(model, (5, 2), jnp.float32)
        (_, manual), (_, auto), _ = _both_gradients(model, params, jnp.asarray(x, jnp.float32), y,
                                                 {"lengths": lengths})
        assert rel_err(manual, auto) <= 1e-5
    # under jit lengths cannot be checked: 0 (all padding) and T + 4 (none) give the same
    # in both paths, as jbp.masks documents
    (value, manual), (auto_value, auto), _ = _both_gradients(
        model, params, jnp.asarray(x, jnp.float32), y, {"lengths": jnp.array([0, 9, 1, 5])})
    assert np.isfinite(value) and abs(value - auto_value) <= 1e-6 * abs(auto_value)
    assert rel_err(manual, auto) <= 1e-5
    tagger = _tagger(jbp.gru, jnp.float32)
    out = tagger.layers[0].apply(_params(tagger, (5, 2), jnp.float32)[0],
                                 jnp.asarray(x, jnp.float32), side={"lengths": lengths})
    assert not np.asarray(out)[np.arange(5)[None, :] >= np.asarray(lengths)[:, None]].any()
    with jax.enable_x64(True):
        model = _classifier(jbp.gru, jnp.float64)
        params = _params(model, (5, 2), jnp.float64)
        side = {"lengths": lengths}
        manual = jit(jbp.manual_value_and_grad(model, CE))(params, x, y, side=side)[1]
        numeric = jit(jbp.numerical_value_and_grad(model, CE))(params, x, y, side=side)[1]
        assert rel_err(manual, numeric) <= 1e-7


# ---------------------------------------------------------------------------- the functions built on the backward

def test_every_gradient_function_takes_side_inputs():
    """float64, the GRU classifier with lengths: per-example gradients == vmap of jax.grad
    on each example with its own length; hvp == jax.jvp of jax.grad; ggn_diagonal ==
    diag(Jᵀ H J) from jax.jacrev; jax.grad through as_custom_vjp == jax.grad;
    data_parallel_value_and_grad on a one-device mesh == the plain gradient."""
    with jax.enable_x64(True):
        model = _classifier(jbp.gru, jnp.float64)
        params = _params(model, (5, 2), jnp.float64)
        rng = np.random.default_rng(7)
        x, y = jnp.asarray(rng.normal(size=(4, 5, 2))), jnp.array([0, 1, 1, 0])
        lengths = jnp.array([5, 2, 1, 4])
        side = {"lengths": lengths}
        v = _noisy(params, jnp.float64, seed=8)
        custom = jbp.as_custom_vjp(model)
        mesh = jbp.data_mesh(jax.devices()[:1])

        def cost(p):
            return CE.value(model.apply(p, x, side=side), y)

        @jit
        def run(params):
            def one(p, x_i, y_i, n_i):
                return jax.grad(lambda q: CE.value(
                    model.apply(q, x_i[None], side={"lengths": n_i[None]}), y_i[None]))(p)

            out = model.apply(params, x, side=side)
            jac = jax.jacrev(lambda p: model.apply(p, x, side=side))(params)     # (B, C, ...)
            h_out = jax.hessian(lambda o: CE.value(o, y))(out)                 # (B, C, B, C)
            flat = jnp.concatenate([j.reshape(*out.shape, -1)
                                    for j in jax.tree_util.tree_leaves(jac)], axis=-1)
            ggn = jnp.einsum("bcp,bcde,dep->p", flat, h_out, flat)
            return ((jbp.per_example_grads(model, CE)(params, x, y, side=side),
                     jax.vmap(one, in_axes=(None, 0, 0, 0))(params, x, y, lengths)),
                    (jbp.hvp(model, CE)(params, x, y, v, side=side),
                     jax.jvp(jax.grad(cost), (params,), (v,))[1]),
                    (jax.flatten_util.ravel_pytree(
                        jbp.ggn_diagonal(model, CE)(params, x, y, side=side))[0], ggn),
                    (jax.grad(lambda p: CE.value(custom(p, x, side=side), y))(params),
                     jax.grad(cost)(params)),
                    (jbp.data_parallel_value_and_grad(model, CE, mesh)(params, x, y,
                                                                      side=side)[1],
                     jax.grad(cost)(params)))

        for got, want in run(params):
            assert rel_err(got, want) <= 1e-10


# ---------------------------------------------------------------------------- bad input

def test_bad_side_inputs_are_refused_naming_the_layer():
    gru = jbp.gru(3)
    model = jbp.serial(jbp.dense(2), gru)
    params = model.init(jax.random.key(0), (4, 2))[1]
    x = jnp.ones((2, 4, 2))
    attend = jbp.attention(1, 2)
    a_params = attend.init(jax.random.key(0), (4, 2))[1]
    cases = [
        (model, params, {"lengths": jnp.array([1, 2, 3])}, ValueError, r"gru\(3\).*\(2,\)"),
        (model, params, {"lengths": jnp.array([1.0, 2.0])}, ValueError, r"gru\(3\).*integers"),
        (model, params, {"lengths": jnp.array([0, 2])}, ValueError, r"gru\(3\).*\[1, 4\]"),
        (model, params, {"lengths": jnp.array([2, 5])}, ValueError, r"\[1, 4\].*2 to 5"),
        (model, params, {"length": jnp.array([2, 2])}, ValueError, "unknown side input 'length'"),
        (model, params, {"key_mask": jnp.ones((2, 4), bool)}, ValueError,
         r"'key_mask' was given, but its layers read only \['lengths'\]"),
        (model, params, [1, 2], TypeError, "side must be a dict"),
        (jbp.dense(2), jbp.dense(2).init(jax.random.key(0), (2,))[1],
         {"lengths": jnp.array([1, 1])}, ValueError, "none of its layers reads a side input"),
        (attend, a_params, {"key_mask": jnp.ones((2, 4))}, ValueError,
         r"attention\(1, 2\).*'key_mask' must be a \(2, 4\) bool"),
        (attend, a_params, {"attention_mask": jnp.ones((2, 4, 3), bool)}, ValueError,
         r"'attention_mask' must be a bool array of shape \(2, 4, 4\)"),
        (attend, a_params, {"lengths": "3"}, TypeError, "'lengths' must be an array"),
        (attend, a_params, {"source_lengths": jnp.array([1, 2])}, ValueError,
         r"'source_lengths' was given, but its layers read only \['attention_mask', "
         r"'key_mask', 'lengths'\]"),
    ]
    for layer, p, side, error, message in cases:
        with pytest.raises(error, match=message):
            layer.apply(p, x, side=side)
    with pytest.raises(TypeError, match="side_inputs must be a tuple of names"):
        jbp.Layer("mine", attend.init, attend.forward, attend.backward, side_inputs=("mask",))


def test_pad_sequences():
    x, lengths = jbp.data.pad_sequences([np.ones((2, 3)), 2 * np.ones((1, 3))], length=4,
                                        value=-1.0)
    assert x.shape == (2, 4, 3) and lengths.tolist() == [2, 1]
    assert (x[1, 0] == 2).all() and (x[1, 1:] == -1).all() and (x[0, :2] == 1).all()
    for bad, message in (([], "non-empty list"), ([np.ones(2), np.ones((2, 1))], "shaped"),
                         ([np.ones(2), np.ones(0)], "at least one step")):
        with pytest.raises(ValueError, match=message):
            jbp.data.pad_sequences(bad)
    with pytest.raises(ValueError, match="length must be an int ≥ the longest sequence"):
        jbp.data.pad_sequences([np.ones(3)], length=2)


def test_fit_batches_the_side_inputs_with_the_rows():
    """fit on (x, y, {"lengths": ...}): one SGD step on the whole data == params − lr · the
    manual gradient with lengths; the evaluation before it == the loss with lengths; garbage
    in the padding trains the same params; side rows that do not match are refused."""
    with jax.enable_x64(True):
        model = jbp.serial(jbp.gru(3, return_sequences=False, dtype=jnp.float64),
                           jbp.dense(2, dtype=jnp.float64))
        params = _params(model, (5, 2), jnp.float64)
        rng = np.random.default_rng(9)
        lengths = np.array([5, 2, 1, 4])
        x = np.where(np.arange(5)[None, :, None] < lengths[:, None, None],
                     rng.normal(size=(4, 5, 2)), 1e4)
        y = np.array([0, 1, 1, 0])
        side = {"lengths": lengths}

        def fit(x):
            return jbp.fit(model, CE, params, (x, y, side), key=jax.random.key(0), steps=1,
                           batch_size=4, optimizer="sgd", learning_rate=0.5, progress=False, loop="python",
                           eval_data=(x, y, side))

        trained, history = fit(x)
        value, grads = jit(jbp.manual_value_and_grad(model, CE))(
            params, jnp.asarray(x), y, side={"lengths": jnp.asarray(lengths)})
        want = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, params, grads)
        assert rel_err(trained, want) <= 1e-12
        assert abs(history["eval"][0]["test_loss"] - float(value)) <= 1e-12 * float(value)
        assert rel_err(fit(np.where(x == 1e4, -3.0, x))[0], trained) <= 1e-12
        with pytest.raises(ValueError, match=r"side input 'lengths' of data has shape \(3,\)"):
            jbp.fit(model, CE, params, (x, y, {"lengths": lengths[:3]}), key=jax.random.key(0))


def test_a_padding_mask_keeps_the_memory_advantage():
    """XLA's compiled temporary memory at T = 2048 (B 4, 4 heads of 64, blocks of 128; what
    experiments/attention_memory.py --padding measures; compiled, not run): the manual
    gradient with a padding mask needs within 10% of the unmasked one's, and at most 1/8
    of jax.grad through a plain attention masked the same way."""
    gradients = load_script("attention_memory").gradients
    t, b, heads, head_dim = 2048, 4, 4, 64
    layer = jbp.attention(heads, head_dim, block_size=128)
    params = jax.eval_shape(lambda k: layer.init(k, (t, heads * head_dim))[1], jax.random.key(0))
    x = jax.ShapeDtypeStruct((b, t, heads * head_dim), jnp.float32)
    lengths = jax.ShapeDtypeStruct((b,), jnp.int32)
    fns = gradients(layer, heads, causal=False)

    def temp(name, lengths):
        with default_compile():
            compiled = jax.jit(fns[name]).lower(params, x, x, lengths).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    masked, unmasked = temp("manual", lengths), temp("manual", None)
    assert abs(masked - unmasked) <= 0.1 * unmasked, (masked, unmasked)
    assert masked <= temp("plain", lengths) / 8
