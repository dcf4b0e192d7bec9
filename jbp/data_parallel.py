"""Data parallelism over devices and hosts with JAX's own runtime (``jax.sharding``).

The lecture's training step is a forward pass, a backward pass and an update. Split the
batch over N devices and each device can run the forward and backward on its rows: every
device holds ∂C_k/∂θ for its shard k, and the gradient of the whole batch is their mean,
one all-reduce away. Two ways to write that, equal to each other and to one device:

- **automatic (GSPMD)**: ``jbp.fit(..., mesh=...)`` puts the batch sharded over the mesh's
  ``"data"`` axis and the params replicated (or sharded, ``shard_params=True``); the jitted
  step is the single-device one, and XLA partitions it and inserts the all-reduce of the
  gradients (for the hand-written backward and ``jax.grad`` alike: both are jnp code).
- **explicit** (:func:`data_parallel_value_and_grad`): ``jax.shard_map`` runs the
  hand-written forward and backward on every device's shard and averages loss and
  gradients with ``lax.pmean``: the lecture's backward pass plus one all-reduce, in view.

Meshes: :func:`data_mesh` puts devices on one ``"data"`` axis (``mesh="auto"``: all of
them). Any ``jax.sharding.Mesh`` with a ``"data"`` axis works; its axes are used as
``AxisType.Auto`` (XLA's sharding propagation decides the layout of everything in between).

Several processes (``jax.distributed``, see :mod:`jbp.distributed`): every process runs
the same program; :class:`DataParallel` feeds each process's devices only their rows of
every batch (``jax.make_array_from_process_local_data``), and :func:`gather` brings sharded
arrays to the host of every process (for evaluation and checkpoints).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jbp.grads import check_model_and_loss, manual_value_and_grad
from jbp.layer import Layer
from jbp.losses import Loss

DATA_AXIS = "data"
"""The mesh axis the batch is split over."""


# ---------------------------------------------------------------------------- meshes

def data_mesh(devices=None, axis: str = DATA_AXIS) -> Mesh:
    """A one-axis mesh ``(len(devices),)`` named ``axis`` over ``devices`` (default: every
    device of every process, ``jax.devices()``), with ``AxisType.Auto``.

    >>> import jbp
    >>> jbp.data_mesh().axis_names
    ('data',)
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("data_mesh: needs at least one device")
    return jax.make_mesh((len(devices),), (axis,), axis_types=(AxisType.Auto,), devices=devices)


def as_mesh(mesh, who: str, axis: str = DATA_AXIS) -> Mesh | None:
    """``None`` → None, ``"auto"`` → :func:`data_mesh` over every device, a ``Mesh`` →
    the same devices and axis names with every axis ``AxisType.Auto``. Anything else is a
    TypeError, a mesh without an ``axis`` axis a ValueError; both name ``who``."""
    if mesh is None:
        return None
    if isinstance(mesh, str) and mesh == "auto":
        return data_mesh(axis=axis)
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{who}: mesh must be None, 'auto' or a jax.sharding.Mesh (e.g. "
                        f"jbp.data_mesh()), got {type(mesh).__name__}: {mesh!r:.80}")
    if axis not in mesh.axis_names:
        raise ValueError(f"{who}: the mesh has axes {mesh.axis_names}, but the batch is split "
                         f"over an axis named {axis!r}; build it with jbp.data_mesh() or "
                         f"jax.make_mesh((n,), ({axis!r},))")
    if any(t != AxisType.Auto for t in mesh.axis_types):
        # Explicit axes would make every op that sums over the batch (aᵀδ) ask for an
        # out_sharding; jbp leaves those choices to XLA's propagation instead.
        mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * mesh.devices.ndim)
    return mesh


def data_size(mesh: Mesh, axis: str = DATA_AXIS) -> int:
    """How many shards the batch is split into: the size of the mesh's ``axis``."""
    return int(mesh.shape[axis])


def check_batch(batch: int, mesh: Mesh, who: str, axis: str = DATA_AXIS) -> None:
    """A ValueError naming both numbers unless ``batch`` splits evenly over the data axis."""
    n = data_size(mesh, axis)
    if batch % n:
        lower, upper = batch // n * n, -(-batch // n) * n
        near = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(f"{who}: batch size {batch} does not divide evenly over the {n} devices "
                         f"of the mesh's {axis!r} axis; use a multiple of {n} (e.g. {near})")


# ---------------------------------------------------------------------------- shardings

