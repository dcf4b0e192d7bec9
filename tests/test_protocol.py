"""The layer protocol as a JAX user meets it: composites with their own backward, gradient
dtypes, leading axes, keyword arguments, errors inside composites, models as values,
check_layer and per-example declarations of user layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp
from conftest import rel_err
from reference_models import black_box_sum, walked_sum

L = jbp.losses
CE, MSE = L.softmax_cross_entropy, L.mean_squared_error


def _data(n_in=4, batch=6, classes=3, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(batch, n_in)), dtype),
            jnp.asarray(rng.integers(0, classes, batch), jnp.int32))


@pytest.mark.parametrize("make", [black_box_sum, walked_sum], ids=["black-box", "walk"])
def test_a_composite_runs_its_own_backward(make):
    """Before: any layer with children was run as a serial chain (relative error 2.3)."""
    block = make(jbp.dense(3), jbp.serial(jbp.dense(3), jbp.tanh()))
    model = jbp.serial(block, jbp.relu(), jbp.dense(3))
    _, params = model.init(jax.random.key(0), (4,))
    x, y = _data()

    @jax.jit
    def both(params):  # the composite inside a serial and as the model itself
        return [(jbp.backprop(top, loss, p, x, target),
                 jbp.autodiff_value_and_grad(top, loss)(p, x, target))
                for top, loss, p, target in ((model, CE, params, y),
                                             (block, MSE, params[0], jnp.ones((6, 3))))]

    for (value, grads, _), (auto_value, auto) in both(params):
        assert value == auto_value and rel_err(grads, auto) <= 1e-5
    _, _, deltas = jax.eval_shape(lambda p: jbp.backprop(model, CE, p, x, y), params)
    assert [d.shape for d in deltas] == [(6, 3), (6, 3), (6, 3)]


def test_walked_composite_takes_part_in_per_example_functions():
    block = walked_sum(jbp.dense(3), jbp.serial(jbp.dense(3), jbp.tanh()))
    assert jbp.check_layer(block, (4,)).ok
    with pytest.raises(ValueError, match=r"per_example_grads: layer sum: this layer declares no "
                                         r"per-example behaviour"):
        x, y = _data()
        model = jbp.serial(black_box_sum(jbp.dense(3), jbp.dense(3)), jbp.dense(3))
        jbp.per_example_grads(model, CE)(model.init(jax.random.key(0), (4,))[1], x, y)


def test_gradients_have_the_params_dtype():
    """float32 params with float64 inputs, bfloat16 params with float32 inputs: the grads come
    back in the params' dtype (as jax.grad gives them) and equal jax.grad's."""
    model = jbp.mlp([4, 8, 3], "tanh")
    with jax.enable_x64(True):
        _, params = model.init(jax.random.key(0), (4,))
        x, y = _data(dtype=jnp.float64)
        for p, tol in ((params, 1e-6), (jbp_cast(params, jnp.bfloat16), 2e-2)):
            x_in = x if p is params else x.astype(jnp.float32)
            manual = jax.jit(jbp.manual_value_and_grad(model, CE))(p, x_in, y)[1]
            auto = jax.jit(jbp.autodiff_value_and_grad(model, CE))(p, x_in, y)[1]
            assert jax.tree_util.tree_map(lambda g: g.dtype, manual) == jax.tree_util.tree_map(
                lambda g: g.dtype, p)
            assert rel_err(manual, auto) <= tol


def jbp_cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), tree)


def test_fit_manual_on_float64_numpy_data():
    """Before: the float64 manual grads broke lax.scan's carry; now both gradients train alike."""
    model = jbp.mlp([4, 8, 3], "tanh")
    _, params = model.init(jax.random.key(0), (4,))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)), rng.integers(0, 3, 64)
    with jax.enable_x64(True):
        runs = [jbp.fit(model, CE, params, (x, y), key=jax.random.key(1), epochs=2,
                        batch_size=16, grad=g, progress=False)[0] for g in ("manual", "autodiff")]
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(runs[0]))
    assert rel_err(runs[0], runs[1]) <= 1e-5


