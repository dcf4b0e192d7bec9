"""The per-example and DP-SGD experiments run with --quick as real processes and write their files."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def run_quick(script, out, *extra):
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / script), "--quick",
                           "--seed", "3", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"device: {jax.devices()[0].platform}" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["device"]["platform"] == jax.devices()[0].platform
    assert results["config"]["quick"] is True and results["config"]["seed"] == 3
    return results, done.stdout


def assert_png(path):
    assert path.read_bytes()[:8] == PNG, f"{path} is not a PNG"


def test_per_example_quick(tmp_path):
    results, stdout = run_quick("per_example.py", tmp_path)
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


def test_dp_sgd_quick(tmp_path):
    # Gaussian clusters instead of MNIST-1D: the same pipeline without generating the data
    # set (jbp.data has its own tests).
    results, stdout = run_quick("dp_sgd.py", tmp_path, "--data", "synthetic")
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


@pytest.mark.parametrize("script", ["per_example.py", "dp_sgd.py"])
def test_help(script):
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / script), "--help"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0
    for flag in ("--quick", "--seed", "--out", "--platform"):
        assert flag in done.stdout