def param_spec(shape, n: int, shard: bool, axis: str = DATA_AXIS) -> P:
    """Where a param (or optimizer state) leaf of ``shape`` lives: replicated (``P()``), or
    with ``shard`` split over ``axis`` along its largest dimension that ``n`` divides
    (ZeRO/FSDP style; leaves with no such dimension stay replicated)."""
    if not shard or n == 1:
        return P()
    dims = [d for d in range(len(shape)) if shape[d] % n == 0 and shape[d] >= n]
    if not dims:
        return P()
    best = max(dims, key=lambda d: shape[d])
    return P(*([None] * best + [axis]))


def _is_array(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray)) and not (
        isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key))


def param_shardings(tree, mesh: Mesh, shard: bool, axis: str = DATA_AXIS):
    """A NamedSharding for every array leaf of ``tree`` (params or optimizer state)."""
    n = data_size(mesh, axis)
    return jax.tree_util.tree_map(
        lambda leaf: NamedSharding(mesh, param_spec(np.shape(leaf), n, shard, axis)), tree)


def place(tree, mesh: Mesh, shard: bool = False, axis: str = DATA_AXIS):
    """``tree``'s array leaves put on ``mesh``: replicated, or sharded with ``shard``
    (see :func:`param_spec`). Works in every process of a multi-process run (each process
    gives the same host values and keeps its own devices' parts)."""
    n = data_size(mesh, axis)

    def put(leaf):
        if not _is_array(leaf):
            return leaf
        # from the host: in a multi-process run device_put takes host values for a sharding
        # over other processes' devices, but not a jax array that sits on one device
        host = np.asarray(gather(leaf))
        return jax.device_put(host, NamedSharding(mesh, param_spec(host.shape, n, shard, axis)))

    return jax.tree_util.tree_map(put, tree)


def gather(tree):
    """``tree`` with every array that spans several devices brought to this process's host
    as a numpy array (the whole array, in every process); other leaves as they are.

    Arrays sharded over several processes go through ``process_allgather``, a collective:
    every process must call this at the same point.
    """
    from jax.experimental import multihost_utils

    def host(leaf):
        if not isinstance(leaf, jax.Array) or len(leaf.sharding.device_set) == 1:
            return leaf
        if leaf.is_fully_addressable or leaf.is_fully_replicated:
            return np.asarray(leaf)
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

    return jax.tree_util.tree_map(host, tree)


def _constrain(tree, mesh: Mesh, shard: bool, axis: str):
    """Pin ``tree``'s layout inside a jitted function (see :func:`param_spec`)."""
    n = data_size(mesh, axis)
    return jax.tree_util.tree_map(
        lambda leaf: jax.lax.with_sharding_constraint(
            leaf, NamedSharding(mesh, param_spec(leaf.shape, n, shard, axis))), tree)


def _local_rows(sharding: NamedSharding, batch: int, dim: int) -> tuple[int, int]:
    """The rows ``[lo, hi)`` of a batch of ``batch`` rows (axis ``dim``) that this process's
    devices hold under ``sharding``; they must be one contiguous block."""
    shape = [1] * (dim + 1)
    shape[dim] = batch
    spans = sorted({(s[dim].start or 0, batch if s[dim].stop is None else s[dim].stop)
                    for s in sharding.addressable_devices_indices_map(tuple(shape)).values()})
    lo, hi = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != hi - lo:
        raise ValueError(f"this process's devices hold rows {spans} of the batch, not one "
                         f"contiguous block; order the mesh's devices by process "
                         f"(jbp.data_mesh() does)")
    return lo, hi


# ---------------------------------------------------------------------------- explicit version

GRADS = ("manual", "autodiff")


