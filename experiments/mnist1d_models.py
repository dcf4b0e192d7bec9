"""The MNIST-1D paper's table, re-run with the hand-written backward and with jax.grad.

Four models from the paper (Greydanus, 2020: logistic regression 32%, MLP 68%, CNN 94%, GRU
91% test accuracy), an LSTM and a small transformer, each trained from the same init on the
same batches with both gradients, over several seeds. The CNN here is four convolutions of
32 channels (kernel 5, ReLU), a global average pool and a dense head; the pool, not the
paper's flatten, is what lifts it above the paper's 94%. The GRU and the LSTM read the
signal as a sequence of 40 steps of one feature (64 units, one direction) and a dense head
reads their last state. The transformer reads the signal as a vision transformer reads an
image: 10 patches of 4 steps, each embedded in 64 features (``conv(64, 4, stride=4)``), a
learned positional embedding, two pre-norm blocks (4 heads of 16, MLP of 128, no mask), a
final layer norm, the mean over the patches and a dense head. Every model: AdamW (weight
decay 1e-4) with cosine decay from 3e-3, batch 100.

Writes results.json (every run's history) and accuracy.png (test accuracy per model,
manual vs autodiff, every seed) into --out.
"""

import time

import jax
import numpy as np
import optax

import jbp
from jbp.cli import experiment_parser, plt, save_figure, show_progress, start_device
from jbp.io import write_json

GRADS = ("manual", "autodiff")
# test accuracy, Greydanus (2020); the paper has no LSTM and no transformer
PAPER = {"logistic": 0.32, "mlp": 0.68, "cnn": 0.94, "gru": 0.91, "lstm": None,
         "transformer": None}


def build(name, channels=32, hidden=64):
    """``(model, per-example input shape)`` for a row of the table."""
    if name == "logistic":
        return jbp.dense(10), (40,)
    if name == "mlp":
        return jbp.mlp([40, 100, 100, 10], "relu"), (40,)
    if name in ("gru", "lstm"):  # 40 steps of 1 feature; the last state feeds the head
        return jbp.serial(getattr(jbp, name)(hidden, return_sequences=False),
                          jbp.dense(10)), (40, 1)
    if name == "transformer":  # 10 patches of 4 steps, width `hidden`, 4 heads
        blocks = [jbp.transformer_block(hidden, 4, hidden // 4, 2 * hidden) for _ in range(2)]
        return jbp.serial(jbp.conv(hidden, 4, stride=4), jbp.positional_embedding(10), *blocks,
                          jbp.layer_norm(), jbp.global_avg_pool(), jbp.dense(10)), (40, 1)
    layers = []
    for _ in range(4):
        layers += [jbp.conv(channels, 5), jbp.relu()]
    return jbp.serial(*layers, jbp.global_avg_pool(), jbp.dense(10)), (40, 1)


def parse_args(argv=None):
    parser = experiment_parser(__doc__.splitlines()[0], "runs/mnist1d_models")
    parser.add_argument("--models", nargs="+", choices=list(PAPER), default=list(PAPER),
                        help="rows of the table to train")
    parser.add_argument("--seeds", type=int, default=3, help="runs per model and gradient "
                        "(seeds --seed, --seed + 1, ...)")
    parser.add_argument("--steps", type=int, default=3000,
                        help="training steps per run (--quick: 80)")
    parser.add_argument("--channels", type=int, default=32, help="CNN channels per layer")
    parser.add_argument("--hidden", type=int, default=64, help="GRU and LSTM units, the "
                        "transformer's width")
    parser.add_argument("--batch-size", type=int, default=100, help="examples per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW's peak learning rate")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.channels, args.hidden = 1, 80, 8, 8
    return args


def run(name, grad, seed, data, args):
    model, in_shape = build(name, args.channels, args.hidden)
    _, params = model.init(jax.random.key(seed), in_shape)
    shaped = jbp.data.Dataset(data.x_train.reshape(-1, *in_shape), data.y_train,
                              data.x_test.reshape(-1, *in_shape), data.y_test)
    optimizer = optax.adamw(optax.cosine_decay_schedule(args.lr, args.steps), weight_decay=1e-4)
    start = time.perf_counter()
    _, history = jbp.fit(model, jbp.losses.softmax_cross_entropy, params, shaped,
                         key=jax.random.key(1000 + seed), optimizer=optimizer, steps=args.steps,
                         batch_size=args.batch_size, grad=grad, progress=show_progress(args))
    last = history["eval"][-1]
    return {"test_accuracy": last["test_accuracy"], "train_accuracy": last["train_accuracy"],
            "seconds": time.perf_counter() - start, "model": repr(model), "history": history}


def plot(out, results, seeds, quick=False):
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6, 3.6))
    names = list(results)
    for j, grad in enumerate(GRADS):
        for i, name in enumerate(names):
            accs = [r["test_accuracy"] for r in results[name][grad]]
            ax.scatter([i + (j - 0.5) * 0.2] * len(accs), accs, color=f"C{j}", s=18,
                       label=grad if i == 0 else None)
    published = [] if quick else [i for i, n in enumerate(names) if PAPER[n] is not None]
    if published:  # the paper's figures are for full runs, not for the tiny quick one
        ax.scatter(published, [PAPER[names[i]] for i in published], marker="_", s=400,
                   color="k", label="paper")
    ax.set(xticks=range(len(names)), xticklabels=names, xlim=(-0.6, len(names) - 0.4),
           ylabel="test accuracy", ylim=(0, 1),
           title=f"MNIST-1D, {seeds} seed{'s' * (seeds > 1)} per point")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)  # off the points
    save_figure(fig, out / "accuracy.png", quick=quick)


def main(argv=None):
    args = parse_args(argv)
    info = start_device(args.platform)
    data = jbp.data.load_mnist1d()
    seeds = [args.seed + i for i in range(args.seeds)]
    results = {name: {grad: [run(name, grad, s, data, args) for s in seeds] for grad in GRADS}
               for name in args.models}

    args.out.mkdir(parents=True, exist_ok=True)
    summary = {name: {grad: {"mean": float(np.mean([r["test_accuracy"] for r in runs])),
                             "std": float(np.std([r["test_accuracy"] for r in runs]))}
                      for grad, runs in by_grad.items()} for name, by_grad in results.items()}
    write_json(args.out / "results.json", {
        "summary": summary, "runs": results, "device": info, "paper": PAPER,
        "config": {"seed": args.seed, "seeds": seeds, "steps": args.steps,
                   "channels": args.channels, "hidden": args.hidden,
                   "batch_size": args.batch_size, "lr": args.lr, "quick": args.quick,
                   "optimizer": "adamw (weight decay 1e-4), cosine decay",
                   "data": "MNIST-1D (4000 train / 1000 test)"}})
    plot(args.out, results, len(seeds), args.quick)

    print(f"test accuracy, mean ± std over {len(seeds)} seed(s), {args.steps} steps")
    print(f"{'model':<10}{'paper':>7}{'manual':>16}{'autodiff':>16}{'s/run':>8}")
    for name in results:
        cells = [f"{summary[name][g]['mean']:.3f} ± {summary[name][g]['std']:.3f}" for g in GRADS]
        seconds = np.mean([r["seconds"] for g in GRADS for r in results[name][g]])
        paper = "—" if PAPER[name] is None else f"{PAPER[name]:.2f}"
        print(f"{name:<10}{paper:>7}{cells[0]:>16}{cells[1]:>16}{seconds:>8.1f}")
    print(f"wrote {args.out / 'results.json'}, {args.out / 'accuracy.png'}")
    return summary


if __name__ == "__main__":
    main()
