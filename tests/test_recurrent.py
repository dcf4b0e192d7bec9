"""rnn, gru, lstm and bidirectional: the hand-written BPTT against jax.vjp of the layers' own
forwards over every option, the forwards and the per-step ∂C/∂h_t against a reference
written from the documented equations, small sequence models against jax.grad, central
differences and vmap(grad), the custom_vjp bridge to second order, and bad input.

Compiles of scans dominate the run time: shapes are tiny, and each test compiles once
(many layers in one jitted function).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jbp
from conftest import cast, rel_err, rtol
from jbp.layers.recurrent import bptt_deltas
from reference_models import assert_three_witnesses_agree, random_params

CE, MSE = jbp.losses.softmax_cross_entropy, jbp.losses.mean_squared_error
LAST = {"return_sequences": False}
LEARNED = {"initial_state": "learned"}
REVERSE = {"reverse": True}

# (id, layer, (B, T, F)): every option on every cell (a bidirectional layer's second run is
# its layer with reverse=True), options combined; T = 1 and B = 1.
CASES = [
    ("rnn", jbp.rnn(3), (3, 4, 3)),
    ("rnn-reverse-last-learned", jbp.rnn(2, **REVERSE, **LAST, **LEARNED), (2, 5, 2)),
    ("gru-reverse-learned", jbp.gru(4, **REVERSE, **LEARNED), (3, 4, 3)),
    ("lstm-last-learned", jbp.lstm(3, **LAST, **LEARNED), (3, 4, 3)),
    ("bidirectional-lstm-learned", jbp.bidirectional(jbp.lstm(2, **LEARNED)), (2, 4, 3)),
    ("bidirectional-gru-last", jbp.bidirectional(jbp.gru(3, **LAST)), (3, 3, 2)),
    ("gru-T1-B1-learned", jbp.gru(2, **LEARNED), (1, 1, 3)),
    ("lstm-T1-B1-reverse-last", jbp.lstm(3, **REVERSE, **LAST), (1, 1, 2)),
]


def _data(layer, shape, dtype, seed=0):
    """Random params (nonzero biases and initial states), an input and a cotangent."""
    rng = np.random.default_rng(seed)
    out_shape, params = random_params(layer, shape[1:], rng, dtype)
    x = jnp.asarray(rng.normal(size=shape), dtype)
    dy = jnp.asarray(rng.normal(size=(shape[0], *out_shape)), dtype)
    return params, x, dy


FLOAT32 = {"rnn", "gru-reverse-learned", "lstm-last-learned", "bidirectional-gru-last"}


def _backward_and_vjp(layers, datas):
    pairs = []
    for layer, (params, x, dy) in zip(layers, datas):
        _, cache, _ = layer.forward(params, x)
        _, vjp = jax.vjp(layer.apply, params, x)
        pairs.append((layer.backward(params, cache, dy), vjp(dy)))
    return pairs


def test_backward_equals_vjp_over_every_option(dtype):
    """float64 ≤ 1e-12 on every case, float32 ≤ 1e-5 on the cases of ``FLOAT32`` (normwise
    relative, per leaf), with gradients in the params' and the input's dtypes; one compile."""
    cases = [c for c in CASES if dtype == jnp.float64 or c[0] in FLOAT32]
    datas = [_data(layer, shape, dtype, seed) for seed, (_, layer, shape) in enumerate(cases)]
    layers = tuple(layer for _, layer, _ in cases)
    results = jax.jit(_backward_and_vjp, static_argnums=0)(layers, datas)
    for (name, _, _), (params, x, _), (manual, reference) in zip(cases, datas, results):
        (dparams, dx) = manual
        assert jax.tree_util.tree_structure(dparams) == jax.tree_util.tree_structure(params)
        assert all(g.dtype == dtype for g in jax.tree_util.tree_leaves(dparams)), name
        assert dx.shape == x.shape and dx.dtype == dtype, name
        assert rel_err(manual, reference) <= rtol(dtype), name


def test_check_layer():
    """jbp.check_layer on one layer with every option, in float64 (random, zero and large
    inputs, a batch of one; examples kept apart; the per-example rule's gradients, norms
    and sums of squares against jax.vjp with one example's cotangent)."""
    layer = jbp.rnn(2, **REVERSE, **LAST, **LEARNED)
    report = jbp.check_layer(layer, (3, 2), batch=3, dtypes=("float64",))
    assert report.ok, str(report)


# ---------------------------------------------------------------------------- ∂C/∂h_t

def reference_forward(kind, options, params, x, offsets):
    """The documented equations, one Python step at a time, with ``offsets[:, t]`` added to
    every h_t as it is made (so ∂/∂offsets is the total ∂C/∂h_t)."""
    B, T, _ = x.shape
    H = offsets.shape[-1]
    learned = options.get("initial_state") == "learned"
    h = jnp.broadcast_to(params["h0"], (B, H)) if learned else jnp.zeros((B, H), x.dtype)
    c = jnp.broadcast_to(params["c0"], (B, H)) if learned and kind == "lstm" else 0 * h
    sig = jax.nn.sigmoid

    def block(k):  # gate k's pre-activation parts: x_t W_xk + b_k and the matrix W_hk
        return (x[:, t] @ params["W_x"][:, k * H:(k + 1) * H] + params["b"][k * H:(k + 1) * H],
                params["W_h"][:, k * H:(k + 1) * H])

    def pre(k):
        zx, W_hk = block(k)
        return zx + h @ W_hk

    ys = {}
    for t in (reversed(range(T)) if options.get("reverse") else range(T)):
        if kind == "rnn":
            h = jnp.tanh(pre(0))
        elif kind == "gru":
            r, u = sig(pre(0)), sig(pre(1))
            zx_n, W_hn = block(2)
            n = jnp.tanh(zx_n + r * (h @ W_hn + params["b_hn"]))
            h = (1 - u) * n + u * h
        else:
            i, f, g, o = sig(pre(0)), sig(pre(1)), jnp.tanh(pre(2)), sig(pre(3))
            c = f * c + i * g
            h = o * jnp.tanh(c)
        h = h + offsets[:, t]
        ys[t] = h
    return jnp.stack([ys[t] for t in range(T)], axis=1) if options.get(
        "return_sequences", True) else h


DELTA_CASES = [("rnn", {**REVERSE, **LEARNED}), ("gru", {**REVERSE, **LAST}),
               ("lstm", {**LEARNED, **LAST})]


def test_forward_and_bptt_deltas_equal_the_equations_and_grad_wrt_every_h_t():
    """The layers compute the documented equations (GRU: reset after the recurrent matmul),
    and bptt_deltas = ∂C/∂h_t by jax.grad with a zero offset added to every h_t (C = Σ y·dy)."""
    with jax.enable_x64(True):
        datas = []
        for seed, (kind, options) in enumerate(DELTA_CASES):
            layer = getattr(jbp, kind)(3, **options)
            datas.append(_data(layer, (2, 4, 3), jnp.float64, seed))

        @jax.jit
        def run(datas):
            out = []
            for (kind, options), (params, x, dy) in zip(DELTA_CASES, datas):
                layer = getattr(jbp, kind)(3, **options)
                y, cache, _ = layer.forward(params, x)
                zero = jnp.zeros((2, 4, 3))
                want_y = reference_forward(kind, options, params, x, zero)
                want = jax.grad(lambda o: jnp.sum(
                    reference_forward(kind, options, params, x, o) * dy))(zero)
                out.append(((y, bptt_deltas(layer, params, cache, dy)), (want_y, want)))
            return out

        for (kind, options), (got, want) in zip(DELTA_CASES, run(datas)):
            assert rel_err(got, want) <= 1e-12, (kind, options)


def test_vanishing_gradients_rnn_against_lstm():
    """The lecture's point, measured with bptt_deltas: ‖∂C/∂h_t‖ of a loss on the last of 12
    steps, relative to step T−2 (both reached through W_h), shrinks geometrically back in
    time through a tanh RNN with a contracting W_h (to ~1e-8 at t = 0), but not through an
    LSTM with the same W_h whose forget gate is open (bias 5): its c carries ∂C/∂c back
    multiplied only by f ≈ 0.99 per step."""
    T = 12
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, T, 3)), jnp.float32)
    layers = (jbp.rnn(4, **LAST), jbp.lstm(4, **LAST))

    @jax.jit
    def norms(key):
        out = []
        for layer in layers:
            p = layer.init(key, (T, 3))[1]
            p["W_h"] = p["W_h"] * 0.3                            # a contracting recurrence
            if layer == layers[1]:
                p["b"] = p["b"].at[4:8].set(5.0)                 # the forget gate wide open
            y, cache, _ = layer.forward(p, x)
            dh = bptt_deltas(layer, p, cache, jnp.ones_like(y))
            out.append(jnp.linalg.norm(dh, axis=(0, 2)))
        return out

    rnn_norms, lstm_norms = norms(jax.random.key(0))
    assert rnn_norms[0] < 1e-6 * rnn_norms[-2]
    assert lstm_norms[0] > 0.1 * lstm_norms[-2]


