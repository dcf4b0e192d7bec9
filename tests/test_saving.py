"""Saving a model: save_model/load_model rebuild the model from its description (no eval,
no pickle) with its params and state, refuse files of another version or changed ones,
and predict gives the same outputs bit for bit in a new process."""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp
from jbp import saving

MODELS = {
    "mlp": jbp.mlp([40, 100, 100, 10], activation="relu"),
    "cnn": jbp.serial(jbp.conv(16, 5), jbp.relu(), jbp.max_pool(2),
                      jbp.residual(jbp.serial(jbp.conv(16, 3), jbp.relu())),
                      jbp.global_avg_pool(), jbp.dense(10)),
    "sequence": jbp.serial(jbp.embedding(20, 16), jbp.positional_embedding(32),
                           jbp.transformer_block(16, heads=2, head_dim=8, mlp_hidden=32, causal=True),
                           jbp.lstm(16), jbp.dense(20)),
    "branches": jbp.serial(jbp.dense(8, dtype=jnp.bfloat16), jbp.batch_norm(dtype=np.float32),
                           jbp.parallel(jbp.relu(), jbp.leaky_relu(0.2), combine="concat"),
                           jbp.bidirectional(jbp.gru(4, initial_state="learned")), jbp.dropout(0.25),
                           jbp.conv(3, (2,), padding="VALID")),
}


@pytest.mark.parametrize("name", MODELS)
def test_every_kind_of_argument_rebuilds_an_equal_model(name):
    model = MODELS[name]
    description = json.loads(json.dumps(saving.describe(model)))  # as the file holds it
    rebuilt = saving.build(description)
    assert rebuilt == model and hash(rebuilt) == hash(model)


def _blobs(n=96, d=6, classes=3):
    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, n).astype(np.int32)
    return (rng.normal(size=(classes, d)).astype(np.float32)[y] * 2
            + rng.normal(size=(n, d)).astype(np.float32)), y


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model with batch norm trained by fit, saved; (path, model, params, state, x)."""
    x, y = _blobs()
    model = jbp.serial(jbp.dense(16), jbp.batch_norm(), jbp.tanh(), jbp.dense(3))
    _, params = model.init(jax.random.key(0), (6,))
    params, state, _ = jbp.fit(model, jbp.losses.softmax_cross_entropy, params, (x, y),
                               key=jax.random.key(1), epochs=2, batch_size=32,
                               progress=False, state=model.init_state((6,)))
    path = tmp_path_factory.mktemp("model") / "model.npz"
    jbp.save_model(path, model, params, state, in_shape=(6,))
    return path, model, params, state, x


def test_a_trained_model_predicts_the_same_bits_in_a_new_process(trained, tmp_path):
    path, model, params, state, x = trained
    np.save(tmp_path / "x.npy", x)
    here = np.asarray(jbp.predict(model, params, x, batch_size=40, state=state))
    script = textwrap.dedent(f"""
        import numpy as np, jbp
        model, params, state = jbp.load_model({str(path)!r})
        x = np.load({str(tmp_path / 'x.npy')!r})
        np.save({str(tmp_path / 'y.npy')!r}, jbp.predict(model, params, x, batch_size=40,
                                                          state=state))
        print(repr(model))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == repr(model)
    there = np.load(tmp_path / "y.npy")
    assert there.shape == (96, 3) and there.dtype == here.dtype
    assert np.array_equal(there, here)


def test_load_gives_the_model_params_and_state_back(trained):
    path, model, params, state, x = trained
    loaded, p, s = jbp.load_model(path)
    assert loaded == model
    for got, want in ((p, params), (s, state)):
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    assert saving.read_index(path)["in_shape"] == [6]


def test_predict_in_chunks_equals_one_pass_and_checks_its_arguments():
    model = MODELS["mlp"]
    _, params = model.init(jax.random.key(0), (40,))
    x = jax.random.normal(jax.random.key(1), (10, 40))
    whole = model.apply(params, x)
    for batch_size in (3, 10, 64):
        np.testing.assert_allclose(jbp.predict(model, params, x, batch_size=batch_size),
                                   whole, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="predict: batch_size must be a positive int, got 0"):
        jbp.predict(model, params, x, batch_size=0)
    with pytest.raises(ValueError, match=r"predict: x must be an array of shape \(N, ...\)"):
        jbp.predict(model, params, [1.0, 2.0])
    with pytest.raises(TypeError, match="this model keeps state"):
        jbp.predict(jbp.serial(jbp.dense(3), jbp.batch_norm()), params, x)


def _rewrite(path, change):
    """Rewrite the model file at ``path`` with ``change(index, arrays)`` applied."""
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    index = json.loads(str(arrays.pop("__index__")))
    change(index, arrays)
    np.savez(path, __index__=np.array(json.dumps(index)), **arrays)


