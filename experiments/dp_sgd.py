"""DP-SGD on MNIST-1D: per-example clipping and Gaussian noise (Abadi et al., 2016).

Each step takes a batch of B examples, clips every example's gradient ∇ℓ_i to L2 norm at
most C, sums them, adds Gaussian noise N(0, σ²C²·I) and divides by B. Two ways to get the
clipped sum, same signature ``(params, x, y, key) -> (noisy gradient, norms)``:

  manual      jbp.clipped_grad_mean: per-example norms from one hand-written backward
              (‖a_i‖²·‖δ_i‖² per dense layer), then a second backward whose output
              cotangent row i is scaled by example i's clip factor; no ∇ℓ_i is formed
  vmap_grad   jax.vmap(jax.grad(ℓ_i)) forms every ∇ℓ_i, clips and averages them

Both add the same noise for the same key, so they give the same update up to float32
round-off: the script checks that on the first batches, then trains the same model from the
same initial parameters with each (and a non-private baseline with plain SGD on the batch
gradient), and reports test accuracy and time per step (interleaved timing of the jitted
steps). Privacy accounting (ε, δ) is out of scope here.

Writes ``results.json`` and ``accuracy.png`` into ``--out``.

    .venv/bin/python experiments/dp_sgd.py --out runs/dp_sgd
    .venv/bin/python experiments/dp_sgd.py --quick --out /tmp/dp_sgd
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import jbp
from jbp import bench, cli
from jbp.io import write_json

N_CLASSES = 10
FULL = {"hidden": (128, 128), "batch": 128, "steps": 1500, "learning_rate": 0.1,
        "momentum": 0.9, "l2_norm_clip": 1.0, "noise_multiplier": 1.1, "eval_every": 150,
        "timing_rounds": 30}
QUICK = {"hidden": (16,), "batch": 32, "steps": 20, "learning_rate": 0.1, "momentum": 0.9,
         "l2_norm_clip": 1.0, "noise_multiplier": 1.1, "eval_every": 10, "timing_rounds": 3}


# ---------------------------------------------------------------------------- DP-SGD core

def add_noise(grads, key, std):
    """``grads`` plus independent N(0, std²) noise on every element (one key per leaf)."""
    leaves, tree = jax.tree_util.tree_flatten(grads)
    keys = jax.random.split(key, len(leaves))
    return tree.unflatten([g + std * jax.random.normal(k, g.shape, g.dtype)
                           for g, k in zip(leaves, keys)])


def private_grad_manual(model, loss, l2_norm_clip, noise_multiplier):
    """``f(params, x, y, key) -> (noisy clipped mean gradient, per-example norms (B,))``."""
    clipped = jbp.clipped_grad_mean(model, loss, l2_norm_clip)

    def private_grad(params, x, y, key):
        grads, norms = clipped(params, x, y)
        return add_noise(grads, key, noise_multiplier * l2_norm_clip / x.shape[0]), norms

    return private_grad


def private_grad_vmap(model, loss, l2_norm_clip, noise_multiplier):
    """The same as :func:`private_grad_manual`, by ``jax.vmap(jax.grad(...))``."""

    def loss_one(params, xi, yi):
        return loss.value(model.apply(params, xi[None]), yi[None])

    def private_grad(params, x, y, key):
        per_example = jax.vmap(jax.grad(loss_one), in_axes=(None, 0, 0))(params, x, y)
        leaves = jax.tree_util.tree_leaves(per_example)
        norms = jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in leaves))
        factor = 1.0 / jnp.maximum(1.0, norms / l2_norm_clip)
        grads = jax.tree_util.tree_map(
            lambda g: jnp.mean(g * factor.reshape((-1,) + (1,) * (g.ndim - 1)), axis=0),
            per_example)
        return add_noise(grads, key, noise_multiplier * l2_norm_clip / x.shape[0]), norms

    return private_grad


def non_private_grad(model, loss):
    """Plain batch gradient (manual backward) with the same signature, for the baseline."""
    grad = jbp.manual_value_and_grad(model, loss)

    def batch_grad(params, x, y, key):
        return grad(params, x, y)[1], jnp.zeros(x.shape[0], x.dtype)

    return batch_grad


def make_step(grad_fn, optimizer):
    """A jitted ``step(params, opt_state, x, y, key) -> (params, opt_state)``."""

    @jax.jit
    def step(params, opt_state, x, y, key):
        grads, _ = grad_fn(params, x, y, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


_PREDICT = {}


def accuracy(model, params, x, y) -> float:
    """Fraction of ``x`` classified as ``y`` (the jitted forward is built once per model)."""
    if model not in _PREDICT:
        _PREDICT[model] = jax.jit(lambda p, x: jnp.argmax(model.apply(p, x), axis=-1))
    return float(jnp.mean(_PREDICT[model](params, x) == y))


@jax.jit
def _sample(x_all, y_all, key, t, batch_like):
    """Batch ``t`` of a run: ``len(batch_like)`` distinct examples and a noise key."""
    k_batch, k_noise = jax.random.split(jax.random.fold_in(key, t))
    idx = jax.random.choice(k_batch, x_all.shape[0], batch_like.shape, replace=False)
    return x_all[idx], y_all[idx], k_noise


def batches(data, batch, key):
    """``get(t) -> (x (batch, ...), y (batch,), noise key)``, one compiled sampler for all runs."""
    x_all, y_all = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    batch_like = jnp.zeros(batch)
    return lambda t: _sample(x_all, y_all, key, t, batch_like)


def train(model, step, params, optimizer, data, cfg, key, desc, progress=False):
    """Run ``cfg['steps']`` steps on uniformly drawn batches; return params and the curve."""
    opt_state = optimizer.init(params)
    get = batches(data, cfg["batch"], key)
    curve = []
    for t in tqdm(range(cfg["steps"]), desc=desc, file=sys.stdout, mininterval=2.0,
                  disable=not progress):
        params, opt_state = step(params, opt_state, *get(t))
        if (t + 1) % cfg["eval_every"] == 0 or t + 1 == cfg["steps"]:
            curve.append((t + 1, accuracy(model, params, data.x_test, data.y_test)))
    return params, curve


def synthetic_data(seed, n_train=512, n_test=256, features=40) -> jbp.data.Dataset:
    """Ten Gaussian clusters in ``features`` dimensions (for tests without MNIST-1D)."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(N_CLASSES, features)) * 1.5

    def draw(n):
        y = rng.integers(0, N_CLASSES, n)
        return (mu[y] + rng.normal(size=(n, features))).astype(np.float32), y.astype(np.int32)

    return jbp.data.Dataset(*draw(n_train), *draw(n_test))