def test_custom_vjp_takes_integer_images():
    """Raw uint8 pixels: the bridge's cotangent for an integer input is float0."""
    model = jbp.serial(jbp.flatten(), jbp.dense(3))
    _, params = model.init(jax.random.key(0), (2, 2))
    pixels = jnp.asarray(np.random.default_rng(0).integers(0, 256, (5, 2, 2)), jnp.uint8)
    apply = jbp.as_custom_vjp(model)
    grads = jax.grad(lambda p: jnp.sum(apply(p, pixels) ** 2))(params)
    want = jax.grad(lambda p: jnp.sum(model.apply(p, pixels) ** 2))(params)
    assert rel_err(grads, want) <= 1e-6


def test_leading_axes_and_single_examples():
    """dense on (B, T, in) sums its gradients over B and T; a single example (no batch axis)
    works, so jax.vmap over examples equals the batched call."""
    model = jbp.serial(jbp.dense(5), jbp.gelu(), jbp.dense(2))
    _, params = model.init(jax.random.key(0), (4,))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 7, 4)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(3, 7, 2)), jnp.float32)

    @jax.jit
    def witnesses(params):
        one_by_one = jax.vmap(jax.grad(lambda p, xi, ti: MSE.value(model.apply(p, xi[None]),
                                                                   ti[None])),
                              in_axes=(None, 0, 0))(params, x, target)
        return (jbp.manual_value_and_grad(model, MSE)(params, x, target),
                jbp.autodiff_value_and_grad(model, MSE)(params, x, target),
                jbp.per_example_grads(model, MSE)(params, x, target), one_by_one,
                jax.vmap(lambda xi: model.apply(params, xi))(x[:, 0]), model.apply(params, x[:, 0]))

    manual, auto, per_example, want, single, batched = witnesses(params)
    assert rel_err(manual, auto) <= 1e-5
    assert rel_err(per_example, want) <= 1e-5
    np.testing.assert_allclose(single, batched, rtol=1e-6)


def test_unknown_keywords_are_rejected():
    """Before: training=True (a typo for train) silently ran in evaluation mode."""
    model = jbp.serial(jbp.dense(3), jbp.dropout(0.5))
    _, params = model.init(jax.random.key(0), (4,))
    x, y = _data(classes=3)
    calls = [lambda: model.apply(params, x, key=jax.random.key(1), training=True),
             lambda: model.forward(params, x, training=True),
             lambda: jbp.manual_value_and_grad(model, CE)(params, x, y, training=True),
             lambda: jbp.autodiff_value_and_grad(model, CE)(params, x, y, training=True),
             lambda: jbp.per_example_grads(model, CE)(params, x, y, training=True)]
    for call in calls:
        with pytest.raises(TypeError, match="unexpected keyword argument 'training'"):
            call()


def test_errors_inside_serial_keep_their_type_and_gain_a_note():
    class Oops(Exception):
        pass

    def forward(params, x, *, key=None, train=False):
        raise Oops("from inside")

    broken = jbp.Layer("broken", lambda k, s: (s, {}), forward, lambda p, c, dy: ({}, dy))
    model = jbp.serial(jbp.dense(3), jbp.serial(jbp.relu(), broken))
    _, params = model.init(jax.random.key(0), (4,))
    with pytest.raises(Oops) as err:
        model.apply(params, jnp.ones((2, 4)))
    assert err.value.__notes__ == [
        "in the forward of layer 1 (broken) of serial(relu, broken)",
        "in the forward of layer 1 (serial(relu, broken)) of serial(dense(3), serial(relu, broken))"]
    # a traced train= under jit: answered at the model's boundary, naming the model
    dropout = jbp.serial(jbp.dense(3), jbp.dropout(0.5))
    _, params = dropout.init(jax.random.key(0), (4,))
    with pytest.raises(TypeError, match=r"^serial\(dense\(3\), dropout\(0.5\)\): train must be "
                                        r"a Python bool.*static_argnames='train'"):
        jax.jit(lambda p, t: dropout.apply(p, jnp.ones((2, 4)), key=jax.random.key(0), train=t))(
            params, True)


