"""Every experiment script runs with --quick and writes its files.

The scripts run in this process, through their ``main(argv)`` (what ``python script.py``
calls), so they share its imports and compiled functions; the config a script may change
(64-bit mode, the default device) is put back after it. Two run as real processes: the
README's main job (compare_training, what ``scripts/run.sh`` runs) and char_lm, whose
compiles run at LLVM optimisation level 0 through XLA_FLAGS, which only a new process reads.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import load_script, run_main
from jbp.data import load_mnist1d

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """The environment of the scripts: a session MNIST-1D cache (generated at most once), a
    shared persistent compile cache and, for every new process (the two scripts that run as
    one, data_parallel's children), LLVM's optimisation level 0: a quick run's programs run
    for seconds, and compiling them at the default level cost a third more CPU time."""
    cache = tmp_path_factory.getbasetemp() / "jbp_cache"
    load_mnist1d(cache)
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    return dict(os.environ, JBP_CACHE=str(cache), XLA_FLAGS=flags,
                JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.getbasetemp() / "xla_cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def run(script, *args, env):
    return subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)


def run_quick(script, out, env, *extra, process=False):
    args = ("--quick", "--seed", "1", "--out", str(out), *extra)
    if process:
        done = run(script, *args, env=env)
        assert done.returncode == 0, done.stderr[-4000:]
        stdout = done.stdout
    else:
        stdout = run_main(script.removesuffix(".py"), args,
                          {k: env[k] for k in ("JBP_CACHE", "XLA_FLAGS")})
    assert "device: cpu" in stdout or "device: gpu" in stdout
    results = json.loads((out / "results.json").read_text())
    assert results["device"]["platform"] == jax.devices()[0].platform
    assert results["config"]["quick"] is True and results["config"]["seed"] == 1
    return results, stdout


def assert_png(path):
    assert path.read_bytes()[:8] == PNG, f"{path} is not a PNG"


def test_compare_training_quick(tmp_path, env):
    results, stdout = run_quick("compare_training.py", tmp_path, env, process=True)
    for grad in ("manual", "autodiff"):
        assert 0.0 <= results[grad]["test_accuracy"] <= 1.0
        history = results[grad]["history"]
        assert len(history["eval"]) == results["config"]["epochs"] + 1
    # same init, same batches: the two runs agree to float32 round-off after a few steps
    assert results["max_param_diff"] < 1e-4
    assert results["manual"]["test_accuracy"] == pytest.approx(
        results["autodiff"]["test_accuracy"], abs=0.01)
    assert_png(tmp_path / "curves.png")
    assert_png(tmp_path / "param_diff.png")
    assert "manual" in stdout and "autodiff" in stdout


def test_depth_quick(tmp_path, env):
    results, stdout = run_quick("depth.py", tmp_path, env)
    runs = results["runs"]
    assert {r["depth"] for r in runs} == {1, 2}
    for r in runs:  # widths chosen to match the budget
        assert abs(r["n_params"] - r["budget"]) / r["budget"] < 0.1
    assert_png(tmp_path / "depth.png")


def test_vanishing_gradients_quick(tmp_path, env):
    results, stdout = run_quick("vanishing_gradients.py", tmp_path, env)
    acts = results["activations"]
    assert set(acts) == {"sigmoid", "relu"}
    depth = results["config"]["depth"]
    for res in acts.values():
        assert [r["epoch"] for r in res["records"]] == results["config"]["record_at"]
        for r in res["records"]:
            assert len(r["delta_norm"]) == depth + 1  # every dense layer, output included
    # at initialisation the sigmoid's deltas shrink far more towards the input than ReLU's
    first = {a: r["records"][0]["delta_norm"] for a, r in acts.items()}
    ratio = {a: d[0] / d[-1] for a, d in first.items()}
    assert ratio["sigmoid"] < ratio["relu"] / 10
    assert_png(tmp_path / "vanishing_gradients.png")


def test_depth_residual_quick(tmp_path, env):
    results, stdout = run_quick("depth_residual.py", tmp_path, env)
    cfg = results["config"]
    for r in results["runs"]:
        for when in ("init", "trained"):  # one delta per block, at the same positions
            assert len(r[when]["delta_norm"]) == r["depth"]
        assert 0.0 <= r["test_accuracy"] <= 1.0
    deepest = [r["init"] for r in results["runs"] if r["depth"] == max(cfg["depths"])]
    assert len(deepest) == len(cfg["variants"]) * len(cfg["activations"])
    assert all(d["rel_error_vs_autodiff"] < 1e-5 for d in deepest)
    both = results["manual_vs_autodiff"]  # same init, same batches, either gradient
    assert both["manual_test_accuracy"] == pytest.approx(both["autodiff_test_accuracy"], abs=0.01)
    assert both["max_loss_diff"] < 1e-4
    assert "ratio init" in stdout
    assert_png(tmp_path / "accuracy.png")
    assert_png(tmp_path / "deltas.png")


@pytest.mark.parametrize("extra", [(), ("--cnn",)], ids=["mlp", "cnn"])
def test_per_example_quick(tmp_path, env, extra):
    results, stdout = run_quick("per_example.py", tmp_path, env, *extra)
    assert ("conv" in results["config"]["model"]) == bool(extra)
    assert results["float64_max_rel_err"] <= 1e-10
    assert results["float32_max_rel_err"] <= 1e-4
    for point in results["points"]:
        for name in ("manual", "vmap_grad"):
            assert point[name]["time"]["median"] > 0
            assert "temp_bytes" in point[name]["memory"]
        assert point["speedup"]["median"] > 0
    assert results["target"]["measured"] is False  # the target point is not in the quick grid
    assert "target point not in this grid" in stdout
    assert_png(tmp_path / "speedup.png")
    assert_png(tmp_path / "memory.png")


def test_dp_sgd_quick(tmp_path, env):
    # Gaussian clusters instead of MNIST-1D: the same pipeline without generating the data
    # set (jbp.data has its own tests).
    results, stdout = run_quick("dp_sgd.py", tmp_path, env, "--data", "synthetic")
    assert results["data"] == "synthetic"
    # same params, batch and noise key: the two per-example paths give the same update
    assert results["update_max_rel_diff"] < 1e-5
    assert results["final_params_max_rel_diff"] < 1e-5
    runs = results["runs"]
    assert set(runs) == {"manual", "vmap_grad", "non_private"}
    for run in runs.values():
        assert 0.0 <= run["test_accuracy"] <= 1.0 and run["step_time"]["median"] > 0
        assert len(run["curve"]) == 2
    assert runs["manual"]["test_accuracy"] == pytest.approx(runs["vmap_grad"]["test_accuracy"], abs=0.01)
    assert "step time vmap_grad/manual" in stdout
    assert_png(tmp_path / "accuracy.png")


def test_data_parallel_quick(tmp_path, env):
    # a driver that runs 2 host devices and 2 processes x 1 device as child processes
    results, stdout = run_quick("data_parallel.py", tmp_path, env)
    runs = results["runs"]
    assert [(r["devices"], r["processes"]) for r in runs] == [(2, 1), (2, 2)]
    for r in runs:
        assert r["max_rel_param_diff"] < 1e-5 and r["max_rel_loss_diff"] < 1e-5
        assert len(r["history"]["mesh"]) == results["config"]["epochs"] + 1
        assert len(r["param_rel_diff_per_epoch"]) == results["config"]["epochs"] + 1
        for grad in ("manual", "autodiff"):
            assert r["step"][grad]["time"]["median"] > 0
            # XLA all-reduces the gradients (and a few scalars) in every step
            reduced = r["step"][grad]["collectives"]["all-reduce"]["bytes"]
            assert r["grad_bytes"] <= reduced <= r["grad_bytes"] + 64
    assert "2 processes x 1 device " in stdout
    assert_png(tmp_path / "curves.png")
    assert_png(tmp_path / "scaling.png")


@pytest.mark.parametrize("name", ["compare_training", "depth", "depth_residual",
                                  "vanishing_gradients", "per_example", "dp_sgd",
                                  "data_parallel", "attention_memory", "adding_problem",
                                  "char_lm", "padded_sequences", "denoise_unet",
                                  "memory_depth", "second_order"])
def test_help_and_a_missing_backend(name, tmp_path, capsys):
    script = load_script(name)
    with pytest.raises(SystemExit) as exit_:
        script.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--quick", "--seed", "--out", "--platform"):
        assert flag in out
    if "tpu" in {d.platform for d in jax.devices()}:
        return
    with pytest.raises(SystemExit, match="--platform tpu: no such backend here; available: "):
        script.main(["--quick", "--platform", "tpu", "--out", str(tmp_path)])
    assert not (tmp_path / "results.json").exists()


# the runnable scripts; a helper module beside them (torch_peer) has no main
SCRIPTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.py")
                 if 'if __name__ == "__main__":' in p.read_text())


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_has_help_and_shows_its_default(name, monkeypatch):
    """--help explains every flag and gives its default (in words where it is None)."""
    parsers = []

    def capture(parser, *args, **kwargs):
        parsers.append(parser)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        load_script(name).main(["--help"])
    (parser,) = parsers
    flags = {flag for action in parser._actions for flag in action.option_strings}
    assert {"--quick", "--seed", "--out", "--platform", "--no-progress"} <= flags
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{name}: {action.option_strings} has no help text"
        if action.default is None and not isinstance(action, argparse._StoreTrueAction):
            assert "default" in action.help, f"{name}: {action.option_strings}: no default"
    text = parser.format_help()
    assert "(default: 0)" in text  # --seed: the formatter shows the defaults


@pytest.mark.parametrize("models", [("logistic", "mlp", "cnn"), ("gru", "transformer")],
                         ids=["feedforward", "sequence"])  # the LSTM is built like the GRU
def test_mnist1d_models_quick(tmp_path, env, models):
    """The table's rows, each trained with both gradients from the same init."""
    results, stdout = run_quick("mnist1d_models.py", tmp_path, env, "--models", *models)
    assert list(results["summary"]) == list(models)
    for name, by_grad in results["runs"].items():
        manual, auto = by_grad["manual"][0], by_grad["autodiff"][0]
        assert manual["history"]["loss"][0] == pytest.approx(auto["history"]["loss"][0], rel=1e-6)
        assert manual["test_accuracy"] == pytest.approx(auto["test_accuracy"], abs=0.02), name
    assert "paper" in stdout and models[-1] in stdout
    assert_png(tmp_path / "accuracy.png")


def test_attention_memory_quick(tmp_path, env):
    """The three gradients of one tiny attention (T = 20 in 3 key blocks, one padded) agree,
    and every figure the full run reports is there."""
    results, stdout = run_quick("attention_memory.py", tmp_path, env)
    (point,) = results["points"]
    assert (point["T"], point["n_blocks"]) == (20, 3)
    assert max(point["max_rel_err"].values()) < 1e-5
    for name in ("manual", "plain", "checkpoint"):
        assert point[name]["time"]["median"] > 0 and "temp_bytes" in point[name]["memory"]
    assert point["time_ratio"]["manual"]["median"] > 0
    assert results["target"]["measured"] is False and "T = 2048 not in this sweep" in stdout
    assert_png(tmp_path / "attention_memory.png")


def test_memory_depth_quick(tmp_path, env):
    """Every gradient of one tiny depth agrees with jax.grad of its net, every figure the
    full run reports is there, and the trained pair has its accuracies."""
    results, stdout = run_quick("memory_depth.py", tmp_path, env)
    (point,) = results["points"]
    for name in ("autodiff", "checkpoint", "manual", "remat", "reversible"):
        assert point[name]["time"]["median"] > 0 and "temp_bytes" in point[name]["memory"]
        if name != "autodiff":
            assert point[name]["rel_err_vs_autodiff"] < 1e-5
    assert 0 < point["reconstruction_rel_err"] < 1e-5
    trained = results["trained"]
    assert all(0 <= r["test_accuracy"] <= 1 for runs in trained["runs"].values() for r in runs)
    assert results["target"]["measured"] is False and "not all in this sweep" in stdout
    assert_png(tmp_path / "memory_depth.png")


def test_adding_problem_quick(tmp_path, env):
    """One cell at the quick lengths (each length compiles afresh: more would pass 15 s)."""
    results, stdout = run_quick("adding_problem.py", tmp_path, env, "--cells", "gru")
    lengths = results["config"]["lengths"]
    assert [(r["cell"], r["T"]) for r in results["runs"]] == [("gru", T) for T in lengths]
    for r in results["runs"]:
        assert len(r["grad_norm_init"]) == len(r["grad_norm_trained"]) == r["T"]
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["test_mse"] > 0
        assert len(r["history"]["loss"]) == results["config"]["steps"]
    assert set(results["summary"]["gru"]) == {str(T) for T in lengths}
    assert "always answering 1" in stdout
    assert_png(tmp_path / "mse.png")
    assert_png(tmp_path / "grad_norm.png")


def test_second_order_quick(tmp_path, env):
    """K-FAC, Adam and SGD each train the MLP from the same init; table and figures."""
    results, stdout = run_quick("second_order.py", tmp_path, env)
    optimizers = results["models"]["mlp"]["optimizers"]
    assert set(optimizers) == {"kfac", "adam", "sgd"}
    for s in optimizers.values():
        assert s["ms_per_step"] > 0 and len(s["train_loss"]) == 1
        assert s["runs"][0]["eval"][-1]["train_loss"] < s["runs"][0]["eval"][0]["train_loss"]
    assert "steps to Adam's final loss" in stdout
    for name in ("loss_steps", "loss_time", "accuracy"):
        assert_png(tmp_path / f"{name}.png")


def test_padded_sequences_quick(tmp_path, env):
    """The GRU trained masked (manual and autodiff) and unmasked: a masked model's accuracy
    is the same at both paddings; the tags are those of the task."""
    results, stdout = run_quick("padded_sequences.py", tmp_path, env, "--models", "gru")
    runs = {r["training"]: r for r in results["runs"]}
    assert set(runs) == {"masked manual", "masked autodiff", "unmasked manual"}
    for name in ("masked manual", "masked autodiff"):
        assert runs[name]["accuracy"]["x1"] == runs[name]["accuracy"]["x8"], name
    assert runs["masked manual"]["final_train_loss"] == pytest.approx(
        runs["masked autodiff"]["final_train_loss"], rel=1e-4)
    assert "unmasked manual" in stdout
    assert_png(tmp_path / "accuracy.png")
    script = load_script("padded_sequences")
    digits, tags = script.make_data(20, 0)
    for d, t in zip(digits, tags):
        assert 5 <= len(d) <= 30 and d.min() >= 1 and d.max() <= 9
        assert (t == (d > d.mean())).all()
    x, labels, side = script.batch("encoder-decoder", digits[:2], tags[:2], 30)
    n = len(digits[0])
    assert x.shape == (2, 60) and (x[0, :n] == digits[0]).all() and (x[0, n:30] == 0).all()
    assert x[0, 30] == script.BOS and (x[0, 31:30 + n] == digits[0][::-1][:-1]).all()
    assert (labels[0, :n] == digits[0][::-1]).all() and (labels[0, n:] == -100).all()
    assert side["lengths"][0] == side["source_lengths"][0] == n


def test_denoise_unet_quick(tmp_path, env):
    """One decoder, one epoch of a one-level U-Net: the two gradients agree at init and
    along the run, and the noise drawn offline has the variance asked for."""
    results, stdout = run_quick("denoise_unet.py", tmp_path, env)
    (run,) = results["runs"]
    assert run["decoder"] == "conv_transpose" and run["init_grads_agree"]
    assert run["init_grad_rel_error"] < 1e-5 and run["loss_diff_max"] < 1e-4
    assert run["manual"]["test_mse"] == pytest.approx(run["autodiff"]["test_mse"], rel=1e-4)
    assert len(run["manual"]["test_mse_per_epoch"]) == results["config"]["epochs"] + 1
    assert results["noisy_test_mse"] == pytest.approx(results["config"]["noise"] ** 2, rel=0.2)
    assert "conv_transpose" in stdout and "autodiff" in stdout
    assert_png(tmp_path / "denoise_unet.png")


def test_adding_problem_data():
    """Shapes, the two markers (one in each half), the target, and the seed decides all."""
    make_data = load_script("adding_problem").make_data
    x, y = make_data(50, 10, seed=3)
    assert x.shape == (50, 10, 2) and y.shape == (50, 1)
    assert x.dtype == y.dtype == np.float32
    markers = x[..., 1]
    assert (markers.sum(1) == 2).all()
    assert (markers[:, :5].sum(1) == 1).all() and (markers[:, 5:].sum(1) == 1).all()
    np.testing.assert_allclose(y[:, 0], (x[..., 0] * markers).sum(1), rtol=1e-6)
    again, other = make_data(50, 10, seed=3), make_data(50, 10, seed=4)
    assert np.array_equal(x, again[0]) and np.array_equal(y, again[1])
    assert not np.array_equal(x, other[0])


def test_char_lm_quick(tmp_path, env):
    """Both models, each trained with both gradients from the same init on the same
    batches, stay together to float32 round-off over the few quick steps. Compiling the
    four training steps is most of the run: LLVM's optimisation level 0 (``env``) cut the
    script's CPU time by about a third (18–24 s to 13–17 s, measured at load 2–5)."""
    results, stdout = run_quick("char_lm.py", tmp_path, env, process=True)
    corpus = results["corpus"]
    assert corpus["chars"] == corpus["train_chars"] + corpus["val_chars"]
    assert len(corpus["sha256"]) == 64 and corpus["vocab_size"] > 80
    steps = results["config"]["steps"]
    for name in ("transformer", "lstm"):
        for grad in ("manual", "autodiff"):
            history = results["runs"][name][grad]["history"]
            assert len(history["loss"]) == steps
            assert [e["step"] for e in history["eval"]][-1] == steps
            assert 0 < results["runs"][name][grad]["val_bpc"] < 8
        assert results["agreement"][name]["max_abs_loss_diff"] < 1e-4
        sample = results["samples"][name]
        assert sample.startswith(results["samples"]["prompt"])
        assert len(sample) == len(results["samples"]["prompt"]) + 20
        assert sample in stdout
    assert_png(tmp_path / "curves.png")
