"""attention, positional_embedding, transformer_block: the blocked backward against jax.vjp
of the layer's own forward and of a plain softmax attention written here, central
differences, a small language model through every gradient function, the custom_vjp bridge
at order 2, no (T, T) array in the traced program, and bad input.

Compiles dominate the run time: shapes are tiny and each jitted function is shared.
"""

import functools
import math
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jbp
from conftest import cast, default_compile, rel_err, rtol
from jbp.check_layer import ROUNDING_FACTOR

CE, MSE = jbp.losses.softmax_cross_entropy, jbp.losses.mean_squared_error
# Each jitted function here runs once on tiny arrays: compiling it is nearly all the time,
# and XLA's backend optimisation (LLVM) is about half of that. Level 0 halves the suite's time.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
HEADS, HEAD_DIM, D_MODEL = 2, 3, 5


def plain_attention(params, x, heads, causal):
    """The textbook attention: the full (B, H, T, T) scores and jax.nn.softmax over them."""
    b, t, _ = x.shape

    def project(name):
        a = x @ params[name]["W"] + params[name].get("b", 0)
        return a.reshape(b, t, heads, -1).transpose(0, 2, 1, 3)           # (B, H, T, Dh)

    q, k, v = project("q"), project("k"), project("v")
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
    if causal:
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    o = jax.nn.softmax(s, axis=-1) @ v
    return o.transpose(0, 2, 1, 3).reshape(b, t, -1) @ params["o"]["W"] + params["o"]["b"]


def _random_params(layer, in_shape, dtype, rng):
    """Params drawn by numpy (nonzero biases: init's zeros would hide a forgotten one)."""
    shapes = jax.eval_shape(lambda k: layer.init(k, in_shape)[1], jax.random.key(0))
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(size=s.shape) / math.sqrt(s.shape[0]), dtype), shapes)


@jit
def _three_derivatives(layer, params, x, dy):
    """Forward values and (dparams, dx) by the hand-written backward, by jax.vjp of the
    layer's forward and by jax.vjp of the plain attention."""
    heads, causal = layer.spec.key[1][0][1], dict(layer.spec.key[1])["causal"]
    y, cache, _ = layer.forward(params, x)
    manual = layer.backward(params, cache, dy)
    own = jax.vjp(layer.apply, params, x)[1](dy)
    y_plain, vjp_plain = jax.vjp(lambda p, x_: plain_attention(p, x_, heads, causal), params, x)
    return (y, y_plain), manual, own, vjp_plain(dy)


CASES = {  # name: (causal, T, block_size, batch); the non-causal blocked path with padding is
    # also checked by central differences below and against plain attention in float32 by
    # test_experiments' run of attention_memory.py --quick (T = 20 in blocks of 8)
    "causal-T7-blocks-of-3-batch-1": (True, 7, 3, 1),  # padding; the diagonal inside blocks
    "T3-block-of-4": (False, 3, 4, 2),                  # T smaller than a block: one block
}


@pytest.mark.parametrize("case", list(CASES))
def test_backward_equals_vjp_of_own_forward_and_of_plain_attention(case, dtype):
    causal, t, block, batch = CASES[case]
    layer = jbp.attention(HEADS, HEAD_DIM, causal=causal, block_size=block, dtype=dtype)
    rng = np.random.default_rng(0)
    params = _random_params(layer, (t, D_MODEL), dtype, rng)
    x = jnp.asarray(rng.normal(size=(batch, t, D_MODEL)), dtype)
    dy = jnp.asarray(rng.normal(size=(batch, t, D_MODEL)), dtype)
    (y, y_plain), manual, own, plain = _three_derivatives(layer, params, x, dy)
    assert y.shape == x.shape and y.dtype == dtype
    assert rel_err(y, y_plain) <= rtol(dtype)
    dparams, dx = manual
    assert dx.shape == x.shape and dx.dtype == dtype
    assert jax.tree_util.tree_map(lambda g: (g.shape, g.dtype), dparams) == \
        jax.tree_util.tree_map(lambda p: (p.shape, p.dtype), params)
    assert rel_err(manual, own) <= rtol(dtype)
    assert rel_err(manual, plain) <= rtol(dtype)


