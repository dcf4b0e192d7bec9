"""``check_layer``: run every check of the layer protocol on a layer, your own included.

The ``torch.autograd.gradcheck`` of jbp. For a layer and a per-example input shape it checks,
in float64 and in float32:

- ``init`` returns ``(out_shape, params)``: a tuple of ints and a pytree of float arrays;
- ``forward`` returns ``(y, cache, new_state)`` with ``y`` of shape ``(B, *out_shape)`` in
  the input's dtype, and ``backward`` returns ``dparams`` with the structure, shapes and dtypes of
  ``params`` and ``dx`` with the shape and dtype of ``x``;
- the backward equals ``jax.vjp`` of the layer's own forward (normwise relative error per
  leaf ≤ 1e-12 in float64, ≤ 1e-5 in float32, with :func:`jbp.compare_grads`' floor for a
  leaf whose exact gradient is ~0) at random inputs, at zeros (kinks), at large inputs
  (saturation), for a batch of one, and at **random params**. Init's params hide slips: a
  scale that starts at 1 makes a backward that forgets to multiply by it exact. So the last
  case draws every leaf afresh around init's (or the given) params: a leaf of one sign (a
  scale, a gain) times ``exp(N(0, ½²))`` element by element, any other leaf plus ``N(0, s²)``
  with ``s`` its RMS (1 for a leaf of zeros, a bias). In float32 a leaf further than 1e-5
  from ``jax.vjp`` gets a second look: where the input makes the gradient ill-conditioned (a
  saturated softmax whose row of ∂C/∂s sums to nearly zero out of large terms), ``jax.vjp``
  in float32 is itself that far from the exact gradient, and two float32 backwards that
  round differently cannot agree to 1e-5. Both are then measured against ``jax.vjp`` in
  float64 from the same (float32-rounded) inputs, and the leaf passes if the backward's
  error is within ``ROUNDING_FACTOR`` (10, an order of magnitude) of ``jax.vjp``'s own. A
  wrong formula is off by far more; float64, where correctness is proven, stays at 1e-12;
- the backward uses no autodiff (the protocol's rule): while it is traced, JAX must start no
  JVP or linearization (``jax.grad``, ``jax.vjp``, ``jax.jvp``, ``jax.linearize``, the
  ``jac*`` functions) and no transposition (``jax.linear_transpose``);
- the per-example declaration holds: the layer keeps the examples of a batch apart (a
  cotangent in row i alone gives a dx that is zero outside row i), and the per-example
  gradients of its :class:`PerExampleRule` (or of its children's, for a composite), their
  squared norms and sums of squares equal ``jax.vjp`` with the cotangent of example i alone.

Integer inputs (token ids for an embedding): ``int_range=(low, high)`` draws the inputs as
int32, uniform in ``[low, high)``; the "zeros" case is then every entry ``low`` and the
"large" case every entry ``high − 1`` (repeated ids). An integer input has no gradient
(``jax.vjp`` gives ``float0`` zeros), so only the parameter gradients are compared, ``dx``
must just have the input's shape, and "examples kept apart" is checked on the forward
instead: row i of ``y`` is unchanged when every other row of the input is redrawn.

A layer that keeps state (batch_norm) runs with its ``init_state``, drawn afresh (running
mean N(0, 1), running variance in [0.5, 2]) so that evaluation mode is not the identity. In
training mode such a layer normalises with batch statistics, which mix the examples: the
batch of one and the per-example declaration are then not checked (the report says so).

Every check is run and reported (a failing one does not hide the others); nothing raises
for a wrong layer, so the report can be printed.

>>> import jax, jbp
>>> report = jbp.check_layer(jbp.dense(3), (4,))
>>> report.ok
True
"""

import contextlib
import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jbp.check import DEFAULT_RTOL, GradComparison, compare_grads
from jbp.layer import Layer, PerExampleRule, check_like, run
from jbp.per_example import rule_grads, trace

# In float32, how many times jax.vjp's own error (against float64) a leaf may be off where
# jax.vjp itself misses the float32 tolerance (see the module docstring).
ROUNDING_FACTOR = 10

# name -> (scale of N(0, 1) draws, batch size or None for the default, params drawn around
# the checked ones); zeros hit the kinks.
CASES = {"random": (1.0, None, False), "zeros": (0.0, None, False), "large": (30.0, None, False),
         "batch of 1": (1.0, 1, False), "random params": (1.0, None, True)}


@dataclass(frozen=True)
class Check:
    """One check: what was checked, whether it held, and how far off it was."""

    name: str
    ok: bool
    detail: str = ""
    comparison: GradComparison | None = None

    def __str__(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.name}" + (f": {self.detail}" if self.detail else "")


