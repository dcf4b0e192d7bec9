"""How many hidden layers? Deep-and-thin against shallow-and-wide MLPs at matched parameter
counts on MNIST-1D: for each depth and parameter budget, the width is chosen so that the
network has about that many parameters; each is trained the same way and tested.

Writes results.json and depth.png (test accuracy against parameter count, one line per
depth) into --out.
"""

import math
import time

import jax

import jbp
from jbp.cli import experiment_parser, plt, save_figure, start_device
from jbp.io import write_json

N_IN, N_OUT = 40, 10


def n_params(depth: int, width: int) -> int:
    """Parameters of an MLP 40 → width (×depth) → 10, biases included."""
    return (N_IN + 1) * width + (depth - 1) * (width + 1) * width + (width + 1) * N_OUT


def width_for(depth: int, budget: int) -> int:
    """The width whose parameter count is closest to ``budget`` at this depth."""
    a, b, c = depth - 1, N_IN + 1 + (depth - 1) + N_OUT, N_OUT - budget
    w = -c / b if a == 0 else (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    candidates = {max(1, math.floor(w)), max(1, math.ceil(w))}
    return min(candidates, key=lambda v: abs(n_params(depth, v) - budget))


def parse_args(argv=None):
    parser = experiment_parser(__doc__.splitlines()[0], "runs/depth")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3, 4, 6],
                        help="numbers of hidden layers")
    parser.add_argument("--budgets", type=int, nargs="+", default=[3000, 10000, 30000],
                        help="parameter counts to match")
    parser.add_argument("--activation", default="relu",
                        help="hidden activation, a jbp name (relu, tanh, sigmoid, ...)")
    parser.add_argument("--epochs", type=int, default=40,
                        help="passes over the training set (--quick: 2)")
    parser.add_argument("--batch-size", type=int, default=100, help="examples per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    parser.add_argument("--grad", choices=["manual", "autodiff"], default="manual",
                        help="the hand-written backward or jax.grad")
    args = parser.parse_args(argv)
    if args.quick:
        args.depths, args.budgets, args.epochs = [1, 2], [1000], 2
    for name in ("depths", "budgets"):
        if any(v <= 0 for v in getattr(args, name)):
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    return args


def plot(path, runs, depths, quick=False):
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6.5, 4.5))
    for depth in depths:
        rows = sorted((r for r in runs if r["depth"] == depth), key=lambda r: r["n_params"])
        ax.plot([r["n_params"] for r in rows], [r["test_accuracy"] for r in rows], marker="o",
                label=f"{depth} hidden layer{'s' if depth > 1 else ''}")
    ax.set(xscale="log", xlabel="parameters", ylabel="test accuracy",
           title="MNIST-1D: deep and thin vs shallow and wide")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path, quick=quick)


def main(argv=None):
    args = parse_args(argv)
    info = start_device(args.platform)
    data = jbp.data.load_mnist1d()
    runs = []
    print(f"{'depth':>5}{'width':>7}{'params':>9}{'train acc':>11}{'test acc':>10}{'seconds':>9}")
    for budget in args.budgets:
        for depth in args.depths:
            width = width_for(depth, budget)
            model = jbp.mlp([N_IN] + [width] * depth + [N_OUT], args.activation)
            _, params = model.init(jax.random.key(args.seed), (N_IN,))
            start = time.perf_counter()
            _, history = jbp.fit(model, jbp.losses.softmax_cross_entropy, params, data,
                                 key=jax.random.key(args.seed + 1), learning_rate=args.lr,
                                 epochs=args.epochs, batch_size=args.batch_size,
                                 grad=args.grad, progress=False)
            last = history["eval"][-1]
            run = {"depth": depth, "width": width, "budget": budget,
                   "n_params": n_params(depth, width),
                   "train_accuracy": last["train_accuracy"],
                   "test_accuracy": last["test_accuracy"],
                   "best_test_accuracy": max(e["test_accuracy"] for e in history["eval"]),
                   "seconds": time.perf_counter() - start}
            runs.append(run)
            print(f"{depth:>5}{width:>7}{run['n_params']:>9}{run['train_accuracy']:>11.3f}"
                  f"{run['test_accuracy']:>10.3f}{run['seconds']:>9.1f}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    results = {"runs": runs, "device": info,
               "config": {"depths": args.depths, "budgets": args.budgets,
                          "activation": args.activation, "epochs": args.epochs,
                          "batch_size": args.batch_size, "optimizer": "adam", "lr": args.lr,
                          "grad": args.grad, "seed": args.seed, "quick": args.quick,
                          "data": "MNIST-1D (4000 train / 1000 test)"}}
    write_json(args.out / "results.json", results)
    plot(args.out / "depth.png", runs, args.depths, args.quick)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'depth.png'}")
    return results


if __name__ == "__main__":
    main()
