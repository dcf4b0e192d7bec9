"""Shared test set-up: a hypothesis profile fit for JIT compiles, dtype helpers, and running
an experiment script in this process."""

import contextlib
import functools
import importlib.util
import io
import os
from pathlib import Path

# Test workers share one machine: on a GPU, each would otherwise take 75% of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# The suite's programs run for moments on tiny arrays and compile for seconds: compile them
# with most of XLA's optimisations off (LLVM at level 0, its expensive passes skipped), here
# and in every subprocess a test starts (they inherit the environment). The same math,
# compiled about a third faster; the tests' assertions hold for any CPU's kernels. A test
# about what XLA's default compile does runs under :func:`default_compile`.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402 (after the environment it reads)
from jax._src.compiler import _DISABLE_MOST_OPTIMIZATIONS  # noqa: E402 (its current value)
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# The first call of a jitted function compiles (seconds): no per-example deadline, and a
# derandomized search so CI sees the same examples on every run.
settings.register_profile("jbp", deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("jbp")

# The tests' own jitted programs (witnesses: jax.grad of a forward, Jacobians, central
# differences, with jbp's functions inside) run once or twice on tiny arrays, so compiling
# them is nearly all their time, about half of it LLVM's optimisation. At XLA's backend
# optimisation level 0 they compile about twice as fast and compute the same math (the
# tests' assertions hold for any CPU's kernels); so does everything else the suite compiles
# (JAX_DISABLE_MOST_OPTIMIZATIONS above).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@contextlib.contextmanager
def default_compile():
    """Compile with XLA's default optimisations inside the block, for a test about what the
    default compile does (its memory, its fusions). Jit a new function inside: one compiled
    before keeps its executable."""
    saved = _DISABLE_MOST_OPTIMIZATIONS.value
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", saved)

# Relative (normwise) tolerance between a hand-written gradient and jax.vjp / jax.grad.
_RTOL = {"float64": 1e-12, "float32": 1e-5}


def rtol(dtype) -> float:
    """The agreement asked of float64 (1e-12) or float32 (1e-5) gradients."""
    return _RTOL[jnp.dtype(dtype).name]


@pytest.fixture(params=[jnp.float32, jnp.float64], ids=["float32", "float64"])
def dtype(request):
    """Run the test in float32 and again in float64 (with x64 enabled only there)."""
    with jax.enable_x64(request.param == jnp.float64):
        yield request.param


def cast(tree, dtype):
    """Every floating leaf of ``tree`` as ``dtype``."""
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def rel_err(got, want) -> float:
    """Max over leaves of the normwise relative error ‖got − want‖/‖want‖ (float64 numpy);
    the two pytrees must have one structure and equal leaf shapes."""
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    errs = []
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, (g.shape, w.shape)
        diff = np.linalg.norm(g - w)
        errs.append(0.0 if diff == 0 else diff / max(np.linalg.norm(w), 1e-300))
    return max(errs, default=0.0)


ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def load_script(name: str):
    """``experiments/<name>.py`` as a module (its main() not run); loaded once, so its jitted
    functions compile once for every test that runs it."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(name: str, args, env: dict | None = None) -> str:
    """``experiments/<name>.py``'s main(args) in this process, what ``python <name>.py args``
    runs, with ``env`` set: its stdout. The config a script may change (64-bit mode, the
    default device) is put back after it. A process of its own costs ~2.5 s of imports."""
    saved = {k: getattr(jax.config, k) for k in ("jax_enable_x64", "jax_default_device")}
    out = io.StringIO()
    try:
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
            for k, v in (env or {}).items():
                patch.setenv(k, v)
            code = load_script(name).main([str(a) for a in args])
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)
    assert not isinstance(code, int) or code == 0, out.getvalue()[-4000:]  # some return results
    return out.getvalue()


# The longest files first: two workers take whole files in collection order, so a long one
# taken last would leave the other worker idle at the end.
LONGEST_FIRST = ("test_parallel.py", "test_experiments.py", "test_readme.py",
                 "test_embedding.py", "test_masks.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: every file keeps its own order