# ---------------------------------------------------------------------------- models

def _models():
    """Two small sequence models with random params, inputs and targets (float64)."""
    rng = np.random.default_rng(0)
    classifier = jbp.serial(jbp.embedding(5, 3), jbp.lstm(4, **LAST, **LEARNED), jbp.dense(3))
    _, p_c = random_params(classifier, (5,), rng, jnp.float64)
    ids, labels = jnp.asarray(rng.integers(0, 5, (3, 5))), jnp.asarray(rng.integers(0, 3, 3))
    tagger = jbp.serial(jbp.bidirectional(jbp.gru(2, **LEARNED)), jbp.dense(2))
    _, p_t = random_params(tagger, (4, 2), rng, jnp.float64)
    x, target = jnp.asarray(rng.normal(size=(3, 4, 2))), jnp.asarray(rng.normal(size=(3, 4, 2)))
    return (classifier, CE, p_c, ids, labels), (tagger, MSE, p_t, x, target)


def test_lstm_classifier_manual_equals_autodiff_equals_finite_differences():
    """embedding → lstm (last step) → dense: backprop == jax.grad (≤ 1e-12) == central
    differences (≤ 1e-6), in float64; the lstm's delta is ∂C/∂(its last h)."""
    with jax.enable_x64(True):
        model, loss, params, x, y = _models()[0]
        deltas = assert_three_witnesses_agree(model, loss, params, x, y)
        assert [d.shape for d in deltas] == [(3, 5, 3), (3, 4), (3, 3)]


