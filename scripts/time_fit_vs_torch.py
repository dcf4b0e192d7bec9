"""jbp.fit's training step against an eager PyTorch loop on MNIST-1D (the MLP by default).

Times one epoch of the scan that ``jbp.fit`` runs (``jbp.train.make_epoch``: the batches
gathered on the device, hand-written gradient, Adam), each from the same params and Adam
state held on the device (fit never re-creates them between epochs), under each XLA:CPU
compile setting in ``SETTINGS``, and an eager PyTorch epoch of the same network, weights,
batches, loss and optimizer (``experiments/torch_peer.py``; PyTorch's own threads and one thread). Compiles
are timed apart; the contenders run interleaved, one epoch each per round; medians and the
per-round paired ratio torch / jbp are printed. Needs PyTorch (``pip install -e .[peers]``).

Usage: .venv/bin/python scripts/time_fit_vs_torch.py [--repeats 41] [--batch-size 100]
"""

import argparse
import statistics
import sys
from pathlib import Path

import jax
import numpy as np

import jbp
from jbp import bench, cli
from jbp.data import load_mnist1d
from jbp.train import _epoch_plan, make_epoch, make_grad_fn, make_optimizer, make_update

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments" / "benchmark.py"  # its folder
# name -> XLA compile options for the epoch (jax.jit(..., compiler_options=...))
SETTINGS = {"default": {}, "eigen-1-thread": {"xla_cpu_multi_thread_eigen": False},
            "xnnpack": {"xla_cpu_use_xnnpack": True}, "onednn": {"xla_cpu_use_onednn": True},
            "ynn-eltwise": bench.XLA_OPTIONS["ynn"],
            "ynn-dot": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()
    peer_lib = cli.sibling(EXPERIMENTS, "torch_peer")
    torch = peer_lib.torch
    print(cli.device_info(jax.devices()[0]), f"| torch {torch.__version__}")
    data = load_mnist1d()
    model, in_shape = cli.sibling(EXPERIMENTS, "mnist1d_models").build("mlp")
    loss = jbp.losses.softmax_cross_entropy
    x = jax.device_put(data.x_train.reshape(-1, *in_shape))
    y = jax.device_put(data.y_train)
    _, params = model.init(jax.random.key(0), in_shape)
    optimizer = make_optimizer("adam", 1e-3)
    n_steps = len(x) // args.batch_size
    batches, keys = _epoch_plan(jax.random.key(1), 0, len(x), args.batch_size, n_steps, 0)
    update = make_update(make_grad_fn(model, loss, "manual"), optimizer)
    thunks, compile_s = {}, {}
    opt_state = optimizer.init(params)  # each timed epoch starts from the same params and state
    for name, options in SETTINGS.items():
        epoch, compile_s[name] = bench.compile_timed(make_epoch(update), params, opt_state, {},
                                                     x, y, batches, keys,
                                                     compiler_options=options)
        thunks[f"jbp {name}"] = (lambda e: lambda: e(params, opt_state, {}, x, y, batches,
                                                      keys)[3])(epoch)
    peer = peer_lib.peer_of(model, in_shape, params)
    xt, yt = peer_lib.torch_input(peer, x), peer_lib.torch_labels(y)
    idx = [torch.from_numpy(np.array(b)) for b in batches]  # writable copies
    default_threads = torch.get_num_threads()

    def torch_epoch(threads):
        def run():
            torch.set_num_threads(threads)
            opt = peer_lib.torch_optimizer(peer.module)
            for b in idx:
                value = peer_lib.torch_step(peer.module, opt, xt[b], yt[b])
            torch.set_num_threads(default_threads)
            return value
        return run
    thunks[f"torch {default_threads} threads"] = torch_epoch(default_threads)
    if default_threads != 1:
        thunks["torch 1 thread"] = torch_epoch(1)
    times = bench.interleaved_times(thunks, args.repeats)
    print(f"{model.name}, batch {args.batch_size}, {n_steps} steps per epoch; median of "
          f"{args.repeats} interleaved epochs; compile s: "
          + ", ".join(f"{k} {v:.1f}" for k, v in compile_s.items()))
    fastest_torch = min((k for k in thunks if k.startswith("torch")),
                        key=lambda k: statistics.median(times[k]))
    print(f"{'contender':<22}{'µs per step':>12}{'torch (' + fastest_torch + ') / it':>34}")
    for name, t in times.items():
        ratio = bench.paired_ratios(times[fastest_torch], t)
        print(f"{name:<22}{statistics.median(t) / n_steps * 1e6:>12.1f}"
              f"{ratio['median']:>20.2f} (IQR {ratio['q25']:.2f}–{ratio['q75']:.2f})")


if __name__ == "__main__":
    sys.exit(main())
