"""Checking gradients: a per-leaf comparison report and a finite-difference witness.

``compare_grads(grads, reference)`` says, for every parameter leaf, how far two gradients
are apart (max absolute error, normwise relative error ‖g − r‖/‖r‖) and which layer, in
backward order, is the first to disagree. ``numerical_value_and_grad`` has the signature of
the other gradient functions and computes central differences in float64.

A leaf whose exact gradient is zero (a bias right before batch norm in training mode, whose
shift the normalisation removes) gets rounding noise from both paths, and ‖g − r‖/‖r‖ is
then noise over noise. So a leaf is judged against the larger of its own norm and a *floor*
from the whole gradient: the norm the leaf would have if its elements were of the whole
gradient's typical (RMS) size, ‖r_all‖·√(n_leaf/n_all). A leaf within the tolerance of its
own norm passes as before; a leaf of (near-)zero gradient passes with rounding noise and
fails with an error at the level of the tolerance times the gradient's typical element."""

import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jbp.grads import check_model_and_loss
from jbp.layer import run

# Default relative tolerance of "agrees", by the dtype of the gradients compared.
DEFAULT_RTOL = {np.dtype("float64"): 1e-12, np.dtype("float32"): 1e-5}


class LeafDiff(NamedTuple):
    """How far one parameter leaf of two gradients is apart."""

    path: str  # e.g. "[2]['W']"
    layer: int | None  # top-level layer index, where params are a tuple per layer
    shape: tuple
    max_abs: float
    rel: float  # ‖g − r‖/‖r‖, or ‖g − r‖/floor where the floor judged (module docstring)
    ok: bool
    floored: bool = False  # whether the floor judged: ‖g − r‖ > rtol·‖r‖ and floor > ‖r‖


@dataclass(frozen=True)
class GradComparison:
    """The result of :func:`compare_grads`; ``str()`` gives a readable table."""

    leaves: tuple[LeafDiff, ...]
    rtol: float

    @property
    def ok(self) -> bool:
        return all(leaf.ok for leaf in self.leaves)

    @property
    def max_rel(self) -> float:
        return max((leaf.rel for leaf in self.leaves), default=0.0)

    @property
    def max_abs(self) -> float:
        return max((leaf.max_abs for leaf in self.leaves), default=0.0)

    @property
    def first_disagreement(self) -> LeafDiff | None:
        """The disagreeing leaf met first by the backward pass (output layer first)."""
        bad = [leaf for leaf in self.leaves if not leaf.ok]
        return max(bad, key=lambda leaf: -1 if leaf.layer is None else leaf.layer, default=None)

    def __str__(self) -> str:
        w = max([16] + [len(leaf.path) + 2 for leaf in self.leaves])
        s = max([14] + [len(str(leaf.shape)) + 2 for leaf in self.leaves])
        head = f"{'leaf':<{w}}{'shape':>{s}}{'max abs err':>14}{'rel err':>12}  ok"
        lines = [head, "-" * len(head)]
        for leaf in self.leaves:
            lines.append(f"{leaf.path:<{w}}{str(leaf.shape):>{s}}{leaf.max_abs:>14.3e}"
                         f"{leaf.rel:>12.3e}{'*' if leaf.floored else ' '} "
                         f"{'yes' if leaf.ok else 'NO'}")
        first = self.first_disagreement
        verdict = ("all leaves agree" if first is None else
                   f"first disagreement in backward order: {first.path}")
        lines.append(f"{verdict} (rtol {self.rtol:.0e}, max rel err {self.max_rel:.3e})")
        if any(leaf.floored for leaf in self.leaves):
            lines.append("* the leaf's own norm is ~0 (its exact gradient vanishes): judged "
                         "against the whole gradient's typical element size")
        return "\n".join(lines)


def _layer_of(path) -> int | None:
    first = path[0] if path else None
    return first.idx if isinstance(first, jax.tree_util.SequenceKey) else None