def test_per_example_grads_and_norms_equal_vmap_grad():
    """Both models: manual_value_and_grad == autodiff_value_and_grad, and per_example_grads
    and per_example_grad_norms == jax.vmap(jax.grad) over single examples."""
    with jax.enable_x64(True):
        models = _models()

        @jax.jit
        def run(datas):
            out = []
            for (model, loss, *_), (params, x, y) in zip(models, datas):
                def loss_one(p, xi, yi):
                    return loss.value(model.apply(p, xi[None]), yi[None])

                want = jax.vmap(jax.grad(loss_one), in_axes=(None, 0, 0))(params, x, y)
                out.append(((jbp.manual_value_and_grad(model, loss)(params, x, y),
                             jbp.per_example_grads(model, loss)(params, x, y),
                             jbp.per_example_grad_norms(model, loss)(params, x, y)),
                            (jbp.autodiff_value_and_grad(model, loss)(params, x, y), want,
                             jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1)
                                          for g in jax.tree_util.tree_leaves(want))))))
            return out

        for (model, *_), (got, want) in zip(models, run([m[2:] for m in models])):
            assert rel_err(got, want) <= 1e-12, model.name


def test_custom_vjp_second_order():
    """as_custom_vjp of a gru with a learned initial state passes jax.test_util.check_grads
    in reverse mode to second order (the backward is jax.numpy and lax.scan, differentiable)."""
    with jax.enable_x64(True):
        layer = jbp.gru(2, **LEARNED, **REVERSE)
        params, x, _ = _data(layer, (2, 3, 2), jnp.float64)
        check_grads(jax.jit(jbp.as_custom_vjp(layer)), (params, x), order=2, modes=["rev"])


# ---------------------------------------------------------------------------- bad input

