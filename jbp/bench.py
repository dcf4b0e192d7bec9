"""Timing helpers for a fair benchmark: compile apart, warm up, block, interleave, pair.

The rules (they keep a comparison of two jitted functions honest):

* compile first and time it apart (:func:`compile_timed`); run time never includes it;
* warm up, then time each call up to ``jax.block_until_ready`` of its result;
* run the contenders interleaved, one call each per round, so a slow patch of a shared
  machine hits both; the two of a pair run back to back and swap places every other
  round, so each goes first half the time and then follows the same call: what ran just
  before a call (a cache-trashing step, a light product) changes its time by a few
  percent, so it must be the same for both; the per-round ratio ``a/b``
  (:func:`paired_ratios`) is then the robust figure, its median the headline;
* count FLOPs analytically (:func:`step_flops`, :func:`mlp_step_flops`) and compare with
  a float32 matrix product timed on the same machine in the same run (:func:`matmul_gflops`).

No function here asserts anything about time: a benchmark reports, a test never times.
"""

import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np


# XLA compile options by name, for jax.jit(..., compiler_options=...). "ynn" routes XLA:CPU's
# element-wise fusions through its YNNPACK library path; with it XLA:CPU's convolutions ran
# 2.3× faster and the causal attention core's forward 1.6× faster on a 2-core EPYC (jax
# 0.10.2; docs/performance.md, "Against PyTorch eager"). An XLA:CPU option only.
XLA_OPTIONS = {"default": {},
               "ynn": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_ELTWISE"}}


def compile_timed(fun: Callable, *args, donate_argnums=(), compiler_options=None):
    """``(compiled, seconds)``: ``fun`` jitted (with XLA ``compiler_options``, e.g. one of
    :data:`XLA_OPTIONS`), lowered for ``args`` and compiled.

    The seconds cover tracing, lowering and XLA compilation, nothing else.
    """
    start = time.perf_counter()
    compiled = jax.jit(fun, donate_argnums=donate_argnums,
                       compiler_options=compiler_options or None).lower(*args).compile()
    return compiled, time.perf_counter() - start


def time_call(thunk: Callable[[], object]) -> float:
    """Seconds one call of ``thunk()`` takes, up to ``block_until_ready`` of its result."""
    start = time.perf_counter()
    jax.block_until_ready(thunk())
    return time.perf_counter() - start


def interleaved_times(thunks: Mapping[str, Callable[[], object]], repeats: int, *,
                      warmup: int = 1, swap: Sequence[tuple[str, str]] = ()
                      ) -> dict[str, np.ndarray]:
    """Time every thunk ``repeats`` times, one call of each per round.

    Every round runs the thunks in the given order, except that in odd rounds the two
    names of each pair in ``swap`` (neighbours in ``thunks``) exchange places. Put a third
    thunk before each pair: then both members are preceded by it when first and by each
    other when second. Returns ``{name: seconds (repeats,)}``; entry ``r`` of every array
    is from round ``r``, which pairs them for :func:`paired_ratios`. ``warmup`` untimed
    rounds run first.
    """
    if repeats < 1:
        raise ValueError(f"interleaved_times: repeats must be >= 1, got {repeats}")
    names = list(thunks)
    swapped = list(names)
    for a, b in swap:
        i, j = (names.index(a), names.index(b)) if a in names and b in names else (-1, -1)
        if abs(i - j) != 1:
            raise ValueError(f"interleaved_times: swap pair ({a!r}, {b!r}) must name two "
                             f"neighbouring thunks of {names}")
        swapped[i], swapped[j] = names[j], names[i]
    for _ in range(warmup):
        for name in names:
            jax.block_until_ready(thunks[name]())
    times = {name: np.empty(repeats) for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else swapped):
            times[name][r] = time_call(thunks[name])
    return times


def summary(seconds: Sequence[float]) -> dict:
    """Median, quartiles, minimum and count of a series of timings (seconds)."""
    s = np.asarray(seconds, dtype=float)
    q25, median, q75 = np.quantile(s, [0.25, 0.5, 0.75])
    return {"median": float(median), "q25": float(q25), "q75": float(q75),
            "min": float(s.min()), "n": int(s.size)}


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> dict:
    """Per-round ratios ``a[r] / b[r]`` of two interleaved series, and their summary.

    Returns ``{"ratios": [...], "median", "q25", "q75", "min", "n"}``. A median below 1
    says ``a`` was faster in most rounds. The two series must have one length.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_ratios: expected two non-empty 1-D series of one length, "
                         f"got shapes {a.shape} and {b.shape}")
    if np.any(b <= 0):
        raise ValueError("paired_ratios: the denominators must be positive times")
    ratios = a / b
    return {"ratios": ratios.tolist(), **summary(ratios)}


def repeats_for(seconds_per_round: float, budget_s: float, *, lo: int = 5, hi: int = 200) -> int:
    """How many rounds fit in ``budget_s`` seconds, clipped to ``[lo, hi]``."""
    if seconds_per_round <= 0:
        return hi
    return int(np.clip(round(budget_s / seconds_per_round), lo, hi))


def step_flops(products: Sequence[tuple[int, int, int]], *, input_grad: bool = False) -> dict:
    """Matrix-product FLOPs of one forward + backward pass of a net of ``products``.

    Each ``(m, k, n)`` is one product of the forward, ``(m, k) @ (k, n)``: ``2·m·k·n`` FLOPs,
    and twice that in the backward, one product per operand (for a dense layer ``a W``:
    ``∂C/∂W = aᵀ δ`` and ``∂C/∂a = δ Wᵀ``; for attention's ``q kᵀ``: ``∂C/∂q`` and
    ``∂C/∂k``). The first product's left operand is the data, whose gradient training
    discards: not counted unless ``input_grad``. Element-wise work is left out.

    Returns ``{"forward", "backward", "step"}`` (step = forward + backward).
    """
    per_product = [2 * m * k * n for m, k, n in products]
    forward = sum(per_product)
    backward = 2 * forward - (0 if input_grad else per_product[0])
    return {"forward": forward, "backward": backward, "step": forward + backward}


def mlp_step_flops(batch: int, sizes: Sequence[int], *, input_grad: bool = False) -> dict:
    """Matrix-product FLOPs of one forward + backward pass of an MLP ``sizes``.

    A dense layer ``(B, n_in) @ (n_in, n_out)`` costs ``2·B·n_in·n_out`` FLOPs three times:
    the forward ``z = a W``, ``∂C/∂W = aᵀ δ`` and ``∂C/∂a = δ Wᵀ``. The first layer's
    ``∂C/∂a`` is the gradient with respect to the data, which training discards, so it is
    not counted unless ``input_grad``. Element-wise work (bias, activations, loss,
    optimizer) is left out: it is O(B·n) against the products' O(B·n²).

    Returns ``{"forward", "backward", "step"}`` (step = forward + backward).
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or batch < 1 or min(sizes) < 1:
        raise ValueError(f"mlp_step_flops: need batch >= 1 and >= 2 positive sizes, "
                         f"got batch={batch}, sizes={sizes}")
    return step_flops([(batch, n_in, n_out) for n_in, n_out in zip(sizes[:-1], sizes[1:])],
                      input_grad=input_grad)


def matmul_gflops(m: int, k: int, n: int, *, repeats: int = 10, key=None,
                  dtype=jnp.float32) -> dict:
    """Throughput of a jitted ``(m, k) @ (k, n)`` product on the default device.

    Returns the timing :func:`summary` plus ``"gflops"`` (at the median time) and
    ``"gflops_best"`` (at the fastest call) — ``2·m·k·n`` FLOPs a call.
    """
    key = jax.random.key(0) if key is None else key
    ka, kb = jax.random.split(key)
    a = jax.random.normal(ka, (m, k), dtype)
    b = jax.random.normal(kb, (k, n), dtype)
    compiled, _ = compile_timed(jnp.matmul, a, b)
    times = interleaved_times({"matmul": lambda: compiled(a, b)}, repeats)["matmul"]
    stats = summary(times)
    flops = 2 * m * k * n
    return {"shape": [m, k, n], **stats, "gflops": flops / stats["median"] / 1e9,
            "gflops_best": flops / stats["min"] / 1e9}


def product_forms_gflops(batch: int, n_in: int, n_out: int, *, repeats: int = 5,
                         key=None, dtype=jnp.float32) -> dict:
    """GFLOP/s of the three products of a dense layer, timed interleaved.

    ``forward`` is ``a W`` (B, in)@(in, out); ``input_grad`` is ``δ Wᵀ``; ``weight_grad``
    is ``aᵀ δ``, which sums over the batch. A backend may run these at different speeds,
    which bounds how close a whole training step can come to a plain product's peak.
    """
    key = jax.random.key(0) if key is None else key
    ka, kw, kd = jax.random.split(key, 3)
    a = jax.random.normal(ka, (batch, n_in), dtype)
    w = jax.random.normal(kw, (n_in, n_out), dtype)
    delta = jax.random.normal(kd, (batch, n_out), dtype)
    forms = {"forward": (lambda a, w, d: a @ w),
             "input_grad": (lambda a, w, d: d @ w.T),
             "weight_grad": (lambda a, w, d: a.T @ d)}
    compiled = {name: compile_timed(f, a, w, delta)[0] for name, f in forms.items()}
    times = interleaved_times({name: (lambda c=c: c(a, w, delta)) for name, c in compiled.items()},
                              repeats)
    flops = 2 * batch * n_in * n_out
    return {"shape": [batch, n_in, n_out],
            **{name: flops / float(np.median(t)) / 1e9 for name, t in times.items()}}


def compiled_stats(compiled) -> dict:
    """XLA's figures for a compiled function, where the backend reports them.

    ``memory``: argument, output, alias and temporary bytes (``memory_analysis()``);
    ``cost``: ``flops`` and ``bytes accessed`` (``cost_analysis()``). Missing figures are
    left out rather than guessed.
    """
    out = {"memory": {}, "cost": {}}
    try:
        mem = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        mem = None
    if mem is not None:
        for name in ("argument", "output", "alias", "temp"):
            value = getattr(mem, f"{name}_size_in_bytes", None)
            if value is not None:
                out["memory"][f"{name}_bytes"] = int(value)
    try:
        cost = compiled.cost_analysis()
    except Exception:
        cost = None
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
        cost = cost[0] if cost else None
    if cost:
        for name, key in (("flops", "flops"), ("bytes_accessed", "bytes accessed")):
            if key in cost:
                out["cost"][name] = float(cost[key])
    return out


def saved_bytes(fun: Callable, *args) -> dict:
    """Bytes of the distinct arrays ``fun(*args)`` returns, split by where they come from.

    ``fun`` returns a pytree (a layer's cache, or ``jax.vjp``'s residuals); it is traced,
    not run. An array returned twice counts once; arrays that are ``args`` themselves
    (the data, the weights) are counted apart from the ones computed by ``fun``.
    Returns ``{"computed_bytes", "input_bytes", "computed_arrays"}``.
    """
    closed = jax.make_jaxpr(fun)(*args)
    invars = set(closed.jaxpr.invars)
    seen, computed, inputs, count = set(), 0, 0, 0
    for var in closed.jaxpr.outvars:
        if not isinstance(var, jax.extend.core.Var) or var in seen:
            continue  # a literal, or an array already counted
        seen.add(var)
        nbytes = int(np.prod(var.aval.shape)) * var.aval.dtype.itemsize
        if var in invars:
            inputs += nbytes
        else:
            computed += nbytes
            count += 1
    return {"computed_bytes": computed, "input_bytes": inputs, "computed_arrays": count}
