"""The benchmark's helpers on fake timings, and its --quick run end to end.

Nothing here asserts a wall-clock time: timings are only checked for shape and sign.
"""

import importlib.util
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp
from conftest import load_script, run_main
from jbp import bench, cli


# --- FLOP counting ---------------------------------------------------------------------

def test_mlp_step_flops_counts_three_products_per_layer_but_not_the_data_gradient():
    # layers (2,4)@(4,8) and (2,8)@(8,3): 2·B·in·out = 128 and 96 FLOPs
    flops = bench.mlp_step_flops(2, [4, 8, 3])
    assert flops["forward"] == 128 + 96
    assert flops["backward"] == 2 * (128 + 96) - 128  # no ∂C/∂x for the first layer
    assert flops["step"] == flops["forward"] + flops["backward"]
    assert bench.mlp_step_flops(2, [4, 8, 3], input_grad=True)["backward"] == 2 * (128 + 96)


def test_mlp_step_flops_matches_xla_within_elementwise_work():
    # XLA's own count of the compiled manual gradient: the products plus O(B·n) extras.
    sizes, batch = [64, 64, 64, 10], 32
    model = jbp.mlp(sizes)
    _, params = model.init(jax.random.key(0), (sizes[0],))
    x, y = jnp.ones((batch, sizes[0])), jnp.zeros((batch,), jnp.int32)
    grad = jbp.manual_value_and_grad(model, jbp.losses.softmax_cross_entropy)
    compiled, seconds = bench.compile_timed(grad, params, x, y)
    stats = bench.compiled_stats(compiled)
    ours = bench.mlp_step_flops(batch, sizes)["step"]
    assert seconds >= 0
    assert ours <= stats["cost"]["flops"] <= 1.05 * ours
    assert stats["memory"]["temp_bytes"] >= 0 and stats["memory"]["argument_bytes"] > 0


def test_step_flops_counts_each_forward_product_three_times():
    # (2,4)@(4,8) then (2,8)@(8,3), as the MLP above; the first one's data gradient dropped
    assert bench.step_flops([(2, 4, 8), (2, 8, 3)]) == bench.mlp_step_flops(2, [4, 8, 3])
    assert bench.step_flops([(5, 2, 3)], input_grad=True)["step"] == 3 * 2 * 5 * 2 * 3


@pytest.mark.parametrize("batch,sizes", [(0, [4, 3]), (2, [4]), (2, [4, 0])])
def test_mlp_step_flops_rejects_bad_shapes(batch, sizes):
    with pytest.raises(ValueError, match="mlp_step_flops"):
        bench.mlp_step_flops(batch, sizes)


# --- paired timing on fake timings -----------------------------------------------------

def test_paired_ratios_are_per_round():
    r = bench.paired_ratios([2.0, 4.0, 9.0, 1.0], [1.0, 2.0, 3.0, 1.0])
    assert r["ratios"] == [2.0, 2.0, 3.0, 1.0]
    assert r["median"] == 2.0 and r["min"] == 1.0 and r["n"] == 4
    assert r["q25"] <= r["median"] <= r["q75"]


def test_paired_ratio_median_differs_from_ratio_of_medians():
    # A slow patch that hits both contenders in round 2 cancels out of the pairs.
    a, b = [1.0, 10.0, 1.1], [1.1, 11.0, 1.0]
    assert bench.paired_ratios(a, b)["median"] == pytest.approx(10 / 11)
    assert np.median(a) / np.median(b) == pytest.approx(1.1 / 1.1)


@pytest.mark.parametrize("a,b", [([1.0, 2.0], [1.0]), ([], []), ([1.0], [0.0])])
def test_paired_ratios_rejects_bad_series(a, b):
    with pytest.raises(ValueError, match="paired_ratios"):
        bench.paired_ratios(a, b)


