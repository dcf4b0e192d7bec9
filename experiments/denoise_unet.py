"""A small 1-D U-Net denoises MNIST-1D signals, trained with the hand-written backward and
with jax.grad.

The data: MNIST-1D's signals (40 steps, 1 channel, zero mean and unit variance), each with
Gaussian noise of standard deviation ``--noise`` added once, offline, from the seed (the
same noisy copy in every epoch and for both gradients); the target is the clean signal,
the loss the mean squared error.

The model, for width w (``--width``), two levels down and back up::

    block(w) ─────────────────────────────────────────────┐ parallel(identity, …, concat)
       max_pool(2) → block(2w) ──────────────────┐          │
          max_pool(2) → block(4w) → up(2w)  ─── concat → block(2w) → up(w) ── concat → block(w) → conv(1, 1)

with ``block(c) = conv(c, 5) → group_norm(4) → relu``; the skips are ``parallel`` branches
(an identity and the level below), concatenated on the channels. The decoder's ``up(c)`` is
``conv_transpose(c, 4, stride=2, padding=1)`` (PyTorch's classic 2× step:
(n − 1)·2 − 2 + 4 = 2n) or ``upsample(2, "linear") → conv(c, 3)`` (``--decoders``).

Each decoder is trained twice from the same init on the same batches, with each gradient;
the printed table gives the test MSE against the noisy input's (σ²). At initialisation the
two gradients are compared on a batch.

Writes results.json and denoise_unet.png (noisy / denoised / clean test signals, and the
loss curves of both gradients) into --out.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

import jbp
from jbp.cli import experiment_parser, plot_with_zeros, plt, save_figure, start_device
from jbp.io import write_json

MSE = jbp.losses.mean_squared_error
DECODERS = ("conv_transpose", "upsample")
GRADS = ("manual", "autodiff")
FULL = {"width": 16, "levels": 2, "epochs": 30, "batch_size": 100, "lr": 3e-3,
        "n_train": 4000, "n_test": 1000}
QUICK = {"width": 4, "levels": 1, "epochs": 1, "batch_size": 64, "lr": 3e-3, "n_train": 128,
         "n_test": 64}


def block(channels: int) -> jbp.Layer:
    """conv(c, 5) → group_norm(4, or c if fewer) → relu."""
    return jbp.serial(jbp.conv(channels, 5), jbp.group_norm(min(4, channels)), jbp.relu())


def up(channels: int, decoder: str) -> jbp.Layer:
    """Twice as many positions, ``channels`` channels."""
    if decoder == "conv_transpose":
        return jbp.conv_transpose(channels, 4, stride=2, padding=1)
    return jbp.serial(jbp.upsample(2, "linear"), jbp.conv(channels, 3))


def unet(width: int, decoder: str, levels: int = 2) -> jbp.Layer:
    """The U-Net of the module docstring, ``levels`` levels below the top (2; --quick: 1):
    (B, 40, 1) -> (B, 40, 1)."""

    def skip(inner):  # the level's own features beside what came back up from below
        return jbp.parallel(jbp.identity(), inner, combine="concat")

    c = width * 2 ** levels
    inner = jbp.serial(jbp.max_pool(2), block(c), up(c // 2, decoder))  # the bottom
    for level in range(levels - 1, 0, -1):
        c = width * 2 ** level
        inner = jbp.serial(jbp.max_pool(2), block(c), skip(inner), block(c), up(c // 2, decoder))
    return jbp.serial(block(width), skip(inner), block(width), jbp.conv(1, 1))


def noisy_data(cfg, noise: float, seed: int):
    """MNIST-1D's train and test signals ``(N, 40, 1)`` and their noisy copies, drawn once."""
    data = jbp.data.load_mnist1d(channels=True)
    rng = np.random.default_rng(seed)
    clean = {"train": data.x_train[: cfg["n_train"]], "test": data.x_test[: cfg["n_test"]]}
    return {split: ((x + noise * rng.normal(size=x.shape)).astype(np.float32), x)
            for split, x in clean.items()}


