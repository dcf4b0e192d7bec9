"""K-FAC against Adam and SGD with momentum on MNIST-1D, by steps and by wall time.

K-FAC (``jbp.kfac``) preconditions every dense and convolution layer's gradient by its
Kronecker-factored curvature ``(A ⊗ G + λI)⁻¹``, the factors read from the hand-written
trace (A from the forward's cache, G from one backward pass per output class). Adam and
SGD with momentum take the plain gradient. Every run trains the same model from the same
initial params with ``jbp.fit`` and the hand-written gradient.

Learning rates are tuned on a small grid (``GRIDS``: the final training loss of one seed
picks the rate), then each optimizer runs with its rate for ``--seeds`` seeds. The table
reports the final training loss and test accuracy (mean ± sd over seeds), the time per
step (the run's wall time over its steps, compile excluded), and the step at which the
mean K-FAC curve first reaches Adam's final training loss.

Writes ``results.json``, ``loss_steps.png``, ``loss_time.png`` and ``accuracy.png``.

    .venv/bin/python experiments/second_order.py --out runs/second_order
    .venv/bin/python experiments/second_order.py --quick --out /tmp/second_order
"""

import time

import jax
import numpy as np
import optax

import jbp
from jbp.cli import experiment_parser, plt, save_figure, show_progress, sibling, start_device
from jbp.io import write_json

CE = jbp.losses.softmax_cross_entropy
OPTIMIZERS = ("kfac", "adam", "sgd")
GRIDS = {"kfac": (0.1, 0.3, 1.0), "adam": (1e-3, 3e-3, 1e-2), "sgd": (0.03, 0.1, 0.3)}
KFAC_SETTINGS = {"damping": 1e-2, "decay": 0.95, "inverse_every": 10, "momentum": 0.0,
                 "kl_clip": 1e-2}


def models(quick: bool) -> dict:
    """``{name: (model, in_shape)}``: the MNIST-1D MLP and CNN of mnist1d_models.py."""
    module = sibling(__file__, "mnist1d_models")
    names = ("mlp",) if quick else ("mlp", "cnn")
    return {name: module.build(name) for name in names}


def optimizer(name, rate, model, in_shape):
    if name == "kfac":
        return jbp.kfac(model, CE, in_shape, learning_rate=rate, **KFAC_SETTINGS)
    if name == "adam":
        return optax.adam(rate)
    return optax.sgd(rate, momentum=0.9)


def run(model, in_shape, opt, data, seed, args):
    """One training run: ``{"eval": [...], "seconds": wall time without compiling}``."""
    params = jax.jit(lambda k: model.init(k, in_shape)[1])(jax.random.key(seed))
    data = data._replace(x_train=data.x_train.reshape(-1, *in_shape),
                         x_test=data.x_test.reshape(-1, *in_shape))
    common = dict(key=jax.random.key(seed + 1000), optimizer=opt, batch_size=args.batch_size,
                  progress=False)
    try:
        jbp.fit(model, CE, params, data, epochs=1, **common)  # compile: fit reuses its steps
        start = time.perf_counter()
        _, history = jbp.fit(model, CE, params, data, epochs=args.epochs,
                             **{**common, "progress": show_progress(args)})
    except FloatingPointError as err:  # a learning rate too large: it diverged
        return {"eval": None, "seconds": None, "diverged": str(err).split(";")[0]}
    return {"eval": history["eval"], "seconds": time.perf_counter() - start}


def first_step_below(evals, level):
    """The first evaluated step whose training loss is ≤ ``level`` (None if none is)."""
    return next((e["step"] for e in evals if e["train_loss"] <= level), None)


def mean_curve(runs, field):
    return np.mean([[e[field] for e in r["eval"]] for r in runs], axis=0)


