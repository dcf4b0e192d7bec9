"""jbp.fit: both gradients train alike, seeds are reproducible, resume after a kill equals an
uninterrupted run, and bad arguments give clear errors."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbp
from jbp import checkpoint
from jbp.data import Dataset

LOSS = jbp.losses.softmax_cross_entropy


def _blobs(n=256, d=8, classes=3, seed=0):
    """A small separable classification set: class means plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n).astype(np.int32)
    centers = rng.normal(size=(classes, d)).astype(np.float32) * 2
    x = centers[y] + rng.normal(size=(n, d)).astype(np.float32)
    return x, y


@pytest.fixture(scope="module")
def setup():
    x, y = _blobs()
    model = jbp.mlp([8, 16, 3], activation="tanh")
    _, params = model.init(jax.random.key(0), (8,))
    return model, params, Dataset(x[:192], y[:192], x[192:], y[192:])


def _fit(setup, **kwargs):
    model, params, data = setup
    kwargs = {"key": jax.random.key(1), "epochs": None if "steps" in kwargs else 3,
              "batch_size": 32, "progress": False, **kwargs}
    return jbp.fit(model, LOSS, params, data, **kwargs)


def _max_rel(a, b):
    return max(float(jnp.linalg.norm(p - q) / jnp.linalg.norm(q))
               for p, q in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _equal(a, b):
    return all(np.array_equal(np.asarray(p), np.asarray(q))
               for p, q in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_manual_and_autodiff_train_to_the_same_params(setup):
    manual, h_manual = _fit(setup, grad="manual")
    auto, h_auto = _fit(setup, grad="autodiff")
    assert _max_rel(manual, auto) < 1e-4
    np.testing.assert_allclose(h_manual["loss"], h_auto["loss"], rtol=1e-4)
    assert not _equal(manual, setup[1])  # it did train


def test_history_records_steps_and_evaluations(setup):
    params, history = _fit(setup, epochs=4)
    assert len(history["loss"]) == 4 * (192 // 32)
    assert [e["epoch"] for e in history["eval"]] == [0, 1, 2, 3, 4]
    assert [e["step"] for e in history["eval"]] == [0, 6, 12, 18, 24]
    last = history["eval"][-1]
    assert set(last) == {"epoch", "step", "train_loss", "train_accuracy", "test_loss",
                         "test_accuracy"}
    assert last["train_loss"] < history["eval"][0]["train_loss"]
    assert last["test_accuracy"] > 0.8
    json.dumps(history)  # plain Python numbers, ready for results.json


def test_same_seed_gives_identical_params_and_another_seed_does_not(setup):
    a, ha = _fit(setup, key=jax.random.key(3))
    b, hb = _fit(setup, key=jax.random.key(3))
    c, _ = _fit(setup, key=jax.random.key(4))
    assert _equal(a, b) and ha == hb
    assert not _equal(a, c)


def test_a_raw_uint32_key_works_like_the_typed_key(setup):
    typed, _ = _fit(setup, key=jax.random.key(1))
    raw, _ = _fit(setup, key=jax.random.PRNGKey(1))
    assert _equal(typed, raw)


def test_python_loop_and_scan_agree(setup):
    scan, _ = _fit(setup, loop="scan")
    python, _ = _fit(setup, loop="python")
    assert _max_rel(scan, python) < 1e-5


def test_steps_sgd_and_a_custom_gradient_function(setup):
    model, params, data = setup
    calls = []

    def my_grad(p, x, y):
        calls.append(x.shape)  # traced once per compile
        return jbp.autodiff_value_and_grad(model, LOSS)(p, x, y)

    a, ha = _fit(setup, grad=my_grad, steps=10, optimizer="sgd", learning_rate=0.1)
    b, _ = _fit(setup, grad="autodiff", steps=10, optimizer="sgd", learning_rate=0.1)
    assert calls and calls[0] == (32, 8)
    assert len(ha["loss"]) == 10 and ha["eval"][-1]["step"] == 10
    assert _max_rel(a, b) < 1e-6


def test_a_schedule_as_learning_rate_of_a_named_optimizer(setup, tmp_path):
    schedule = optax.linear_schedule(0.1, 0.01, 6)
    a, ha = _fit(setup, steps=6, optimizer="sgd", learning_rate=schedule,
                 checkpoint_dir=tmp_path)
    b, _ = _fit(setup, steps=6, optimizer=optax.sgd(schedule))
    assert _max_rel(a, b) < 1e-6 and len(ha["loss"]) == 6
    meta = checkpoint.read_meta(tmp_path / "checkpoint.npz")
    assert meta["optimizer"]["learning_rate"] == "schedule"
    with pytest.raises(ValueError, match="'sgd' with a learning-rate schedule; this run uses "
                                         "'sgd' with learning_rate 0.1"):
        _fit(setup, steps=6, optimizer="sgd", learning_rate=0.1, checkpoint_dir=tmp_path,
             resume=True)


def test_pair_data_without_eval_and_dropout_model():
    x, y = _blobs(n=64)
    model = jbp.serial(jbp.dense(16), jbp.relu(), jbp.dropout(0.5), jbp.dense(3))
    _, params = model.init(jax.random.key(0), (8,))
    out, history = jbp.fit(model, LOSS, params, (x, y), key=jax.random.key(0), epochs=2,
                           batch_size=16, optimizer=optax.sgd(0.05), progress=False)
    assert set(history["eval"][-1]) == {"epoch", "step", "train_loss", "train_accuracy"}
    assert all(np.isfinite(v) for v in history["loss"])


def test_progress_bar_shows_the_loss_or_stays_silent(setup, capsys):
    _fit(setup, epochs=1, progress=True)
    assert "loss=" in capsys.readouterr().err
    _fit(setup, epochs=1, progress=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


@pytest.mark.parametrize("kwargs, message", [
    ({"grad": "numeric"}, "unknown gradient source 'numeric'"),
    ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
    ({"epochs": 0}, "epochs must be a positive int, got 0"),
    ({"steps": -1}, "steps must be a positive int, got -1"),
    ({"batch_size": 0}, "batch_size must be a positive int, got 0"),
    ({"batch_size": 193}, "batch_size 193 is larger than the data .192 examples."),
    ({"learning_rate": 0.0}, "learning_rate must be a positive number, got 0.0"),
    ({"learning_rate": -1e-3, "optimizer": "sgd"}, "learning_rate must be a positive"),
    ({"steps": 5, "epochs": 2}, "give epochs or steps, not both"),
    ({"resume": True}, "resume=True needs a checkpoint_dir"),
    ({"loop": "fori"}, "loop must be one of"),
    ({"key": 3}, r"key must be a PRNG key, e.g. jax.random.key\(0\), got int32"),
    ({"key": None}, "key must be a PRNG key.*got NoneType"),
    ({"eval_batch_size": 0}, "eval_batch_size must be a positive int, got 0"),
    ({"eval_batch_size": 2.5}, "eval_batch_size must be a positive int, got 2.5"),
    ({"optimizer": optax.sgd(0.1), "learning_rate": 0.1},
     "learning_rate=0.1 does not apply to an optax GradientTransformation"),
    ({"overwrite": True}, "overwrite=True needs a checkpoint_dir"),
    ({"resume": True, "overwrite": True, "checkpoint_dir": "unused"}, "give one of them"),
    ({"stop_on_nonfinite": "yes"}, "stop_on_nonfinite must be True or False, got 'yes'"),
])
def test_bad_arguments(setup, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _fit(setup, **kwargs)


def test_resume_rejects_a_checkpoint_of_another_model_or_run(setup, tmp_path):
    _fit(setup, epochs=1, checkpoint_dir=tmp_path)
    model = jbp.mlp([8, 32, 3], activation="tanh")
    _, params = model.init(jax.random.key(0), (8,))
    with pytest.raises(ValueError, match=r"different model: leaf \['params'\]\[0\]\['W'\] "
                                         r"has shape \(8, 16\).*expects shape \(8, 32\)"):
        jbp.fit(model, LOSS, params, setup[2], key=jax.random.key(1), epochs=2,
                batch_size=32, checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        _fit(setup, epochs=2, batch_size=16, checkpoint_dir=tmp_path, resume=True)


# A training run in its own process. "slow" makes it sleep after each checkpoint so the test
# can kill it with SIGKILL at a known point; "plain" runs (or resumes) to the end.
CHILD = textwrap.dedent("""
    import json, sys, time
    import jax, numpy as np
    import jbp
    from jbp import checkpoint

    mode, ck_dir, out = sys.argv[1:4]
    if mode == "slow":
        save = checkpoint.save

        def save_then_wait(*args, **kwargs):
            path = save(*args, **kwargs)
            print("SAVED", flush=True)
            time.sleep(120)
            return path

        checkpoint.save = save_then_wait
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200).astype(np.int32)
    x = (rng.normal(size=(3, 8))[y] * 2 + rng.normal(size=(200, 8))).astype(np.float32)
    model = jbp.mlp([8, 16, 3])
    _, params = model.init(jax.random.key(0), (8,))
    params, history = jbp.fit(model, jbp.losses.softmax_cross_entropy, params, (x, y),
                              key=jax.random.key(7), epochs=3, batch_size=20,
                              checkpoint_dir=ck_dir or None, resume=bool(ck_dir),
                              progress=False)
    leaves = jax.tree_util.tree_leaves(params)
    np.savez(out, *[np.asarray(leaf) for leaf in leaves])
    with open(out + ".json", "w") as f:
        json.dump(history, f)
""")


def test_resume_after_a_killed_process_equals_an_uninterrupted_run(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    ck_dir = tmp_path / "ck"
    # the three processes compile the same functions: share a persistent compile cache
    # (and compile at LLVM's optimisation level 0: the same math, about twice as fast)
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip())

    def run(mode, ck, out):
        return subprocess.run([sys.executable, str(script), mode, ck, str(tmp_path / out)],
                              capture_output=True, text=True, timeout=180, env=env)

    proc = subprocess.Popen([sys.executable, str(script), "slow", str(ck_dir),
                             str(tmp_path / "killed")], stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        assert proc.stdout.readline().strip() == "SAVED"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed.npz").exists()  # it never finished
    assert checkpoint.read_meta(ck_dir / "checkpoint.npz")["history"]["eval"][-1]["epoch"] == 1

    for args in (("plain", "", "straight"), ("plain", str(ck_dir), "resumed")):
        done = run(*args)
        assert done.returncode == 0, done.stderr[-3000:]
    with np.load(tmp_path / "straight.npz") as a, np.load(tmp_path / "resumed.npz") as b:
        assert a.files == b.files
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])
    straight = json.loads((tmp_path / "straight.json").read_text())
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert straight == resumed
    assert len(resumed["loss"]) == 3 * 10


def test_on_epoch_is_called_after_every_epoch(setup):
    seen = []
    _fit(setup, on_epoch=lambda epoch, params, history: seen.append(
        (epoch, len(history["loss"]), history["eval"][-1]["epoch"])))
    assert seen == [(1, 6, 1), (2, 12, 2), (3, 18, 3)]


# ---------------------------------------------------------------------------- non-finite loss

# Plain SGD whose learning rate turns NaN at the 9th update (optimizer count 8): the params
# are NaN from then on, so the minibatch loss of step 10 (history index 9, epoch 2) is NaN.
# One object for the module, so its compiled functions are reused.
SGD_NAN_FROM_9TH_UPDATE = optax.sgd(lambda count: jnp.where(count < 8, 0.1, jnp.nan))


@pytest.mark.parametrize("grad", ["manual", "autodiff"])
def test_a_nan_in_the_params_stops_fit_at_the_first_step(setup, grad):
    model, params, data = setup  # tanh: NaN goes through it (relu(NaN) may not)
    params = jax.tree_util.tree_map(lambda a: a, params)
    params[0]["W"] = params[0]["W"].at[0, 0].set(jnp.nan)
    with pytest.raises(FloatingPointError, match=r"minibatch loss is nan at step 1 "
                                                 r"\(history\['loss'\]\[0\]\), epoch 1;"):
        jbp.fit(model, LOSS, params, data, key=jax.random.key(1), epochs=3, batch_size=32,
                grad=grad, progress=False)


@pytest.mark.parametrize("loop", ["scan", "python"])
def test_a_loss_turning_nan_stops_fit_at_that_step_keeping_the_last_good_checkpoint(
        setup, tmp_path, loop):
    kwargs = {"optimizer": SGD_NAN_FROM_9TH_UPDATE, "loop": loop}
    _, history = _fit(setup, stop_on_nonfinite=False, **kwargs)  # trains on regardless
    finite = np.isfinite(history["loss"])
    assert finite[:9].all() and not finite[9:].any()

    seen = []
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 10 "
                                                 r"\(history\['loss'\]\[9\]\), epoch 2;"):
        _fit(setup, checkpoint_dir=tmp_path, on_epoch=lambda e, p, h: seen.append(e), **kwargs)
    assert seen == [1]  # epoch 2 was neither evaluated nor handed on
    meta = checkpoint.read_meta(tmp_path / "checkpoint.npz")
    assert len(meta["history"]["loss"]) == 6 and meta["history"]["eval"][-1]["epoch"] == 1
    with np.load(tmp_path / "checkpoint.npz") as f:
        assert all(np.isfinite(f[name]).all() for name in f.files if name.startswith("leaf_"))


# ---------------------------------------------------------------------------- evaluation

def test_evaluation_in_chunks_gives_the_same_numbers(setup):
    _, whole = _fit(setup, epochs=1)  # 192 train and 64 test rows: one chunk each
    _, chunked = _fit(setup, epochs=1, eval_batch_size=7)  # 7 divides neither 192 nor 256
    assert whole["loss"] == chunked["loss"]
    for a, b in zip(whole["eval"], chunked["eval"], strict=True):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_allclose(b[name], a[name], rtol=1e-6, err_msg=name)


def test_accuracy_from_one_hot_targets_and_none_for_other_targets(setup):
    model, params, data = setup
    hot = Dataset(data.x_train, jbp.data.one_hot(data.y_train, 3), data.x_test,
                  jbp.data.one_hot(data.y_test, 3))
    trained, history = jbp.fit(model, LOSS, params, hot, key=jax.random.key(1), epochs=1,
                               batch_size=32, progress=False)
    for split, x, labels in (("train", data.x_train, data.y_train),
                             ("test", data.x_test, data.y_test)):
        want = float(np.mean(np.argmax(np.asarray(model.apply(trained, x)), -1) == labels))
        assert history["eval"][-1][f"{split}_accuracy"] == pytest.approx(want, abs=1e-12)
    # regression targets (rows that are not probability vectors): accuracy does not apply
    scaled = hot._replace(y_train=2 * hot.y_train, y_test=2 * hot.y_test)
    _, history = jbp.fit(model, jbp.losses.mean_squared_error, params, scaled,
                         key=jax.random.key(1), steps=1, batch_size=32, progress=False)
    assert history["eval"][-1]["train_accuracy"] is None
    assert history["eval"][-1]["test_accuracy"] is None


@pytest.mark.parametrize("split, message", [
    ("eval_labels", r"fit: eval_data \(inputs float32\[64, 8\], targets int32\[64, 2\]\) "
                    r"does not fit the model and loss: .*\(64, 2\)"),
    ("eval_inputs", r"fit: eval_data \(inputs float32\[64, 7\], targets int32\[64\]\) "
                    r"does not fit the model and loss"),
    ("train_labels", r"fit: data \(inputs float32\[192, 8\], targets int32\[192, 2\]\)"),
    ("test_length", r"fit: the test split of data has inputs of shape \(64, 8\) but targets "
                    r"of shape \(63,\)"),
])
def test_bad_shapes_are_reported_for_their_split_with_its_sizes(setup, split, message):
    x, y, xt, yt = setup[2]
    kwargs = {}
    if split == "eval_labels":
        kwargs["eval_data"] = (xt, np.stack([yt, yt], axis=1))
    elif split == "eval_inputs":
        kwargs["eval_data"] = (xt[:, :7], yt)
    elif split == "train_labels":
        kwargs["data"] = (x, np.stack([y, y], axis=1))
    else:
        kwargs["data"] = Dataset(x, y, xt, yt[:63])
    model, params, data = setup
    with pytest.raises(ValueError, match=message) as err:
        jbp.fit(model, LOSS, params, kwargs.pop("data", data), key=jax.random.key(1), epochs=1,
                batch_size=32, progress=False, **kwargs)
    assert "256" not in str(err.value)  # never the size of train and test put together


# ---------------------------------------------------------------------------- resume rules

def test_resume_counts_the_whole_run_and_refuses_fewer_steps_than_the_checkpoint_holds(
        setup, tmp_path):
    straight, h_straight = _fit(setup, epochs=3)
    two, h_two = _fit(setup, epochs=2, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"already holds 12 steps \(2 epochs\); asked for 6 "
                                         r"steps \(1 epoch\)\. epochs/steps count the whole run"):
        _fit(setup, epochs=1, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="already holds 12 steps"):
        _fit(setup, steps=11, checkpoint_dir=tmp_path, resume=True)
    seen = []  # as many steps as it holds: the saved result, without training
    same, h_same = _fit(setup, epochs=2, checkpoint_dir=tmp_path, resume=True,
                        on_epoch=lambda *args: seen.append(args))
    assert _equal(same, two) and h_same == h_two and seen == []
    three, h_three = _fit(setup, epochs=3, checkpoint_dir=tmp_path, resume=True)
    assert len(h_three["loss"]) == 18 and _equal(three, straight) and h_three == h_straight


def test_a_fresh_run_refuses_to_replace_a_checkpoint_unless_told(setup, tmp_path):
    path = tmp_path / "checkpoint.npz"
    _fit(setup, epochs=1, checkpoint_dir=tmp_path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"checkpoint.npz already holds a checkpoint \(6 steps\)"
                                         r"; pass resume=True.*or overwrite=True"):
        _fit(setup, epochs=1, checkpoint_dir=tmp_path, key=jax.random.key(2))
    assert path.read_bytes() == before
    _, history = _fit(setup, epochs=1, checkpoint_dir=tmp_path, key=jax.random.key(2),
                      overwrite=True)
    assert checkpoint.read_meta(path)["history"] == history
    assert path.read_bytes() != before


def test_resume_with_another_optimizer_says_different_optimizer(setup, tmp_path):
    named, custom = tmp_path / "named", tmp_path / "custom"
    _fit(setup, epochs=1, checkpoint_dir=named)  # adam, learning rate 1e-3
    adam = optax.adam(1e-3)
    _fit(setup, epochs=1, checkpoint_dir=custom, optimizer=adam)
    for ck_dir, kwargs, saved, asked in [
        (named, {"optimizer": "sgd"}, "'adam' with learning_rate 0.001",  # state: other leaves
         "'sgd' with learning_rate 0.001"),
        (named, {"learning_rate": 1e-2}, "'adam' with learning_rate 0.001",  # same state
         "'adam' with learning_rate 0.01"),
        (custom, {"optimizer": optax.adamw(1e-3)}, "optax GradientTransformation",  # same
         "optax GradientTransformation"),                          # leaves, other structure
    ]:
        with pytest.raises(ValueError, match="different optimizer") as err:
            _fit(setup, epochs=2, checkpoint_dir=ck_dir, resume=True, **kwargs)
        message = str(err.value)
        assert "different model" not in message
        assert message.index(saved) < message.index("this run uses") < message.rindex(asked)
    # a different model with a different optimizer is a different model first
    model = jbp.mlp([8, 32, 3], activation="tanh")
    _, params = model.init(jax.random.key(0), (8,))
    with pytest.raises(ValueError, match=r"different model: leaf \['params'\]"):
        jbp.fit(model, LOSS, params, setup[2], key=jax.random.key(1), epochs=2, batch_size=32,
                optimizer="sgd", checkpoint_dir=named, resume=True, progress=False)
    # the same optimizer again resumes
    _, history = _fit(setup, epochs=2, checkpoint_dir=custom, resume=True, optimizer=adam)
    assert len(history["loss"]) == 12


def test_auto_loop_takes_the_python_loop_for_convolutions():
    """XLA's CPU convolutions inside lax.scan were 17-24x slower: fit(loop="auto") avoids it."""
    from jbp.train import _has_conv

    cnn = jbp.serial(jbp.residual(jbp.serial(jbp.conv(2, 3), jbp.relu())), jbp.global_avg_pool())
    assert _has_conv(cnn) and _has_conv(jbp.parallel(jbp.dense(2), jbp.conv(2, 3)))
    assert not _has_conv(jbp.mlp([4, 8, 3])) and not _has_conv(jbp.max_pool(2))
