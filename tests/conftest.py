"""Shared test set-up: a hypothesis profile fit for JIT compiles, and dtype helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# The first call of a jitted function compiles (seconds): no per-example deadline, and a
# derandomized search so CI sees the same examples on every run.
settings.register_profile("jbp", deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("jbp")

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
