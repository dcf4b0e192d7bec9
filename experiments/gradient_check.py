"""Gradient check sweep: manual backprop vs jax.grad vs finite differences.

For every depth × activation × loss × dtype, one MLP with MNIST-1D-shaped input (40
features, 10 outputs) is differentiated three ways: by the hand-written backward, by
``jax.grad``, and by float64 central differences. The table and the heat map give the
normwise relative error ‖g − r‖/‖r‖ (worst parameter leaf) of the manual gradient against
each witness. Exit status 1 if any combination disagrees beyond its tolerance.

    python experiments/gradient_check.py --out runs/gradient_check
"""

import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jbp
from jbp.cli import experiment_parser, plt, save_figure, show_progress, start_device
from jbp.io import write_json

# manual vs autodiff must agree to these (normwise relative); vs float64 finite
# differences the float32 gradient can only be as good as float32 rounding allows.
TOL_AUTODIFF = {"float32": 1e-5, "float64": 1e-12}
TOL_FD = {"float32": 1e-3, "float64": 1e-6}
N_IN, N_OUT, BATCH = 40, 10, 16


def targets(loss, rng):
    if loss is jbp.losses.softmax_cross_entropy:
        return jnp.asarray(rng.integers(0, N_OUT, size=BATCH), jnp.int32)
    if loss is jbp.losses.mean_squared_error:
        return jnp.asarray(rng.normal(size=(BATCH, N_OUT)), jnp.float32)
    return jnp.asarray(rng.uniform(size=(BATCH, N_OUT)), jnp.float32)


def check_one(depth, activation, loss, dtype, width, seed):
    """Relative errors of the manual gradient vs autodiff and vs finite differences."""
    model = jbp.mlp([N_IN] + [width] * depth + [N_OUT], activation, dtype=dtype)
    rng = np.random.default_rng(seed)
    _, params = model.init(jax.random.key(seed), (N_IN,))
    x = jnp.asarray(rng.normal(size=(BATCH, N_IN)), dtype)
    y = targets(loss, rng)
    y = y.astype(dtype) if jnp.issubdtype(y.dtype, jnp.floating) else y

    @jax.jit
    def three_ways(params, x, y):
        manual = jbp.manual_value_and_grad(model, loss)(params, x, y)[1]
        auto = jbp.autodiff_value_and_grad(model, loss)(params, x, y)[1]
        fd = jbp.numerical_value_and_grad(model, loss)(params, x, y)[1]
        return manual, auto, fd

    manual, auto, fd = three_ways(params, x, y)
    vs_auto = jbp.compare_grads(manual, auto, rtol=TOL_AUTODIFF[jnp.dtype(dtype).name])
    vs_fd = jbp.compare_grads(manual, fd, rtol=TOL_FD[jnp.dtype(dtype).name])
    return vs_auto, vs_fd


def heat_map(rows, depths, activations, losses, dtypes, path, quick=False):
    pyplot = plt()
    cols = [(loss, d) for loss in losses for d in depths]
    fig, axes = pyplot.subplots(2, len(dtypes), figsize=(2 + (1.5 + 0.7 * len(cols)) * len(dtypes),
                                                         2 + 0.9 * len(activations)),
                                squeeze=False, constrained_layout=True)
    index = {(r["depth"], r["activation"], r["loss"], r["dtype"]): r for r in rows}
    for j, dtype in enumerate(dtypes):
        for i, (key, title) in enumerate([("manual_vs_autodiff", "manual vs jax.grad"),
                                          ("manual_vs_fd", "manual vs finite differences")]):
            grid = np.array([[index[(d, a, loss, dtype)][key] for loss, d in cols]
                             for a in activations])
            ax = axes[i, j]
            im = ax.imshow(np.log10(np.maximum(grid, 1e-17)), vmin=-17, vmax=-2, cmap="viridis",
                           aspect="auto")
            ax.set_title(f"{title} ({dtype})", fontsize=10)
            ax.set_yticks(range(len(activations)), activations)
            ax.set_xticks(range(len(cols)), [f"{loss[:7]}\ndepth {d}" for loss, d in cols],
                          fontsize=7)
            for (r, c), v in np.ndenumerate(grid):
                ax.text(c, r, f"{v:.0e}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=axes, label="log10 relative error (worst leaf)")
    save_figure(fig, path, dpi=110, tight_rect=None, quick=quick)


def main(argv=None):
    parser = experiment_parser(__doc__.split("\n\n")[0], "runs/gradient_check")
    parser.add_argument("--width", type=int, default=32, help="hidden layer width")
    args = parser.parse_args(argv)
    if args.width <= 0:
        parser.error(f"--width must be positive, got {args.width}")
    jax.config.update("jax_enable_x64", True)   # for the finite-difference witness
    info = start_device(args.platform)

    if args.quick:
        depths, activations = [1], ["relu", "sigmoid"]
        losses = ["softmax_cross_entropy"]
    else:
        depths, activations = [1, 3], list(jbp.activations.ACTIVATIONS)
        losses = list(jbp.losses.LOSSES)
    dtypes = ["float32", "float64"]
    combos = list(itertools.product(depths, activations, losses, dtypes))
    rows = []
    for depth, act, loss_name, dtype in tqdm(combos, desc="gradient check", unit="model",
                                             disable=not show_progress(args)):
        vs_auto, vs_fd = check_one(depth, act, jbp.losses.get(loss_name), jnp.dtype(dtype),
                                   args.width, args.seed)
        rows.append({"depth": depth, "activation": act, "loss": loss_name, "dtype": dtype,
                     "manual_vs_autodiff": vs_auto.max_rel, "manual_vs_fd": vs_fd.max_rel,
                     "max_abs_vs_autodiff": vs_auto.max_abs, "ok": vs_auto.ok and vs_fd.ok})

    print(f"\n{'depth':>5} {'activation':<12}{'loss':<30}{'dtype':<9}"
          f"{'vs jax.grad':>12}{'vs fin.diff':>12}  ok")
    for r in rows:
        print(f"{r['depth']:>5} {r['activation']:<12}{r['loss']:<30}{r['dtype']:<9}"
              f"{r['manual_vs_autodiff']:>12.1e}{r['manual_vs_fd']:>12.1e}  "
              f"{'yes' if r['ok'] else 'NO'}")
    for dtype in dtypes:
        sel = [r for r in rows if r["dtype"] == dtype]
        print(f"{dtype}: worst manual vs jax.grad {max(r['manual_vs_autodiff'] for r in sel):.1e} "
              f"(tol {TOL_AUTODIFF[dtype]:.0e}), worst vs finite differences "
              f"{max(r['manual_vs_fd'] for r in sel):.1e} (tol {TOL_FD[dtype]:.0e})")

    all_ok = all(r["ok"] for r in rows)
    args.out.mkdir(parents=True, exist_ok=True)
    heat_map(rows, depths, activations, losses, dtypes, args.out / "gradient_check.png",
             args.quick)
    write_json(args.out / "results.json", {
        "all_ok": all_ok, "rows": rows, "device": info,
        "config": {"depths": depths, "activations": activations, "losses": losses,
                   "dtypes": dtypes, "width": args.width, "batch": BATCH, "seed": args.seed,
                   "quick": args.quick, "tol_autodiff": TOL_AUTODIFF, "tol_fd": TOL_FD}})
    print(f"{'all combinations agree' if all_ok else 'DISAGREEMENT found'}; "
          f"results in {args.out}/results.json, heat map in {args.out}/gradient_check.png")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