def test_interleaved_times_swaps_pairs_and_pairs_rounds():
    calls = []
    thunks = {name: (lambda name=name: calls.append(name)) for name in "xabyc"}
    times = bench.interleaved_times(thunks, repeats=3, warmup=1, swap=[("a", "b")])
    assert calls == list("xabyc" + "xabyc" + "xbayc" + "xabyc")
    assert set(times) == set("xabyc")
    assert all(t.shape == (3,) and np.all(t >= 0) for t in times.values())
    with pytest.raises(ValueError, match="repeats"):
        bench.interleaved_times(thunks, repeats=0)
    with pytest.raises(ValueError, match="neighbouring"):
        bench.interleaved_times(thunks, repeats=1, swap=[("a", "c")])


def test_repeats_for_and_summary():
    assert bench.repeats_for(0.1, 2.0, lo=3, hi=100) == 20
    assert bench.repeats_for(10.0, 2.0, lo=3, hi=100) == 3
    assert bench.repeats_for(1e-6, 2.0, lo=3, hi=100) == 100
    s = bench.summary([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["n"]) == (2.0, 1.0, 3)


def test_saved_bytes_counts_distinct_arrays_and_inputs_apart():
    x = jnp.ones((4, 8), jnp.float32)

    def fun(x):
        y = 2 * x
        return {"x": x, "y": y, "y_again": y, "z": jnp.sum(y)}

    s = bench.saved_bytes(fun, x)
    assert s == {"computed_bytes": 4 * 8 * 4 + 4, "input_bytes": 4 * 8 * 4, "computed_arrays": 2}


# --- the script ------------------------------------------------------------------------

@pytest.mark.parametrize("argv,flag", [(["--batch", "0"], "--batch"),
                                       (["--width", "a,b"], "--width"),
                                       (["--activation", "nope"], "nope"),
                                       (["--budget", "-1"], "--budget"),
                                       (["--models", "mlp,gan"], "gan"),
                                       (["--models", "cnn", "--width", "8"], "--width")])
def test_bad_flags_name_the_argument(argv, flag, capsys):
    script = load_script("benchmark")
    with pytest.raises(SystemExit) as exc:
        script.parse_args(argv)
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_models_flag_chooses_the_families():
    script = load_script("benchmark")
    assert script.parse_args([]).models == ("mlp", "cnn", "rnn", "attention")  # all by default
    assert [s.family for s in script.specs(script.parse_args(["--quick", "--models", "cnn"]))] \
        == ["cnn"] * len(script.QUICK_CNNS)
    assert {s.family for s in script.specs(script.parse_args(["--quick", "--models", "mlp"]))} \
        == {"mlp"}


def test_cnn_specs_build_the_issue_models():
    # Built, not compiled or timed: the MNIST-1D CNN is mnist1d_models.build("cnn", 32).
    script = load_script("benchmark")
    one = script.cnn_spec("cnn1d", **script.CNNS["cnn1d"])
    built, shape = cli.sibling(script.__file__, "mnist1d_models").build("cnn", 32)
    assert (one.model == built, one.in_shape, one.batch) == (True, (40, 1), 100)
    assert one.matmul == (100 * 40, 5 * 32, 32) and one.flops is None  # XLA counts
    two = script.cnn_spec("cnn2d", **script.CNNS["cnn2d"])
    assert (two.in_shape, two.batch, two.matmul) == ((32, 32, 3), 128, (128 * 32 * 32, 9 * 64, 64))
    params = jax.eval_shape(lambda k: two.model.init(k, two.in_shape)[1], jax.random.key(0))
    x = jax.ShapeDtypeStruct((two.batch, *two.in_shape), jnp.float32)
    assert jax.eval_shape(two.model.apply, params, x).shape == (128, 10)
    convs = [p["W"].shape for p in params if isinstance(p, dict) and "W" in p
             and p["W"].ndim == 4]
    assert convs == [(3, 3, 3, 64)] + [(3, 3, 64, 64)] * 3
    three = script.cnn_spec("unet1d", **script.CNNS["unet1d"])  # the decoder layers' point
    params = jax.eval_shape(lambda k: three.model.init(k, three.in_shape)[1], jax.random.key(0))
    x = jax.ShapeDtypeStruct((three.batch, *three.in_shape), jnp.float32)
    assert jax.eval_shape(three.model.apply, params, x).shape == (100, 10)
    assert "conv_transpose" in repr(three.model) and "group_norm" in repr(three.model)
    with pytest.raises(ValueError, match="unknown CNN"):
        script.cnn_spec("cnn3d", 1, 1, (4, 4, 4, 1))


def test_sequence_specs_build_the_issue_models():
    # Built and shape-checked, not compiled: the counted products must be the model's.
    script = load_script("benchmark")
    for name, gates in script.GATES.items():
        spec = script.rnn_spec(name, **script.RNNS[name])
        params = jax.eval_shape(lambda k: spec.model.init(k, spec.in_shape)[1], jax.random.key(0))
        assert params[0]["W_x"].shape == (32, gates * 128) and spec.matmul == (32, 128, gates * 128)
        assert spec.flops["forward"] == 2 * 32 * 128 * (32 + 128) * gates * 128 + 2 * 32 * 128 * 10
    attn = script.attention_spec("attn512", **script.ATTENTIONS["attn512"])
    params = jax.eval_shape(lambda k: attn.model.init(k, attn.in_shape)[1], jax.random.key(0))
    x = jax.ShapeDtypeStruct((attn.batch, *attn.in_shape), jnp.float32)
    assert jax.eval_shape(attn.model.apply, params, x).shape == (4, 10)
    assert params[1]["q"]["W"].shape == (256, 256) and attn.matmul == (4 * 512, 256, 256)
    bt = 4 * 512
    assert attn.flops["forward"] == 2 * (bt * 32 * 256 + 4 * bt * 256 * 256
                                         + 2 * 4 * 4 * 512 * 512 * 64 + 4 * 256 * 10)
    with pytest.raises(ValueError, match="unknown recurrent"):
        script.rnn_spec("transformer", 1, 1, 1, 1)


def test_without_pytorch_the_column_is_a_dash_and_the_hint_says_how(monkeypatch, capsys):
    script = load_script("benchmark")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    assert script.load_torch_peer("torch") is None
    assert "pip install -e .[peers]" in capsys.readouterr().err
    assert script.load_torch_peer("none") is None and capsys.readouterr().err == ""
    assert script.torch_cells({"ratio_manual_vs_torch": None, "torch": None}) == ("—",) * 3
    assert "not installed" in script.peers_line(script.peers_info("torch", None))
    assert script.peers_info("none", None) == {} and script.peers_line({}) is None
    assert script.parse_args(["--peers", "none"]).peers == "none"
    with pytest.raises(SystemExit):
        script.parse_args(["--peers", "jax"])


def test_xla_counts_conv_flops_of_real_taps():
    # What the CNN points' GFLOP/s rest on: cost_analysis() reports a convolution's FLOPs
    # on CPU: 2 per multiply-add of the kernel taps that meet real input ("SAME" padding
    # is not counted), plus one per bias add.
    batch, c, o, in_shape = 2, 4, 6, (10, 10, 4)
    # taps per (example, channel pair): VALID 8×8 outputs × 9; SAME 10×10 outputs, where
    # along each axis the 10 windows' 3 taps meet 3·10 − 2 real rows in all (the two end
    # windows each lose one tap to the padding)
    for padding, positions, taps in (("VALID", 8 * 8, 8 * 8 * 9), ("SAME", 10 * 10, 28 * 28)):
        layer = jbp.conv(o, 3, padding=padding)
        params = {"W": jnp.ones((3, 3, c, o)), "b": jnp.ones((o,))}  # no random draw to compile
        compiled, _ = bench.compile_timed(layer.apply, params, jnp.ones((batch, *in_shape)))
        flops = bench.compiled_stats(compiled)["cost"]["flops"]
        assert flops == 2 * batch * taps * c * o + batch * positions * o, padding


HAS_TORCH = importlib.util.find_spec("torch") is not None


def test_quick_run_writes_results_and_plots(tmp_path):
    """Where PyTorch is installed, with its column (one eager step per point, checked
    against jbp's gradients); without it (CI), with "—" in its place."""
    out = tmp_path / "bench"
    run_main("benchmark", ["--quick", "--out", out])
    for png in ("step_time.png", "ratio.png", "gflops.png", "memory.png", "table.md"):
        assert (out / png).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert {"experiment", "command", "device", "config", "peak_matmul", "summary", "points",
            "wall_s"} <= set(results)
    assert {"platform", "device_kind", "jax", "jaxlib", "cpu_count"} <= set(results["device"])
    assert results["peak_matmul"]["gflops"] > 0
    assert {"forward", "input_grad", "weight_grad"} <= set(results["product_forms_gflops"])
    config = results["config"]
    assert config["models"] == ["mlp", "cnn", "rnn", "attention"] == list(results["summary"])
    for family, summary in results["summary"].items():
        assert set(summary["targets"]) == {
            "ratio_median_le_1.00", "no_point_above_1.05", "largest_ge_90pct_peak",
            "manual_step_temp_le_autodiff", "manual_grad_temp_le_autodiff"}
        assert summary["n_points"] == sum(p["family"] == family for p in results["points"])
    grid = config["grid"]
    n_mlp = np.prod([len(grid[k]) for k in ("batch", "width", "depth", "activation")])
    families = [p["family"] for p in results["points"]]
    assert families == ["mlp"] * n_mlp + ["cnn", "rnn", "attention"]  # one tiny point each
    assert [len(config["points"][f]) for f in ("cnn", "rnn", "attention")] == [1, 1, 1]
    table = (out / "table.md").read_text()
    assert results["config"]["peers"] == "torch"
    assert results["peers"]["torch"]["available"] is HAS_TORCH
    for point in results["points"]:
        assert f"| {point['label']} |" in table
        assert set(point["time_s"]) == {"forward", "manual_grad", "autodiff_grad",
                                        "manual_step", "autodiff_step", "matmul",
                                        *(["torch_step"] if HAS_TORCH else [])}
        assert set(point["compile_s"]) == set(point["time_s"]) - {"torch_step"}
        if HAS_TORCH:  # every quick point has a peer, which agrees with jbp
            assert point["torch"]["agreement"]["ok"], point["torch"]
            assert len(point["ratio_manual_vs_torch"]["ratios"]) == point["repeats"]
            assert point["gflops"]["torch_step"] > 0
        else:
            assert point["torch"] is None and point["ratio_manual_vs_torch"] is None
            row = next(line for line in table.splitlines()
                       if line.startswith(f"| {point['label']} |"))
            assert [c.strip() for c in row.split("|")].count("—") == 3  # ms, ratio, error
        for key in ("ratio_step", "ratio_grad"):
            assert len(point[key]["ratios"]) == point["repeats"]
            assert point[key]["median"] > 0
        if point["family"] == "mlp":
            assert point["flops"] == bench.mlp_step_flops(point["batch"], point["sizes"])
            assert point["flops_source"].startswith("counted")
        elif point["family"] != "cnn":  # counted: XLA counts a scan's body once
            assert point["flops_source"].startswith("counted")
        else:  # XLA's figures: the forward's, and the autodiff gradient's for both paths
            xla = point["xla"]
            assert point["flops"]["forward"] == xla["forward"]["cost"]["flops"]
            assert point["flops"]["step"] == xla["autodiff_grad"]["cost"]["flops"]
            assert point["flops_source"].startswith("xla")
            assert point["gflops"]["manual_step"] > 0 and point["gflops"]["autodiff_step"] > 0
        for name in ("forward", "manual_grad", "autodiff_grad", "manual_step", "autodiff_step"):
            assert point["xla"][name]["memory"]["temp_bytes"] >= 0
            assert point["xla"][name]["cost"]["flops"] > 0
        assert point["saved"]["manual_cache"]["computed_bytes"] > 0
        assert point["saved"]["autodiff_residuals"]["computed_bytes"] > 0