@dataclass(frozen=True)
class LayerReport:
    """The result of :func:`check_layer`; ``str()`` prints one line per check."""

    layer: str
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.ok)

    def __str__(self) -> str:
        lines = [f"check_layer({self.layer})"]
        lines += [f"  {c}" for c in self.checks]
        failed = self.failures
        lines.append(f"all {len(self.checks)} checks passed" if not failed else
                     f"{len(failed)} of {len(self.checks)} checks failed; first: {failed[0].name}")
        for c in failed:
            if c.comparison is not None:
                lines += ["", f"{c.name}:", str(c.comparison)]
        return "\n".join(lines)


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".split("\n--------------------")[0]


def _cast(tree, dtype):
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a,
        tree)


def check_layer(layer: Layer, in_shape, *, params=None, batch: int = 4, seed: int = 0, key=None,
                train: bool = False, dtypes=("float64", "float32"),
                int_range: tuple[int, int] | None = None) -> LayerReport:
    """Check ``layer`` against the protocol and against ``jax.vjp`` of its own forward.

    Args:
      layer: the Layer to check (a leaf layer or a composite).
      in_shape: the per-example input shape (no batch dimension).
      params: the params to check at (cast to each dtype), shaped as ``init``'s; None (the
        default) takes ``init``'s. The "random params" case draws around them either way.
      batch: examples per input batch (a batch of one is checked too).
      seed: seeds the params (``init``), the inputs and the cotangents.
      key, train: passed to ``forward``/``apply`` (e.g. ``train=True`` with a key for dropout).
      dtypes: the float types to check in (of the params, and of the inputs unless
        ``int_range`` is given); float64 runs with ``jax_enable_x64`` on.
      int_range: ``(low, high)`` for integer inputs (int32, uniform in ``[low, high)``), e.g.
        ``(0, vocab_size)`` for an embedding; None (the default) draws floats N(0, 1).

    Returns a :class:`LayerReport`: ``.ok``, ``.failures``, and ``print(report)``.
    """
    if not isinstance(layer, Layer):
        raise TypeError(f"check_layer: layer must be a jbp Layer, got {type(layer).__name__}")
    if int_range is not None:
        ok = (isinstance(int_range, (tuple, list)) and len(int_range) == 2
              and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                      for v in int_range) and int_range[0] < int_range[1])
        if not ok:
            raise ValueError(f"check_layer: int_range must be a pair of ints (low, high) with "
                             f"low < high, got {int_range!r}")
        int_range = (int(int_range[0]), int(int_range[1]))
    checks: list[Check] = []
    for dtype in dtypes:
        with jax.enable_x64(jnp.dtype(dtype) == jnp.float64):
            built = _check_dtype(layer, in_shape, params, jnp.dtype(dtype), batch, seed, key,
                                 train, int_range, checks)
        if not built:
            break  # init fails: one dtype says why
    return LayerReport(layer.name, tuple(checks))


def _inputs(rng, shape, dtype, case, int_range):
    """The input of one case: floats N(0, 1)·scale, or int32 in [low, high) (the zeros case:
    every entry low; the large case: every entry high − 1)."""
    if int_range is None:
        return jnp.asarray(rng.normal(size=shape) * CASES[case][0], dtype)
    low, high = int_range
    value = {"zeros": low, "large": high - 1}.get(case)
    x = rng.integers(low, high, size=shape) if value is None else np.full(shape, value)
    return jnp.asarray(x, jnp.int32)


