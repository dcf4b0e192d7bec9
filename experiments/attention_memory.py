"""Attention's memory and time: the blocked hand-written backward against jax.grad.

For the attention layer alone (``jbp.attention``, float32, batch 4, 4 heads of 64, so
d_model 256) and a sweep of sequence lengths T, it compiles three training gradients
``(params, x, target) -> (loss, grads)`` of a mean-squared error on the layer's output,
all with the same params:

  manual      jbp.manual_value_and_grad: the blocked forward (online softmax over key
              blocks) and the hand-written backward, which recomputes the probabilities
              block by block from each row's cached max and normaliser; no (B, H, T, T) array
  plain       jax.grad through a plain attention: the full scores, jax.nn.softmax
  checkpoint  jax.grad of the blocked forward wrapped in jax.checkpoint: the forward is
              recomputed in the backward, and autodiff's backward of the scan keeps what
              each key block's step needs (its probabilities), which adds up to (T, T)

With ``--padding`` every example is padded: its length is drawn from [T/2, T] and the
padded keys are masked in all three (the side input ``lengths`` for jbp's layer, a key
mask on the full scores for the plain one), to compare the memory a padding mask costs.

It checks that the three agree, reports XLA's temporary memory of each compiled gradient
(``memory_analysis().temp_size_in_bytes``: the scratch a call needs beyond its arguments
and outputs) and times them interleaved (median of the paired per-round ratios
manual/plain and checkpoint/plain). The targets, at T = 2048: manual temp memory ≤ 1/8 of
plain's, and manual time ≤ 0.75 × plain's.

Writes ``results.json`` and ``attention_memory.png`` into ``--out``.

    .venv/bin/python experiments/attention_memory.py --out runs/attention_memory
    .venv/bin/python experiments/attention_memory.py --quick --out /tmp/attention_memory
"""

import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jbp
from jbp import bench, cli
from jbp.io import write_json

MSE = jbp.losses.mean_squared_error
FULL = {"lengths": (256, 512, 1024, 2048, 4096), "batch": 4, "heads": 4, "head_dim": 64,
        "block_size": 128, "budget_s": 20.0}
QUICK = {"lengths": (20,), "batch": 2, "heads": 2, "head_dim": 4, "block_size": 8,
         "budget_s": 0.2}
TARGET = {"T": 2048, "memory_ratio_max": 1 / 8, "time_ratio_max": 0.75}
NAMES = ("manual", "plain", "checkpoint")