def data_parallel_value_and_grad(model: Layer, loss: Loss, mesh, *, grad: str = "manual",
                                 axis: str = DATA_AXIS):
    """``f(params, x, y, *, weights=None, key=None, train=False, side=None) -> (C,
    ∂C/∂params)`` for the whole batch, computed shard by shard with ``jax.shard_map``.

    Every device of ``mesh``'s ``axis`` gets ``B/N`` rows of ``x`` and ``y`` (and
    ``weights`` and the side inputs, :mod:`jbp.masks`) and the whole params, and runs the hand-written forward and backward
    (:func:`jbp.manual_value_and_grad`) on them: its shard's cost C_k and gradient ∂C_k/∂θ.
    Then one all-reduce, ``lax.pmean``, averages them over the devices.

    The cost is a weighted mean (padding labels weigh 0), so each shard's term is scaled by
    its share of the weight, ``W_k / mean_k(W_k)``: exactly 1 when every shard weighs the
    same (the plain ``pmean`` of shard means), and the global weighted mean when they do
    not. Loss and gradients come back replicated.

    ``grad="autodiff"`` takes ``jax.value_and_grad`` of the pmean'd cost on every device
    instead (for comparison). The gradient of a per-shard cost would not do: inside
    ``shard_map`` the gradient of replicated params is summed over devices, so it would be N
    times too large. ``key`` (dropout) is folded with the device index, so masks differ from
    a single device's. ``f`` is jit-able; the batch must divide N (a ValueError says so).
    """
    check_model_and_loss(model, loss)
    if model.stateful:
        raise ValueError(f"data_parallel_value_and_grad: {model.name} keeps state (batch_norm); "
                         f"under shard_map every device would normalise with its own shard's "
                         f"statistics. Train it with jbp.fit(..., mesh=...), where XLA computes "
                         f"them over the whole batch")
    mesh = as_mesh(mesh, "data_parallel_value_and_grad", axis)
    if grad not in GRADS:
        raise ValueError(f"data_parallel_value_and_grad: grad must be one of {GRADS}, got {grad!r}")
    manual = manual_value_and_grad(model, loss)

    def shard(params, x, y, weights, key, side, train):
        if key is not None:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis))
        # This shard's total example weight W_k (what its cost is the mean over). The
        # weights depend on the targets only; ``out`` just gives shape and dtype.
        out = jax.eval_shape(lambda p, a, s: model.apply(p, a, key=key, train=train, side=s),
                             params, x, side)
        w_k = jnp.sum(loss.weights(jnp.zeros(out.shape, out.dtype), y, weights))
        mean_w = jax.lax.pmean(w_k, axis)
        share = w_k / jnp.where(mean_w > 0, mean_w, 1)
        if grad == "manual":
            value, grads = manual(params, x, y, weights=weights, key=key, train=train,
                                  side=side)
            # the all-reduce: the mean over devices of every shard's (weighted) loss and grads
            return jax.lax.pmean((share * value, _scale(grads, share)), axis)

        def cost(p):
            value = loss.value(model.apply(p, x, key=key, train=train, side=side), y, weights)
            return jax.lax.pmean(share * value, axis)

        return jax.value_and_grad(cost)(params)

    def value_and_grad(params, x, y, *, weights=None, key=None, train=False, side=None):
        check_batch(x.shape[0], mesh, "data_parallel_value_and_grad", axis)
        if y.shape[:1] != x.shape[:1]:
            raise ValueError(f"data_parallel_value_and_grad: inputs have {x.shape[0]} rows but "
                             f"targets {y.shape[0] if y.ndim else 'none'}")
        run = jax.shard_map(
            functools.partial(shard, train=train), mesh=mesh,
            in_specs=(P(), P(axis), P(axis), None if weights is None else P(axis), P(),
                      None if not side else P(axis)),
            out_specs=(P(), P()))
        return run(params, x, y, weights, key, side or None)

    return value_and_grad


def _scale(tree, s):
    return jax.tree_util.tree_map(lambda g: (g * s).astype(g.dtype), tree)


# ---------------------------------------------------------------------------- fit on a mesh

def _epoch_scan(update):
    def epoch(params, opt_state, state, xs, ys, keys):
        def body(carry, step):
            *carry, value = update(*carry, *step)
            return tuple(carry), value

        (params, opt_state, state), values = jax.lax.scan(body, (params, opt_state, state),
                                                          (xs, ys, keys))
        return params, opt_state, state, values

    return epoch


def _compile(model, loss, grad, optimizer, mesh, shard, axis):
    """(step, epoch), jitted: ``fit``'s update with params and optimizer state pinned to
    their layout on ``mesh`` (replicated, or sharded with ``shard``)."""
    from jbp.train import make_grad_fn, optimizer_update  # jbp.train imports this module

    grad_fn = make_grad_fn(model, loss, grad)

    def update(params, opt_state, state, x, y, key):
        value, state, grads = grad_fn(params, state, x, y, key)
        updates, opt_state = optimizer_update(optimizer, grads, opt_state, params, x, y, key)
        params = optax.apply_updates(params, updates)
        return (_constrain(params, mesh, shard, axis), _constrain(opt_state, mesh, shard, axis),
                _constrain(state, mesh, False, axis), value)

    return jax.jit(update), jax.jit(_epoch_scan(update))


_compile_cached = functools.lru_cache(maxsize=16)(_compile)


