"""Which block size should causal attention use at a given T? Times the causal core's
forward and hand-written backward (``jbp.layers.attention.attention_core`` and
``attention_core_backward``, B 4, 4 heads of 64, float32) for each block size, interleaved
rounds, medians; GFLOP/s count the products of the T(T+1)/2 pairs a causal mask keeps.

Usage: .venv/bin/python scripts/time_attention_blocks.py [--steps 1024 2048 4096]
       [--blocks 128 256 512] [--repeats 5]
"""

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from jbp import bench
from jbp.cli import device_info
from jbp.layers.attention import attention_core, attention_core_backward

B, H, DH = 4, 4, 64


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--blocks", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(device_info(jax.devices()[0]))
    rng = np.random.default_rng(0)
    print(f"{'T':>6}{'block':>7}{'forward ms':>12}{'backward ms':>13}{'total ms':>10}"
          f"{'GFLOP/s':>9}")
    for t in args.steps:
        q, k, v, do = (jnp.asarray(rng.standard_normal((B, H, t, DH), np.float32))
                       for _ in range(4))
        thunks = {}
        for block in args.blocks:
            fwd = jax.jit(lambda q, k, v, b=block: attention_core(q, k, v, causal=True, block=b))
            bwd = jax.jit(lambda q, k, v, o, m, l, do, b=block: attention_core_backward(
                q, k, v, o, m, l, do, causal=True, block=b))
            o, m, l = fwd(q, k, v)
            thunks[(block, "forward")] = lambda f=fwd: f(q, k, v)
            thunks[(block, "backward")] = lambda g=bwd, o=o, m=m, l=l: g(q, k, v, o, m, l, do)
        times = bench.interleaved_times(thunks, args.repeats)
        pair_flops = 2 * B * H * t * (t + 1) / 2 * DH  # one product over the kept pairs
        for block in args.blocks:
            f, b = (statistics.median(times[(block, part)]) for part in ("forward", "backward"))
            print(f"{t:>6}{block:>7}{f * 1e3:>12.1f}{b * 1e3:>13.1f}{(f + b) * 1e3:>10.1f}"
                  f"{7 * pair_flops / (f + b) / 1e9:>9.1f}")  # 2 forward + 5 backward products


if __name__ == "__main__":
    main()