@pytest.mark.parametrize("t, block", [(8, 4), (9, 4), (12, 3)])
def test_causal_schedule_visits_only_the_pairs_below_the_diagonal(t, block):
    """Causal attention with T > block scans the n(n+1)/2 (query block, key block) pairs at
    or below the diagonal, forward and backward, and equals jax.vjp of plain causal softmax
    attention in float64: T a multiple of the block and not, with a key mask."""
    from jbp.layers.attention import attention_core, attention_core_backward
    n = -(-t // block)
    with jax.enable_x64(True):
        rng = np.random.default_rng(t)
        q, k, v, do = (jnp.asarray(rng.normal(size=(2, 2, t, 4))) for _ in range(4))
        key_mask = jnp.asarray(rng.random((2, t)) > 0.3).at[:, 0].set(True)
        keep = jnp.tril(jnp.ones((t, t), bool)) & key_mask[:, None, None, :]

        def plain(q, k, v):
            s = jnp.where(keep, q @ jnp.swapaxes(k, -1, -2) / 2.0, -jnp.inf)
            return jax.nn.softmax(s, axis=-1) @ v

        def core(q, k, v):
            return attention_core(q, k, v, causal=True, block=block, key_mask=key_mask)

        def backward(q, k, v, do):
            return attention_core_backward(q, k, v, *core(q, k, v), do, causal=True, block=block,
                                           key_mask=key_mask)

        for fun, args in ((core, (q, k, v)), (backward, (q, k, v, do))):
            lengths = [e.params["length"] for e in jax.make_jaxpr(fun)(*args).eqns
                       if e.primitive.name == "scan"]
            assert lengths[-1] == n * (n + 1) // 2, lengths
        o_plain, vjp = jax.vjp(plain, q, k, v)
        assert rel_err(jit(core)(q, k, v)[0], o_plain) <= 1e-12
        assert rel_err(jit(backward)(q, k, v, do), vjp(do)) <= 1e-12


def test_check_layer_with_a_saturated_softmax():
    """check_layer passes the non-causal layer (2 heads of 4, T 20 in blocks of 8, the last
    padded) in every case. With inputs × 30 the softmax saturates, and in float32 jax.vjp
    itself can be more than 1e-5 from the exact gradient (how much depends on the CPU's
    kernels). Whichever branch check_layer takes there, this backward is within its
    documented bound: each leaf, against float64 from the same rounded inputs, within
    float32's 1e-5 or within ROUNDING_FACTOR × jax.vjp's own error. The limit of this (of any
    ``D = rowsum(do ∘ o)``) backward is in jbp/layers/attention.py."""
    layer = jbp.attention(2, 4, block_size=8)
    report = jbp.check_layer(layer, (20, 6))
    assert report.ok, str(report)
    _, params = layer.init(jax.random.key(1), (20, 6))
    rng = np.random.default_rng(1)
    x = jnp.asarray(30 * rng.normal(size=(4, 20, 6)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(4, 20, 6)), jnp.float32)

    def manual_and_vjp(params, x, dy):
        y, cache, _ = layer.forward(params, x)
        vjp = jax.vjp(lambda p, x_: layer.forward(p, x_)[0], params, x)[1]
        return layer.backward(params, cache, dy), vjp(dy)

    manual, vjp32 = jit(manual_and_vjp)(params, x, dy)
    with jax.enable_x64(True):
        _, exact = jit(manual_and_vjp)(*cast((params, x, dy), jnp.float64))
    mine, theirs = (jbp.compare_grads(g, exact, rtol=1e-5) for g in (manual, vjp32))
    for m, t in zip(mine.leaves, theirs.leaves):
        assert m.rel <= max(1e-5, ROUNDING_FACTOR * t.rel), (m.path, m.rel, t.rel)


def test_a_single_key_gives_exactly_zero_query_and_key_gradients():
    """T = 1 (and every row that sees one key) has a one-hot softmax, whose Jacobian is zero:
    the q and k gradients are exactly zero, as jax.grad's of the plain softmax attention are,
    not rounding noise. float32, one head of 1 feature and 4 causal heads of 8, compiled at
    XLA's default optimisation (its fusions are what made the noise): configurations that
    gave ~1e-8 before the one-hot rule."""
    for heads, head_dim, d, causal in ((1, 1, 3, False), (4, 8, 16, True)):
        layer = jbp.attention(heads, head_dim, causal=causal)
        _, params = layer.init(jax.random.key(0), (1, d))
        rng = np.random.default_rng(heads)
        x, y = (jnp.asarray(rng.normal(size=(2, 1, d)), jnp.float32) for _ in range(2))
        with default_compile():
            manual = jax.jit(jbp.manual_value_and_grad(layer, MSE))(params, x, y)[1]
            plain = jax.jit(jax.grad(lambda p: MSE.value(plain_attention(p, x, heads, causal),
                                                         y)))(params)
        for name in "qk":
            for leaf, want in zip(jax.tree_util.tree_leaves(manual[name]),
                                  jax.tree_util.tree_leaves(plain[name])):
                assert not np.any(np.asarray(want)), name
                assert not np.any(np.asarray(leaf)), (name, heads)


def test_central_differences():
    """float64, non-causal, T = 3 in blocks of 2 (one padded): the hand-written gradient
    equals jax.grad of the layer's forward (≤ 1e-12), and its directional derivative
    ⟨∇C, u⟩ the central difference (C(θ + hu) − C(θ − hu))/2h along random directions u of
    (params, x) together (≤ 1e-8 relative)."""
    with jax.enable_x64(True):
        layer = jbp.attention(2, 2, block_size=2, dtype=jnp.float64)
        rng = np.random.default_rng(1)
        params = _random_params(layer, (3, 4), jnp.float64, rng)
        x, target = (jnp.asarray(rng.normal(size=(2, 3, 4))) for _ in range(2))
        directions = [jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape)),
                                             (params, x)) for _ in range(3)]

        def cost(theta):
            return MSE.value(layer.apply(*theta), target)

        @jit
        def run(theta, directions):
            y, cache, _ = layer.forward(*theta)
            dparams, dx = layer.backward(theta[0], cache, MSE.grad(y, target))
            manual = [sum(jnp.vdot(g, u) for g, u in zip(jax.tree_util.tree_leaves((dparams, dx)),
                                                         jax.tree_util.tree_leaves(d)))
                      for d in directions]
            h = 1e-5

            def step(d, sign):
                return jax.tree_util.tree_map(lambda a, u: a + sign * h * u, theta, d)

            central = [(cost(step(d, 1)) - cost(step(d, -1))) / (2 * h) for d in directions]
            return (dparams, dx), jax.grad(cost)(theta), jnp.stack(manual), jnp.stack(central)

        grads, auto, manual, central = run((params, x), directions)
        assert rel_err(grads, auto) <= 1e-12
        np.testing.assert_allclose(manual, central, rtol=1e-8)
        assert np.all(np.abs(manual) > 1e-3)  # directions that see the gradient