def global_rel_error(grads, reference) -> float:
    """‖grads − reference‖ / ‖reference‖ over all leaves together (in float64 numpy)."""
    pairs = [(np.asarray(a, np.float64), np.asarray(b, np.float64)) for a, b in
             zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(reference))]
    return float(np.sqrt(sum(np.sum((a - b) ** 2) for a, b in pairs)
                         / sum(np.sum(b ** 2) for _, b in pairs)))


def run(decoder, data, cfg, args):
    """One decoder: both gradients at init, then a training with each from the same init."""
    model = unet(cfg["width"], decoder, cfg["levels"])
    probe = tuple(a[: cfg["batch_size"]] for a in data["train"])

    @jax.jit  # one compile for the params and both gradients at them
    def at_init(key, x, y):
        params = model.init(key, (40, 1))[1]
        return (params, jbp.manual_value_and_grad(model, MSE)(params, x, y)[1],
                jbp.autodiff_value_and_grad(model, MSE)(params, x, y)[1])

    init, manual, auto = at_init(jax.random.key(args.seed), *probe)
    result = {"decoder": decoder, "model": repr(model),
              "n_params": sum(p.size for p in jax.tree_util.tree_leaves(init)),
              "init_grad_rel_error": global_rel_error(manual, auto),
              "init_grads_agree": jbp.compare_grads(manual, auto).ok}
    test_mse = jax.jit(lambda p: MSE.value(model.apply(p, data["test"][0]), data["test"][1]))
    trained = {}
    for grad in GRADS:
        start, curve = time.perf_counter(), [float(test_mse(init))]
        params, history = jbp.fit(model, MSE, init, data["train"], key=jax.random.key(args.seed + 1),
                                  learning_rate=cfg["lr"], epochs=cfg["epochs"],
                                  batch_size=cfg["batch_size"], grad=grad, progress=False,
                                  loop="python" if args.quick else "auto",
                                  on_epoch=lambda e, p, h: curve.append(float(test_mse(p))))
        trained[grad] = params
        result[grad] = {"test_mse": curve[-1], "test_mse_per_epoch": curve,
                        "loss": history["loss"], "seconds": time.perf_counter() - start}
    losses = [np.asarray(result[g]["loss"]) for g in GRADS]
    steps = len(losses[0]) // cfg["epochs"]
    result["loss_diff_first_epoch"] = float(np.max(np.abs(losses[0] - losses[1])[:steps]))
    result["loss_diff_max"] = float(np.max(np.abs(losses[0] - losses[1])))
    diffs = jax.tree_util.tree_map(lambda a, b: jnp.max(jnp.abs(a - b)), *trained.values())
    result["max_param_diff"] = float(max(jax.tree_util.tree_leaves(diffs)))
    result["denoised"] = np.asarray(jax.jit(model.apply)(trained["manual"], data["test"][0][:3]))
    return result


