"""A character-level language model on stdlib source, trained with both gradients.

Each model is trained with the hand-written backward and with jax.grad, from the same init
on the same batches, on the Python standard library's own source text.

The corpus is offline and fixed: the source files in CORPUS_FILES, read from
``sysconfig.get_paths()["stdlib"]`` and joined in that order (their text depends on the
Python version; results.json keeps the version, the size and a SHA-256). The vocabulary is
the set of characters in the corpus; the first 90% of the text trains, the last 10%
validates. A training batch is ``batch`` windows of ``context`` characters at random
offsets in the train text, the targets the same windows shifted by one character.

Two models, each trained twice (``grad="manual"`` and ``grad="autodiff"``):

  transformer  embedding -> positional_embedding -> 2 x transformer_block(causal) -> dense
  lstm         embedding -> lstm -> dense

The train loss is evaluated on fixed windows spread over the train text, the validation
loss on every window of the validation text (--quick: its first 4 x eval_windows), both
reported in bits per character. Each trained manual model writes a sample from a fixed
prompt and key.

Writes results.json and curves.png (loss over steps, and |loss_manual − loss_autodiff|
per step) into --out.

    .venv/bin/python experiments/char_lm.py --out runs/char_lm
    .venv/bin/python experiments/char_lm.py --quick --out /tmp/char_lm
"""

import hashlib
import math
import sys
import sysconfig
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import jbp
from jbp.cli import (experiment_parser, plot_with_zeros, plt, save_figure, show_progress,
                     start_device)
from jbp.evaluation import make_evaluator
from jbp.io import write_json
from jbp.train import compiled

CORPUS_FILES = ("argparse.py", "collections/__init__.py", "contextlib.py", "dataclasses.py",
                "difflib.py", "enum.py", "functools.py", "pprint.py", "random.py",
                "string.py", "textwrap.py")
VAL_FRACTION = 0.1
GRADS = ("manual", "autodiff")
MODELS = ("transformer", "lstm")
PROMPT = "    def __init__(self, "
FULL = {"context": 64, "batch": 32, "width": 64, "heads": 4, "hidden": 128, "steps": 2500,
        "eval_every": 125, "eval_windows": 512, "sample_chars": 200}
QUICK = {"context": 16, "batch": 8, "width": 16, "heads": 2, "hidden": 16, "steps": 20,
         "eval_every": 10, "eval_windows": 16, "sample_chars": 20}
BITS = 1 / math.log(2)  # nats -> bits