def _check_dtype(layer, in_shape, given, dtype, batch, seed, key, train, int_range,
                 checks) -> bool:
    """Append the checks in ``dtype`` to ``checks``; False if ``init`` (or ``given``) failed."""
    name = dtype.name
    try:
        out_shape, params = layer.init(jax.random.key(seed), tuple(in_shape))
        out_shape = tuple(out_shape)
        if not all(isinstance(d, (int, np.integer)) and d >= 0 for d in out_shape):
            raise TypeError(f"out_shape must be a tuple of ints, got {out_shape!r}")
        for leaf in jax.tree_util.tree_leaves(params):
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
                raise TypeError(f"params must hold float arrays, found {jnp.result_type(leaf)}")
    except Exception as err:  # noqa: BLE001 (reported, not hidden)
        checks.append(Check(f"{name}: init", False, _error(err)))
        return False
    if given is not None:
        try:
            params = _given_params(given, params)
        except ValueError as err:
            checks.append(Check(f"{name}: the given params", False, _error(err)))
            return False
    params = _cast(params, dtype)
    drawn = _draw_around(params, np.random.default_rng([seed, 1]))
    rng = np.random.default_rng(seed)
    kw = {"key": key, "train": train, "state": _random_state(layer, in_shape, rng, dtype)}
    mixes = layer.stateful and train
    autodiff, traced = set(), {}
    for case, (scale, case_batch, around) in CASES.items():
        if mixes and case_batch == 1:
            checks.append(Check(f"{name} {case}", True, "not checked: training mode of a layer "
                                "with state needs batch statistics of more than one example"))
            continue
        b = case_batch or batch
        x = _inputs(rng, (b, *in_shape), dtype, case, int_range)
        dy = jnp.asarray(rng.normal(size=(b, *out_shape)), dtype)
        what = f"{name} {case}"
        at = drawn if around else params
        if b not in traced:  # a trace per batch size: the other cases trace the same program
            try:
                autodiff |= _check_shapes(layer, at, x, dy, out_shape, dtype, kw)
                traced[b] = None
            except Exception as err:  # noqa: BLE001
                traced[b] = _error(err)
        if traced[b] is not None:
            checks.append(Check(f"{what}: shapes and dtypes", False, traced[b]))
            continue
        manual, reference = _vjp_pair(layer, at, x, dy, kw)
        compared = "dparams and dx"
        if int_range is not None:  # an integer input has no gradient (jax.vjp: float0)
            manual, reference, compared = manual["dparams"], reference["dparams"], "dparams"
        comparison = _compare(manual, reference, DEFAULT_RTOL[dtype])
        detail = (f"max rel err {comparison.max_rel:.1e} over {len(comparison.leaves)} leaves "
                  f"of {compared}")
        if not comparison.ok and dtype != jnp.float64:
            comparison, vjp_err = _against_float64(layer, at, x, dy, kw, manual, reference,
                                                   int_range is not None, dtype)
            detail += (f"; against float64 {comparison.max_rel:.1e}, jax.vjp's own "
                       f"{vjp_err:.1e} (allowed: {ROUNDING_FACTOR}× jax.vjp's, leaf by leaf)")
        checks.append(Check(f"{what}: backward vs jax.vjp", comparison.ok, detail, comparison))
        if case in ("random", "random params") and mixes:
            checks.append(Check(f"{what}: per-example declaration", True, "not checked: in "
                                "training mode batch statistics mix the examples"))
        elif case in ("random", "random params"):
            x_other = _inputs(rng, x.shape, dtype, "random", int_range)
            checks.append(_check_per_example(layer, at, x, x_other, dy, kw, dtype, what))
    checks.append(Check(f"{name}: backward without autodiff", not autodiff,
                        f"the backward started JAX's autodiff ({', '.join(sorted(autodiff))}); "
                        f"a backward is written by hand in jax.numpy" if autodiff else ""))
    return True


def _given_params(given, params):
    """``given``, checked to have the structure and shapes of init's ``params``."""
    def shape_of(tree):
        return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.float32),
                                      tree)

    check_like("check_layer", "params", shape_of(given), shape_of(params))
    return given


def _draw_around(params, rng):
    """Params drawn around ``params`` (the "random params" case; see the module docstring):
    a leaf of one sign times exp(N(0, ½²)), any other leaf plus N(0, s²), s its RMS or 1."""

    def draw(p):
        a = np.asarray(p, np.float64)
        if a.size and (np.all(a > 0) or np.all(a < 0)):
            new = a * np.exp(0.5 * rng.normal(size=a.shape))
        else:
            s = math.sqrt(float(np.mean(a * a))) if a.size else 0.0
            new = a + (s if s > 0 else 1.0) * rng.normal(size=a.shape)
        return jnp.asarray(new, jnp.result_type(p))

    return jax.tree_util.tree_map(draw, params)


# What JAX's autodiff starts, by where it is started from: a JVP (jax.jvp, jax.jacfwd, and
# forward-over-reverse), a linearization (jax.grad, jax.vjp, jax.linearize, jax.jacrev) and
# a transposition (jax.linear_transpose, and the second half of jax.vjp).
_AUTODIFF_ENTRIES = (("JVPTrace", "__init__", "a JVP: jax.jvp or jax.jacfwd"),
                     ("LinearizeTrace", "__init__",
                      "a linearization: jax.grad, jax.vjp, jax.linearize or jax.jacrev"),
                     (None, "backward_pass3", "a transposition: jax.linear_transpose"))