def compare_updates(steps, params, opt_state, get, checks=3) -> float:
    """Max relative difference between the manual and vmap_grad updates (new params minus
    old) taken from the same params, batch and noise key, over ``checks`` batches."""
    worst = 0.0
    for i in range(checks):
        batch = get(i)
        new_m, _ = steps["manual"](params, opt_state, *batch)
        new_v, _ = steps["vmap_grad"](params, opt_state, *batch)
        for m, v, p in zip(*(jax.tree_util.tree_leaves(t) for t in (new_m, new_v, params))):
            du_m, du_v = np.asarray(m - p, np.float64), np.asarray(v - p, np.float64)
            worst = max(worst, float(np.linalg.norm(du_m - du_v) / max(np.linalg.norm(du_v), 1e-30)))
    return worst


def main(argv=None):
    parser = cli.experiment_parser(__doc__.split("\n\n")[0], "runs/dp_sgd")
    parser.add_argument("--data", choices=["mnist1d", "synthetic"], default="mnist1d",
                        help="MNIST-1D (generated offline and cached) or Gaussian clusters")
    args = parser.parse_args(argv)
    info = cli.start_device(args.platform)
    cfg = QUICK if args.quick else FULL
    key = jax.random.key(args.seed)
    _, k_init, k_check, k_train, k_time = jax.random.split(key, 5)
    data = jbp.data.load_mnist1d() if args.data == "mnist1d" else synthetic_data(args.seed)
    features = data.x_train.shape[1]
    model = jbp.mlp([features, *cfg["hidden"], N_CLASSES], "relu")
    loss = jbp.losses.softmax_cross_entropy
    params0 = jax.jit(lambda k: model.init(k, (features,))[1])(k_init)  # one compile, not one per op
    start = time.perf_counter()

    grads = {"manual": private_grad_manual(model, loss, cfg["l2_norm_clip"], cfg["noise_multiplier"]),
             "vmap_grad": private_grad_vmap(model, loss, cfg["l2_norm_clip"], cfg["noise_multiplier"]),
             "non_private": non_private_grad(model, loss)}
    optimizer = optax.sgd(cfg["learning_rate"], momentum=cfg["momentum"])
    steps = {name: make_step(g, optimizer) for name, g in grads.items()}

    # Time per step: the jitted steps on one batch, interleaved, after compiling apart.
    x = jnp.asarray(data.x_train[:cfg["batch"]])
    y = jnp.asarray(data.y_train[:cfg["batch"]])
    state = optimizer.init(params0)
    compile_s = {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        jax.block_until_ready(step(params0, state, x, y, k_time))
        compile_s[name] = time.perf_counter() - t0
    times = bench.interleaved_times(
        {name: (lambda s=s: s(params0, state, x, y, k_time)) for name, s in steps.items()},
        cfg["timing_rounds"])

    update_rel_diff = compare_updates(steps, params0, state, batches(data, cfg["batch"], k_check))

    runs = {}
    for name, step in steps.items():
        final, curve = train(model, step, params0, optimizer, data, cfg, k_train, name,
                             cli.show_progress(args))
        runs[name] = {"test_accuracy": curve[-1][1], "curve": curve,
                      "train_accuracy": accuracy(model, final, data.x_train, data.y_train),
                      "first_call_s": compile_s[name], "step_time": bench.summary(times[name])}
        runs[name]["final_params"] = final
    param_diff = max(
        float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) for a, b in zip(
            jax.tree_util.tree_leaves(runs["manual"].pop("final_params")),
            jax.tree_util.tree_leaves(runs["vmap_grad"].pop("final_params"))))
    runs["non_private"].pop("final_params")
    speedup = bench.paired_ratios(times["vmap_grad"], times["manual"])

    results = {"experiment": "dp_sgd", "device": info, "seed": args.seed, "quick": args.quick,
               "data": args.data, "config": {**cfg, "quick": args.quick, "seed": args.seed},
               "model": model.name,
               "update_max_rel_diff": update_rel_diff,
               "final_params_max_rel_diff": param_diff,
               "runs": runs, "step_speedup_vmap_over_manual": speedup,
               "wall_s": time.perf_counter() - start,
               "note": "timings on a shared machine; no privacy accounting (epsilon) computed"}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", results)

    plt = cli.plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in runs.items():
        steps_, accs = zip(*run["curve"])
        ax.plot(steps_, accs, "o-" if name == "manual" else "--", label=name, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"DP-SGD on {args.data} (C={cfg['l2_norm_clip']}, σ={cfg['noise_multiplier']})")
    ax.legend()
    cli.save_figure(fig, args.out / "accuracy.png", quick=args.quick)

    print(f"{'path':<12}{'test acc':>9}{'train acc':>10}{'ms/step':>9}")
    for name, run in runs.items():
        print(f"{name:<12}{run['test_accuracy']:>9.3f}{run['train_accuracy']:>10.3f}"
              f"{run['step_time']['median'] * 1e3:>9.3f}")
    print(f"manual vs vmap_grad noisy updates (same key): max rel diff {update_rel_diff:.1e}; "
          f"final params after {cfg['steps']} steps: {param_diff:.1e}")
    print(f"step time vmap_grad/manual: {speedup['median']:.2f}x (median of paired rounds)")
    print(f"wrote {args.out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
