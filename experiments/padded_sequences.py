"""Padded sequences: does a model's accuracy depend on how much padding its batch holds?

Two tasks on sequences of 5 to 30 digits 1…9 (0 pads; labels of padding are IGNORE_LABEL,
so the loss and the accuracy count real positions only):

- tagging: position t is labelled 1 when its digit is above the sequence's mean, else 0.
  Models that read the whole sequence in both directions:
    gru              embedding(10, 16) → bidirectional(gru(32)) → dense(2)
    transformer      embedding(10, 16) → positional → transformer_block(2 heads of 8) → dense(2)
- reversal (sequences of 5 to 15 digits): the target is the source reversed, read by an
    encoder-decoder  [embedding, positional, transformer_block(4 heads of 8)] and [embedding,
                     positional] → decoder_block (causal self- and cross-attention) → dense(10)
  with teacher forcing (the decoder's input is BOS and the target shifted by one).

Each model is trained on batches padded to the longest sequence three ways: **masked**, with
the hand-written backward and with jax.grad (side inputs ``lengths`` and, for the
encoder–decoder, ``source_lengths``: the recurrent state stops at the last real step,
attention masks padded keys), and **unmasked** (no side inputs: padding is read as digits
0). Then each is evaluated on test sets padded to 1, 2 and 8 times the longest sequence. A
masked model gives the same accuracy at every padding; an unmasked one reads the padding as
part of the sequence.

Writes results.json and accuracy.png (test accuracy per model, training and padding; seeds
as points) into --out.
"""

import time

import jax
import numpy as np
from tqdm import tqdm

import jbp
from jbp.cli import experiment_parser, plt, save_figure, show_progress, start_device
from jbp.io import write_json
from jbp.losses import IGNORE_LABEL

CE = jbp.losses.softmax_cross_entropy
MIN_LEN, VOCAB, BOS = 5, 10, 10  # digits 1…9, 0 pads, BOS starts a decoder's input
MAX_LEN = {"gru": 30, "transformer": 30, "encoder-decoder": 15}
MODELS = tuple(MAX_LEN)
FACTORS = (1, 2, 8)  # test sets padded to 1, 2 and 8 times the longest sequence
TRAININGS = ("masked manual", "masked autodiff", "unmasked manual")
FULL = {"n_train": 4096, "n_test": 1024, "epochs": 8, "batch_size": 64, "seeds": (0, 1, 2),
        "factors": FACTORS}
QUICK = {"n_train": 64, "n_test": 32, "epochs": 1, "batch_size": 32, "seeds": (0,),
         "factors": (1, 8)}


def make_data(n: int, seed: int, max_len: int = 30):
    """``n`` sequences of digits 1…9 of lengths 5…``max_len`` and their tags (digit >
    the sequence's mean)."""
    rng = np.random.default_rng(seed)
    digits = [rng.integers(1, VOCAB, n_i) for n_i in rng.integers(MIN_LEN, max_len + 1, n)]
    return digits, [(d > d.mean()).astype(np.int32) for d in digits]


def batch(name: str, digits, tags, length: int):
    """``(x, labels, side)`` padded to ``length``: digits with 0, labels with IGNORE_LABEL.
    Tagging: ``x`` the digits, labels their tags. Reversal (the encoder–decoder): ``x =
    [source ; BOS, reversed[:-1]] (n, 2·length)``, labels the reversed digits."""
    pad = jbp.data.pad_sequences
    if name != "encoder-decoder":
        ids, lengths = pad(digits, length=length)
        return ids, pad(tags, length=length, value=IGNORE_LABEL)[0], {"lengths": lengths}
    reversed_ = [d[::-1] for d in digits]
    src, lengths = pad(digits, length=length)
    dec_in = pad([np.concatenate([[BOS], r[:-1]]) for r in reversed_], length=length)[0]
    labels = pad(reversed_, length=length, value=IGNORE_LABEL)[0]
    return (np.concatenate([src, dec_in], axis=1), labels,
            {"lengths": lengths, "source_lengths": lengths})


def build(name: str, length: int) -> jbp.Layer:
    """The model for inputs padded to ``length`` (the encoder–decoder is built for its
    source length; its params do not depend on it)."""
    if name == "gru":
        core = jbp.serial(jbp.embedding(VOCAB, 16), jbp.bidirectional(jbp.gru(32)))
    elif name == "transformer":
        core = jbp.serial(jbp.embedding(VOCAB, 16), jbp.positional_embedding(8 * 30),
                          jbp.transformer_block(16, 2, 8, 32, block_size=16))
    else:
        def embedded():
            return [jbp.embedding(VOCAB + 1, 32), jbp.positional_embedding(8 * 15)]

        encoder = jbp.serial(*embedded(), jbp.transformer_block(32, 4, 8, 64, block_size=16))
        decoder = jbp.decoder_block(32, 4, 8, 64, length, block_size=16)
        core = jbp.encoder_decoder(encoder, jbp.serial(*embedded()), decoder, length)
    return jbp.serial(core, jbp.dense(VOCAB if name == "encoder-decoder" else 2))


