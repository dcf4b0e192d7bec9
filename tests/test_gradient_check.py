"""The gradient-check experiment runs end to end and reports agreement."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gradient_check_quick(tmp_path):
    out = tmp_path / "gc"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments/gradient_check.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all combinations agree" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["all_ok"] is True
    assert {r["dtype"] for r in results["rows"]} == {"float32", "float64"}
    for row in results["rows"]:
        assert row["manual_vs_autodiff"] <= results["config"]["tol_autodiff"][row["dtype"]]
        assert row["manual_vs_fd"] <= results["config"]["tol_fd"][row["dtype"]]
    assert (out / "gradient_check.png").stat().st_size > 1000


def test_gradient_check_rejects_bad_width(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "experiments/gradient_check.py"),
                           "--width", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--width must be positive, got 0" in proc.stderr