def compare_grads(grads, reference, *, rtol: float | None = None) -> GradComparison:
    """Compare ``grads`` with ``reference`` leaf by leaf (both pytrees of one structure).

    ``rtol`` (normwise relative error allowed) defaults by the reference's dtype: 1e-12 for
    float64, 1e-5 for float32. A leaf passes if its values are finite and
    ``‖g − r‖ ≤ rtol · max(‖r‖, ‖r_all‖·√(n_leaf/n_all))``: relative to its own norm, or, for
    a leaf whose exact gradient is ~0, to the whole gradient's scale (module docstring); the
    report's ``rel`` is against the norm that judged it (``floored`` where the floor did).
    """
    paths_g, tree_g = jax.tree_util.tree_flatten_with_path(grads)
    paths_r, tree_r = jax.tree_util.tree_flatten_with_path(reference)
    if tree_g != tree_r:
        raise ValueError(f"compare_grads: the two gradients have different structures:\n"
                         f"  grads:     {tree_g}\n  reference: {tree_r}")
    if rtol is None:
        dtypes = {np.dtype(jnp.result_type(leaf)) for _, leaf in paths_r}
        rtol = max((DEFAULT_RTOL.get(d, 1e-2) for d in dtypes), default=1e-12)
    pairs = []
    for (path, g), (_, r) in zip(paths_g, paths_r):
        g64, r64 = np.asarray(g, np.float64), np.asarray(r, np.float64)
        if g64.shape != r64.shape:
            raise ValueError(f"compare_grads: leaf {jax.tree_util.keystr(path)} has shape "
                             f"{g64.shape} in grads but {r64.shape} in reference")
        pairs.append((path, g64, r64))
    n_all = sum(r.size for _, _, r in pairs)
    norm_all = math.sqrt(sum(float(np.sum(r * r)) for _, _, r in pairs))
    leaves = []
    for path, g64, r64 in pairs:
        diff = g64 - r64
        err, norm = float(np.linalg.norm(diff)), float(np.linalg.norm(r64))
        floor = norm_all * math.sqrt(r64.size / n_all) if n_all else 0.0
        # the leaf's own norm, unless the error exceeds the tolerance of it: then the floor
        scale = norm if err <= rtol * norm else max(norm, floor)
        rel = 0.0 if err == 0 else (err / scale if scale > 0 else math.inf)
        max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
        ok = bool(np.all(np.isfinite(g64))) and rel <= rtol
        leaves.append(LeafDiff(jax.tree_util.keystr(path), _layer_of(path), g64.shape,
                               max_abs, rel, ok, scale > norm))
    return GradComparison(tuple(leaves), float(rtol))


def finite_difference_grad(fun, params, *, batch_size: int = 64):
    """∂fun/∂params by central differences in float64.

    ``fun(params) -> scalar``; ``params`` must be float64 (this needs ``jax_enable_x64``).
    The step for element ``w`` is ``eps^(1/3) · max(1, |w|)`` (the optimum for central
    differences), taken as the exactly representable difference. Costs 2 evaluations of
    ``fun`` per parameter, ``batch_size`` of them vectorised at a time.
    """
    flat, unravel = ravel_pytree(params)
    if flat.dtype != jnp.float64:
        raise ValueError("finite differences need float64 params (got "
                         f"{flat.dtype}); enable jax.config.update('jax_enable_x64', True) "
                         "and cast the params")
    h = np.finfo(np.float64).eps ** (1 / 3) * jnp.maximum(1.0, jnp.abs(flat))

    def partial(i):
        up, down = flat.at[i].add(h[i]), flat.at[i].add(-h[i])
        return (fun(unravel(up)) - fun(unravel(down))) / (up[i] - down[i])

    g = jax.lax.map(partial, jnp.arange(flat.size), batch_size=min(batch_size, flat.size))
    return unravel(g)


def numerical_value_and_grad(model, loss):
    """``f(params, x, y) -> (C, ∂C/∂params)`` by float64 central differences.

    A third witness beside the manual and autodiff gradients; params and inputs are cast
    to float64, so enable ``jax_enable_x64`` first. Use it on small models: it evaluates
    the loss twice per parameter.
    """
    check_model_and_loss(model, loss)

    def value_and_grad(params, x, y, **kwargs):
        if not jax.config.jax_enable_x64:
            raise ValueError("numerical_value_and_grad needs float64: call "
                             "jax.config.update('jax_enable_x64', True) first")
        params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), params)
        x = jnp.asarray(x, jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x
        if jnp.issubdtype(y.dtype, jnp.floating):
            y = jnp.asarray(y, jnp.float64)

        def cost(p):
            return loss.value(run(model, p, x, **kwargs)[0], y)

        return cost(params), finite_difference_grad(cost, params)

    return value_and_grad