@jax.jit  # a Layer is a static pytree: one compile per model, padding and masking
def _logits(model, params, x, side):
    return model.apply(params, x, side=side)


def accuracy(model, params, x, labels, side, masked: bool) -> float:
    """The share of real positions whose label the model gets right."""
    logits = _logits(model, params, x, side if masked else None)
    real = labels != IGNORE_LABEL
    return float(np.mean((np.argmax(np.asarray(logits), -1) == labels)[real]))


def train(model, params, train_data, masked: bool, grad: str, cfg, seed: int):
    x, labels, side = train_data
    data = (x, labels, side) if masked else (x, labels)
    params, history = jbp.fit(model, CE, params, data, key=jax.random.key(seed), grad=grad,
                              epochs=cfg["epochs"], batch_size=cfg["batch_size"],
                              learning_rate=3e-3, progress=False)
    return params, history["loss"][-1]


def plot(results, cfg, out, quick: bool):
    names = [name for name in MODELS if any(r["model"] == name for r in results)]
    fig, axes = plt().subplots(1, len(names), figsize=(5 * len(names), 4), sharey=True,
                               squeeze=False)
    axes = axes[0]
    for ax, name in zip(axes, names):
        for i, training in enumerate(TRAININGS):
            for j, factor in enumerate(cfg["factors"]):
                accs = [r["accuracy"][f"x{factor}"] for r in results
                        if r["model"] == name and r["training"] == training]
                xpos = i * (len(cfg["factors"]) + 1) + j
                ax.scatter([xpos] * len(accs), accs, color=f"C{j}", s=18,
                           label=f"padded to {factor} × {MAX_LEN[name]}" if i == 0 else None)
        ax.set_xticks([i * (len(cfg["factors"]) + 1) + (len(cfg["factors"]) - 1) / 2
                       for i in range(len(TRAININGS))], TRAININGS)
        task = "reversal" if name == "encoder-decoder" else "tagging"
        ax.set_title(f"{name} ({task})")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize="small")
    axes[0].set_ylabel("test accuracy (real positions)")
    fig.suptitle(f"trained padded to the longest sequence; test sets padded "
                 f"{', '.join(map(str, cfg['factors']))} ×; "
                 f"{len(cfg['seeds'])} seed(s) per point")
    return save_figure(fig, out / "accuracy.png", quick=quick)


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
    for name, training, seed in tqdm(runs, desc="trainings", disable=not show_progress(args)):
        longest = MAX_LEN[name]
        train_set = batch(name, *make_data(cfg["n_train"], 1000 * seed, longest), longest)
        test = make_data(cfg["n_test"], 1000 * seed + 1, longest)
        model = build(name, longest)
        params = model.init(jax.random.key(seed), train_set[0].shape[1:])[1]
        masked, grad = training.startswith("masked"), training.split()[1]
        t0 = time.perf_counter()
        params, last_loss = train(model, params, train_set, masked, grad, cfg, seed)
        results.append({
            "model": name, "training": training, "seed": seed, "final_train_loss": last_loss,
            "train_s": time.perf_counter() - t0,
            "accuracy": {f"x{f}": accuracy(build(name, f * longest), params,
                                           *batch(name, *test, f * longest), masked)
                         for f in cfg["factors"]}})

    summary = {}
    for name in args.models:
        for training in TRAININGS:
            accs = {f"x{f}": [r["accuracy"][f"x{f}"] for r in results
                              if r["model"] == name and r["training"] == training]
                    for f in cfg["factors"]}
            summary[f"{name} {training}"] = {
                k: {"mean": float(np.mean(a)), "min": float(np.min(a)), "max": float(np.max(a))}
                for k, a in accs.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", {
        "experiment": "padded_sequences", "device": info,
        "config": {**cfg, "quick": args.quick, "seed": args.seed, "models": args.models,
                   "min_len": MIN_LEN, "max_len": MAX_LEN,
                   "learning_rate": 3e-3, "optimizer": "adam"},
        "runs": results, "summary": summary, "wall_s": time.perf_counter() - start})
    plot(results, cfg, args.out, args.quick)

    print(f"test accuracy on real positions over {len(cfg['seeds'])} seed(s), mean [min, max], "
          f"test sets padded to {', '.join(map(str, cfg['factors']))} × the longest sequence "
          f"(30; reversal 15)")
    print(f"{'model':<17}{'training':<17}"
          + "".join(f"{'× ' + str(f):>22}" for f in cfg["factors"]))
    for key, by_factor in summary.items():
        name, training = key.split(" ", 1)
        print(f"{name:<17}{training:<17}" + "".join(
            f"{v['mean']:>8.3f} [{v['min']:.3f}, {v['max']:.3f}]" for v in by_factor.values()))
    print(f"wrote {args.out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