def load_corpus():
    """The joined source text of CORPUS_FILES and what identifies it."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((root / name).read_text(encoding="utf-8") for name in CORPUS_FILES)
    return text, {"files": list(CORPUS_FILES), "stdlib": str(root),
                  "python": sys.version.split()[0], "chars": len(text),
                  "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def build_model(name, vocab, cfg):
    width = cfg["width"]
    if name == "transformer":
        blocks = [jbp.transformer_block(width, cfg["heads"], width // cfg["heads"], 4 * width,
                                        causal=True) for _ in range(2)]
        return jbp.serial(jbp.embedding(vocab, width),
                          jbp.positional_embedding(cfg["context"]), *blocks, jbp.dense(vocab))
    return jbp.serial(jbp.embedding(vocab, width), jbp.lstm(cfg["hidden"]), jbp.dense(vocab))


def windows(ids, starts, context):
    """``(x, y)``: the windows of ``context`` ids at ``starts`` and the next id of each."""
    idx = np.asarray(starts)[:, None] + np.arange(context)
    return jnp.asarray(ids[idx]), jnp.asarray(ids[idx + 1])


def train(model, grad, params, train_ids, evaluator, optimizer, cfg, seed, progress):
    """One run. ``x[idx]``, ``y[idx]`` with ``x, y`` the train text and the text one
    character on, and ``idx (B, T)`` a batch of windows, are the inputs and targets, so
    ``jbp.train``'s compiled steps run unchanged (``epoch`` is one scan of eval_every steps).
    """
    fns = compiled(model, jbp.losses.softmax_cross_entropy, grad, optimizer)
    x, y = jnp.asarray(train_ids[:-1]), jnp.asarray(train_ids[1:])
    opt_state, context = optimizer.init(params), cfg["context"]
    starts = np.random.default_rng(seed).integers(0, len(x) - context,
                                                  (cfg["steps"], cfg["batch"]))
    idx = jnp.asarray(starts[:, :, None] + np.arange(context), jnp.int32)
    keys = jax.random.split(jax.random.key(seed), cfg["eval_every"])  # unused: no dropout
    history = {"loss": [], "eval": [{"step": 0, **evaluator(params, {})}]}
    start, step = time.perf_counter(), 0
    with tqdm(total=cfg["steps"], desc=grad, unit="step", disable=not progress,
              leave=False) as bar:
        while step < cfg["steps"]:
            n = min(cfg["eval_every"], cfg["steps"] - step)
            params, opt_state, _, values = fns.epoch(params, opt_state, {}, x, y,
                                                     idx[step:step + n], keys[:n])
            step += n
            history["loss"] += np.asarray(values, np.float64).tolist()
            history["eval"].append({"step": step, **evaluator(params, {})})
            bar.update(n)
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}")
    return params, history, time.perf_counter() - start


def sample(model, params, prompt_ids, n, context, temperature, key):
    """``n`` ids drawn one at a time after ``prompt_ids``, each from the model's output at
    the last of (at most) ``context`` ids. The window is padded with zeros on the right:
    the models are causal, so the padding does not reach the position read."""
    p = len(prompt_ids)
    buffer = jnp.zeros(p + n + context, jnp.int32).at[:p].set(jnp.asarray(prompt_ids,
                                                                          jnp.int32))

    def step(i, buffer):
        seen = p + i
        first = jnp.maximum(seen - context, 0)
        logits = model.apply(params, jax.lax.dynamic_slice(buffer, (first,), (context,))[None])
        next_id = jax.random.categorical(jax.random.fold_in(key, i),
                                         logits[0, seen - 1 - first] / temperature)
        return buffer.at[seen].set(next_id.astype(buffer.dtype))

    return np.asarray(jax.jit(lambda b: jax.lax.fori_loop(0, n, step, b))(buffer))[p:p + n]


def agreement(manual, auto, early):
    """How close the two runs stay: per-step minibatch losses and the evaluations."""
    diff = np.abs(np.asarray(manual["loss"]) - np.asarray(auto["loss"]))
    above = np.nonzero(diff > 1e-3)[0]
    return {"max_abs_loss_diff_early": float(diff[:early].max()), "early_steps": early,
            "max_abs_loss_diff": float(diff.max()),
            "first_step_diff_above_1e-3": int(above[0]) + 1 if len(above) else None,
            "max_abs_val_loss_diff": max(abs(a["val_loss"] - b["val_loss"])
                                         for a, b in zip(manual["eval"], auto["eval"])),
            "loss_diff_per_step": diff.tolist()}


def plot(out, runs, agree, quick=False):
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 3, figsize=(15, 4.2))
    for ax, name in zip(axes, MODELS):
        for grad, style in zip(GRADS, ("-", "--")):
            h = runs[name][grad]["history"]
            steps = np.arange(1, len(h["loss"]) + 1)
            ax.plot(steps, np.asarray(h["loss"]) * BITS, style, color="gray", lw=0.6, alpha=0.6,
                    label=f"{grad} minibatch")
            ev = h["eval"]
            for split, color in (("train", "tab:blue"), ("val", "tab:orange")):
                ax.plot([e["step"] for e in ev], [e[f"{split}_loss"] * BITS for e in ev], style,
                        color=color, marker="o", ms=3, label=f"{grad} {split}")
        ax.set(xlabel="step", ylabel="bits per character", title=name)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for name in MODELS:  # the largest difference in each window of `every` steps
        diff = np.asarray(agree[name]["loss_diff_per_step"])
        every = max(1, len(diff) // 100)
        windows_max = [diff[i:i + every].max() for i in range(0, len(diff), every)]
        axes[2].set_yscale("log")
        plot_with_zeros(axes[2], np.arange(len(windows_max)) * every + every, windows_max,
                        drawstyle="steps-pre", lw=1, label=name)
    ulp = float(np.spacing(np.float32(runs[MODELS[0]]["manual"]["history"]["loss"][-1])))
    axes[2].axhline(ulp, color="gray", ls=":", lw=1, label="1 ulp of the final loss (float32)")
    axes[2].set(xlabel="step", ylabel="|loss_manual − loss_autodiff| (nats)",
                title="the two gradients' runs: minibatch loss difference\n"
                      "(max per window of steps; ▼: exactly 0)")
    axes[2].legend(fontsize=8)
    axes[2].grid(alpha=0.3)
    fig.suptitle("character LM on Python stdlib source: hand-written backward (solid) "
                 "vs jax.grad (dashed)")
    save_figure(fig, out / "curves.png", dpi=110, quick=quick)


def parse_args(argv=None):
    parser = experiment_parser(__doc__.splitlines()[0], "runs/char_lm")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps per run (default {FULL['steps']}, quick "
                             f"{QUICK['steps']})")
    parser.add_argument("--lr", type=float, default=3e-3,
                        help="Adam's peak learning rate (warmup, then cosine decay to 0)")
    parser.add_argument("--temperature", type=float, default=0.8, help="for the samples")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                        help="float64 (the float32 init, cast) shows how far the two runs "
                             "drift with less round-off")
    args = parser.parse_args(argv)
    args.cfg = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        args.cfg["steps"] = args.steps
    return args


def main(argv=None):
    args = parse_args(argv)
    info = start_device(args.platform)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    cfg, context = args.cfg, args.cfg["context"]
    text, corpus = load_corpus()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = np.asarray([index[c] for c in text], np.int32)
    split = int(len(ids) * (1 - VAL_FRACTION))
    train_ids, val_ids = ids[:split], ids[split:]
    corpus.update(vocab_size=len(vocab), train_chars=len(train_ids), val_chars=len(val_ids))
    # evaluation: windows spread evenly over the train text; every window of the val text
    n_val = (len(val_ids) - 1) // context
    evaluate_on = {
        "train": windows(train_ids, np.linspace(0, len(train_ids) - context - 1,
                                                cfg["eval_windows"]).astype(int), context),
        "val": windows(val_ids, np.arange(min(n_val, cfg["eval_windows"] * 4)) * context,
                       context)}
    warmup = max(1, cfg["steps"] // 20)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(
        optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, cfg["steps"])))
    prompt_ids = [index[c] for c in PROMPT]

    runs, agree, samples = {}, {}, {}
    for name in MODELS:
        model = build_model(name, len(vocab), cfg)
        _, params = model.init(jax.random.key(args.seed), (context,))
        params = jax.tree_util.tree_map(lambda a: a.astype(args.dtype), params)
        n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
        runs[name] = {"model": model.name, "n_params": n_params}
        trained = {}
        evaluator = make_evaluator(  # the forward alone: the same for both gradients
            compiled(model, jbp.losses.softmax_cross_entropy, "manual", optimizer).evaluate,
            evaluate_on, 256)
        for grad in GRADS:
            trained[grad], history, seconds = train(
                model, grad, params, train_ids, evaluator, optimizer, cfg, args.seed + 1,
                show_progress(args))
            last = history["eval"][-1]
            runs[name][grad] = {"train_bpc": last["train_loss"] * BITS,
                                "val_bpc": last["val_loss"] * BITS, "seconds": seconds,
                                "history": history}
        agree[name] = agreement(runs[name]["manual"]["history"],
                                runs[name]["autodiff"]["history"], min(20, cfg["steps"]))
        leaves = [jax.tree_util.tree_leaves(jax.device_get(trained[g])) for g in GRADS]
        agree[name]["max_abs_param_diff"] = max(float(np.max(np.abs(a - b)))
                                                for a, b in zip(*leaves))
        drawn = sample(model, trained["manual"], prompt_ids, cfg["sample_chars"], context,
                       args.temperature, jax.random.key(args.seed + 2))
        samples[name] = PROMPT + "".join(vocab[i] for i in drawn)

    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        "runs": runs, "agreement": agree,
        "samples": {"prompt": PROMPT, "temperature": args.temperature, **samples},
        "corpus": corpus, "device": info,
        "config": {**cfg, "lr": args.lr, "optimizer": "clip_by_global_norm(1) + adam, "
                   f"linear warmup {warmup} steps then cosine decay to 0",
                   "loss": "softmax cross-entropy, nats (history) / bits per char (bpc)",
                   "dtype": args.dtype, "seed": args.seed, "quick": args.quick},
    }
    write_json(args.out / "results.json", results)
    plot(args.out, runs, agree, args.quick)

    print(f"corpus: {len(CORPUS_FILES)} stdlib files, Python {corpus['python']}, "
          f"{corpus['chars']} chars, vocab {len(vocab)}, sha256 {corpus['sha256'][:16]}…")
    print(f"{cfg['steps']} steps of {cfg['batch']} x {context} chars; bits per character:")
    print(f"{'model':<12}{'params':>8}{'gradient':>10}{'train':>8}{'val':>8}{'seconds':>9}")
    for name in MODELS:
        for grad in GRADS:
            r = runs[name][grad]
            print(f"{name:<12}{runs[name]['n_params']:>8}{grad:>10}{r['train_bpc']:>8.3f}"
                  f"{r['val_bpc']:>8.3f}{r['seconds']:>9.1f}")
    print(f"{'model':<12}{'|Δloss| first ' + str(agree[MODELS[0]]['early_steps']):>18}"
          f"{'|Δloss| max':>13}{'first >1e-3':>13}{'|Δval| max':>12}{'|Δθ| end':>10}")
    for name in MODELS:
        a = agree[name]
        print(f"{name:<12}{a['max_abs_loss_diff_early']:>18.1e}{a['max_abs_loss_diff']:>13.1e}"
              f"{str(a['first_step_diff_above_1e-3']):>13}{a['max_abs_val_loss_diff']:>12.1e}"
              f"{a['max_abs_param_diff']:>10.1e}")
    for name in MODELS:
        print(f"--- sample, {name} (manual), temperature {args.temperature}:\n{samples[name]}")
    print(f"wrote {args.out / 'results.json'}, {args.out / 'curves.png'}")
    return results


if __name__ == "__main__":
    main()
