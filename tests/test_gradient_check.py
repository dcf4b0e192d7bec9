"""The gradient-check experiment runs end to end and reports agreement."""

import json

import pytest

from conftest import run_main


def test_gradient_check_quick(tmp_path):
    out = tmp_path / "gc"
    stdout = run_main("gradient_check", ["--quick", "--out", out])
    assert "all combinations agree" in stdout
    results = json.loads((out / "results.json").read_text())
    assert results["all_ok"] is True
    assert {r["dtype"] for r in results["rows"]} == {"float32", "float64"}
    for row in results["rows"]:
        assert row["manual_vs_autodiff"] <= results["config"]["tol_autodiff"][row["dtype"]]
        assert row["manual_vs_fd"] <= results["config"]["tol_fd"][row["dtype"]]
    assert (out / "gradient_check.png").stat().st_size > 1000


def test_gradient_check_rejects_bad_width(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_main("gradient_check", ["--width", "0", "--out", tmp_path])
    assert exit_.value.code == 2 and "--width must be positive, got 0" in capsys.readouterr().err
