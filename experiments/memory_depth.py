"""Training memory against depth: recomputation and reversible blocks by hand.

MLPs on MNIST-1D: ``dense(W)`` (an input projection), ``D`` equal blocks of width ``W``
and ``dense(10)``, float32, softmax cross-entropy. Two kinds of block with the same
weights and FLOPs per block (W² weights):

- residual:   ``residual(serial(dense(W), act))``
- reversible: ``reversible(F, G)`` with F = G = ``serial(dense(W/2), act, dense(W/2))``

and five training gradients ``(params, x, y) -> (loss, grads)``, each compiled for every depth:

  autodiff    jax.grad of the residual net (keeps every block's activations)
  checkpoint  jax.grad of the residual net with jax.checkpoint around every segment of
              ⌈√n⌉ of its n layers (Chen et al.'s √n scheme, by JAX)
  manual      the residual net's hand-written backward (jbp.manual_value_and_grad)
  remat       the same with ``serial(..., remat_every="sqrt")``: only every segment's
              input is kept, each segment's forward is rerun in the backward
  reversible  the reversible net as ``reversible_serial``: only the final output is kept,
              every block's input is reconstructed from its output on the way down

For each it reports XLA's temporary memory of the compiled gradient
(``memory_analysis().temp_size_in_bytes``: the scratch beyond arguments and outputs, where
the activations live; the optimizer's update, the same for all, is left out) and its time,
interleaved and paired with ``manual`` (median of the per-round ratios; ``reversible``,
whose net has params of its own, in rounds of its own with ``manual``, the two swapping
places, since a call right after one on the same params finds them in the cache). It checks that
every gradient agrees with ``autodiff`` of the same net (``reversible`` against jax.grad
of the reversible net), measures the float32 reconstruction error of the reversible stack
(‖x̂ − x‖/‖x‖ of its input rebuilt from its output, at init), and trains the residual and
the reversible net at one depth for a few seeds (test accuracy, and the reconstruction
error after training).

Targets (issue 22): reversible's temporary memory flat in depth, at most 1.2× from depth 8
to depth 128, at at most 1.5× the time of ``manual`` (judged at depth 128); its test
accuracy equal to the residual net's within noise.

Writes ``results.json`` and ``memory_depth.png`` into ``--out``.

    .venv/bin/python experiments/memory_depth.py --out runs/memory_depth
    .venv/bin/python experiments/memory_depth.py --quick --out /tmp/memory_depth
"""

import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jbp
from jbp import bench, cli
from jbp.io import write_json
from jbp.layers.memory import invert, segment_length

LOSS = jbp.losses.softmax_cross_entropy
N_IN = 40
VARIANTS = ("autodiff", "checkpoint", "manual", "remat", "reversible")
TARGET = {"from_depth": 8, "to_depth": 128, "memory_growth_max": 1.2, "time_ratio_max": 1.5}