def test_models_are_values():
    a, b = jbp.mlp([4, 8, 3]), jbp.mlp([4, 8, 3])
    assert a == b and hash(a) == hash(b) and a != jbp.mlp([4, 8, 3], "tanh")
    assert repr(jbp.mlp([4, 8, 3], "tanh")) == "mlp([4, 8, 3], activation='tanh')"
    assert repr(jbp.serial(jbp.dense(3, gain=2.0), jbp.dropout(0.2))) == \
        "serial(dense(3, gain=2.0), dropout(0.2))"
    _, params = a.init(jax.random.key(0), (4,))
    traces = []

    def apply(model, params, x):
        traces.append(1)
        return model.apply(params, x)

    as_static = jax.jit(apply, static_argnums=0)
    as_argument = jax.jit(apply)  # a Layer is a pytree without leaves
    x = jnp.ones((2, 4))
    for f in (as_static, as_argument):
        np.testing.assert_array_equal(f(a, params, x), f(b, params, x))
    assert len(traces) == 2  # one compile each: the equal model b reused a's
    optimizer = jbp.train.make_optimizer("adam")
    assert jbp.train.compiled(a, CE, "manual", optimizer) is jbp.train.compiled(b, CE, "manual",
                                                                                optimizer)


def test_mlp_initialisation_follows_the_activation():
    """He normal (std √2/√in) for ReLU, LeCun (1/√in) for tanh; the output layer LeCun."""
    for activation, gain in (("relu", np.sqrt(2)), ("tanh", 1.0), ("gelu", np.sqrt(2))):
        _, params = jbp.mlp([400, 300, 200], activation).init(jax.random.key(0), (400,))
        assert abs(np.std(params[0]["W"]) * np.sqrt(400) / gain - 1) < 0.02, activation
        assert abs(np.std(params[2]["W"]) * np.sqrt(300) - 1) < 0.03, activation


def _scale(per_example=None, forget_sum=False):
    def backward(params, x, dy):
        ds = x * dy if forget_sum else jnp.sum(x * dy, axis=0)
        return {"s": ds}, dy * params["s"]

    return jbp.Layer("scale", lambda k, s: (s, {"s": jnp.ones(s)}),
                     lambda p, x, *, key=None, train=False: (x * p["s"], x), backward,
                     per_example=per_example)


def test_check_layer_finds_what_is_wrong():
    good = _scale(jbp.PerExampleRule(lambda p, x, d: {"s": x * d}))
    assert jbp.check_layer(good, (3,)).ok
    forgot = jbp.check_layer(_scale(forget_sum=True), (3,))
    assert not forgot.ok and "a backward must sum over the batch" in str(forgot)
    wrong_rule = jbp.check_layer(_scale(jbp.PerExampleRule(lambda p, x, d: {"s": 2 * x * d})), (3,))
    assert [c.name for c in wrong_rule.failures] == [
        f"{d} {case}: per-example declaration" for d in ("float64", "float32")
        for case in ("random", "random params")]
    double = jbp.Layer("double", lambda k, s: (s, {}),
                       lambda p, x, *, key=None, train=False: (x, None),
                       lambda p, c, dy: ({}, 2 * dy))
    assert len(jbp.check_layer(double, (3,)).failures) == 10  # every case, both dtypes
    # 1e-4 off: float32's second look (against float64, where jax.vjp of an identity is
    # exact) does not excuse it
    nearly = jbp.Layer("nearly", lambda k, s: (s, {}),
                       lambda p, x, *, key=None, train=False: (x, None),
                       lambda p, c, dy: ({}, (1 + 1e-4) * dy))
    failures = jbp.check_layer(nearly, (3,)).failures
    assert len(failures) == 10 and "against float64 1.0e-04, jax.vjp's own 0.0e+00" in str(failures[-1])
    # and the gradient functions refuse the forgotten sum, naming the layer
    model = jbp.serial(jbp.dense(3), _scale(forget_sum=True), jbp.dense(2))
    _, params = model.init(jax.random.key(0), (4,))
    x, y = _data(classes=2)
    with pytest.raises(ValueError, match=r"scale: backward: dparams\['s'\] has shape \(6, 3\), "
                                         r"expected \(3,\); a backward must sum over the batch"):
        jbp.manual_value_and_grad(model, CE)(params, x, y)


def test_user_layer_per_example_rule_and_curvature_errors():
    scale = _scale(jbp.PerExampleRule(lambda p, x, d: {"s": x * d}))
    model = jbp.serial(jbp.dense(3), scale, jbp.tanh(), jbp.dense(2))
    _, params = model.init(jax.random.key(0), (4,))
    x, y = _data(classes=2)
    got, want = jax.jit(lambda p: (jbp.per_example_grads(model, CE)(p, x, y), jax.vmap(
        jax.grad(lambda p, xi, yi: CE.value(model.apply(p, xi[None]), yi[None])),
        in_axes=(None, 0, 0))(p, x, y)))(params)
    assert rel_err(got, want) <= 1e-5
    undeclared = jbp.serial(jbp.dense(3), _scale(), jbp.dense(2))
    with pytest.raises(ValueError, match=r"^ggn_diagonal: layer scale: .*ggn_diagonal needs every "
                                         r"layer to declare Layer.per_example"):
        jbp.ggn_diagonal(undeclared, CE)(undeclared.init(jax.random.key(0), (4,))[1], x, y)


