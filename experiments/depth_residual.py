"""Deep plain MLPs against residual and batch-norm ones: test accuracy and the deltas.

Every model is ``dense(width)`` (an input projection), ``depth`` equal blocks of width
``width``, and ``dense(10)``; the variants differ only in the block:

- plain:    serial(dense, act)
- residual: residual(serial(dense, act))
- bn:       serial(dense, batch_norm, act)
- res+bn:   residual(serial(dense, batch_norm, act))

so ``jbp.backprop``'s deltas hold one entry per block, δ = ∂C/∂h for the block's output h
(for a plain block that is the lecture's ∂C/∂a, a = σ(z)), at the same positions in every
variant. The deltas are measured on a probe batch in training mode
(batch statistics, as the optimizer sees them) at initialisation and after training. Each
model is trained the same way on MNIST-1D and tested; one configuration is trained with
both the hand-written backward and jax.grad from the same init, and at initialisation the
two gradients are compared for every variant at the deepest depth.

Writes results.json, accuracy.png (test accuracy against depth, one panel per activation)
and deltas.png (‖δ‖ per block at the deepest depth, log scale) into --out.
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jbp
from jbp.cli import experiment_parser, plt, save_figure, show_progress, start_device
from jbp.io import write_json
from jbp.layers.serial import init_gain

LOSS = jbp.losses.softmax_cross_entropy
VARIANTS = ("plain", "residual", "bn", "res+bn")
N_IN = 40


def build(variant: str, depth: int, width: int, activation: str) -> jbp.Layer:
    """Input projection, ``depth`` blocks of ``variant``, a dense head of 10 logits."""
    act = jbp.activations.get(activation)
    gain = init_gain(act)  # He for relu, LeCun for tanh (as jbp.mlp)

    def block():
        norm = [jbp.batch_norm()] if variant in ("bn", "res+bn") else []
        inner = jbp.serial(jbp.dense(width, gain=gain), *norm, act)
        return jbp.residual(inner) if variant in ("residual", "res+bn") else inner

    return jbp.serial(jbp.dense(width), *[block() for _ in range(depth)], jbp.dense(10))


def parse_args(argv=None):
    parser = experiment_parser(__doc__.splitlines()[0], "runs/depth_residual")
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16, 32],
                        help="numbers of blocks (hidden layers)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="plain blocks, residual, batch norm, or both")
    parser.add_argument("--activations", nargs="+", default=["tanh", "relu"],
                        help="hidden activations, jbp names")
    parser.add_argument("--width", type=int, default=64, help="units per block (--quick: 16)")
    parser.add_argument("--epochs", type=int, default=40,
                        help="passes over the training set (--quick: 1)")
    parser.add_argument("--batch-size", type=int, default=100, help="examples per step")
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                        help="optax optimizer")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    parser.add_argument("--probe", type=int, default=500,
                        help="training examples on which the deltas are measured")
    args = parser.parse_args(argv)
    if args.quick:
        args.depths, args.width, args.epochs, args.probe = [3], 16, 1, 200
        args.variants, args.activations = ["plain", "res+bn"], ["tanh"]
    if any(d <= 0 for d in args.depths) or args.width <= 0:
        parser.error("--depths and --width must be positive")
    args.depths = sorted(set(args.depths))
    return args


def init(model, seed):
    _, params = model.init(jax.random.key(seed), (N_IN,))
    return params, (model.init_state((N_IN,)) if model.stateful else None)


def measure(model, params, state, x, y):
    """‖∂C/∂(block output)‖ and ‖∂C/∂W‖ of each block's dense, input side first, and the
    norm of ∂C/∂logits, in training mode (batch norm uses the batch's statistics); and the
    gradient, for comparisons."""
    _, grads, deltas = jbp.backprop(model, LOSS, params, x, y, train=True, state=state)
    blocks = range(1, len(deltas) - 1)  # deltas: input projection, blocks, head
    norms = [float(jnp.linalg.norm(deltas[i])) for i in blocks]
    return {"delta_norm": norms, "first_over_last": norms[0] / norms[-1],
            "weight_grad_norm": [float(jnp.linalg.norm(grads[i][0]["W"])) for i in blocks],
            "output_delta_norm": float(jnp.linalg.norm(deltas[-1]))}, grads


def train(model, params, state, data, args, grad="manual"):
    """``(params, state, history)`` after the fixed budget, or ``(None, None, message)``
    when the minibatch loss turned NaN or inf."""
    try:
        out = jbp.fit(model, LOSS, params, data, key=jax.random.key(args.seed + 1),
                      optimizer=args.optimizer, learning_rate=args.lr, epochs=args.epochs,
                      batch_size=args.batch_size, grad=grad, progress=False,
                      loop="python" if args.quick else "auto",  # compiles faster than scan
                      state=state)
    except FloatingPointError as err:
        return None, None, str(err)
    return out if model.stateful else (out[0], None, out[1])


def run(variant, depth, activation, data, probe, args):
    """One model: its deltas at init, trained, its deltas again."""
    model = build(variant, depth, args.width, activation)
    params, state = init(model, args.seed)
    start = time.perf_counter()
    result = {"variant": variant, "depth": depth, "activation": activation}
    result["init"], grads = measure(model, params, state, *probe)
    if depth == max(args.depths):  # the hand-written gradient against jax.grad's
        _, reference = jbp.autodiff_value_and_grad(model, LOSS)(params, *probe, train=True,
                                                                 state=state)
        result["init"]["rel_error_vs_autodiff"] = global_rel_error(grads, reference)
    params, state, history = train(model, params, state, data, args)
    if params is None:
        result.update(diverged=history, test_accuracy=None, train_accuracy=None)
    else:
        last = history["eval"][-1]
        result.update(test_accuracy=last["test_accuracy"],
                      train_accuracy=last["train_accuracy"],
                      trained=measure(model, params, state, *probe)[0])
    result["seconds"] = time.perf_counter() - start
    return result


def global_rel_error(grads, reference):
    """‖grads − reference‖ / ‖reference‖ over all leaves together. (Per leaf, the bias of a
    dense layer that a batch norm follows has the gradient 0 exactly, so both sides hold
    round-off there and their per-leaf relative error means nothing.)"""
    diff = jax.tree_util.tree_map(lambda a, b: jnp.sum((a - b) ** 2), grads, reference)
    norm = jax.tree_util.tree_map(lambda b: jnp.sum(b**2), reference)
    return float(jnp.sqrt(sum(jax.tree_util.tree_leaves(diff))
                          / sum(jax.tree_util.tree_leaves(norm))))


def train_both(args, data):
    """The deepest res+bn (else the last variant) of the first activation, trained with
    each gradient from the same init on the same batches (the manual run repeats the
    grid's, bit for bit, and reuses its compiled step)."""
    variant = "res+bn" if "res+bn" in args.variants else args.variants[-1]
    depth, activation = max(args.depths), args.activations[0]
    model = build(variant, depth, args.width, activation)
    runs = {g: train(model, *init(model, args.seed), data, args, grad=g)
            for g in ("manual", "autodiff")}
    result = {"variant": variant, "depth": depth, "activation": activation}
    for g, (_, _, history) in runs.items():
        result[f"{g}_test_accuracy"] = (None if isinstance(history, str)
                                        else history["eval"][-1]["test_accuracy"])
    (pm, sm, hm), (pa, sa, ha) = runs.values()
    if pm is not None and pa is not None:
        x = data.x_test
        logits = [jbp.layer.run(model, p, x, state=s)[0] for p, s in ((pm, sm), (pa, sa))]
        diff = np.abs(np.array(hm["loss"]) - np.array(ha["loss"]))
        result["loss_diff_per_epoch"] = diff.reshape(args.epochs, -1).max(axis=1).tolist()
        result["max_loss_diff"] = float(diff.max())
        result["max_test_logit_diff"] = float(jnp.max(jnp.abs(logits[0] - logits[1])))
        diffs = jax.tree_util.tree_map(lambda a, b: jnp.max(jnp.abs(a - b)), pm, pa)
        result["max_param_diff"] = float(max(jax.tree_util.tree_leaves(diffs)))
    return result


def plot_accuracy(path, runs, args):
    pyplot = plt()
    acts = args.activations
    fig, axes = pyplot.subplots(1, len(acts), figsize=(5.2 * len(acts), 4), sharey=True,
                                squeeze=False)
    for ax, act in zip(axes[0], acts):
        for k, variant in enumerate(args.variants):
            rows = [r for r in runs if r["activation"] == act and r["variant"] == variant]
            ax.plot([r["depth"] for r in rows],
                    [np.nan if r["test_accuracy"] is None else r["test_accuracy"] for r in rows],
                    marker="o", color=f"C{k}", label=variant)
        ax.set_xscale("log", base=2)
        ax.set(xticks=args.depths, xticklabels=args.depths, xlabel="blocks",
               title=f"{act}, width {args.width}")
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][0].legend()
    fig.suptitle(f"MNIST-1D, {args.epochs} epochs of {args.optimizer} lr {args.lr}")
    save_figure(fig, path, quick=args.quick)


def plot_deltas(path, runs, args):
    pyplot = plt()
    acts, depth = args.activations, max(args.depths)
    fig, axes = pyplot.subplots(1, len(acts), figsize=(5.5 * len(acts), 4.2), sharey=True,
                                squeeze=False)
    for ax, act in zip(axes[0], acts):
        for k, variant in enumerate(args.variants):
            r = next(r for r in runs if (r["activation"], r["variant"], r["depth"])
                     == (act, variant, depth))
            blocks = range(1, depth + 1)
            ax.plot(blocks, r["init"]["delta_norm"], color=f"C{k}", marker="o", ms=3,
                    label=f"{variant}, init")
            if "trained" in r:
                ax.plot(blocks, r["trained"]["delta_norm"], color=f"C{k}", ls="--",
                        label=f"{variant}, trained")
        ax.set(yscale="log", xlabel="block (1 = input side)", title=f"{act}, {depth} blocks")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("‖δ‖ = ‖∂C/∂(block output)‖, probe batch")
    axes[0][0].legend(fontsize=7, ncol=2)
    save_figure(fig, path, quick=args.quick)


def print_table(runs, args):
    print(f"test accuracy after {args.epochs} epochs; at the deepest, the train accuracy and "
          f"‖δ‖ at the first block / at the last, at init and after training")
    print(f"{'activation':<11}{'variant':<10}" + "".join(f"{d:>8}" for d in args.depths)
          + f"{'train':>8}{'ratio init':>12}{'trained':>10}")
    def cell(value, width, spec):
        return f"{'-' if value is None else format(value, spec):>{width}}"

    for act in args.activations:
        for variant in args.variants:
            rows = [r for r in runs if r["activation"] == act and r["variant"] == variant]
            deepest = rows[-1]
            print(f"{act:<11}{variant:<10}"
                  + "".join(cell(r["test_accuracy"], 8, ".3f") for r in rows)
                  + cell(deepest["train_accuracy"], 8, ".3f")
                  + cell(deepest["init"]["first_over_last"], 12, ".2e")
                  + cell(deepest.get("trained", {}).get("first_over_last"), 10, ".2e"))


def main(argv=None):
    args = parse_args(argv)
    info = start_device(args.platform)
    data = jbp.data.load_mnist1d()
    probe = (data.x_train[: args.probe], data.y_train[: args.probe])
    start = time.perf_counter()
    grid = [(a, v, d) for a in args.activations for v in args.variants for d in args.depths]
    runs = [run(v, d, a, data, probe, args)
            for a, v, d in tqdm(grid, desc="models", unit="model", file=sys.stdout,
                                disable=not show_progress(args))]
    agreement = [r["init"]["rel_error_vs_autodiff"] for r in runs
                 if "rel_error_vs_autodiff" in r["init"]]
    both = train_both(args, data)
    seconds = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", {
        "runs": runs, "manual_vs_autodiff": both,
        "seconds": seconds, "device": info,
        "config": {"depths": args.depths, "variants": args.variants,
                   "activations": args.activations, "width": args.width,
                   "epochs": args.epochs, "batch_size": args.batch_size,
                   "optimizer": args.optimizer, "lr": args.lr, "probe": args.probe,
                   "seed": args.seed, "quick": args.quick,
                   "data": "MNIST-1D (4000 train / 1000 test)"}})
    plot_accuracy(args.out / "accuracy.png", runs, args)
    plot_deltas(args.out / "deltas.png", runs, args)

    print_table(runs, args)
    print(f"manual vs jax.grad at init, deepest depth, largest relative error (all params): "
          f"{max(agreement):.1e}")
    print(f"{both['activation']} {both['variant']} depth {both['depth']} trained with each: "
          f"test accuracy manual {both['manual_test_accuracy']}, autodiff "
          f"{both['autodiff_test_accuracy']}")
    if "max_loss_diff" in both:
        print(f"  largest difference of a minibatch loss: {both['loss_diff_per_epoch'][0]:.1e} "
              f"in epoch 1, {both['max_loss_diff']:.1e} over the run; of a test logit "
              f"{both['max_test_logit_diff']:.1e}; of a parameter {both['max_param_diff']:.1e}")
    print(f"{seconds:.0f} s; wrote {args.out / 'results.json'}, {args.out / 'accuracy.png'}, "
          f"{args.out / 'deltas.png'}")
    return runs


if __name__ == "__main__":
    main()
