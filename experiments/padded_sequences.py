"""Padded sequences: does a model's accuracy depend on how much padding its batch holds?

A tagging task that needs the whole sequence: each sequence holds 5 to 30 digits 1…9 (0
pads), and position t is labelled 1 when its digit is above the sequence's mean, else 0;
padding is labelled IGNORE_LABEL, so the loss and the accuracy count real positions only.
Two models read the whole sequence in both directions:

  gru          embedding(10, 16) → bidirectional(gru(32)) → dense(2)
  transformer  embedding(10, 16) → positional → transformer_block(2 heads of 8) → dense(2)

Each is trained padded to T = 30 (the longest) three ways: **masked** with the hand-written
backward and with jax.grad (the side input ``lengths``: the recurrent state stops at the
last real step, attention masks padded keys), and **unmasked** (no lengths: the padding is
read as digits 0). Then every model is evaluated on the test set padded to T = 30 and to
T = 60. A masked model gives the same accuracy at both; an unmasked one depends on the
padding, which it reads as part of the sequence.

Writes results.json and accuracy.png (test accuracy per model and training, at each
padding, seeds as points) into --out.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jbp
from jbp.cli import experiment_parser, plt, save_figure, start_device
from jbp.io import write_json
from jbp.losses import IGNORE_LABEL

CE = jbp.losses.softmax_cross_entropy
MIN_LEN, MAX_LEN, VOCAB = 5, 30, 10
MODELS = ("gru", "transformer")
PADDINGS = (MAX_LEN, 2 * MAX_LEN)
TRAININGS = ("masked manual", "masked autodiff", "unmasked manual")
FULL = {"n_train": 4096, "n_test": 1024, "epochs": 8, "batch_size": 64, "seeds": (0, 1, 2)}
QUICK = {"n_train": 64, "n_test": 32, "epochs": 1, "batch_size": 32, "seeds": (0,)}


def make_data(n: int, seed: int):
    """``n`` sequences of digits 1…9 of lengths 5…30 and their tags (digit > mean)."""
    rng = np.random.default_rng(seed)
    digits = [rng.integers(1, VOCAB, n_i) for n_i in rng.integers(MIN_LEN, MAX_LEN + 1, n)]
    return digits, [(d > d.mean()).astype(np.int32) for d in digits]


def padded(digits, tags, length: int):
    """``(ids (n, length), tags (n, length), lengths (n,))``: digits padded with 0, tags with
    IGNORE_LABEL."""
    ids, lengths = jbp.data.pad_sequences(digits, length=length)
    return ids, jbp.data.pad_sequences(tags, length=length, value=IGNORE_LABEL)[0], lengths


def build(name: str) -> jbp.Layer:
    if name == "gru":
        core = jbp.bidirectional(jbp.gru(32))
    else:
        core = jbp.serial(jbp.positional_embedding(2 * MAX_LEN),
                          jbp.transformer_block(2, 8, 32, block_size=16))
    return jbp.serial(jbp.embedding(VOCAB, 16), core, jbp.dense(2))


@jax.jit  # a Layer is a static pytree: one compile per model, padding and masking
def _logits(model, params, ids, side):
    return model.apply(params, ids, side=side)


def accuracy(model, params, ids, tags, lengths, masked: bool) -> float:
    """The share of real positions whose tag the model gets right."""
    side = {"lengths": jnp.asarray(lengths)} if masked else None
    logits = _logits(model, params, ids, side)
    real = tags != IGNORE_LABEL
    return float(np.mean((np.argmax(np.asarray(logits), -1) == tags)[real]))


def train(model, params, train_data, masked: bool, grad: str, cfg, seed: int):
    ids, tags, lengths = train_data
    data = (ids, tags, {"lengths": lengths}) if masked else (ids, tags)
    params, history = jbp.fit(model, CE, params, data, key=jax.random.key(seed), grad=grad,
                              epochs=cfg["epochs"], batch_size=cfg["batch_size"],
                              learning_rate=3e-3, progress=False)
    return params, history["loss"][-1]


def plot(results, cfg, out, quick: bool):
    names = sorted({r["model"] for r in results}, key=MODELS.index)
    fig, axes = plt().subplots(1, len(names), figsize=(5 * len(names), 4), sharey=True,
                               squeeze=False)
    axes = axes[0]
    for ax, name in zip(axes, names):
        for i, training in enumerate(TRAININGS):
            for j, t in enumerate(PADDINGS):
                accs = [r["accuracy"][str(t)] for r in results
                        if r["model"] == name and r["training"] == training]
                xpos = i * (len(PADDINGS) + 1) + j
                ax.scatter([xpos] * len(accs), accs, color=f"C{j}",
                           label=f"test padded to T = {t}" if i == 0 else None)
        ax.set_xticks([i * (len(PADDINGS) + 1) + 0.5 for i in range(len(TRAININGS))],
                      TRAININGS)
        ax.set_title(f"{name}{' (quick run)' if quick else ''}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (real positions)")
    axes[-1].legend(loc="lower left")
    fig.suptitle(f"trained padded to T = {MAX_LEN}; {len(cfg['seeds'])} seed(s) per point")
    return save_figure(fig, out / "accuracy.png")


def main(argv=None):
    parser = experiment_parser(__doc__.split("\n\n")[0], "runs/padded_sequences")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                        help="the models to train")
    args = parser.parse_args(argv)
    info = start_device(args.platform)
    cfg = dict(QUICK if args.quick else FULL)
    cfg["seeds"] = tuple(args.seed + s for s in cfg["seeds"])
    start = time.perf_counter()
    runs = [(name, training, seed) for seed in cfg["seeds"] for name in args.models
            for training in TRAININGS]
    results = []
    for name, training, seed in tqdm(runs, desc="trainings", disable=None):
        train_set = padded(*make_data(cfg["n_train"], 1000 * seed), MAX_LEN)
        test_digits, test_tags = make_data(cfg["n_test"], 1000 * seed + 1)
        model = build(name)
        params = model.init(jax.random.key(seed), (MAX_LEN,))[1]
        masked, grad = training.startswith("masked"), training.split()[1]
        t0 = time.perf_counter()
        params, last_loss = train(model, params, train_set, masked, grad, cfg, seed)
        results.append({
            "model": name, "training": training, "seed": seed, "final_train_loss": last_loss,
            "train_s": time.perf_counter() - t0,
            "accuracy": {str(t): accuracy(model, params, *padded(test_digits, test_tags, t),
                                          masked) for t in PADDINGS}})

    summary = {}
    for name in args.models:
        for training in TRAININGS:
            accs = {t: [r["accuracy"][str(t)] for r in results
                        if r["model"] == name and r["training"] == training] for t in PADDINGS}
            summary[f"{name} {training}"] = {str(t): {"mean": float(np.mean(a)),
                                                      "min": float(np.min(a)),
                                                      "max": float(np.max(a))}
                                             for t, a in accs.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", {
        "experiment": "padded_sequences", "device": info,
        "config": {**cfg, "quick": args.quick, "seed": args.seed, "models": args.models,
                   "min_len": MIN_LEN, "max_len": MAX_LEN,
                   "paddings": PADDINGS, "learning_rate": 3e-3, "optimizer": "adam"},
        "runs": results, "summary": summary, "wall_s": time.perf_counter() - start})
    plot(results, cfg, args.out, args.quick)

    print(f"test accuracy over {len(cfg['seeds'])} seed(s), mean [min, max]")
    print(f"{'model':<12}{'training':<18}" + "".join(f"{'T = ' + str(t):>22}" for t in PADDINGS))
    for key, by_t in summary.items():
        name, training = key.split(" ", 1)
        print(f"{name:<12}{training:<18}" + "".join(
            f"{s['mean']:>8.3f} [{s['min']:.3f}, {s['max']:.3f}]" for s in by_t.values()))
    print(f"wrote {args.out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