# ---------------------------------------------------------------------------- check_layer's edges

def _scale_shift(slip=False):
    """docs/custom_layers.md's layer; ``slip``: its backward forgets the × s of dx."""

    def backward(params, x, dy):
        dx = dy if slip else dy * params["s"]
        return {"s": jnp.sum(x * dy, axis=0), "t": jnp.sum(dy, axis=0)}, dx

    return jbp.Layer("scale_shift", lambda k, s: (s, {"s": jnp.ones(s), "t": jnp.zeros(s)}),
                     lambda p, x, *, key=None, train=False: (x * p["s"] + p["t"], x), backward)


def _swish(slip=False):
    """y = x·sigmoid(β x) with a learnable β (starts at 1); ``slip``: dx forgets β."""

    def forward(params, x, *, key=None, train=False):
        return x * jax.nn.sigmoid(params["beta"] * x), x

    def backward(params, x, dy):
        beta = params["beta"]
        s = jax.nn.sigmoid(beta * x)
        ds = s * (1 - s)  # ∂sigmoid/∂(βx)
        dx = dy * (s + x * (1 if slip else beta) * ds)
        return {"beta": jnp.sum(dy * x * x * ds, axis=0)}, dx

    return jbp.Layer("swish", lambda k, s: (s, {"beta": jnp.ones(s)}), forward, backward)


@pytest.mark.parametrize("make", [_scale_shift, _swish], ids=["scale_shift", "swish"])
def test_check_layer_checks_at_random_params(make):
    """A slip that init's params hide (a scale of 1) fails at the random params, in both
    dtypes, with the wrong leaf named; the correct layer passes."""
    assert jbp.check_layer(make(), (3,)).ok
    report = jbp.check_layer(make(slip=True), (3,))
    assert [c.name for c in report.failures] == ["float64 random params: backward vs jax.vjp",
                                                 "float32 random params: backward vs jax.vjp"]
    for check in report.failures:
        assert check.comparison.first_disagreement.path == "['dx']"
        assert "['dx']" in str(report)
    # params= from the user: at s = 2 every case sees the slip (the batch of one too)
    params = {"s": jnp.full((3,), 2.0), "t": jnp.zeros(3)}
    if make is _scale_shift:
        failed = jbp.check_layer(make(slip=True), (3,), params=params).failures
        assert len(failed) == 10 and all("backward vs jax.vjp" in c.name for c in failed)
        wrong = jbp.check_layer(make(), (3,), params={"s": jnp.ones(4), "t": jnp.zeros(4)})
        assert [c.name for c in wrong.failures] == ["float64: the given params"]
        assert "params['s'] has shape (4,), expected (3,)" in str(wrong)


def test_check_layer_reports_a_backward_that_calls_autodiff():
    """The protocol forbids autodiff in a backward; a correct gradient taken by jax.vjp or by
    jax.linear_transpose passes every comparison, and fails this check, in both dtypes."""

    def forward(params, x, *, key=None, train=False):
        return x * params["s"], x

    def by_vjp(params, x, dy):
        return jax.vjp(lambda p, x_: forward(p, x_)[0], params, x)[1](dy)

    def by_transpose(params, x, dy):
        dx = jax.linear_transpose(lambda x_: x_ * params["s"], x)(dy)[0]
        return {"s": jnp.sum(x * dy, axis=0)}, dx

    for backward, what in ((by_vjp, "a linearization"), (by_transpose, "a transposition")):
        layer = jbp.Layer("s", lambda k, s: (s, {"s": jnp.ones(s)}), forward, backward)
        report = jbp.check_layer(layer, (3,))
        assert [c.name for c in report.failures] == ["float64: backward without autodiff",
                                                     "float32: backward without autodiff"]
        assert what in report.failures[0].detail