def test_changed_files_and_other_versions_are_refused(trained, tmp_path):
    path = trained[0]
    tampered = tmp_path / "tampered.npz"
    tampered.write_bytes(path.read_bytes())
    _rewrite(tampered, lambda index, arrays: arrays["a0"].__setitem__((0, 0), 1.0))
    with pytest.raises(ValueError, match="was changed after it was written"):
        jbp.load_model(tampered)
    other = tmp_path / "other.npz"
    other.write_bytes(path.read_bytes())
    _rewrite(other, lambda index, arrays: index.update(format="jbp-model-2"))
    with pytest.raises(ValueError, match="is of format 'jbp-model-2'; this jbp reads "
                                         "'jbp-model-1'"):
        jbp.load_model(other)
    checkpoint = jbp.checkpoint.save(tmp_path / "checkpoint.npz", {"w": np.ones(2)})
    with pytest.raises(ValueError, match="a checkpoint of fit: read it with jbp.checkpoint"):
        jbp.load_model(checkpoint)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        jbp.load_model(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        jbp.load_model(tmp_path / "missing.npz")


@jbp.constructor
def scaled(factor: float, *, inner: jbp.Layer) -> jbp.Layer:
    """A user's composite: ``inner`` then a fixed scale (its constructor is registered in
    the test below)."""
    return jbp.serial(inner, jbp.elementwise("scale", lambda z: factor * z,
                                             lambda z, a: jnp.full_like(z, factor)))


def test_a_users_constructor_rebuilds_once_registered(tmp_path, monkeypatch):
    monkeypatch.setattr(saving, "_REGISTRY", {})
    model = jbp.serial(scaled(2.0, inner=jbp.dense(3)), jbp.relu())
    _, params = model.init(jax.random.key(0), (4,))
    with pytest.raises(ValueError, match=r"save_model: unknown constructor "
                                         r"'test_saving.scaled': register it first"):
        jbp.save_model(tmp_path / "m.npz", model, params)
    assert jbp.register_constructor(scaled) is scaled
    jbp.save_model(tmp_path / "m.npz", model, params)
    assert jbp.load_model(tmp_path / "m.npz")[0] == model
    monkeypatch.setattr(saving, "_REGISTRY", {})  # a program that did not register it
    with pytest.raises(ValueError, match=r"load_model: unknown constructor 'test_saving.scaled'"
                                         r": import the module .* before loading"):
        jbp.load_model(tmp_path / "m.npz")
    with pytest.raises(TypeError, match="expected a function decorated with @jbp.constructor"):
        jbp.register_constructor(lambda: None)


def test_what_cannot_be_saved_is_refused_by_name(tmp_path):
    square = jbp.elementwise("square", lambda z: z * z, lambda z, a: 2 * z)
    with pytest.raises(ValueError, match=r"argument 'sigma' of elementwise\('square', .*\) "
                                         r"cannot be saved: it is a function"):
        jbp.save_model(tmp_path / "m.npz", jbp.serial(jbp.dense(2), square), ({}, {}))
    @jbp.constructor
    def shifted(shift) -> jbp.Layer:
        return jbp.elementwise("shifted", lambda z: z + shift, lambda z, a: jnp.ones_like(z))

    with pytest.raises(ValueError, match=r"argument 'shift' of shifted\(array\(.*cannot be "
                                         r"saved: it is a ndarray"):
        jbp.save_model(tmp_path / "m.npz", shifted(np.ones(3)), {})
    bare = jbp.Layer("bare", init=lambda k, s: (s, {}), forward=lambda p, x, **kw: (x, None),
                     backward=lambda p, c, dy: ({}, dy))
    with pytest.raises(ValueError, match="layer Layer\\('bare'\\) cannot be saved: it was not "
                                         "built by a function decorated with @jbp.constructor"):
        jbp.save_model(tmp_path / "m.npz", bare, {})
    model = MODELS["mlp"]
    _, params = jbp.mlp([40, 99, 10]).init(jax.random.key(0), (40,))
    with pytest.raises(ValueError, match=r"save_model: params do not fit mlp\(.*\) on inputs "
                                         r"of shape \(40,\)"):
        jbp.save_model(tmp_path / "m.npz", model, params, in_shape=(40,))
    with pytest.raises(ValueError, match="params holds a str"):
        jbp.save_model(tmp_path / "m.npz", model, ({"W": "weights"},))
    assert not (tmp_path / "m.npz").exists()


def test_bfloat16_params_and_a_list_in_the_params_round_trip(tmp_path):
    model = jbp.serial(jbp.dense(4, dtype=jnp.bfloat16), jbp.relu(), jbp.dense(2))
    _, params = model.init(jax.random.key(0), (3,))
    jbp.save_model(tmp_path / "m.npz", model, params, {"kept": [np.arange(3)]}, in_shape=(3,))
    loaded, p, s = jbp.load_model(tmp_path / "m.npz")
    assert loaded == model and p[0]["W"].dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(p[0]["W"], np.float32), np.asarray(params[0]["W"], np.float32))
    assert isinstance(s["kept"], list) and np.array_equal(s["kept"][0], np.arange(3))
