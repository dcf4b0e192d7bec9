"""Per-example gradient norms: one hand-written backward pass against jax.vmap(jax.grad).

For every grid point (batch × width, fixed depth) it builds ``mlp([width]*(depth+1) + [10])``
(``depth`` hidden ReLU layers of ``width`` units, input size ``width``, 10 classes) and
compiles, apart from the timing, two jitted functions of ``(params, x, y) -> (B,)``:

  manual      jbp.per_example_grad_norms: ‖a_i‖²·‖δ_i‖² per dense layer, from the deltas of
              one manual backward pass; no per-example gradient is ever formed
  vmap_grad   ‖jax.grad(ℓ_i)‖ for every i by jax.vmap(jax.grad(...)) (forms all B gradients)

It checks that both agree (float32 on the grid, float64 on a small model), times them
interleaved (paired per-round ratio vmap_grad/manual), and records XLA's compiled memory
figures. The grid is a batch sweep at the largest width and a width sweep at the largest
batch; the target point is batch 256, width 1024, depth 3: manual ≥ 10× faster.

With ``--cnn`` the model is the MNIST-1D CNN instead (input (40, 1); ``depth`` convolutions
of ``width`` channels, kernel 5, ReLU; a global average pool and a dense head) over a batch
sweep: there the manual norms come from the convolution's per-example rule (BackPACK's
Gram-matrix trick over unfolded inputs where it is cheaper than forming the gradients).

Writes ``results.json`` and ``speedup.png``, ``memory.png`` into ``--out``.

    .venv/bin/python experiments/per_example.py --out runs/per_example
    .venv/bin/python experiments/per_example.py --cnn --out runs/per_example_cnn
    .venv/bin/python experiments/per_example.py --quick --out /tmp/per_example
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jbp
from jbp import bench, cli
from jbp.io import write_json

N_CLASSES = 10
FULL = {"batches": (16, 64, 256), "widths": (128, 256, 512, 1024), "depth": 3, "budget_s": 20.0}
QUICK = {"batches": (4, 8), "widths": (8,), "depth": 1, "budget_s": 0.2}
FULL_CNN = {"batches": (16, 64, 256), "widths": (32,), "depth": 4, "budget_s": 20.0}
QUICK_CNN = {"batches": (4, 8), "widths": (4,), "depth": 1, "budget_s": 0.2}
CNN_INPUT = (40, 1)  # an MNIST-1D signal: 40 steps of one channel
TARGET = {"batch": 256, "width": 1024, "depth": 3, "speedup_min": 10.0}


def model_for(width: int, depth: int, cnn: bool = False):
    """``(model, per-example input shape)``: the MLP of the grid, or the MNIST-1D CNN."""
    if not cnn:
        return jbp.mlp([width] * (depth + 1) + [N_CLASSES], "relu"), (width,)
    layers = []
    for _ in range(depth):
        layers += [jbp.conv(width, 5), jbp.relu()]
    return jbp.serial(*layers, jbp.global_avg_pool(), jbp.dense(N_CLASSES)), CNN_INPUT


def vmap_grad_norms(model, loss):
    """The reference: every ∇ℓ_i by vmap(grad) over batches of one, then its norm."""

    def norms(params, x, y):
        def loss_one(p, xi, yi):
            return loss.value(model.apply(p, xi[None]), yi[None])

        grads = jax.vmap(jax.grad(loss_one), in_axes=(None, 0, 0))(params, x, y)
        leaves = jax.tree_util.tree_leaves(grads)
        return jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in leaves))

    return norms


def init_params(model, key, in_shape):
    """``model.init`` jitted: one compile instead of one per eager random op."""
    return jax.jit(lambda k: model.init(k, in_shape)[1])(key)


def data(key, batch, in_shape, dtype=jnp.float32):
    def draw(key):
        kx, ky = jax.random.split(key)
        return (jax.random.normal(kx, (batch, *in_shape), dtype),
                jax.random.randint(ky, (batch,), 0, N_CLASSES))

    return jax.jit(draw)(key)


def max_rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


def float64_check(seed: int) -> float:
    """Max relative error of the manual norms against vmap(grad) in float64."""
    loss = jbp.losses.softmax_cross_entropy
    with jax.enable_x64(True):
        model = jbp.mlp([20, 32, 32, N_CLASSES], "relu", dtype=jnp.float64)
        params = init_params(model, jax.random.key(seed), (20,))
        x, y = data(jax.random.key(seed + 1), 16, (20,), jnp.float64)
        manual = jax.jit(jbp.per_example_grad_norms(model, loss))(params, x, y)
        ref = jax.jit(vmap_grad_norms(model, loss))(params, x, y)
        return max_rel_err(manual, ref)


def run_point(batch, width, depth, seed, budget_s, cnn=False) -> dict:
    loss = jbp.losses.softmax_cross_entropy
    model, in_shape = model_for(width, depth, cnn)
    k_init, k_data = jax.random.split(jax.random.fold_in(jax.random.key(seed), batch * 7919 + width))
    params = init_params(model, k_init, in_shape)
    x, y = data(k_data, batch, in_shape)
    n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
    funcs = {"manual": jbp.per_example_grad_norms(model, loss),
             "vmap_grad": vmap_grad_norms(model, loss)}
    point = {"batch": batch, "width": width, "depth": depth, "n_params": int(n_params)}
    compiled, outs = {}, {}
    for name, f in funcs.items():
        compiled[name], seconds = bench.compile_timed(f, params, x, y)
        outs[name] = compiled[name](params, x, y)
        point[name] = {"compile_s": seconds, **bench.compiled_stats(compiled[name])}
    point["max_rel_err"] = max_rel_err(outs["manual"], outs["vmap_grad"])
    one_round = sum(bench.time_call(lambda c=c: c(params, x, y)) for c in compiled.values())
    repeats = bench.repeats_for(one_round, budget_s, lo=3, hi=50)
    times = bench.interleaved_times(
        {name: (lambda c=c: c(params, x, y)) for name, c in compiled.items()}, repeats, warmup=0)
    for name in funcs:
        point[name]["time"] = bench.summary(times[name])
    point["speedup"] = bench.paired_ratios(times["vmap_grad"], times["manual"])
    temp_m = point["manual"]["memory"].get("temp_bytes")
    temp_v = point["vmap_grad"]["memory"].get("temp_bytes")
    point["temp_bytes_ratio"] = (temp_v / temp_m) if temp_m and temp_v is not None else None
    return point


def plot(points, cfg, out, quick=False):
    plt = cli.plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    wmax, bmax = max(cfg["widths"]), max(cfg["batches"])
    for ax, key, fixed, fixed_val in ((axes[0], "batch", "width", wmax), (axes[1], "width", "batch", bmax)):
        sel = sorted((p for p in points if p[fixed] == fixed_val), key=lambda p: p[key])
        xs = [p[key] for p in sel]
        for name, style in (("manual", "o-"), ("vmap_grad", "s--")):
            ax.plot(xs, [p[name]["time"]["median"] * 1e3 for p in sel], style, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("median time per call (ms)")
        ax.set_title(f"per-example grad norms, {fixed} {fixed_val}, depth {cfg['depth']}")
        ax.legend()
    cli.save_figure(fig, out / "speedup.png", quick=quick)

    fig, ax = plt.subplots(figsize=(6, 4))
    sel = sorted(points, key=lambda p: (p["batch"], p["width"]))
    labels = [f"B{p['batch']}\nW{p['width']}" for p in sel]
    idx = np.arange(len(sel))
    for off, name in ((-0.2, "manual"), (0.2, "vmap_grad")):
        ax.bar(idx + off, [p[name]["memory"].get("temp_bytes", 0) / 2**20 for p in sel], 0.4, label=name)
    ax.set_xticks(idx, labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("XLA temp memory (MiB)")
    ax.set_title("compiled temporary memory")
    ax.legend()
    cli.save_figure(fig, out / "memory.png", quick=quick)


def main(argv=None):
    parser = cli.experiment_parser(__doc__.split("\n\n")[0], "runs/per_example")
    parser.add_argument("--cnn", action="store_true",
                        help="the MNIST-1D CNN over a batch sweep instead of the MLP grid")
    args = parser.parse_args(argv)
    info = cli.start_device(args.platform)
    cfg = {(False, False): FULL, (False, True): QUICK, (True, False): FULL_CNN,
           (True, True): QUICK_CNN}[args.cnn, args.quick]
    grid = sorted({(b, max(cfg["widths"])) for b in cfg["batches"]}
                  | {(max(cfg["batches"]), w) for w in cfg["widths"]})
    start = time.perf_counter()
    f64_err = float64_check(args.seed)
    points = [run_point(b, w, cfg["depth"], args.seed, cfg["budget_s"], args.cnn)
              for b, w in tqdm(grid, desc="grid points", file=sys.stdout,
                   disable=not cli.show_progress(args))]

    target_point = next((p for p in points if (p["batch"], p["width"], p["depth"]) ==
                         (TARGET["batch"], TARGET["width"], TARGET["depth"])), None)
    target = dict(TARGET)
    if target_point is None or args.cnn:
        target.update(measured=False, holds=None,
                      note="target point not in this grid (--quick, or --cnn: it is an MLP)")
    else:
        speedup = target_point["speedup"]["median"]
        target.update(measured=True, speedup=speedup, holds=bool(speedup >= TARGET["speedup_min"]),
                      temp_bytes_ratio=target_point["temp_bytes_ratio"])

    results = {"experiment": "per_example", "device": info, "seed": args.seed,
               "quick": args.quick, "config": {**cfg, "quick": args.quick, "seed": args.seed,
                                               "model": repr(model_for(*cfg["widths"][-1:],
                                                                       cfg["depth"], args.cnn)[0])},
               "float64_max_rel_err": f64_err,
               "float32_max_rel_err": max(p["max_rel_err"] for p in points),
               "points": points, "target": target,
               "wall_s": time.perf_counter() - start,
               "note": "timings on a shared machine; speedup = paired per-round ratio "
                       "vmap_grad/manual (median)"}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", results)
    plot(points, cfg, args.out, args.quick)

    print(f"{'batch':>6}{'width':>7}{'manual ms':>11}{'vmap ms':>10}{'speedup':>9}"
          f"{'temp MiB m/v':>18}{'rel err':>10}")
    for p in points:
        tm = p["manual"]["memory"].get("temp_bytes", float("nan")) / 2**20
        tv = p["vmap_grad"]["memory"].get("temp_bytes", float("nan")) / 2**20
        print(f"{p['batch']:>6}{p['width']:>7}{p['manual']['time']['median'] * 1e3:>11.3f}"
              f"{p['vmap_grad']['time']['median'] * 1e3:>10.3f}{p['speedup']['median']:>8.1f}x"
              f"{tm:>9.2f}/{tv:<8.2f}{p['max_rel_err']:>10.1e}")
    print(f"float64 check: max rel err {f64_err:.1e}")
    if target["measured"]:
        print(f"target (batch {TARGET['batch']}, width {TARGET['width']}, depth {TARGET['depth']}: "
              f"manual >= {TARGET['speedup_min']:.0f}x faster): {target['speedup']:.1f}x -> "
              f"{'holds' if target['holds'] else 'does NOT hold'}; XLA temp memory ratio "
              f"vmap/manual {target['temp_bytes_ratio']:.1f}x")
    else:
        print(f"target: {target['note']}")
    print(f"wrote {args.out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