@contextlib.contextmanager
def _autodiff_watch():
    """Yield a set that collects which of :data:`_AUTODIFF_ENTRIES` JAX enters inside the
    block (entries this JAX version lacks are not watched)."""
    from jax._src.interpreters import ad

    seen, saved = set(), []
    for cls, name, what in _AUTODIFF_ENTRIES:
        owner = getattr(ad, cls, None) if cls else ad
        original = getattr(owner, name, None)
        if original is None:
            continue

        def spy(*args, _original=original, _what=what, **kwargs):
            seen.add(_what)
            return _original(*args, **kwargs)

        saved.append((owner, name, original))
        setattr(owner, name, spy)
    try:
        yield seen
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def _random_state(layer, in_shape, rng, dtype):
    if not layer.stateful:
        return None
    state = layer.init_state(tuple(in_shape))
    draw = {"mean": lambda s: rng.normal(size=s), "var": lambda s: rng.uniform(0.5, 2, size=s)}
    leaves, tree = jax.tree_util.tree_flatten_with_path(state)
    drawn = [draw.get(getattr(path[-1], "key", None), lambda s: rng.normal(size=s))(leaf.shape)
             for path, leaf in leaves]
    return _cast(jax.tree_util.tree_unflatten(tree, [jnp.asarray(d) for d in drawn]), dtype)


def _check_shapes(layer, params, x, dy, out_shape, dtype, kw) -> set:
    """Trace (no compile) forward and backward; raise with what is wrong. ``y`` must have
    ``dtype`` (the input's, or the params' for integer inputs); ``dx`` the shape of ``x`` and,
    for a float ``x``, its dtype. Returns the autodiff the backward started (empty: none)."""
    floating = jnp.issubdtype(x.dtype, jnp.inexact)

    def run_once(params, x, dy):
        y, cache, _ = run(layer, params, x, **kw)
        if tuple(y.shape) != (x.shape[0], *out_shape):
            raise ValueError(f"forward gave y of shape {tuple(y.shape)}, init promised "
                             f"(batch, *out_shape) = {(x.shape[0], *out_shape)}")
        if y.dtype != dtype:
            raise ValueError(f"forward gave y of dtype {y.dtype} for an input of {x.dtype}"
                             + ("" if floating else f" and params of {dtype}"))
        with _autodiff_watch() as seen:
            dparams, dx = layer.backward(params, cache, dy)
        autodiff.update(seen)
        check_like("backward", "dparams", dparams, params)
        if not floating:  # no gradient to check the dtype of (jax.vjp gives float0 zeros)
            if tuple(dx.shape) != tuple(x.shape):
                raise ValueError(f"backward gave dx of shape {tuple(dx.shape)}, expected x's "
                                 f"{tuple(x.shape)} (float0 zeros for an integer input)")
            return
        if tuple(dx.shape) != tuple(x.shape) or dx.dtype != x.dtype:
            raise ValueError(f"backward gave dx of shape {tuple(dx.shape)} and dtype {dx.dtype}, "
                             f"expected x's {tuple(x.shape)} and {x.dtype}")

    autodiff = set()
    jax.eval_shape(run_once, params, x, dy)
    return autodiff


def _against_float64(layer, params, x, dy, kw, manual, reference, params_only, dtype):
    """``(comparison of manual with the float64 gradient, jax.vjp's own max rel err)``: a leaf
    is ok if within the dtype's tolerance of it or within ``ROUNDING_FACTOR`` × jax.vjp's
    error (in ``dtype``) on that leaf."""
    rtol = DEFAULT_RTOL[dtype]
    with jax.enable_x64(True):
        up = functools.partial(_cast, dtype=jnp.float64)
        exact = _vjp_pair(layer, up(params), up(x), up(dy), {**kw, "state": up(kw["state"])})[1]
        exact = exact["dparams"] if params_only else exact
        mine, theirs = (_compare(g, exact, rtol) for g in (manual, reference))
    leaves = tuple(m._replace(ok=m.ok or (math.isfinite(m.rel) and
                                          m.rel <= ROUNDING_FACTOR * t.rel))
                   for m, t in zip(mine.leaves, theirs.leaves))
    return GradComparison(leaves, rtol), theirs.max_rel


def _compare(got: dict, want: dict, rtol: float) -> GradComparison:
    """:func:`compare_grads` of each entry of two dicts on its own (dparams and dx, or the
    per-example quantities), merged: a leaf's floor for a ~0 exact value comes from its own
    quantity, not from another of a different scale (dx, squared norms)."""
    if not isinstance(want, dict):  # dparams alone
        return compare_grads(got, want, rtol=rtol)
    leaves = tuple(leaf for k in want for leaf in
                   compare_grads({k: got[k]}, {k: want[k]}, rtol=rtol).leaves)
    return GradComparison(leaves, rtol)


