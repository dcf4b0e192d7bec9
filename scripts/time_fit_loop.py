"""Which epoch loop should jbp.fit use? One lax.scan per epoch, or a Python loop over the
jitted step. Times one epoch of each on MNIST-1D (compile timed apart, warmed up, medians
of interleaved repeats) for both gradient sources and a few batch sizes.

Usage: .venv/bin/python scripts/time_fit_loop.py [--repeats 7] [--sizes 40 100 100 10]
       .venv/bin/python scripts/time_fit_loop.py --cnn 32 --batch-sizes 100 --repeats 3
(--cnn C: the MNIST-1D CNN of experiments/mnist1d_models.py, four convolutions of C channels,
instead of the MLP)
"""

import argparse
import statistics
import time

import jax

import jbp
from jbp.cli import device_info
from jbp.data import load_mnist1d
from jbp.train import _epoch_plan, make_epoch, make_grad_fn, make_optimizer, make_update


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="+", default=[40, 100, 100, 10])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 100, 500])
    parser.add_argument("--cnn", type=int, default=None, metavar="C",
                        help="time the MNIST-1D CNN with C channels per convolution instead")
    args = parser.parse_args()

    print(device_info(jax.devices()[0]))
    data = load_mnist1d()
    loss = jbp.losses.softmax_cross_entropy
    if args.cnn:
        layers = []
        for _ in range(4):
            layers += [jbp.conv(args.cnn, 5), jbp.relu()]
        model, in_shape = jbp.serial(*layers, jbp.global_avg_pool(), jbp.dense(10)), (40, 1)
    else:
        model, in_shape = jbp.mlp(args.sizes), (args.sizes[0],)
    x = jax.device_put(data.x_train.reshape(-1, *in_shape))
    y = jax.device_put(data.y_train)
    _, params = model.init(jax.random.key(0), in_shape)
    optimizer = make_optimizer("adam", 1e-3)
    opt_state = optimizer.init(params)
    print(f"model {model.name}, N={len(x)}; per epoch, median of {args.repeats}")
    print(f"{'grad':>9} {'batch':>6} {'steps':>6} {'scan ms':>9} {'python ms':>10} "
          f"{'python/scan':>12} {'compile scan s':>15} {'compile step s':>15}")
    for grad in ("manual", "autodiff"):
        update = make_update(make_grad_fn(model, loss, grad), optimizer)
        for batch_size in args.batch_sizes:
            n_steps = len(x) // batch_size
            batches, keys = _epoch_plan(jax.random.key(1), 0, len(x), batch_size, n_steps, 0)
            t = time.perf_counter()
            run_epoch = jax.jit(make_epoch(update)).lower(
                params, opt_state, {}, x, y, batches, keys).compile()
            compile_scan = time.perf_counter() - t
            t = time.perf_counter()
            step = jax.jit(update).lower(params, opt_state, {}, x, y, batches[0], keys[0]).compile()
            compile_step = time.perf_counter() - t
            rows = [batches[i] for i in range(n_steps)]
            ks = [keys[i] for i in range(n_steps)]

            def scan_epoch():
                jax.block_until_ready(run_epoch(params, opt_state, {}, x, y, batches, keys))

            def python_epoch():
                p, s = params, opt_state
                values = []
                for i in range(n_steps):
                    p, s, _, v = step(p, s, {}, x, y, rows[i], ks[i])
                    values.append(v)
                jax.block_until_ready((p, s, values))

            scan_epoch(), python_epoch()  # warm up
            times = {"scan": [], "python": []}
            for _ in range(args.repeats):
                for name, fn in (("scan", scan_epoch), ("python", python_epoch)):
                    t = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t)
            scan_ms = 1e3 * statistics.median(times["scan"])
            python_ms = 1e3 * statistics.median(times["python"])
            print(f"{grad:>9} {batch_size:>6} {n_steps:>6} {scan_ms:>9.2f} {python_ms:>10.2f} "
                  f"{python_ms / scan_ms:>12.2f} {compile_scan:>15.2f} {compile_step:>15.2f}")


if __name__ == "__main__":
    main()