def plain_attention(params, x, heads, causal, lengths=None):
    """Textbook multi-head attention with the same params: (B, H, T, T) scores, softmax;
    keys at or past ``lengths (B,)`` masked where given."""
    b, t, _ = x.shape

    def heads_of(a):
        return a.reshape(b, t, heads, -1).transpose(0, 2, 1, 3)

    q = heads_of(x @ params["q"]["W"] + params["q"]["b"])
    k = heads_of(x @ params["k"]["W"])
    v = heads_of(x @ params["v"]["W"] + params["v"]["b"])
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
    if causal:
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    if lengths is not None:
        s = jnp.where((jnp.arange(t) < lengths[:, None])[:, None, None, :], s, -jnp.inf)
    o = (jax.nn.softmax(s, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)
    return o @ params["o"]["W"] + params["o"]["b"]


def gradients(layer, heads, causal):
    """The three ``(params, x, target, lengths) -> (loss, grads)`` functions (``lengths``:
    (B,) or None, no padding)."""

    def manual(params, x, target, lengths):
        side = None if lengths is None else {"lengths": lengths}
        return jbp.manual_value_and_grad(layer, MSE)(params, x, target, side=side)

    def plain(params, x, target, lengths):
        return jax.value_and_grad(lambda p: MSE.value(
            plain_attention(p, x, heads, causal, lengths), target))(params)

    def checkpoint(params, x, target, lengths):
        side = None if lengths is None else {"lengths": lengths}
        apply = jax.checkpoint(lambda p: layer.apply(p, x, side=side))
        return jax.value_and_grad(lambda p: MSE.value(apply(p), target))(params)

    return {"manual": manual, "plain": plain, "checkpoint": checkpoint}


def max_rel_err(a, b) -> float:
    """Max over leaves of ‖a − b‖/‖b‖."""
    return max(float(np.linalg.norm(np.asarray(x) - np.asarray(y)) / np.linalg.norm(np.asarray(y)))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def run_point(t, cfg, causal, seed, padding=False) -> dict:
    heads, head_dim, batch = cfg["heads"], cfg["head_dim"], cfg["batch"]
    d = heads * head_dim
    layer = jbp.attention(heads, head_dim, causal=causal, block_size=cfg["block_size"])

    @jax.jit  # one compile for all the draws (eager random ops compile one kernel each)
    def draw(seed):
        k_init, k_x, k_y = jax.random.split(jax.random.fold_in(jax.random.key(seed), t), 3)
        return (layer.init(k_init, (t, d))[1], jax.random.normal(k_x, (batch, t, d)),
                jax.random.normal(k_y, (batch, t, d)),
                jax.random.randint(k_y, (batch,), (t + 1) // 2, t + 1))

    params, x, target, lengths = draw(seed)
    args = (params, x, target, lengths if padding else None)
    point = {"T": t, "block_size": min(t, cfg["block_size"]),
             "n_blocks": -(-t // cfg["block_size"])}
    compiled, outs = {}, {}
    for name, f in gradients(layer, heads, causal).items():
        compiled[name], seconds = bench.compile_timed(f, *args)
        outs[name] = jax.block_until_ready(compiled[name](*args))
        point[name] = {"compile_s": seconds, **bench.compiled_stats(compiled[name])}
    point["max_rel_err"] = {name: max_rel_err(outs[name], outs["plain"])
                            for name in ("manual", "checkpoint")}
    one_round = sum(bench.time_call(lambda c=c: c(*args)) for c in compiled.values())
    repeats = bench.repeats_for(one_round, cfg["budget_s"], lo=3, hi=30)
    # checkpoint first, then the pair manual/plain, which swap places every other round
    order = {name: (lambda c=compiled[name]: c(*args))
             for name in ("checkpoint", "manual", "plain")}
    times = bench.interleaved_times(order, repeats, warmup=0, swap=[("manual", "plain")])
    for name in NAMES:
        point[name]["time"] = bench.summary(times[name])
    point["time_ratio"] = {name: bench.paired_ratios(times[name], times["plain"])
                           for name in ("manual", "checkpoint")}
    temp = {name: point[name]["memory"].get("temp_bytes") for name in NAMES}
    point["temp_ratio"] = {name: (temp[name] / temp["plain"]) if temp[name] is not None
                           and temp["plain"] else None for name in ("manual", "checkpoint")}
    return point


def plot(points, cfg, out, quick=False):
    plt = cli.plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ts = [p["T"] for p in points]
    for name, style in zip(NAMES, ("o-", "s--", "^:")):
        axes[0].plot(ts, [p[name]["memory"].get("temp_bytes", np.nan) / 2**20 for p in points],
                     style, label=name)
    axes[0].set_ylabel("XLA temp memory (MiB)")
    axes[0].set_title(f"training gradient, B={cfg['batch']}, {cfg['heads']} heads of "
                      f"{cfg['head_dim']}, blocks of {cfg['block_size']}")
    for name, style in (("manual", "o-"), ("checkpoint", "^:")):
        axes[1].plot(ts, [p["time_ratio"][name]["median"] for p in points], style,
                     label=f"{name} / plain")
    axes[1].axhline(TARGET["time_ratio_max"], color="grey", lw=0.8, ls="--",
                    label=f"target {TARGET['time_ratio_max']}")
    axes[1].axhline(1.0, color="black", lw=0.5)
    axes[1].set_ylabel("time ratio (median of paired rounds)")
    axes[1].set_title("time against plain attention under jax.grad")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T")
        ax.legend()
    axes[0].set_yscale("log")
    cli.save_figure(fig, out / "attention_memory.png", quick=quick)


def main(argv=None):
    parser = cli.experiment_parser(__doc__.split("\n\n")[0], "runs/attention_memory")
    parser.add_argument("--causal", action="store_true", help="causal (decoder) attention")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="sequence lengths T to sweep (default: 256 ... 4096; --quick: 20)")
    parser.add_argument("--padding", action="store_true",
                        help="pad every example (lengths from [T/2, T]) and mask the padding")
    parser.add_argument("--block-size", type=int, default=None,
                        help="keys per block (default: 128, the layer's default; --quick: 8)")
    args = parser.parse_args(argv)
    info = cli.start_device(args.platform)
    cfg = dict(QUICK if args.quick else FULL)
    if args.lengths:
        cfg["lengths"] = tuple(args.lengths)
    if args.block_size:
        cfg["block_size"] = args.block_size
    start = time.perf_counter()
    points = [run_point(t, cfg, args.causal, args.seed, args.padding)
              for t in tqdm(cfg["lengths"], desc="lengths", file=sys.stdout,
                            disable=not cli.show_progress(args))]

    at = next((p for p in points if p["T"] == TARGET["T"]), None)
    target = dict(TARGET)
    if at is None:
        target.update(measured=False, holds=None, note=f"T = {TARGET['T']} not in this sweep")
    else:
        memory, speed = at["temp_ratio"]["manual"], at["time_ratio"]["manual"]["median"]
        target.update(measured=True, memory_ratio=memory, time_ratio=speed,
                      memory_holds=bool(memory is not None
                                        and memory <= TARGET["memory_ratio_max"]),
                      time_holds=bool(speed <= TARGET["time_ratio_max"]))
        target["holds"] = target["memory_holds"] and target["time_holds"]

    results = {"experiment": "attention_memory", "device": info,
               "config": {**cfg, "causal": args.causal, "padding": args.padding,
                          "quick": args.quick, "seed": args.seed,
                          "d_model": cfg["heads"] * cfg["head_dim"], "dtype": "float32",
                          "loss": "mean_squared_error"},
               "points": points, "target": target, "wall_s": time.perf_counter() - start,
               "note": "timings on a shared machine; time ratio = median of per-round ratios "
                       "(interleaved, manual and plain swap places every other round); temp "
                       "memory = XLA's compiled temp_size_in_bytes"}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", results)
    plot(points, cfg, args.out, args.quick)

    print(f"{'T':>6}{'blocks':>7}{'temp MiB manual':>17}{'plain':>9}{'checkpt':>9}"
          f"{'mem m/p':>9}{'time m/p':>10}{'ckpt/p':>8}{'plain ms':>10}{'rel err':>9}")
    for p in points:
        mib = {n: p[n]["memory"].get("temp_bytes", float("nan")) / 2**20 for n in NAMES}
        ratio = p["temp_ratio"]["manual"]
        print(f"{p['T']:>6}{p['n_blocks']:>7}{mib['manual']:>17.1f}{mib['plain']:>9.1f}"
              f"{mib['checkpoint']:>9.1f}{(ratio if ratio is not None else float('nan')):>9.3f}"
              f"{p['time_ratio']['manual']['median']:>10.2f}"
              f"{p['time_ratio']['checkpoint']['median']:>8.2f}"
              f"{p['plain']['time']['median'] * 1e3:>10.1f}"
              f"{max(p['max_rel_err'].values()):>9.1e}")
    if target["measured"]:
        print(f"target at T = {TARGET['T']}: temp memory manual/plain {target['memory_ratio']:.3f} "
              f"(≤ {TARGET['memory_ratio_max']:.3f}: "
              f"{'holds' if target['memory_holds'] else 'does NOT hold'}), time manual/plain "
              f"{target['time_ratio']:.2f} (≤ {TARGET['time_ratio_max']}: "
              f"{'holds' if target['time_holds'] else 'does NOT hold'})")
    else:
        print(f"target: {target['note']}")
    print(f"wrote {args.out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