class DataParallel:
    """What ``jbp.fit`` does differently on a mesh: place params and optimizer state,
    feed every process its rows of each batch, run the sharded step, gather for the host.

    ``grad`` is ``fit``'s gradient source (``"manual"``, ``"autodiff"`` or a function); the
    compiled step is reused across calls with equal arguments.
    """

    def __init__(self, model, loss, grad, optimizer, mesh: Mesh, shard: bool, x, y,
                 axis: str = DATA_AXIS):
        self.mesh, self.shard, self.axis = mesh, shard, axis
        self.x, self.y = jax.tree_util.tree_map(np.asarray, (x, y))
        args = (model, loss, grad, optimizer, mesh, shard, axis)
        try:
            self.step, self.epoch_fn = _compile_cached(*args)
        except TypeError:  # something unhashable inside: compile afresh
            self.step, self.epoch_fn = _compile(*args)
        # XLA's CPU all-reduce can deadlock on a small machine when collective steps are
        # dispatched back to back (seen on 2 cores, FACTS.md); waiting for each to finish
        # avoided it in every trial, and costs nothing that matters on a CPU.
        self.block = any(d.platform == "cpu" for d in mesh.devices.flat)

    @property
    def is_main(self) -> bool:
        """True in the process that logs and writes (process 0)."""
        return jax.process_index() == 0

    def place(self, tree):
        return place(tree, self.mesh, self.shard, self.axis)

    def agree(self, step: int, where) -> None:
        """Stop every process with one error unless all start at the same ``step`` (a
        checkpoint that only some processes can see would make them diverge and hang)."""
        if jax.process_count() == 1:
            return
        from jax.experimental import multihost_utils

        steps = np.asarray(multihost_utils.process_allgather(np.int64(step))).reshape(-1)
        if len(set(steps.tolist())) != 1:
            raise ValueError(f"fit: the processes start at different steps {steps.tolist()} "
                             f"(from checkpoint {where}); checkpoint_dir must be a folder "
                             f"that every process sees")

    def _global(self, idx, dim):
        """``x[idx], y[idx]`` as global arrays sharded over the data axis at ``dim`` (the
        batch axis), built from this process's rows only."""
        spec = P(*([None] * dim + [self.axis]))
        sharding = NamedSharding(self.mesh, spec)
        lo, hi = _local_rows(sharding, idx.shape[dim], dim)
        rows = idx[(slice(None),) * dim + (slice(lo, hi),)]
        def global_rows(data):
            return jax.make_array_from_process_local_data(sharding, data[rows],
                                                          idx.shape + data.shape[1:])

        return jax.tree_util.tree_map(global_rows, (self.x, self.y))

    def _wait(self, result):
        return jax.block_until_ready(result) if self.block else result

    def run_epoch(self, params, opt_state, state, batches, keys, loop: str, bar):
        """Train over ``batches (S, B)`` (row indices) with per-step ``keys (S,)``; ``state``
        is the model's (batch norm's statistics are those of the whole global batch)."""
        idx = np.asarray(batches)  # the keys stay where they are: jit replicates them
        if loop == "scan":
            xs, ys = self._global(idx, 1)
            *carry, values = self._wait(self.epoch_fn(params, opt_state, state, xs, ys, keys))
            bar.update(len(idx))
            return (*carry, values)
        values = []
        for i in range(len(idx)):
            xb, yb = self._global(idx[i], 0)
            params, opt_state, state, value = self._wait(
                self.step(params, opt_state, state, xb, yb, keys[i]))
            values.append(value)
            bar.update(1)
        return params, opt_state, state, jnp.stack(values)


# ---------------------------------------------------------------------------- HLO figures

_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64|c64|c128)"
                    r"\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")


def collective_bytes(hlo_text: str) -> dict:
    """Bytes each kind of collective produces per call of a compiled XLA program, from its
    HLO text (``jax.jit(f).lower(...).compile().as_text()``): ``{op: {"count", "bytes"}}``.

    The bytes are those of each collective's result shape (for an all-reduce: the buffer
    reduced across devices, e.g. the gradients; a tuple counts all its members). Async
    pairs count once, at their ``-start``: an ``all-reduce-start`` has the result's shape,
    the other ``-start`` ops return ``(operand, result, ...)`` and count their second
    member. Ops inside a loop body (``lax.scan``) count once, not per iteration.
    """
    found = {}
    for line in hlo_text.splitlines():
        if "=" not in line:
            continue
        rhs = line.split("=", 1)[1]
        for op in COLLECTIVES:
            match = re.match(rf"\s*(.*?)\s{op}(-start)?\(", rhs)
            if not match:
                continue
            shapes = _SHAPE.findall(match.group(1))
            if match.group(2) and op != "all-reduce":
                shapes = shapes[1:2]
            size = sum(_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d]))
                       for t, dims in shapes)
            entry = found.setdefault(op, {"count": 0, "bytes": 0})
            entry["count"] += 1
            entry["bytes"] += size
            break
    return found


def tree_bytes(tree) -> int:
    """Bytes of all array leaves of ``tree`` (e.g. the gradients an all-reduce sums)."""
    return int(sum(np.prod(np.shape(a)) * jnp.dtype(a.dtype).itemsize
                   for a in jax.tree_util.tree_leaves(tree)))
