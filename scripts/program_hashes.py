"""Print a hash of every compiled program the benchmark times, to show that a change to
the library leaves them as they were (so the step times cannot have moved).

For each point of ``experiments/benchmark.py``'s default grid: the manual and the
autodiff Adam training step; for a small MLP, attention model and GRU: the per-example
gradient norms and the GGN diagonal. Each is jitted, compiled by XLA, and hashed as
optimised HLO text without its source metadata (file names, lines, Python function
names), so two checkouts that compile to the same program print the same hash.

Usage, comparing the working tree with another commit::

    git worktree add /tmp/before <commit>
    (cd /tmp/before && ../path/to/.venv/bin/python /path/to/scripts/program_hashes.py /tmp/before) > before.txt
    .venv/bin/python scripts/program_hashes.py . > after.txt
    diff before.txt after.txt
"""

import hashlib
import importlib.util
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

ROOT = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
sys.path.insert(0, str(ROOT.resolve()))
import jbp  # noqa: E402  (the checkout named on the command line)


def program_text(f, *args) -> str:
    """XLA's optimised HLO of ``jax.jit(f)`` for ``args``, without source metadata."""
    text = jax.jit(f).lower(*args).compile().as_text()
    text = re.sub(r", metadata=\{[^}]*\}", "", text)
    lines = [line for line in text.splitlines()
             if line.startswith(("%", "ENTRY", "}", "  ")) and not re.match(r"^\s*\d+ ", line)]
    return "\n".join(lines)


def digest(f, *args) -> str:
    return hashlib.sha256(program_text(f, *args).encode()).hexdigest()[:16]


def main():
    path = ROOT / "experiments" / "benchmark.py"
    spec = importlib.util.spec_from_file_location("benchmark", path)
    bm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bm)
    loss, opt = jbp.losses.softmax_cross_entropy, optax.adam(1e-3)
    for point in bm.specs(bm.parse_args([])):
        _, params = point.model.init(jax.random.key(0), point.in_shape)
        x = jax.ShapeDtypeStruct((point.batch, *point.in_shape), jnp.float32)
        y = jax.ShapeDtypeStruct((point.batch,), jnp.int32)
        opt_state = jax.eval_shape(opt.init, params)
        for name, make in (("manual", jbp.manual_value_and_grad),
                           ("autodiff", jbp.autodiff_value_and_grad)):
            step = bm.adam_step(make(point.model, loss), opt)
            print(digest(step, params, opt_state, x, y), point.label, name, flush=True)
    small = {"mlp": (jbp.mlp([8, 16, 4]), (8,)),
             "attention": (jbp.serial(jbp.attention(2, 4), jbp.global_avg_pool(),
                                      jbp.dense(4)), (5, 8)),
             "gru": (jbp.serial(jbp.gru(6, return_sequences=False), jbp.dense(4)), (5, 3))}
    for label, (model, shape) in small.items():
        _, params = model.init(jax.random.key(0), shape)
        x = jax.ShapeDtypeStruct((3, *shape), jnp.float32)
        y = jax.ShapeDtypeStruct((3,), jnp.int32)
        for name, make in (("norms", jbp.per_example_grad_norms), ("ggn", jbp.ggn_diagonal)):
            print(digest(make(model, loss), params, x, y), label, name, flush=True)


if __name__ == "__main__":
    main()
