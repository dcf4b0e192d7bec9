"""The adding problem: can an RNN, a GRU and an LSTM carry a number across T steps?

Hochreiter & Schmidhuber (1997), in the variant of Le et al. (2015): each step of a sequence
is a pair (value, marker); the values are uniform in [0, 1], the marker is 1 at two steps,
one in the first half and one in the second, and 0 elsewhere. The target is the sum of the
two marked values. A regression with MSE: always answering the mean, 1, scores 1/6 ≈ 0.167;
an answer counts as right when its error is under 0.04 (Hochreiter & Schmidhuber's
criterion). Every cell (64 units, its last state into dense(1)) is trained with the
hand-written backward on freshly generated data at each length T. ‖∂C/∂h_t‖ over the steps
t, from the backward's own reverse scan (``bptt_deltas``), shows how much of the gradient
reaches back to the first marker: at initialisation and after training.

Writes results.json and two plots into --out: mse.png (test MSE and accuracy against T, one
line per cell) and grad_norm.png (‖∂C/∂h_t‖ against t at the longest T, log scale).
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jbp
from jbp.cli import experiment_parser, plt, save_figure, show_progress, start_device
from jbp.io import write_json
from jbp.layers.recurrent import bptt_deltas

CELLS = ("rnn", "gru", "lstm")
LOSS = jbp.losses.mean_squared_error
TOLERANCE = 0.04  # |prediction − target| below this counts as right
BASELINE = 1 / 6  # the MSE of always answering 1: the variance of a sum of two U(0, 1)


def make_data(n, T, seed):
    """``x (n, T, 2)``: (value, marker) pairs; ``y (n, 1)``: the sum of the two marked
    values, one marked in the first half of the steps and one in the second; float32."""
    rng = np.random.default_rng(seed)
    values = rng.uniform(0, 1, (n, T))
    rows, first, second = np.arange(n), rng.integers(0, T // 2, n), rng.integers(T // 2, T, n)
    markers = np.zeros((n, T))
    markers[rows, first] = markers[rows, second] = 1
    x = np.stack([values, markers], axis=-1).astype(np.float32)
    return x, (values[rows, first] + values[rows, second])[:, None].astype(np.float32)


def build(cell, hidden):
    return jbp.serial(getattr(jbp, cell)(hidden, return_sequences=False), jbp.dense(1))


@functools.partial(jax.jit, static_argnums=0)
def probe(model, params, x, y):
    """``(‖∂C/∂h_t‖ for every step t, over the batch and the units: what BPTT carried
    back; the prediction errors (B, 1))``."""
    _, _, deltas = jbp.backprop(model, LOSS, params, x, y)
    out, caches, _ = model.forward(params, x)
    dh = bptt_deltas(model.layers[0], params[0], caches[0], deltas[0])
    return jnp.linalg.norm(dh, axis=(0, 2)), out - y


def parse_args(argv=None):
    parser = experiment_parser(__doc__.splitlines()[0], "runs/adding_problem")
    parser.add_argument("--cells", nargs="+", choices=CELLS, default=list(CELLS),
                        help="recurrent layers to compare")
    parser.add_argument("--lengths", type=int, nargs="+", default=[10, 25, 50, 100],
                        help="sequence lengths T")
    parser.add_argument("--seeds", type=int, default=1, help="runs per cell and length "
                        "(seeds --seed, --seed + 1, ...)")
    parser.add_argument("--hidden", type=int, default=64, help="units (--quick: 8)")
    parser.add_argument("--steps", type=int, default=2000,
                        help="training steps per run (--quick: 20)")
    parser.add_argument("--batch-size", type=int, default=100, help="sequences per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's peak learning rate")
    parser.add_argument("--train", type=int, default=10000, help="training sequences")
    parser.add_argument("--test", type=int, default=1000, help="test sequences")
    parser.add_argument("--grad", choices=["manual", "autodiff"], default="manual",
                        help="the hand-written backward or jax.grad")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.hidden, args.steps, args.train, args.test = [4, 8], 8, 20, 200, 100
    if min(args.lengths) < 2:
        parser.error("--lengths must be at least 2 (one marker in each half)")
    return args


def run(cell, T, seed, args):
    x, y = make_data(args.train + args.test, T, seed)
    data = jbp.data.Dataset(x[:args.train], y[:args.train], x[args.train:], y[args.train:])
    model = build(cell, args.hidden)
    _, params = model.init(jax.random.key(seed), (T, 2))
    norms_at_init, _ = probe(model, params, data.x_test, data.y_test)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adam(optax.cosine_decay_schedule(args.lr, args.steps)))
    start = time.perf_counter()
    params, history = jbp.fit(model, LOSS, params, data, key=jax.random.key(1000 + seed),
                              optimizer=optimizer, steps=args.steps, batch_size=args.batch_size,
                              grad=args.grad, progress=show_progress(args))
    seconds = time.perf_counter() - start
    norms, error = probe(model, params, data.x_test, data.y_test)
    return {"cell": cell, "T": T, "seed": seed, "seconds": seconds,
            "test_mse": history["eval"][-1]["test_loss"],
            "train_mse": history["eval"][-1]["train_loss"],
            "test_accuracy": float(np.mean(np.abs(np.asarray(error)) < TOLERANCE)),
            "first_over_last_init": float(norms_at_init[0] / norms_at_init[-1]),
            "grad_norm_init": norms_at_init.tolist(),
            "grad_norm_trained": norms.tolist(),
            "history": history}


def mean_of(runs, cell, T, key):
    return float(np.mean([r[key] for r in runs if r["cell"] == cell and r["T"] == T]))


def plot(out, runs, args):
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(10, 3.8))
    for i, cell in enumerate(args.cells):
        for ax, key in zip(axes, ("test_mse", "test_accuracy")):
            ax.plot(args.lengths, [mean_of(runs, cell, T, key) for T in args.lengths],
                    marker="o", color=f"C{i}", label=cell)
    axes[0].axhline(BASELINE, color="k", ls="--", lw=1, label="always 1")
    axes[0].set(yscale="log", xlabel="sequence length T", ylabel="test MSE")
    axes[1].set(xlabel="sequence length T", ylim=(0, 1.02),
                ylabel=f"test accuracy (|error| < {TOLERANCE})")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4)
    fig.suptitle(f"adding problem, {args.hidden} units, {args.steps} steps, {args.grad} "
                 f"gradient")
    save_figure(fig, out / "mse.png", tight_rect=(0, 0.07, 1, 1), quick=args.quick)

    T = max(args.lengths)
    fig, axes = pyplot.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, when in zip(axes, ("init", "trained")):
        for i, cell in enumerate(args.cells):
            for r in (r for r in runs if r["cell"] == cell and r["T"] == T):
                norms = np.asarray(r[f"grad_norm_{when}"])
                ax.plot(norms / norms[-1], color=f"C{i}",
                        label=cell if r["seed"] == args.seed else None)
        ax.set(yscale="log", xlabel="step t", title=f"T = {T}, "
               + ("at initialisation" if when == "init" else "after training"))
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    axes[0].set_ylabel("‖∂C/∂h_t‖, relative to the last step")
    save_figure(fig, out / "grad_norm.png", quick=args.quick)


def main(argv=None):
    args = parse_args(argv)
    info = start_device(args.platform)
    seeds = [args.seed + i for i in range(args.seeds)]
    runs = [run(cell, T, s, args) for T in args.lengths for cell in args.cells for s in seeds]

    args.out.mkdir(parents=True, exist_ok=True)
    keys = ("test_mse", "test_accuracy", "first_over_last_init")
    summary = {cell: {str(T): {k: mean_of(runs, cell, T, k) for k in keys}
                      for T in args.lengths} for cell in args.cells}
    write_json(args.out / "results.json", {
        "summary": summary, "runs": runs, "device": info,
        "config": {"seed": args.seed, "seeds": seeds, "lengths": args.lengths,
                   "hidden": args.hidden, "steps": args.steps, "batch_size": args.batch_size,
                   "lr": args.lr, "train": args.train, "test": args.test, "grad": args.grad,
                   "quick": args.quick, "tolerance": TOLERANCE, "baseline_mse": BASELINE,
                   "optimizer": "adam, global-norm clipping at 1, cosine decay",
                   "data": "Le et al. (2015): one marker in each half"}})
    plot(args.out, runs, args)

    print(f"test MSE / accuracy (|error| < {TOLERANCE}), mean over {len(seeds)} seed(s), "
          f"{args.steps} steps; always answering 1 gives MSE {BASELINE:.3f}")
    print(f"{'T':>5}" + "".join(f"{cell:>18}" for cell in args.cells) + f"{'s/run':>8}")
    for T in args.lengths:
        cells = [f"{summary[c][str(T)]['test_mse']:.4f} / {summary[c][str(T)]['test_accuracy']:.2f}"
                 for c in args.cells]
        seconds = np.mean([r["seconds"] for r in runs if r["T"] == T])
        print(f"{T:>5}" + "".join(f"{c:>18}" for c in cells) + f"{seconds:>8.1f}")
    T = max(args.lengths)
    print(f"‖∂C/∂h_0‖ / ‖∂C/∂h_{T - 1}‖ at initialisation, T = {T}: " + ", ".join(
        f"{c} {mean_of(runs, c, T, 'first_over_last_init'):.1e}" for c in args.cells))
    print(f"wrote {args.out / 'results.json'}, {args.out / 'mse.png'}, "
          f"{args.out / 'grad_norm.png'}")
    return summary


if __name__ == "__main__":
    main()