def test_no_t_by_t_array_in_the_traced_gradient():
    """With T = 7 and blocks of 2, no array in the jaxpr of the manual gradient (scan bodies
    included) has two axes of length T: the probabilities live as (B, H, T, 2) blocks. The
    jax.grad of the plain attention, for contrast, has them."""
    t = 7
    layer = jbp.attention(HEADS, HEAD_DIM, block_size=2)
    rng = np.random.default_rng(0)
    params = _random_params(layer, (t, D_MODEL), jnp.float32, rng)
    x = jnp.asarray(rng.normal(size=(1, t, D_MODEL)), jnp.float32)

    def shapes(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (v.aval.shape for v in eqn.outvars)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from shapes(sub)

    def square(fun):
        jaxpr = jax.make_jaxpr(fun)(params, x, x).jaxpr
        return [s for s in shapes(jaxpr) if list(s).count(t) >= 2]

    assert square(jbp.manual_value_and_grad(layer, MSE)) == []
    plain = jax.value_and_grad(lambda p, x_, y: MSE.value(plain_attention(p, x_, HEADS, False), y))
    assert square(plain)


# ---------------------------------------------------------------------------- a small model

VOCAB, T, MAX_LEN, BLOCK = 6, 5, 8, 2


def _language_model(dtype):
    return jbp.serial(jbp.embedding(VOCAB, 4, dtype=dtype),
                      jbp.positional_embedding(MAX_LEN, dtype=dtype),
                      jbp.transformer_block(4, 2, 2, 6, causal=True, block_size=BLOCK, dtype=dtype),
                      jbp.dense(VOCAB, dtype=dtype))


def test_language_model_through_every_gradient_function():
    """embedding → positional → transformer_block (causal, T = 5 in blocks of 2) → dense, in
    float64: backprop == jax.grad (loss and grads ≤ 1e-12); the delta backprop reports for
    each layer == jax.grad of the loss with respect to that layer's output; per-example
    gradients and norms == vmap(grad)."""
    with jax.enable_x64(True):
        model = _language_model(jnp.float64)
        rng = np.random.default_rng(0)
        params = _random_params(model, (T,), jnp.float64, rng)
        ids = jnp.asarray(rng.integers(0, VOCAB, (2, T)), jnp.int32)
        labels = jnp.asarray(rng.integers(0, VOCAB, (2, T)), jnp.int32)

        def cost(params, shifts):
            """The loss, with ``shifts[i]`` (zeros) added to layer i's output: ∂C/∂shifts[i]
            is ∂C/∂(layer i's output), the delta backprop reports for layer i."""
            h = ids
            for layer, p, shift in zip(model.layers, params, shifts):
                h = layer.apply(p, h) + shift
            return CE.value(h, labels)

        outs = [(2, T, 4)] * 3 + [(2, T, VOCAB)]
        shifts = [jnp.zeros(shape) for shape in outs]

        @jit
        def run(params):
            return (jbp.backprop(model, CE, params, ids, labels),
                    jax.value_and_grad(cost, argnums=(0, 1))(params, shifts),
                    jbp.per_example_grads(model, CE)(params, ids, labels),
                    jbp.per_example_grad_norms(model, CE)(params, ids, labels),
                    jax.vmap(jax.grad(lambda p, i, y: CE.value(model.apply(p, i[None]), y[None])),
                             in_axes=(None, 0, 0))(params, ids, labels))

        (value, grads, deltas), (auto_value, (auto, want)), per_example, norms, ref = run(params)
        assert abs(value - auto_value) <= 1e-12 * abs(value)
        assert rel_err(grads, auto) <= 1e-12
        assert len(deltas) == len(want) == 4
        for got, expected in zip(deltas, want):
            assert rel_err(got, expected) <= 1e-12
        assert rel_err(per_example, ref) <= 1e-10
        flat = jnp.sqrt(sum(jnp.sum(g.reshape(2, -1) ** 2, axis=1)
                            for g in jax.tree_util.tree_leaves(ref)))
        assert rel_err(norms, flat) <= 1e-10


# ---------------------------------------------------------------------------- the bridge

def test_custom_vjp_check_grads_order_2():
    """jax.test_util.check_grads of as_custom_vjp(attention), reverse mode, to order 2: the
    second order differentiates the hand-written backward itself."""
    with jax.enable_x64(True):
        layer = jbp.attention(1, 2, causal=True, block_size=2, dtype=jnp.float64)
        rng = np.random.default_rng(2)
        params = _random_params(layer, (3, 2), jnp.float64, rng)
        x = jnp.asarray(rng.normal(size=(1, 3, 2)))
        apply = jax.jit(jbp.as_custom_vjp(layer))
        check_grads(apply, (params, x), order=2, modes=["rev"], eps=1e-5)


# ---------------------------------------------------------------------------- positions

def test_positional_embedding():
    """The sinusoidal table by hand; both kinds' backward equals jax.vjp; learned rows past T
    get zero gradient; the per-example rule pads each example's delta."""
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4)))
        dy = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 4)))
        sin = jbp.positional_embedding(5, "sinusoidal")
        assert sin.init(jax.random.key(0), (3, 4)) == ((3, 4), {})
        y, cache, _ = sin.forward({}, x)
        table = np.array([[0, 1, 0, 1], [np.sin(1), np.cos(1), np.sin(0.01), np.cos(0.01)],
                          [np.sin(2), np.cos(2), np.sin(0.02), np.cos(0.02)]])
        np.testing.assert_allclose(y - x, np.broadcast_to(table, x.shape), rtol=1e-15, atol=1e-15)
        assert sin.backward({}, cache, dy) == ({}, dy) and sin.per_example is jbp.EXAMPLEWISE
        odd = jbp.positional_embedding(3, "sinusoidal").apply({}, jnp.zeros((1, 2, 3)))
        np.testing.assert_allclose(odd[0, 1], [np.sin(1), np.cos(1), np.sin(1 / 10000 ** (2 / 3))])

        learned = jbp.positional_embedding(5)
        params = {"P": jnp.asarray(np.random.default_rng(2).normal(size=(5, 4)))}
        y, cache, _ = learned.forward(params, x)
        np.testing.assert_array_equal(y, x + params["P"][:3])
        dparams, dx = learned.backward(params, cache, dy)
        want = jax.vjp(learned.apply, params, x)[1](dy)
        assert rel_err((dparams, dx), want) == 0
        np.testing.assert_array_equal(dparams["P"][3:], 0)
        per_example = learned.per_example.grads(params, cache, dy)["P"]
        assert per_example.shape == (2, 5, 4)
        np.testing.assert_array_equal(per_example.sum(0), dparams["P"])


