"""Bad input gets a clear error that names the layer or argument, what was expected and got."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp

CE = jbp.losses.softmax_cross_entropy


@pytest.fixture(scope="module")
def net():
    model = jbp.mlp([4, 8, 3], "relu")
    _, params = model.init(jax.random.key(0), (4,))
    return model, params


def test_init_wrong_per_example_shape(net):
    model, _ = net
    with pytest.raises(ValueError, match=r"mlp: built for per-example input shape \(4,\), got \(5,\)"):
        model.init(jax.random.key(0), (5,))
    with pytest.raises(ValueError, match=r"maxout\(2\): the last axis \(3 features\) must be "
                                         r"divisible by k=2\nin the init of layer 1 \(maxout\(2\)\)"):
        jbp.serial(jbp.dense(3), jbp.maxout(2)).init(jax.random.key(0), (4,))
    with pytest.raises(ValueError, match="divisible by k=3"):
        jbp.maxout(3).init(jax.random.key(0), (4,))
    with pytest.raises(TypeError, match="in_shape must be a tuple of ints"):
        jbp.dense(3).init(jax.random.key(0), 4)


@pytest.mark.parametrize("jit", [False, True])
def test_apply_wrong_input_shape(net, jit):
    model, params = net
    apply = jax.jit(model.apply) if jit else model.apply
    with pytest.raises(ValueError, match=r"dense\(8\): expected input of shape \(\.\.\., 4\) "
                                         r".*got \(2, 5\)\nin the forward of layer 0 \(dense\(8\)\)"):
        apply(params, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"got \(\)"):
        apply(params, jnp.ones(()))


def test_gradient_functions_check_input(net):
    model, params = net
    for make in (jbp.manual_value_and_grad, jbp.autodiff_value_and_grad):
        with pytest.raises(ValueError, match=r"expected input of shape \(\.\.\., 4\)"):
            jax.jit(make(model, CE))(params, jnp.ones((2, 3)), jnp.array([0, 1]))


def test_params_of_wrong_structure(net):
    model, params = net
    x = jnp.ones((2, 4))
    with pytest.raises(TypeError, match=r"one entry per layer \(3\), got tuple of length 2"):
        model.apply(params[:2], x)
    with pytest.raises(TypeError, match=r"^mlp\(.*\): params must be a tuple.*got dict"):
        model.apply({"W": 1}, x)
    bad = ({"W": params[0]["W"]},) + params[1:]
    with pytest.raises(TypeError, match=r"dense\(8\): params must be a dict with keys "
                                        r"\['W', 'b'\], got \['W'\]\nin the forward of layer 0"):
        model.apply(bad, x)
    bad = ({"W": params[0]["W"][:, :7], "b": params[0]["b"]},) + params[1:]
    with pytest.raises(ValueError, match=r"dense\(8\): expected params\['W'\] shaped \(4, 8\), got "
                                         r"\(4, 7\)\nin the forward of layer 0"):
        model.apply(bad, x)
    bad = (params[0], {"W": jnp.ones(1)}, params[2])
    with pytest.raises(TypeError, match=r"relu: this layer has no weights.*\nin the forward of "
                                        r"layer 1 \(relu\)"):
        model.apply(bad, x)


def test_unknown_activation_lists_valid_names():
    with pytest.raises(ValueError, match="unknown activation 'rleu'; valid names: identity, "
                                         "sigmoid, tanh, relu"):
        jbp.mlp([2, 3, 1], activation="rleu")
    with pytest.raises(ValueError, match="unknown loss 'ce'; valid names: softmax_cross_entropy"):
        jbp.losses.get("ce")


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, "half", None])
def test_dropout_rate_outside_range(rate):
    with pytest.raises(ValueError, match=r"dropout: rate \(the drop probability\) must be in \[0, 1\)"):
        jbp.dropout(rate)


def test_dropout_train_needs_key():
    with pytest.raises(ValueError, match="train=True needs a PRNG key"):
        jbp.dropout(0.5).apply({}, jnp.ones((2, 2)), train=True)


@pytest.mark.parametrize("sizes", [[], [5], (), "abc", [3, 0, 2], [3, 2.5]])
def test_bad_mlp_sizes(sizes):
    with pytest.raises(ValueError, match="mlp: "):
        jbp.mlp(sizes)


@pytest.mark.parametrize("bad", [0, -3, 2.0, True])
def test_bad_layer_hyper_parameters(bad):
    with pytest.raises(ValueError, match="dense: out_features must be a positive int"):
        jbp.dense(bad)
    with pytest.raises(ValueError, match="maxout: k"):
        jbp.maxout(bad if bad != 2.0 else -1)


def test_labels_out_of_range(net):
    model, params = net
    x = jnp.ones((2, 4))
    for labels in (jnp.array([0, 3]), jnp.array([-1, 0])):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) for 3 classes"):
            jbp.manual_value_and_grad(model, CE)(params, x, labels)
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
            jbp.autodiff_value_and_grad(model, CE)(params, x, labels)


def test_loss_target_shapes():
    logits = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="share the batch dimension"):
        CE.value(logits, jnp.array([0, 1]))
    with pytest.raises(ValueError, match=r"labels must be integers of shape \(4,\) \(or one-hot/"
                                         r"probability targets of shape \(4, 3\)\); got float32"):
        CE.value(logits, jnp.ones((4, 2)))
    with pytest.raises(ValueError, match=r"labels must be integers.*got float32 of shape \(4,\)"):
        CE.value(logits, jnp.ones(4))
    with pytest.raises(ValueError, match=r"expected logits of shape \(batch, \.\.\., classes\)"):
        CE.value(jnp.ones(4), jnp.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="mean_squared_error: target must have the output's shape"):
        jbp.losses.mean_squared_error.value(logits, jnp.ones((4, 1)))


def test_gradient_functions_reject_non_layers(net):
    model, _ = net
    with pytest.raises(TypeError, match="model must be a jbp Layer"):
        jbp.manual_value_and_grad(lambda p, x: x, CE)
    with pytest.raises(TypeError, match="loss must be a jbp Loss"):
        jbp.autodiff_value_and_grad(model, "softmax_cross_entropy")
    with pytest.raises(TypeError, match="serial: argument 1 must be a Layer, got str"):
        jbp.serial(jbp.dense(2), "relu")


def test_compare_grads_structure_mismatch():
    with pytest.raises(ValueError, match="different structures"):
        jbp.compare_grads({"W": jnp.ones(2)}, {"V": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"leaf \['W'\] has shape \(2,\) in grads but \(3,\)"):
        jbp.compare_grads({"W": jnp.ones(2)}, {"W": jnp.ones(3)})


def test_finite_differences_need_float64(net):
    model, params = net
    with jax.enable_x64(False):
        with pytest.raises(ValueError, match="needs float64"):
            jbp.numerical_value_and_grad(model, CE)(params, jnp.ones((2, 4)), jnp.array([0, 1]))


def test_train_must_be_a_python_bool(net):
    """train="False" is truthy: it would run training mode (dropout, batch statistics)."""
    model, params = net
    for bad in ("False", 0, None):
        with pytest.raises(TypeError, match=r"mlp\(\[4, 8, 3\], relu\): train must be a Python "
                                            r"bool \(True or False\), got"):
            model.apply(params, jnp.ones((2, 4)), train=bad)
    with pytest.raises(TypeError, match="dropout.*train must be a Python bool"):
        jbp.manual_value_and_grad(jbp.serial(jbp.dense(3), jbp.dropout(0.5)), CE)(
            jbp.serial(jbp.dense(3), jbp.dropout(0.5)).init(jax.random.key(0), (4,))[1],
            jnp.ones((2, 4)), jnp.zeros(2, jnp.int32), key=jax.random.key(1), train="yes")


@pytest.mark.parametrize("bad", [(8.7, 2), "82", (True, 2), (8, 2.0), b"\x08\x02"])
def test_in_shape_is_not_coerced(bad):
    for layer, who in ((jbp.conv(3, 2), r"conv\(3, 2\)"),
                       (jbp.serial(jbp.conv(3, 2), jbp.relu()), "serial")):
        with pytest.raises(TypeError, match=who + ": in_shape must be a tuple of ints"):
            layer.init(jax.random.key(0), bad)


def test_every_integer_type_is_a_size():
    """np.int64 (what NumPy arithmetic gives) builds the same layer as int, everywhere."""
    i = np.int64
    built = [(jbp.dense(i(8)), jbp.dense(8)), (jbp.attention(i(2), i(4)), jbp.attention(2, 4)),
             (jbp.positional_embedding(i(8)), jbp.positional_embedding(8)),
             (jbp.transformer_block(i(4), i(2), i(2), i(8)), jbp.transformer_block(4, 2, 2, 8)),
             (jbp.mlp([i(4), i(3)]), jbp.mlp([4, 3])), (jbp.conv(i(3), i(2)), jbp.conv(3, 2)),
             (jbp.embedding(i(5), i(2)), jbp.embedding(5, 2)), (jbp.maxout(i(2)), jbp.maxout(2)),
             (jbp.max_pool(i(2)), jbp.max_pool(2))]
    built += [(make(i(3)), make(3)) for make in (jbp.rnn, jbp.gru, jbp.lstm)]
    for got, want in built:
        assert got == want and repr(got) == repr(want)
    shapes = {"dense": (4,), "mlp": (4,), "maxout": (4,), "embedding": (3,)}
    for got, want in built:
        shape = next((s for k, s in shapes.items() if repr(got).startswith(k)), (8, 4))
        assert got.init(jax.random.key(0), (i(shape[0]), *shape[1:]))[0] == \
            want.init(jax.random.key(0), shape)[0]
    with pytest.raises(ValueError, match="dense: out_features must be a positive int, got 2.0"):
        jbp.dense(2.0)
    with pytest.raises(ValueError, match="lstm: hidden must be a positive int, got True"):
        jbp.lstm(True)