def main(argv=None):
    parser = experiment_parser(__doc__.split("\n\n")[0], "runs/second_order")
    parser.add_argument("--epochs", type=int, default=15, help="passes over the 4000 "
                        "training examples (--quick: 1)")
    parser.add_argument("--batch-size", type=int, default=100, help="examples per step")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per optimizer (--quick: 1)")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds = 1, 1
    info = start_device(args.platform)
    data = jbp.data.load_mnist1d()
    if args.quick:
        data = data._replace(x_train=data.x_train[:400], y_train=data.y_train[:400],
                             x_test=data.x_test[:200], y_test=data.y_test[:200])
    steps_per_epoch = len(data.x_train) // args.batch_size
    results = {"device": info, "config": {
        "epochs": args.epochs, "batch_size": args.batch_size, "seeds": args.seeds,
        "grids": GRIDS, "kfac": KFAC_SETTINGS, "steps": args.epochs * steps_per_epoch,
        "quick": args.quick, "seed": args.seed, "data": f"MNIST-1D ({len(data.x_train)} train)"}, "models": {}}
    for model_name, (model, in_shape) in models(args.quick).items():
        tuned, runs, tuning = {}, {}, {}
        for name in OPTIMIZERS:
            grid = GRIDS[name][:1] if args.quick else GRIDS[name]
            opts = {rate: optimizer(name, rate, model, in_shape) for rate in grid}
            first = {rate: run(model, in_shape, opt, data, args.seed, args)  # tuning: seed 0
                     for rate, opt in opts.items()}
            finals = {rate: r["eval"][-1]["train_loss"] if r["eval"] else None
                      for rate, r in first.items()}  # None: diverged
            tuned[name] = min(finals, key=lambda rate: (finals[rate] is None, finals[rate] or 0))
            tuning[name] = {str(rate): loss for rate, loss in finals.items()}
            runs[name] = [first[tuned[name]]] + [
                run(model, in_shape, opts[tuned[name]], data, args.seed + s, args)
                for s in range(1, args.seeds)]
            shown = {k: "diverged" if v is None else round(v, 4) for k, v in finals.items()}
            print(f"{model_name} {name}: final training loss by learning rate {shown} -> "
                  f"{tuned[name]}", flush=True)
        runs = {name: [r for r in rs if r["eval"]] for name, rs in runs.items()}  # finished
        adam_final = float(mean_curve(runs["adam"], "train_loss")[-1])
        summary = {}
        for name in OPTIMIZERS:
            finals = [r["eval"][-1] for r in runs[name]]
            mean_eval = [{"step": e["step"], "train_loss": v} for e, v in
                         zip(runs[name][0]["eval"], mean_curve(runs[name], "train_loss"))]
            summary[name] = {
                "learning_rate": tuned[name], "tuning": tuning[name],
                "diverged_seeds": args.seeds - len(runs[name]),
                "train_loss": [f["train_loss"] for f in finals],
                "test_accuracy": [f["test_accuracy"] for f in finals],
                "ms_per_step": 1e3 * float(np.mean([r["seconds"] for r in runs[name]]))
                / (args.epochs * steps_per_epoch),
                "steps_to_adam_final_loss": first_step_below(mean_eval, adam_final),
                "runs": runs[name]}
        results["models"][model_name] = {"adam_final_train_loss": adam_final,
                                         "optimizers": summary}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", results)
    plot(args.out, results, steps_per_epoch, args.quick)
    print_table(results)
    return results


def print_table(results):
    total = results["config"]["steps"]
    print(f"{'model':<6}{'optimizer':<10}{'lr':>7}{'train loss':>18}{'test acc':>16}"
          f"{'ms/step':>9}  steps to Adam's final loss (of {total})")
    for model_name, m in results["models"].items():
        for name, s in m["optimizers"].items():
            loss, acc = np.array(s["train_loss"]), np.array(s["test_accuracy"])
            reach = s["steps_to_adam_final_loss"]
            print(f"{model_name:<6}{name:<10}{s['learning_rate']:>7g}"
                  f"{loss.mean():>10.4f} ± {loss.std():.4f}{acc.mean():>9.3f} ± {acc.std():.3f}"
                  f"{s['ms_per_step']:>9.2f}  {reach if reach is not None else 'not reached'}")


def plot(out, results, steps_per_epoch, quick):
    pyplot = plt()
    figures = {name: pyplot.subplots(1, len(results["models"]), figsize=(5.5 * len(
        results["models"]), 4), squeeze=False) for name in ("loss_steps", "loss_time", "accuracy")}
    for col, (model_name, m) in enumerate(results["models"].items()):
        for name, s in m["optimizers"].items():
            runs = s["runs"]
            steps = [e["step"] for e in runs[0]["eval"]]
            seconds = [st * s["ms_per_step"] / 1e3 for st in steps]
            for figure, x, field in (("loss_steps", steps, "train_loss"),
                                     ("loss_time", seconds, "train_loss"),
                                     ("accuracy", steps, "test_accuracy")):
                ax = figures[figure][1][0, col]
                for r in runs:
                    ax.plot(x, [e[field] for e in r["eval"]], lw=0.8, alpha=0.5,
                            color=f"C{OPTIMIZERS.index(name)}")
                ax.plot(x, mean_curve(runs, field), lw=2, color=f"C{OPTIMIZERS.index(name)}",
                        label=f"{name} (lr {s['learning_rate']:g})")
        for figure, xlabel, ylabel in (("loss_steps", "step", "training loss"),
                                       ("loss_time", "seconds (compile excluded)", "training loss"),
                                       ("accuracy", "step", "test accuracy")):
            ax = figures[figure][1][0, col]
            ax.axhline(m["adam_final_train_loss"], color="gray", lw=0.8, ls=":") \
                if figure != "accuracy" else None
            ax.set(xlabel=xlabel, ylabel=ylabel, title=f"MNIST-1D {model_name}",
                   yscale="log" if figure != "accuracy" else "linear")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    for name, (fig, _) in figures.items():
        save_figure(fig, out / f"{name}.png", quick=quick)


if __name__ == "__main__":
    main()
