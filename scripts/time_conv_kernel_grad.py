"""∂C/∂W of a convolution two ways on XLA:CPU: as one convolution of the input with the delta
(``kernel_grad_by_conv``) and as one product per kernel tap in a scan
(``kernel_grad_by_taps``, what conv's backward uses for one group). Times both, interleaved,
with the forward and the data gradient for scale, and prints GFLOP/s (dense formula
2·B·positions·taps·C·O) and XLA's temporary memory.

Usage: .venv/bin/python scripts/time_conv_kernel_grad.py            # cnn2d's 64→64 3×3 layer
       .venv/bin/python scripts/time_conv_kernel_grad.py --shape 100 40 32 32 --kernel 5
       (--shape B positions… C O: a 1-D layer is B L C O, a 2-D one B H W C O)
"""

import argparse
import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from jbp import bench
from jbp.cli import device_info
from jbp.layers import conv_geometry as G


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[128, 32, 32, 64, 64])
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    b, *size, c, o = args.shape
    n = len(size)
    geo = G.window(tuple(size), (args.kernel,) * n, (1,) * n, (1,) * n, "SAME", "conv")
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((b, *size, c), np.float32))
    delta = jnp.asarray(rng.standard_normal((b, *size, o), np.float32))
    W = jnp.asarray(rng.standard_normal((*geo.size, c, o), np.float32))
    fns = {"kernel grad, convolution": (lambda a, d: G.kernel_grad_by_conv(a, d, geo, 1), a, delta),
           "kernel grad, per tap": (lambda a, d: G.kernel_grad_by_taps(a, d, geo), a, delta),
           "forward": (lambda a, W: G.convolve(a, W, geo, 1), a, W),
           "data grad": (lambda d, W: G.input_grad(d, W, geo, 1), delta, W)}
    print(device_info(jax.devices()[0]))
    thunks, temp = {}, {}
    for name, (f, *xs) in fns.items():
        compiled = jax.jit(f).lower(*xs).compile()
        temp[name] = compiled.memory_analysis().temp_size_in_bytes / 2**20
        thunks[name] = (lambda c, xs: lambda: c(*xs))(compiled, xs)
    times = bench.interleaved_times(thunks, args.repeats)
    flops = 2 * b * math.prod(size) * math.prod(geo.size) * c * o
    print(f"B {b}, {'×'.join(map(str, size))}, {c}→{o}, kernel {args.kernel}: median of "
          f"{args.repeats} interleaved rounds")
    for name, t in times.items():
        median = statistics.median(t)
        print(f"{name:<26}{median * 1e3:>9.1f} ms{flops / median / 1e9:>8.1f} GFLOP/s"
              f"{temp[name]:>9.1f} MiB temp")


if __name__ == "__main__":
    main()