def build(kind: str, depth: int, width: int, activation: str, remat: bool = False):
    """The net of ``kind`` ("residual" or "reversible"); ``remat``: the residual net as
    ``serial(..., remat_every="sqrt")``, the same params."""
    act = jbp.activations.get(activation)
    gain = jbp.layers.serial.init_gain(act)
    if kind == "residual":
        blocks = [jbp.residual(jbp.serial(jbp.dense(width, gain=gain), act))
                  for _ in range(depth)]
        return jbp.serial(jbp.dense(width), *blocks, jbp.dense(10),
                          remat_every="sqrt" if remat else None)

    def half():
        return jbp.serial(jbp.dense(width // 2, gain=gain), act, jbp.dense(width // 2))

    stack = jbp.reversible_serial(*[jbp.reversible(half(), half()) for _ in range(depth)])
    return jbp.serial(jbp.dense(width), stack, jbp.dense(10))


def checkpointed(model: jbp.Layer, k: int):
    """``model.apply`` (a serial) with ``jax.checkpoint`` around every segment of ``k``
    layers: what JAX offers for the √n scheme."""
    layers = model.layers
    segments = [range(s, min(s + k, len(layers))) for s in range(0, len(layers), k)]
    parts = [jax.checkpoint(jbp.serial(*[layers[i] for i in seg]).apply) for seg in segments]

    def apply(params, x):
        for seg, part in zip(segments, parts):
            x = part(tuple(params[i] for i in seg), x)
        return x

    return apply


def gradients(depth: int, args):
    """``{variant: (gradient function, params)}`` and the reversible net."""
    residual = build("residual", depth, args.width, args.activation)
    remat = build("residual", depth, args.width, args.activation, remat=True)
    reversible = build("reversible", depth, args.width, args.activation)
    key = jax.random.key(args.seed)
    p_res, p_rev = residual.init(key, (N_IN,))[1], reversible.init(key, (N_IN,))[1]
    apply = checkpointed(residual, segment_length("sqrt", len(residual.layers), "checkpoint"))

    def checkpoint(params, x, y):
        return jax.value_and_grad(lambda p: LOSS.value(apply(p, x), y))(params)

    return {"autodiff": (jbp.autodiff_value_and_grad(residual, LOSS), p_res),
            "checkpoint": (checkpoint, p_res),
            "manual": (jbp.manual_value_and_grad(residual, LOSS), p_res),
            "remat": (jbp.manual_value_and_grad(remat, LOSS), p_res),
            "reversible": (jbp.manual_value_and_grad(reversible, LOSS), p_rev)}, reversible


def rel_error(a, b) -> float:
    """‖a − b‖/‖b‖ over all leaves together."""
    num = sum(float(jnp.sum((x - y) ** 2)) for x, y in
              zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    den = sum(float(jnp.sum(y ** 2)) for y in jax.tree_util.tree_leaves(b))
    return (num / den) ** 0.5


@functools.partial(jax.jit, static_argnums=0)
def reconstruction_error(model: jbp.Layer, params, x):
    """‖x̂ − x‖/‖x‖ for the input x of the reversible stack (``model.layers[1]``) and x̂
    reconstructed from its output, as the backward reconstructs it."""
    stack = model.layers[1]
    h = model.layers[0].apply(params[0], x)
    rebuilt = invert(stack, params[1], stack.apply(params[1], h))
    return jnp.linalg.norm(rebuilt - h) / jnp.linalg.norm(h)


def run_depth(depth: int, batch, args) -> dict:
    fns, reversible = gradients(depth, args)
    x, y = batch
    point = {"depth": depth, "remat_every": segment_length("sqrt", depth + 2, "remat")}
    compiled, outs = {}, {}
    for name in args.variants:
        f, params = fns[name]
        compiled[name], seconds = bench.compile_timed(f, params, x, y)
        outs[name] = jax.block_until_ready(compiled[name](params, x, y))
        point[name] = {"compile_s": seconds, **bench.compiled_stats(compiled[name])}
    if "reversible" in args.variants:
        auto = jbp.autodiff_value_and_grad(reversible, LOSS)
        reference = jax.jit(auto)(fns["reversible"][1], x, y)
        point["reversible"]["rel_err_vs_autodiff"] = rel_error(outs["reversible"][1],
                                                               reference[1])
        point["reconstruction_rel_err"] = float(reconstruction_error(
            reversible, fns["reversible"][1], x))
    for name in set(args.variants) & {"checkpoint", "manual", "remat"}:
        if "autodiff" in args.variants:
            point[name]["rel_err_vs_autodiff"] = rel_error(outs[name][1], outs["autodiff"][1])
    thunks = {name: (lambda c=compiled[name], p=fns[name][1]: c(p, x, y))
              for name in args.variants}
    one_round = sum(bench.time_call(t) for t in thunks.values())
    repeats = bench.repeats_for(one_round, args.budget / 2, lo=args.min_repeats, hi=50)
    # The residual net's gradients share its params; the reversible net has its own, and a
    # call right after one on the same params finds them in the cache. So reversible is
    # timed in rounds of its own with manual, the two swapping places every other round.
    rounds = [[n for n in args.variants if n != "reversible"]]
    if "reversible" in args.variants:
        rounds.append(["manual", "reversible"] if "manual" in args.variants else ["reversible"])
    for names in rounds:
        swap = [tuple(names)] if names == ["manual", "reversible"] else []
        times = bench.interleaved_times({n: thunks[n] for n in names}, repeats, warmup=0,
                                        swap=swap)
        for name in names:
            if name == "manual" and "time" in point[name]:
                continue  # timed with the residual net's gradients
            point[name]["time"] = bench.summary(times[name])
            if "manual" in names:
                point[name]["time_ratio_vs_manual"] = bench.paired_ratios(times[name],
                                                                         times["manual"])
    return point


def train_compare(data, args) -> dict:
    """The residual and the reversible net at ``args.train_depth``, trained alike from
    ``args.seeds`` seeds: test accuracy of each, reconstruction error after training."""
    runs = {"residual": [], "reversible": []}
    for seed in range(args.seed, args.seed + args.seeds):
        for kind in runs:
            model = build(kind, args.train_depth, args.width, args.activation)
            params = model.init(jax.random.key(seed), (N_IN,))[1]
            params, history = jbp.fit(model, LOSS, params, data, key=jax.random.key(seed + 1),
                                      optimizer="adam", learning_rate=args.lr,
                                      epochs=args.epochs, batch_size=args.batch_size,
                                      progress=False, loop="python" if args.quick else "auto")
            run = {"seed": seed, "test_accuracy": history["eval"][-1]["test_accuracy"]}
            if kind == "reversible":
                run["reconstruction_rel_err"] = float(reconstruction_error(
                    model, params, jnp.asarray(data.x_test[: args.batch])))
            runs[kind].append(run)
    summary = {kind: {"mean": float(np.mean([r["test_accuracy"] for r in rs])),
                      "std": float(np.std([r["test_accuracy"] for r in rs]))}
               for kind, rs in runs.items()}
    return {"depth": args.train_depth, "runs": runs, "summary": summary}


def judge(points, args) -> dict:
    """The targets, where the sweep has both depths."""
    by_depth = {p["depth"]: p for p in points}
    lo, hi = TARGET["from_depth"], TARGET["to_depth"]
    target = dict(TARGET)
    if lo not in by_depth or hi not in by_depth or not {"reversible", "manual"} <= set(
            args.variants):
        return {**target, "measured": False,
                "note": f"depths {lo} and {hi} and the variants reversible and manual are "
                        f"not all in this sweep"}
    temp = {d: by_depth[d]["reversible"]["memory"].get("temp_bytes") for d in (lo, hi)}
    growth = temp[hi] / temp[lo] if temp[lo] else None
    ratio = by_depth[hi]["reversible"]["time_ratio_vs_manual"]["median"]
    target.update(measured=True, memory_growth=growth, time_ratio=ratio,
                  memory_holds=bool(growth is not None
                                    and growth <= TARGET["memory_growth_max"]),
                  time_holds=bool(ratio <= TARGET["time_ratio_max"]))
    target["holds"] = target["memory_holds"] and target["time_holds"]
    return target


def plot(points, args, out):
    plt = cli.plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    depths = [p["depth"] for p in points]
    styles = {name: dict(fmt=fmt, color=f"C{i}")
              for i, (name, fmt) in enumerate(zip(VARIANTS, ("s--", "^:", "o-", "D-.", "v-")))}
    for name in args.variants:
        fmt, color = styles[name]["fmt"], styles[name]["color"]
        axes[0].plot(depths, [p[name]["memory"].get("temp_bytes", np.nan) / 2**20
                              for p in points], fmt, color=color, label=name)
        if name != "manual" and "manual" in args.variants:
            axes[1].plot(depths, [p[name]["time_ratio_vs_manual"]["median"] for p in points],
                         fmt, color=color, label=f"{name} / manual")
    axes[0].set(yscale="log", ylabel="XLA temp memory of the gradient (MiB)",
                title=f"batch {args.batch}, width {args.width}, {args.activation}, float32")
    axes[1].axhline(TARGET["time_ratio_max"], color="grey", lw=0.8, ls="--",
                    label=f"target for reversible: {TARGET['time_ratio_max']}")
    axes[1].axhline(1.0, color="black", lw=0.5)
    axes[1].set(ylabel="time / manual (median of paired rounds)",
                title="time against the hand-written residual backward")
    if "reversible" in args.variants:
        axes[2].plot(depths, [p["reconstruction_rel_err"] for p in points],
                     styles["reversible"]["fmt"], color=styles["reversible"]["color"],
                     label="input of the stack")
        axes[2].plot(depths, [p["reversible"].get("rel_err_vs_autodiff", np.nan)
                              for p in points], "x:", color="black",
                     label="gradient vs jax.grad")
    axes[2].set(yscale="log", ylabel="relative error, float32, at init",
                title="reversible: reconstruction against depth")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set(xticks=depths, xticklabels=depths, xlabel="blocks D")
        ax.minorticks_off()
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    cli.save_figure(fig, out / "memory_depth.png", quick=args.quick)


def print_table(points, args, trained, target):
    print(f"temp MiB of the compiled gradient (time / manual, median of paired rounds); "
          f"batch {args.batch}, width {args.width}")
    header = f"{'D':>5}" + "".join(f"{n:>20}" for n in args.variants) + f"{'manual ms':>11}"
    print(header + f"{'recon err':>11}")
    for p in points:
        cells = []
        for name in args.variants:
            mib = p[name]["memory"].get("temp_bytes", float("nan")) / 2**20
            ratio = p[name].get("time_ratio_vs_manual", {}).get("median", float("nan"))
            cells.append(f"{mib:>12.3f} ({ratio:4.2f})")
        manual = p["manual"]["time"]["median"] * 1e3 if "manual" in p else float("nan")
        print(f"{p['depth']:>5}" + "".join(cells) + f"{manual:>11.2f}"
              + f"{p.get('reconstruction_rel_err', float('nan')):>11.1e}")
    errs = [p[n]["rel_err_vs_autodiff"] for p in points for n in args.variants
            if "rel_err_vs_autodiff" in p[n]]
    if errs:
        print(f"largest relative error of a gradient against jax.grad of its net: "
              f"{max(errs):.1e}")
    if trained is not None:
        s = trained["summary"]
        recon = [r["reconstruction_rel_err"] for r in trained["runs"]["reversible"]]
        print(f"depth {trained['depth']}, {args.seeds} seeds, {args.epochs} epochs: test "
              f"accuracy residual {s['residual']['mean']:.3f} ± {s['residual']['std']:.3f}, "
              f"reversible {s['reversible']['mean']:.3f} ± {s['reversible']['std']:.3f}; "
              f"reconstruction error after training up to {max(recon):.1e}")
    if target["measured"]:
        print(f"target: reversible temp memory depth {TARGET['to_depth']} / depth "
              f"{TARGET['from_depth']} = {target['memory_growth']:.2f} (≤ "
              f"{TARGET['memory_growth_max']}: "
              f"{'holds' if target['memory_holds'] else 'does NOT hold'}); time / manual at "
              f"depth {TARGET['to_depth']} = {target['time_ratio']:.2f} (≤ "
              f"{TARGET['time_ratio_max']}: "
              f"{'holds' if target['time_holds'] else 'does NOT hold'})")
    else:
        print(f"target: {target['note']}")


def parse_args(argv=None):
    parser = cli.experiment_parser(__doc__.splitlines()[0], "runs/memory_depth")
    parser.add_argument("--depths", type=int, nargs="+", default=None,
                        help="numbers of blocks D (default: 4 8 16 32 64 128 256; --quick: 1)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="which gradients to compile and time")
    parser.add_argument("--width", type=int, default=None,
                        help="units per block, even (default: 128; --quick: 8)")
    parser.add_argument("--batch", type=int, default=None,
                        help="examples in the measured batch (default: 128; --quick: 16)")
    parser.add_argument("--activation", default="tanh", help="the blocks' activation")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timing per depth (default: 3; --quick: 0.1)")
    parser.add_argument("--min-repeats", type=int, default=5, help="timed rounds at least")
    parser.add_argument("--train-depth", type=int, default=None,
                        help="depth of the trained pair (default: 16; --quick: 1); 0: no training")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds of the trained pair (default: 3; --quick: 1)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of the trained pair (default: 20; --quick: 1)")
    parser.add_argument("--batch-size", type=int, default=100, help="training batch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"depths": ([1], [4, 8, 16, 32, 64, 128, 256]), "width": (8, 128),
                "batch": (16, 128), "budget": (0.1, 3.0), "train_depth": (1, 16),
                "seeds": (1, 3), "epochs": (1, 20)}
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    if quick:
        args.min_repeats = min(args.min_repeats, 2)
    if args.width <= 0 or args.width % 2 or min(args.depths) <= 0:
        parser.error("--width must be positive and even, --depths positive")
    args.depths = sorted(set(args.depths))
    return args


def main(argv=None):
    args = parse_args(argv)
    info = cli.start_device(args.platform)
    data = jbp.data.load_mnist1d()
    batch = (jnp.asarray(data.x_train[: args.batch]), jnp.asarray(data.y_train[: args.batch]))
    start = time.perf_counter()
    points = [run_depth(d, batch, args)
              for d in tqdm(args.depths, desc="depths", file=sys.stdout,
                            disable=not cli.show_progress(args))]
    trained = train_compare(data, args) if args.train_depth > 0 else None
    target = judge(points, args)
    results = {"experiment": "memory_depth", "device": info, "points": points,
               "trained": trained, "target": target, "wall_s": time.perf_counter() - start,
               "config": {"depths": args.depths, "variants": args.variants,
                          "width": args.width, "batch": args.batch,
                          "activation": args.activation, "budget": args.budget,
                          "train_depth": args.train_depth, "seeds": args.seeds,
                          "epochs": args.epochs, "batch_size": args.batch_size,
                          "lr": args.lr, "seed": args.seed, "quick": args.quick,
                          "dtype": "float32", "data": "MNIST-1D (4000 train / 1000 test)"},
               "note": "timings on a shared machine: time ratio = median of per-round ratios "
                       "(interleaved); temp memory = XLA's compiled temp_size_in_bytes of the "
                       "gradient"}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", results)
    plot(points, args, args.out)
    print_table(points, args, trained, target)
    print(f"{results['wall_s']:.0f} s; wrote {args.out / 'results.json'}, "
          f"{args.out / 'memory_depth.png'}")
    return results


if __name__ == "__main__":
    main()
