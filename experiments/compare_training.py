"""Train one MLP on MNIST-1D twice from the same init: with the hand-written backward and
with jax.grad. Same data order, same dropout masks, same optimizer: the two runs should
stay together to float32 round-off, and both should reach the published MLP accuracy (68%).

Writes results.json, curves.png (loss and accuracy of both runs) and param_diff.png (the
largest parameter difference between the runs, per epoch) into --out.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jbp
from jbp.cli import (experiment_parser, plot_with_zeros, plt, save_figure, show_progress,
                     start_device)
from jbp.io import write_json

GRADS = ("manual", "autodiff")


def build_model(hidden, dropout, dtype=jnp.float32):
    """dense → relu → dropout, once per hidden width, then a dense output of 10 logits."""
    layers = []
    for width in hidden:
        layers += [jbp.dense(width, dtype=dtype), jbp.relu()]
        if dropout > 0:
            layers.append(jbp.dropout(dropout))
    return jbp.serial(*layers, jbp.dense(10, dtype=dtype))


def parse_args(argv=None):
    parser = experiment_parser(__doc__.splitlines()[0], "runs/compare_training")
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256],
                        help="hidden layer widths (--quick: 32)")
    parser.add_argument("--dropout", type=float, default=0.3, help="drop probability")
    parser.add_argument("--epochs", type=int, default=60,
                        help="passes over the 4000 training examples (--quick: 2)")
    parser.add_argument("--batch-size", type=int, default=100, help="examples per step")
    parser.add_argument("--lr", type=float, default=3e-3,
                        help="Adam's peak learning rate (cosine decay to 0 over the run)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                        help="float64 shows how far the two runs drift with less round-off")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.epochs = [32], 2
    return args


def train(grad, model, params, data, args, snapshots):
    """One run; ``snapshots[epoch]`` collects host copies of the params after each epoch."""
    steps = args.epochs * (len(data.x_train) // args.batch_size)
    optimizer = optax.adam(optax.cosine_decay_schedule(args.lr, steps))
    snapshots[0] = jax.device_get(params)
    start = time.perf_counter()
    params, history = jbp.fit(
        model, jbp.losses.softmax_cross_entropy, params, data, key=jax.random.key(args.seed + 1),
        optimizer=optimizer, epochs=args.epochs, batch_size=args.batch_size, grad=grad,
        progress=show_progress(args),
        on_epoch=lambda epoch, p, h: snapshots.__setitem__(epoch, jax.device_get(p)))
    return params, history, time.perf_counter() - start


def max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def plot(out, runs, diffs, quick=False):
    pyplot = plt()
    fig, (ax_loss, ax_acc) = pyplot.subplots(1, 2, figsize=(11, 4))
    for grad, style in zip(GRADS, ("-", "--")):
        ev = runs[grad]["history"]["eval"]
        epochs = [e["epoch"] for e in ev]
        for split, color in (("train", "tab:blue"), ("test", "tab:orange")):
            ax_loss.plot(epochs, [e[f"{split}_loss"] for e in ev], style, color=color,
                         label=f"{grad} {split}")
            ax_acc.plot(epochs, [e[f"{split}_accuracy"] for e in ev], style, color=color,
                        label=f"{grad} {split}")
    if not quick:  # the published figure is for a full run, not for the tiny quick one
        ax_acc.axhline(0.68, color="gray", lw=0.8, ls=":", label="published MLP (68%)")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("MNIST-1D MLP: hand-written backward (solid) vs jax.grad (dashed)")
    save_figure(fig, out / "curves.png", quick=quick)

    fig, ax = pyplot.subplots(figsize=(6, 4))
    epochs = sorted(diffs)
    ax.set_yscale("log")
    plot_with_zeros(ax, epochs, [diffs[e] for e in epochs], label="max |θ_manual − θ_autodiff|",
                    marker="o", ms=3)
    ax.set(xlabel="epoch", ylabel="max |θ_manual − θ_autodiff|",
           title="parameter difference between the two runs")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, out / "param_diff.png", quick=quick)


def main(argv=None):
    args = parse_args(argv)
    info = start_device(args.platform)
    data = jbp.data.load_mnist1d()
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
        data = data._replace(x_train=data.x_train.astype(np.float64),
                             x_test=data.x_test.astype(np.float64))
    model = build_model(args.hidden, args.dropout, jnp.dtype(args.dtype))
    _, params = model.init(jax.random.key(args.seed), (data.x_train.shape[1],))
    n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))

    runs, snapshots = {}, {}
    for grad in GRADS:
        snapshots[grad] = {}
        final, history, seconds = train(grad, model, params, data, args, snapshots[grad])
        last = history["eval"][-1]
        runs[grad] = {"test_accuracy": last["test_accuracy"], "test_loss": last["test_loss"],
                      "train_accuracy": last["train_accuracy"], "seconds": seconds,
                      "history": history}
    diffs = {e: max_abs_diff(snapshots["manual"][e], snapshots["autodiff"][e])
             for e in snapshots["manual"]}

    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        **runs,
        "max_param_diff": max(diffs.values()),
        "param_diff_per_epoch": [diffs[e] for e in sorted(diffs)],
        "device": info,
        "config": {"model": model.name, "n_params": n_params, "hidden": args.hidden,
                   "dropout": args.dropout, "epochs": args.epochs,
                   "batch_size": args.batch_size, "optimizer": "adam, cosine decay",
                   "lr": args.lr, "dtype": args.dtype, "seed": args.seed, "quick": args.quick,
                   "data": "MNIST-1D (4000 train / 1000 test)"},
    }
    write_json(args.out / "results.json", results)
    plot(args.out, runs, diffs, args.quick)

    print(f"model: {model.name}, {n_params} params, {args.epochs} epochs")
    print(f"{'gradient':<10}{'train acc':>10}{'test acc':>10}{'test loss':>11}{'seconds':>9}")
    for grad in GRADS:
        r = runs[grad]
        print(f"{grad:<10}{r['train_accuracy']:>10.3f}{r['test_accuracy']:>10.3f}"
              f"{r['test_loss']:>11.4f}{r['seconds']:>9.1f}")
    print(f"largest parameter difference over training: {results['max_param_diff']:.3e}")
    print(f"wrote {args.out / 'results.json'}, {args.out / 'curves.png'}, "
          f"{args.out / 'param_diff.png'}")
    return results


if __name__ == "__main__":
    main()