def plot(path, runs, data, cfg, noise, quick):
    pyplot = plt()
    fig, axes = pyplot.subplots(2, 3, figsize=(13, 6.5))
    noisy, clean = (a[:3, :, 0] for a in data["test"])
    steps = np.arange(40)
    for i, ax in enumerate(axes[0]):
        ax.plot(steps, noisy[i], color="0.7", lw=1, label=f"noisy (σ = {noise})")
        ax.plot(steps, clean[i], color="k", lw=1.5, label="clean")
        for k, r in enumerate(runs):
            ax.plot(steps, r["denoised"][i, :, 0], color=f"C{k}", lw=1.2,
                    label=f"denoised, {r['decoder']}")
        ax.set(title=f"test signal {i}", xlabel="step")
    axes[0][0].legend(fontsize=7)
    ax_train, ax_test = axes[1][0], axes[1][1]
    for k, r in enumerate(runs):
        for grad, style in zip(GRADS, ("-", "--")):
            loss = np.asarray(r[grad]["loss"])
            per_epoch = loss[: len(loss) // cfg["epochs"] * cfg["epochs"]].reshape(
                cfg["epochs"], -1).mean(axis=1)
            ax_train.plot(np.arange(1, cfg["epochs"] + 1), per_epoch, style, color=f"C{k}",
                          marker=".", label=f"{r['decoder']}, {grad}")
            ax_test.plot(r[grad]["test_mse_per_epoch"], style, color=f"C{k}", marker=".",
                         label=f"{r['decoder']}, {grad}")
    for ax, what in ((ax_train, "train MSE (mean over the epoch's steps)"),
                     (ax_test, "test MSE")):
        ax.axhline(noise ** 2, color="0.5", ls=":", label="noisy input (σ²)")
        ax.set(yscale="log", xlabel="epoch", ylabel=what)
        ax.grid(alpha=0.3, which="both")
    ax_test.legend(fontsize=7)
    ax = axes[1][2]
    for k, r in enumerate(runs):
        diff = np.abs(np.asarray(r["manual"]["loss"]) - np.asarray(r["autodiff"]["loss"]))
        plot_with_zeros(ax, np.arange(1, len(diff) + 1), diff, color=f"C{k}", lw=0.8,
                        label=r["decoder"])
    ax.set(yscale="log", xlabel="step", ylabel="|loss manual − loss autodiff|",
           title="same init, same batches")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return save_figure(fig, path, quick=quick)


def main(argv=None):
    parser = experiment_parser(__doc__.splitlines()[0], "runs/denoise_unet")
    parser.add_argument("--decoders", nargs="+", choices=DECODERS, default=list(DECODERS),
                        help="the U-Net's upsampling: conv_transpose, or upsample + conv "
                             "(--quick: the first only)")
    parser.add_argument("--noise", type=float, default=0.5,
                        help="standard deviation of the Gaussian noise added to the signals")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"passes over the training set (default: {FULL['epochs']}, "
                             f"--quick {QUICK['epochs']})")
    args = parser.parse_args(argv)
    if args.noise <= 0:
        parser.error("--noise must be positive")
    info = start_device(args.platform)
    cfg = dict(QUICK if args.quick else FULL)
    if args.quick:
        args.decoders = args.decoders[:1]
    if args.epochs is not None:
        if args.epochs <= 0:
            parser.error("--epochs must be positive")
        cfg["epochs"] = args.epochs
    start = time.perf_counter()
    data = noisy_data(cfg, args.noise, args.seed)
    runs = [run(decoder, data, cfg, args) for decoder in args.decoders]
    seconds = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    plot(args.out / "denoise_unet.png", runs, data, cfg, args.noise, args.quick)
    noisy_mse = float(np.mean((data["test"][0] - data["test"][1]) ** 2))
    write_json(args.out / "results.json", {
        "experiment": "denoise_unet", "device": info, "seconds": seconds,
        "noisy_test_mse": noisy_mse,
        "runs": [{k: v for k, v in r.items() if k != "denoised"} for r in runs],
        "config": {**cfg, "noise": args.noise, "decoders": args.decoders, "seed": args.seed,
                   "quick": args.quick, "optimizer": "adam", "loss": "mean_squared_error",
                   "data": f"MNIST-1D signals, {cfg['n_train']} train / {cfg['n_test']} "
                           f"test, Gaussian noise added once from the seed"}})

    print(f"test MSE against the clean signals after {cfg['epochs']} epochs "
          f"(noise σ = {args.noise}; the noisy input's own MSE: {noisy_mse:.4f})")
    print(f"{'U-Net decoder':<16}{'params':>8}{'manual':>10}{'autodiff':>10}"
          f"{'grads at init':>15}{'loss diff, epoch 1':>20}")
    for r in runs:
        print(f"{r['decoder']:<16}{r['n_params']:>8,}{r['manual']['test_mse']:>10.4f}"
              f"{r['autodiff']['test_mse']:>10.4f}{r['init_grad_rel_error']:>15.1e}"
              f"{r['loss_diff_first_epoch']:>20.1e}")
    print(f"{seconds:.0f} s; wrote {args.out / 'results.json'}, {args.out / 'denoise_unet.png'}")
    return runs


if __name__ == "__main__":
    main()