def _vjp_pair(layer, params, x, dy, kw):
    return _vjp_pair_jit(layer, params, x, dy, kw["key"], kw["train"], kw["state"])


def _manual_and_reference(layer, params, x, dy, key, train, state):
    y, cache, _ = run(layer, params, x, key=key, train=train, state=state)
    dparams, dx = layer.backward(params, cache, dy)
    _, vjp = jax.vjp(lambda p, x_: run(layer, p, x_, key=key, train=train, state=state)[0],
                     params, x)
    ref_dparams, ref_dx = vjp(dy)
    return {"dparams": dparams, "dx": dx}, {"dparams": ref_dparams, "dx": ref_dx}


# check_layer's programs run once or twice on a handful of examples: compiling them is nearly
# all its time, and about half of that is LLVM's optimisation, which buys nothing here.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
_vjp_pair_jit = _jit(_manual_and_reference, static_argnums=(0, 5))


def _check_per_example(layer, params, x, x_other, dy, kw, dtype, what) -> Check:
    name = f"{what}: per-example declaration"
    if layer.per_example is None:
        return Check(name, True, "none declared (per-example functions will refuse this layer)")
    try:
        got, want = _per_example_pair(layer, params, x, x_other, dy, kw["key"], kw["train"],
                                      kw["state"])
    except Exception as err:  # noqa: BLE001
        return Check(name, False, _error(err))
    comparison = _compare(got, want, DEFAULT_RTOL[dtype])
    return Check(name, comparison.ok, f"examples kept apart, per-example gradients, norms and "
                                      f"sums of squares vs jax.vjp; max rel err "
                                      f"{comparison.max_rel:.1e}", comparison)


def _per_example(layer, params, x, x_other, dy, key, train, state):
    """(what the declaration gives, the reference from ``jax.vjp``): ∇ℓ_i, their squared norms
    and sums of squares, and how much of dx leaks out of row i when only row i of dy is set
    (zero for a layer that keeps examples apart). The reference runs the whole batch (so a
    dropout mask is the same) with a cotangent that is dy in row i and zero elsewhere.

    An integer ``x`` has no dx: there the examples are kept apart if row i of the output
    stays as it is when every other row of the input is taken from ``x_other``."""
    def apply(p, x_):
        return run(layer, p, x_, key=key, train=train, state=state)[0]

    y, cache, _ = run(layer, params, x, key=key, train=train, state=state)
    _, vjp = jax.vjp(apply, params, x)
    batch = x.shape[0]
    floating = jnp.issubdtype(x.dtype, jnp.inexact)
    dtype = x.dtype if floating else y.dtype

    def row_of(i, ndim):
        return (jnp.arange(batch) == i).reshape((batch,) + (1,) * (ndim - 1))

    def row(i):
        dp, dx = vjp(dy * row_of(i, dy.ndim))
        if floating:
            return dp, jnp.where(row_of(i, x.ndim), 0, dx)
        # y's row i from x's row i alone: redraw the other rows, read row i back
        mixed = apply(params, jnp.where(row_of(i, x.ndim), x, x_other))
        return dp, mixed[i]

    grads_alone, leaks = jax.vmap(row)(jnp.arange(batch))
    grads = trace(layer, params, cache, dy, rule_grads, "check_layer")
    sq_norms = trace(layer, params, cache, dy, PerExampleRule.squared_norms, "check_layer")
    sum_sq = trace(layer, params, cache, dy, PerExampleRule.sum_of_squares, "check_layer")
    zeros = jnp.zeros(batch, dtype)
    want_norms = sum((jnp.sum(g.reshape(batch, -1) ** 2, axis=1)
                      for g in jax.tree_util.tree_leaves(grads_alone)), zeros)
    want_sum_sq = jax.tree_util.tree_map(lambda g: jnp.sum(g * g, axis=0), grads_alone)
    got_norms = sum(jax.tree_util.tree_leaves(sq_norms), zeros)
    apart = (("dx_outside_row_i", leaks, jnp.zeros_like(leaks)) if floating else
             ("y_row_i_with_other_rows_redrawn", leaks, y))
    got = {apart[0]: apart[1], "grads": grads, "sq_norms": got_norms, "sum_sq": sum_sq}
    want = {apart[0]: apart[2], "grads": grads_alone, "sq_norms": want_norms,
            "sum_sq": want_sum_sq}
    return _cast(got, dtype), want


_per_example_pair = _jit(_per_example, static_argnums=(0, 6))