# ---------------------------------------------------------------------------- errors, values

def test_bad_input_is_refused_naming_the_layer():
    for name in ("heads", "head_dim", "block_size"):
        for bad in (0, -1, 1.5, True, None):
            args = {"heads": 2, "head_dim": 3, "block_size": 4, name: bad}
            with pytest.raises(ValueError, match=rf"^attention: {name} must be a positive int"):
                jbp.attention(args["heads"], args["head_dim"], block_size=args["block_size"])
    layer = jbp.attention(2, 3)
    params = _shapes(layer, (4, 5))  # shapes are all the checks look at
    for x in (jnp.ones((4, 5)), jnp.ones((2, 4, 5, 1)), jnp.ones((2, 4, 6))):
        with pytest.raises(ValueError, match=r"^attention\(2, 3\): expected input of shape "
                                             r"\(B, T, 5\) .*got " + re_shape(x)):
            layer.apply(params, x)
    with pytest.raises(ValueError, match=r"^attention\(2, 3\): expected at least one position, "
                                         r"got T = 0"):
        layer.apply(params, jnp.ones((2, 0, 5)))
    with pytest.raises(ValueError, match=r"^attention\(2, 3\): expects a per-example shape "
                                         r"\(T, d_model\), got \(5,\)"):
        layer.init(jax.random.key(0), (5,))
    with pytest.raises(ValueError, match=r"^attention\(3, 3\): expected params\['k'\]\['W'\] "
                                         r"shaped \(5, 9\), got \(5, 6\)"):
        jbp.attention(3, 3).apply(params, jnp.ones((2, 4, 5)))
    with pytest.raises(TypeError, match=r"^attention\(2, 3\): params must be a dict with keys"):
        layer.apply({"W": 1}, jnp.ones((2, 4, 5)))

    pos = jbp.positional_embedding(4)
    with pytest.raises(ValueError, match=r"^positional_embedding\(4, learned\): T = 5 positions "
                                         r"exceed max_len = 4"):
        pos.init(jax.random.key(0), (5, 3))
    p = _shapes(pos, (4, 3))
    for x, what in ((jnp.ones((1, 5, 3)), r"1 ≤ T ≤ max_len = 4 positions, got T = 5"),
                    (jnp.ones((1, 0, 3)), r"1 ≤ T ≤ max_len = 4 positions, got T = 0"),
                    (jnp.ones((1, 2, 2)), r"input of shape \(B, T, 3\), got \(1, 2, 2\)"),
                    (jnp.ones((2, 3)), r"input of shape \(B, T, 3\), got \(2, 3\)")):
        with pytest.raises(ValueError, match=r"^positional_embedding\(4, learned\): expected "
                                             + what):
            pos.apply(p, x)
    with pytest.raises(ValueError, match=r"^positional_embedding\(4, sinusoidal\): "
                                         r"expected 1 ≤ T"):
        jbp.positional_embedding(4, "sinusoidal").apply({}, jnp.ones((1, 5, 3)))
    for args, what in (((0,), "max_len must be a positive int"),
                       ((4, "rotary"), "kind must be one of")):
        with pytest.raises(ValueError, match=r"^positional_embedding: " + what):
            jbp.positional_embedding(*args)

    block = jbp.transformer_block(4, 2, 2, 6)
    bp = block.init(jax.random.key(0), (3, 4))[1]
    with pytest.raises(ValueError, match=r"^layer_norm: expected input of shape \(\.\.\., 4\) .*"
                                         r"got \(1, 3, 5\)\nin the forward of layer 0 \(layer_norm\)"):
        block.apply(bp, jnp.ones((1, 3, 5)))
    with pytest.raises(ValueError, match=r"^attention\(2, 2\): expected input of shape "
                                         r"\(B, T, 4\) .*got \(3, 4\)"):
        block.apply(bp, jnp.ones((3, 4)))
    with pytest.raises(ValueError, match=r"^transformer_block\(4, 2, 2, 6\): expects a per-example "
                                         r"shape \(T, 4\), got \(3, 5\)"):
        block.init(jax.random.key(0), (3, 5))
    with pytest.raises(ValueError, match=r"^attention: heads must be a positive int"):
        jbp.transformer_block(4, 0, 2, 6)
    with pytest.raises(ValueError, match=r"^transformer_block: mlp_hidden must be a positive int"):
        jbp.transformer_block(4, 2, 2, 0)
    with pytest.raises(ValueError, match=r"^transformer_block: d_model must be a positive int"):
        jbp.transformer_block(0, 2, 2, 6)


def _shapes(layer, in_shape):
    return jax.eval_shape(lambda k: layer.init(k, in_shape)[1], jax.random.key(0))


def re_shape(x):
    return re.escape(str(tuple(x.shape)))


def test_models_are_values():
    assert jbp.attention(2, 3, causal=True) == jbp.attention(2, 3, causal=True)
    assert jbp.attention(2, 3) != jbp.attention(2, 3, block_size=4)
    assert repr(jbp.attention(2, 3, causal=True)) == "attention(2, 3, causal=True)"
    assert jbp.transformer_block(4, 2, 2, 6) == jbp.transformer_block(4, 2, 2, 6)
    assert hash(jbp.positional_embedding(8)) == hash(jbp.positional_embedding(8))
