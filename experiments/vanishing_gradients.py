"""Vanishing gradients: sigmoid against ReLU in a deep MLP on MNIST-1D. The hand-written
backward pass records ∂C/∂z (the lecture's delta) at every dense layer; its norm, layer by
layer from the input side to the output, shows how the sigmoid's σ′ ≤ 1/4 shrinks the
signal on its way back, at initialisation and as training goes on.

Writes results.json and vanishing_gradients.png (‖∂C/∂z‖ per layer, log scale, one panel
per activation, one line per recorded epoch) into --out.
"""

import time

import jax
import jax.numpy as jnp

import jbp
from jbp.cli import experiment_parser, plt, save_figure, start_device
from jbp.io import write_json

LOSS = jbp.losses.softmax_cross_entropy


def parse_args(argv=None):
    parser = experiment_parser(__doc__.splitlines()[0], "runs/vanishing_gradients")
    parser.add_argument("--activations", nargs="+", default=["sigmoid", "relu"],
                        help="hidden activations to compare, jbp names")
    parser.add_argument("--depth", type=int, default=8, help="hidden layers")
    parser.add_argument("--width", type=int, default=64,
                        help="units per hidden layer (--quick: 16)")
    parser.add_argument("--epochs", type=int, default=20,
                        help="passes over the training set (--quick: 2)")
    parser.add_argument("--record-at", type=int, nargs="+", default=[0, 1, 5, 20],
                        help="epochs at which to record the deltas (0: initialisation)")
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                        help="sgd is the lecture's plain gradient descent")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate")
    parser.add_argument("--batch-size", type=int, default=100, help="examples per step")
    parser.add_argument("--probe", type=int, default=500,
                        help="training examples on which the deltas are measured")
    args = parser.parse_args(argv)
    if args.quick:
        args.depth, args.width, args.epochs, args.record_at = 4, 16, 2, [0, 2]
    if args.depth <= 0 or args.width <= 0:
        parser.error("--depth and --width must be positive")
    bad = [e for e in args.record_at if not 0 <= e <= args.epochs]
    if bad:
        parser.error(f"--record-at epochs must lie in [0, --epochs={args.epochs}], got {bad}")
    return args


def delta_norms(model, params, x, y):
    """‖∂C/∂z‖ (Frobenius, over the probe batch) and ‖∂C/∂W‖ at every dense layer,
    input side first."""
    _, grads, deltas = jbp.backprop(model, LOSS, params, x, y)
    dense = [i for i, layer in enumerate(model.layers) if layer.name.startswith("dense")]
    return ([float(jnp.linalg.norm(deltas[i])) for i in dense],
            [float(jnp.linalg.norm(grads[i]["W"])) for i in dense])


def plot(path, results, args):
    pyplot = plt()
    acts = list(results)
    fig, axes = pyplot.subplots(1, len(acts), figsize=(5.5 * len(acts), 4.2), sharey=True,
                                squeeze=False)
    cmap = pyplot.get_cmap("viridis")
    for ax, act in zip(axes[0], acts):
        records = results[act]["records"]
        for k, rec in enumerate(records):
            layers = range(1, len(rec["delta_norm"]) + 1)
            ax.plot(layers, rec["delta_norm"], marker="o", ms=3,
                    color=cmap(k / max(1, len(records) - 1)), label=f"epoch {rec['epoch']}")
        ax.set(yscale="log", xlabel="dense layer (1 = input side, last = output)",
               title=f"{act}: test accuracy {results[act]['test_accuracy']:.2f}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("‖∂C/∂z‖ over the probe batch")
    fig.suptitle(f"{args.depth} hidden layers of {args.width}, {args.optimizer} lr {args.lr}")
    save_figure(fig, path, quick=args.quick)


def main(argv=None):
    args = parse_args(argv)
    info = start_device(args.platform)
    data = jbp.data.load_mnist1d()
    x_probe, y_probe = data.x_train[: args.probe], data.y_train[: args.probe]
    record_at = sorted(set(args.record_at))
    results = {}
    for act in args.activations:
        model = jbp.mlp([40] + [args.width] * args.depth + [10], act)
        _, params = model.init(jax.random.key(args.seed), (40,))
        records = []

        def record(epoch, p, history=None):
            if epoch in record_at:
                deltas, weight_grads = delta_norms(model, p, x_probe, y_probe)
                records.append({"epoch": epoch, "delta_norm": deltas,
                                "weight_grad_norm": weight_grads})

        record(0, params)
        start = time.perf_counter()
        _, history = jbp.fit(model, LOSS, params, data, key=jax.random.key(args.seed + 1),
                             optimizer=args.optimizer, learning_rate=args.lr,
                             epochs=args.epochs, batch_size=args.batch_size,
                             progress=False, on_epoch=record)
        last = history["eval"][-1]
        results[act] = {"records": records, "test_accuracy": last["test_accuracy"],
                        "train_loss": last["train_loss"],
                        "seconds": time.perf_counter() - start, "history": history}

    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", {
        "activations": results, "device": info,
        "config": {"depth": args.depth, "width": args.width, "epochs": args.epochs,
                   "record_at": record_at, "optimizer": args.optimizer, "lr": args.lr,
                   "batch_size": args.batch_size, "probe": args.probe, "seed": args.seed,
                   "quick": args.quick, "data": "MNIST-1D (4000 train / 1000 test)"}})
    plot(args.out / "vanishing_gradients.png", results, args)

    print(f"{args.depth} hidden layers of {args.width}; ‖∂C/∂z‖ at the first and the last "
          f"dense layer")
    print(f"{'activation':<12}{'epoch':>6}{'first':>12}{'last':>12}{'first/last':>12}")
    for act, res in results.items():
        for rec in res["records"]:
            first, last = rec["delta_norm"][0], rec["delta_norm"][-1]
            print(f"{act:<12}{rec['epoch']:>6}{first:>12.3e}{last:>12.3e}"
                  f"{first / last if last else float('nan'):>12.3e}")
    for act, res in results.items():
        print(f"{act}: final test accuracy {res['test_accuracy']:.3f}, "
              f"train loss {res['train_loss']:.3f}")
    print(f"wrote {args.out / 'results.json'}, {args.out / 'vanishing_gradients.png'}")


if __name__ == "__main__":
    main()