def test_bad_input_is_refused_naming_the_layer():
    for hidden in (0, -1, 2.5, True, "4"):
        with pytest.raises(ValueError, match=r"lstm: hidden must be a positive int"):
            jbp.lstm(hidden)
    with pytest.raises(ValueError, match=r"gru: initial_state must be one of \('zeros', "
                                         r"'learned'\), got 'ones'"):
        jbp.gru(3, initial_state="ones")
    with pytest.raises(TypeError, match=r"rnn: reverse must be a bool, got 'yes'"):
        jbp.rnn(3, reverse="yes")
    layer = jbp.gru(4, reverse=True)
    with pytest.raises(ValueError, match=r"gru\(4, reverse=True\): expects a per-example shape "
                                         r"\(time, features\), got \(3,\)"):
        layer.init(jax.random.key(0), (3,))
    with pytest.raises(ValueError, match=r"gru\(4, reverse=True\): in_shape must hold positive"):
        layer.init(jax.random.key(0), (0, 3))
    _, params = layer.init(jax.random.key(0), (5, 3))
    for shape in ((2, 3), (2, 5, 2), (2, 5, 3, 1)):
        with pytest.raises(ValueError, match=r"gru\(4, reverse=True\): expected input of shape "
                                             r"\(batch, time, 3\) \(3 features, as at init\), "
                                             r"got " + rf"\({', '.join(map(str, shape))}\)"):
            layer.apply(params, jnp.ones(shape))
    with pytest.raises(ValueError, match=r"gru\(4, reverse=True\): the input has no time steps"):
        layer.apply(params, jnp.ones((2, 0, 3)))
    with pytest.raises(TypeError, match=r"gru\(4, reverse=True\): input must be an array"):
        layer.apply(params, [[[1.0] * 3]])
    with pytest.raises(TypeError, match=r"params must be a dict with keys \['W_h', 'W_x', 'b', "
                                        r"'b_hn'\], got \['W', 'b'\]"):
        layer.apply({"W": 1, "b": 2}, jnp.ones((2, 5, 3)))
    with pytest.raises(ValueError, match=r"gru\(4, reverse=True\): expected params\['W_h'\] "
                                         r"shaped \(4, 12\), got \(4, 4\)"):
        layer.apply({**params, "W_h": params["W_h"][:, :4]}, jnp.ones((2, 5, 3)))
    with pytest.raises(TypeError, match=r"bidirectional: needs a recurrent layer \(jbp.rnn, "
                                        r"jbp.gru or jbp.lstm\), got dense\(3\)"):
        jbp.bidirectional(jbp.dense(3))
    with pytest.raises(ValueError, match=r"bidirectional: give the layer that runs forward"):
        jbp.bidirectional(layer)
    with pytest.raises(TypeError, match=r"bptt_deltas: needs a recurrent layer"):
        bptt_deltas(jbp.serial(jbp.dense(3)), {}, None, None)


def test_layers_are_values():
    assert jbp.lstm(4) == jbp.lstm(4) and hash(jbp.gru(3)) == hash(jbp.gru(3))
    assert jbp.rnn(4) != jbp.rnn(4, reverse=True)
    assert repr(jbp.gru(3, reverse=True, initial_state="learned")) == \
        "gru(3, initial_state='learned', reverse=True)"
    bi = jbp.bidirectional(jbp.lstm(2, return_sequences=False))
    assert repr(bi) == "bidirectional(lstm(2, return_sequences=False))"
    assert bi.name == "bidirectional(lstm(2, return_sequences=False))"
    assert [repr(child) for child in bi.layers] == [
        "lstm(2, return_sequences=False)", "lstm(2, reverse=True, return_sequences=False)"]
    assert bi == jbp.bidirectional(jbp.lstm(2, return_sequences=False))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
def test_half_precision_params(dtype):
    """The orthogonal W_h comes from a QR, which has no bfloat16/float16 kernel: it is drawn
    in float32 and cast (it was a NotImplementedError in init). The layers then run and train
    in that dtype, gradients in the params' dtype and, as a whole, near the float32 ones."""
    for make in (jbp.rnn, jbp.gru):
        _, params = make(4, dtype=dtype).init(jax.random.key(0), (5, 3))
        assert all(p.dtype == dtype for p in jax.tree_util.tree_leaves(params))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 3)), jnp.float32)
    model = jbp.serial(jbp.lstm(4, dtype=dtype, return_sequences=False), jbp.dense(2, dtype=dtype))
    _, params = model.init(jax.random.key(0), (5, 3))
    assert all(p.dtype == dtype for p in jax.tree_util.tree_leaves(params))
    w = np.asarray(params[0]["W_h"][:, :4], np.float32)  # the first gate's block: orthogonal
    np.testing.assert_allclose(w.T @ w, np.eye(4), atol=2e-2)
    grad = jax.jit(jbp.manual_value_and_grad(model, CE))
    y = jnp.array([0, 1])
    _, grads = grad(params, x.astype(dtype), y)
    _, ref = grad(cast(params, jnp.float32), x, y)
    assert all(g.dtype == dtype for g in jax.tree_util.tree_leaves(grads))
    flat, ref_flat = (np.concatenate([np.ravel(np.asarray(g, np.float64))
                                      for g in jax.tree_util.tree_leaves(t)]) for t in (grads, ref))
    assert np.linalg.norm(flat - ref_flat) <= 0.05 * np.linalg.norm(ref_flat)  # 8-bit mantissas