def test_compare_grads_judges_a_zero_gradient_leaf_against_the_whole_gradient():
    """Rounding noise in a leaf whose exact gradient is 0 passes; an error of 1e-3 there, or
    of 1e-4 relative in an ordinary leaf, fails (float32's rtol 1e-5)."""
    rng = np.random.default_rng(0)
    ref = {"W": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.zeros(4)}
    noise = {"W": ref["W"] * (1 + 1e-7), "b": jnp.asarray([1e-8, -1e-8, 3e-9, 0], jnp.float32)}
    got = jbp.compare_grads(noise, ref)
    assert got.ok and got.leaves[1].floored and "*" in str(got)
    assert not jbp.compare_grads({**noise, "b": noise["b"] + 1e-3}, ref).ok
    assert not jbp.compare_grads({**noise, "W": ref["W"] * (1 + 1e-4)}, ref).ok
    assert not jbp.compare_grads({**noise, "b": noise["b"].at[0].set(jnp.nan)}, ref).ok


def test_check_layer_a_zero_gradient_leaf_passes_and_an_error_in_it_fails():
    """The conv bias right before batch_norm (training mode) has a zero gradient, rounding
    noise in both paths; check_layer passes it and fails a backward 1e-3 off there."""
    conv = jbp.conv(4, 3)

    def off(params, a, delta):
        grads, da = conv.backward(params, a, delta)
        return {**grads, "b": grads["b"] + 1e-3}, da

    assert jbp.check_layer(jbp.serial(conv, jbp.batch_norm()), (8, 2), train=True).ok
    report = jbp.check_layer(jbp.serial(conv.replace(backward=off), jbp.batch_norm()), (8, 2),
                             train=True)
    # every float64 case; in float32 at least the random ones (at zeros the batch statistics
    # divide by √eps, and float32's own noise in that leaf nears 1e-4 of the floor)
    failed = {c.name.split(":")[0] for c in report.failures}
    assert failed >= {"float64 random", "float64 zeros", "float64 large", "float64 random params",
                      "float32 random", "float32 random params"}
    assert all(c.comparison.first_disagreement.path == "['dparams'][0]['b']"
               for c in report.failures)
    # what users write before a batch norm: no bias at all
    for layer, shape in ((jbp.dense(4, use_bias=False), (2,)),
                         (jbp.conv(4, 3, use_bias=False), (8, 2))):
        assert set(layer.init(jax.random.key(0), shape)[1]) == {"W"}
    assert jbp.check_layer(jbp.dense(4, use_bias=False), (2,)).ok  # the per-example rules too
    assert jbp.check_layer(jbp.conv(8, 3, use_bias=False), (3, 4)).ok  # (its Gram path)
    assert jbp.check_layer(jbp.serial(jbp.conv(4, 3, use_bias=False), jbp.batch_norm()), (8, 2),
                           train=True).ok


def test_ordinary_calls_give_no_jax_warning_and_an_impossible_dtype_is_an_error():
    """NumPy float64 input with float32 params (the default of np.random) runs without JAX's
    "requested dtype float64 ... truncated" warning through apply and both gradients; a
    float64 model without x64 is an error that says how to enable it, not silent float32."""
    import warnings

    rng = np.random.default_rng(0)
    models = [(jbp.serial(jbp.conv(3, 3), jbp.gelu(), jbp.max_pool(2), jbp.flatten(),
                          jbp.dense(4), jbp.elu(), jbp.maxout(2), jbp.softplus()), (8, 2)),
              (jbp.serial(jbp.attention(2, 2), jbp.gru(3)), (5, 2))]
    for model, shape in models:
        out, params = model.init(jax.random.key(0), shape)
        x, y = rng.normal(size=(2, *shape)), rng.normal(size=(2, *out))
        with warnings.catch_warnings():  # the warning comes while tracing: no need to compile
            warnings.simplefilter("error")
            jax.eval_shape(lambda p: model.apply(p, x), params)  # x: NumPy, as a user holds it
            for grad in (jbp.manual_value_and_grad, jbp.autodiff_value_and_grad):
                jax.eval_shape(lambda p: grad(model, MSE)(p, x, y), params)
    with pytest.raises(ValueError, match=r"dense\(3\): dtype float64 needs JAX's 64-bit mode.*"
                                         r"jax.config.update\('jax_enable_x64', True\)"):
        jbp.dense(3, dtype=jnp.float64).init(jax.random.key(0), (4,))
    with jax.enable_x64(True):
        assert jbp.dense(3, dtype=jnp.float64).init(jax.random.key(0), (4,))[1]["W"].dtype == \
            jnp.float64
