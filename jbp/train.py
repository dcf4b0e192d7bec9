"""Training: minibatch gradient descent with any optax optimizer on either gradient.

Lecture map: "pick the best function". :func:`fit` repeats ``θ ← θ − η ∇C(θ)`` (or Adam's
version of it) over shuffled minibatches; ∇C comes from the hand-written backward
(``grad="manual"``), from ``jax.grad`` (``grad="autodiff"``), or from any function with
the signature ``(params, x, y) -> (loss, grads)``.

How it runs: the data are put on the device once; each epoch draws a permutation from
``fold_in(key, epoch)`` and runs the update step over it, either as one ``lax.scan`` per
epoch (``loop="scan"``, faster for MLPs on a 2-core CPU) or as a Python loop over the
jitted step (``loop="python"``); ``loop="auto"``, the default, takes the Python loop for
models with convolutions on the CPU, where XLA's convolutions inside ``lax.scan`` ran slower
than in the jitted step on its own (docs/training.md, ``scripts/time_fit_loop.py``), and
scan otherwise. The same key gives bit-identical params on the same
machine, and a run resumed from a checkpoint ends where an uninterrupted run ends.
Evaluation (:mod:`jbp.evaluation`) runs in chunks of ``eval_batch_size`` rows. With a
``mesh`` the same step runs data-parallel (:mod:`jbp.data_parallel`). This module checks
fit's arguments and compiles its steps; the loop itself (resume, the epoch runners, the
bookkeeping after each epoch) is in :mod:`jbp.fit_loop`.

A model that keeps state (batch_norm) trains with ``state=``: every step returns the new
state beside the params, evaluation uses it, checkpoints hold it, and ``fit`` returns
``(params, state, history)``. Internally a model without state carries ``{}``.
"""

import functools
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jbp import data_parallel, fit_loop
from jbp.data import Dataset
from jbp.evaluation import check_split, make_evaluate, make_evaluate_chunks
from jbp.grads import autodiff_value_and_grad, manual_value_and_grad
from jbp.layer import Layer, check_state
from jbp.kfac import KFAC
from jbp.layers.conv import Convolution
from jbp.losses import Loss
from jbp.masks import WithSide, rows, split_side

OPTIMIZERS = {"adam": optax.adam, "sgd": optax.sgd}
DEFAULT_LEARNING_RATE = 1e-3
GRADS = {"manual": manual_value_and_grad, "autodiff": autodiff_value_and_grad}
LOOPS = ("auto", "scan", "python")
CHECKPOINT_FILE = "checkpoint.npz"


# ---------------------------------------------------------------------------- arguments

def _positive_int(value, name):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"fit: {name} must be a positive int, got {value!r}")
    return int(value)


def _bool(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"fit: {name} must be True or False, got {value!r}")
    return bool(value)


@functools.lru_cache(maxsize=16)
def _named_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    # The same name and rate give the same object, so compiled steps can be reused.
    return OPTIMIZERS[name](learning_rate)


def make_optimizer(optimizer=None, learning_rate=None) -> optax.GradientTransformation:
    """``None``/``"adam"`` → ``optax.adam(learning_rate)``, ``"sgd"`` → ``optax.sgd``
    (``learning_rate=None`` means 1e-3; a positive number, or an optax schedule: a function
    ``step -> rate`` such as ``optax.cosine_decay_schedule(3e-3, 1000)``). An optax
    GradientTransformation is returned as it is: it carries its own learning rate, so giving
    ``learning_rate`` with it is an error."""
    if isinstance(optimizer, optax.GradientTransformation):
        if learning_rate is not None:
            raise ValueError(f"fit: learning_rate={learning_rate!r} does not apply to an optax "
                             f"GradientTransformation, which carries its own learning rate; "
                             f"leave learning_rate out or use optimizer='adam'/'sgd'")
        return optimizer
    if optimizer is None:
        optimizer = "adam"
    if not isinstance(optimizer, str) or optimizer not in OPTIMIZERS:
        raise ValueError(f"fit: unknown optimizer {optimizer!r}; use one of "
                         f"{', '.join(map(repr, OPTIMIZERS))} or an optax GradientTransformation")
    if learning_rate is None:
        learning_rate = DEFAULT_LEARNING_RATE
    if callable(learning_rate):  # an optax schedule: step -> rate
        return _named_optimizer(optimizer, learning_rate)
    if (not isinstance(learning_rate, (int, float)) or isinstance(learning_rate, bool)
            or not learning_rate > 0):
        raise ValueError(f"fit: learning_rate must be a positive number, got {learning_rate!r} "
                         f"(or an optax schedule: a function step -> rate)")
    return _named_optimizer(optimizer, float(learning_rate))


def describe_optimizer(optimizer, learning_rate, opt_state) -> dict:
    """What a checkpoint records of the optimizer (JSON): the name and learning rate of a
    named one, and for any optimizer the tree structure of its state."""
    state = str(jax.tree_util.tree_structure(opt_state))
    if isinstance(optimizer, optax.GradientTransformation):
        return {"name": None, "learning_rate": None, "state": state}
    if callable(learning_rate):  # a schedule: a function cannot be compared across runs
        return {"name": optimizer or "adam", "learning_rate": "schedule", "state": state}
    rate = DEFAULT_LEARNING_RATE if learning_rate is None else float(learning_rate)
    return {"name": optimizer or "adam", "learning_rate": rate, "state": state}


def make_grad_fn(model: Layer, loss: Loss, grad) -> Callable:
    """The gradient source as ``f(params, state, x, y, key) -> (loss, new_state, grads)``.

    ``"manual"`` and ``"autodiff"`` run the model in training mode with a per-step key (for
    dropout); a user function is called as ``grad(params, x, y)`` (models without state
    only). ``state`` is the model's, ``{}`` for a model without (given back as it is).
    """
    if isinstance(grad, str) and grad in GRADS:
        value_and_grad = GRADS[grad](model, loss)

        def grad_fn(params, state, x, y, key):
            x, side = split_side(x)
            value, grads = value_and_grad(params, x, y, key=key, train=True, state=state,
                                          side=side)
            value, state = value if model.stateful else (value, state)
            return value, state, grads

        return grad_fn
    if callable(grad) and not isinstance(grad, str):
        if model.stateful:
            raise ValueError(f"fit: {model.name} keeps state (batch_norm), which a gradient "
                             f"function (params, x, y) -> (loss, grads) cannot update; use "
                             f"grad='manual' or 'autodiff'")

        def user_grad_fn(params, state, x, y, key):
            x, side = split_side(x)
            value, grads = grad(params, x, y, **({"side": side} if side else {}))
            return value, state, grads

        return user_grad_fn
    raise ValueError(f"fit: unknown gradient source {grad!r}; use 'manual', 'autodiff' or a "
                     f"function (params, x, y) -> (loss, grads)")


def _has_conv(layer: Layer) -> bool:
    """Whether ``layer`` or a layer inside it is a ``jbp.conv``."""
    return isinstance(layer.info, Convolution) or any(_has_conv(c) for c in layer.layers)


def _as_key(key):
    """A typed PRNG key; raw ``uint32[2]`` keys (``jax.random.PRNGKey``) are wrapped."""
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    try:
        raw = jnp.asarray(key)
    except (TypeError, ValueError):
        raw = None
    if raw is None or raw.dtype != jnp.uint32 or raw.shape != (2,):
        got = (f"{raw.dtype}{list(raw.shape)}" if raw is not None else type(key).__name__)
        raise ValueError(f"fit: key must be a PRNG key, e.g. jax.random.key(0), got {got}")
    return jax.random.wrap_key_data(raw)


def _split_data(data, name):
    """``(x, y)`` as arrays, with as many inputs as targets; for ``(x, y, side)`` the ``x``
    is a :class:`jbp.masks.WithSide` of the inputs and the side inputs' arrays."""
    if isinstance(data, Dataset):
        data = (data.x_train, data.y_train)
    try:
        x, y, *side = data
        if len(side) > 1:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"fit: {name} must be a jbp.data.Dataset, a pair (x, y) or a "
                         f"triple (x, y, side) with side a dict of side inputs, e.g. "
                         f"{{'lengths': lengths}}") from None
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise ValueError(f"fit: {name} has inputs of shape {tuple(x.shape)} but targets of "
                         f"shape {tuple(y.shape)}; both need one row per example")
    if len(x) == 0:
        raise ValueError(f"fit: {name} has no examples")
    if not side or not side[0]:
        return x, y
    if not isinstance(side[0], dict):
        raise ValueError(f"fit: the side inputs of {name} must be a dict, e.g. "
                         f"{{'lengths': lengths}}, got {type(side[0]).__name__}")
    side = {k: jnp.asarray(v) for k, v in side[0].items()}
    for k, v in side.items():
        if v.ndim == 0 or len(v) != len(x):
            raise ValueError(f"fit: side input {k!r} of {name} has shape {tuple(v.shape)}; "
                             f"it needs one row per example ({len(x)})")
    return WithSide(x, side), y


def _like(b, a):
    """``b`` in ``a``'s dtype when both are floating or both integer (e.g. float64 test
    data beside float32 train data), else ``b`` as it is; leaf by leaf for pytrees alike."""
    if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b):
        return b
    if not hasattr(a, "dtype"):
        return jax.tree_util.tree_map(_like, b, a)
    for kind in (jnp.floating, jnp.integer):
        if jnp.issubdtype(a.dtype, kind) and jnp.issubdtype(b.dtype, kind):
            return b.astype(a.dtype)
    return b


# ---------------------------------------------------------------------------- compiled steps

def optimizer_update(optimizer, grads, opt_state, params, x, y, key):
    """``optimizer.update``; a :class:`jbp.kfac.KFAC` also gets the batch it preconditions
    with (``x`` a batch or a :class:`jbp.masks.WithSide`)."""
    if isinstance(optimizer, KFAC):
        x, side = split_side(x)
        return optimizer.update(grads, opt_state, params, x=x, y=y, key=key, side=side)
    return optimizer.update(grads, opt_state, params)


def make_update(grad_fn, optimizer):
    """One optimisation step on the batch ``x[idx], y[idx]`` (pure; jit or scan it)."""

    def update(params, opt_state, state, x, y, idx, key):
        xb, yb = rows(x, idx), y[idx]
        value, state, grads = grad_fn(params, state, xb, yb, key)
        updates, opt_state = optimizer_update(optimizer, grads, opt_state, params, xb, yb, key)
        return optax.apply_updates(params, updates), opt_state, state, value

    return update


def make_epoch(update):
    """Run ``update`` over the rows of ``batches (S, B)`` as one ``lax.scan``."""

    def epoch(params, opt_state, state, x, y, batches, keys):
        def body(carry, step):
            idx, key = step
            *carry, value = update(*carry, x, y, idx, key)
            return tuple(carry), value

        (params, opt_state, state), values = jax.lax.scan(body, (params, opt_state, state),
                                                          (batches, keys))
        return params, opt_state, state, values

    return epoch


class Compiled(NamedTuple):
    """The jitted functions of one (model, loss, gradient source, optimizer)."""

    # state: the model's ({} without); step and epoch give it back updated
    step: Callable  # (params, opt_state, state, x, y, idx (B,), key) -> (..., loss)
    epoch: Callable  # (params, opt_state, state, x, y, batches (S, B), keys (S,)) -> (..., losses (S,))
    evaluate: Callable  # (params, state, xs (K, C, ...), ys (K, C, ...)) -> (losses, correct)


def _compile(model, loss, grad, optimizer) -> Compiled:
    update = make_update(make_grad_fn(model, loss, grad), optimizer)
    return Compiled(jax.jit(update), jax.jit(make_epoch(update)),
                    jax.jit(make_evaluate_chunks(make_evaluate(model, loss))))


_compile_cached = functools.lru_cache(maxsize=16)(_compile)


def compiled(model, loss, grad, optimizer) -> Compiled:
    """:class:`Compiled` functions, reused across ``fit`` calls with the same arguments
    (so a second run of the same model does not compile again)."""
    make_grad_fn(model, loss, grad)  # validate before caching
    try:
        return _compile_cached(model, loss, grad, optimizer)
    except TypeError:  # something unhashable inside: compile afresh
        return _compile(model, loss, grad, optimizer)


def _epoch_plan(key, epoch, n, batch_size, n_steps, first_step):
    """The shuffled batches ``(n_steps, batch_size)`` and per-step dropout keys of an epoch."""
    shuffle_key, step_key = jax.random.split(key)
    perm = jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), n)
    batches = perm[: n_steps * batch_size].reshape(n_steps, batch_size)
    keys = jax.vmap(lambda s: jax.random.fold_in(step_key, s))(
        first_step + jnp.arange(n_steps))
    return batches, keys


_plan = jax.jit(_epoch_plan, static_argnums=(2, 3, 4))


# ---------------------------------------------------------------------------- configuration

def _config(model, loss, params, data, *, key, optimizer, learning_rate, epochs, steps,
            batch_size, grad, eval_data, eval_batch_size, checkpoint_dir, resume, overwrite,
            stop_on_nonfinite, loop, progress, on_epoch, mesh, shard_params,
            state) -> fit_loop.FitConfig:
    """:func:`fit`'s arguments (as fit takes them) checked, each once and in this order, as
    a :class:`jbp.fit_loop.FitConfig`. A bad one raises ValueError (TypeError for a mesh or
    state of the wrong kind) with a message that names it; so does data that does not fit
    the model."""
    opt = make_optimizer(optimizer, learning_rate)
    fns = compiled(model, loss, grad, opt)  # checks grad
    check_state(model, state)
    state = state if model.stateful else {}
    loop = _choose_loop(loop, model)
    key = _as_key(key)
    batch_size = _positive_int(batch_size, "batch_size")
    eval_batch_size = _positive_int(eval_batch_size, "eval_batch_size")
    if epochs is not None and steps is not None:
        raise ValueError("fit: give epochs or steps, not both")
    resume, overwrite = _bool(resume, "resume"), _bool(overwrite, "overwrite")
    stop_on_nonfinite = _bool(stop_on_nonfinite, "stop_on_nonfinite")
    checkpoint_path = _checkpoint_path(checkpoint_dir, resume, overwrite)
    x, y, splits = _splits(model, loss, params, state, data, eval_data)
    if batch_size > len(y):
        raise ValueError(f"fit: batch_size {batch_size} is larger than the data "
                         f"({len(y)} examples)")
    mesh, shard_params = _mesh(mesh, _bool(shard_params, "shard_params"), batch_size)
    total_steps = _total_steps(epochs, steps, len(y) // batch_size)
    return fit_loop.FitConfig(opt, fns, state, loop, key, x, y, splits, batch_size,
                              eval_batch_size, total_steps, stop_on_nonfinite, resume,
                              overwrite, checkpoint_path, mesh, shard_params, progress,
                              on_epoch)


def _choose_loop(loop, model) -> str:
    """``"scan"`` or ``"python"``: ``loop`` checked, and ``"auto"`` decided for ``model``
    (the Python loop for a model with convolutions on the CPU: see the module docstring)."""
    if loop not in LOOPS:
        raise ValueError(f"fit: loop must be one of {LOOPS}, got {loop!r}")
    if loop == "auto":
        loop = "python" if jax.default_backend() == "cpu" and _has_conv(model) else "scan"
    return loop


def _checkpoint_path(checkpoint_dir, resume: bool, overwrite: bool) -> Path | None:
    """Where the checkpoint lives (None without ``checkpoint_dir``), once ``resume`` and
    ``overwrite`` are known to make sense: each needs a folder, and they exclude each other."""
    for flag, value in (("resume", resume), ("overwrite", overwrite)):
        if value and checkpoint_dir is None:
            raise ValueError(f"fit: {flag}=True needs a checkpoint_dir")
    if resume and overwrite:
        raise ValueError("fit: resume=True continues the checkpoint, overwrite=True replaces "
                         "it; give one of them")
    return None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_FILE


def _splits(model, loss, params, state, data, eval_data):
    """``(x, y, splits)``: the training data and what is evaluated, ``{"train": (x, y)}``
    plus ``"test"`` from ``eval_data`` (default: a Dataset's test split). Each split is
    checked against the model on its own, so an error names it and quotes its shapes."""
    x, y = _split_data(data, "data")
    check_split(model, loss, params, state, x, y, "fit: data")
    splits = {"train": (x, y)}
    if eval_data is None and isinstance(data, Dataset):
        eval_data, eval_name = (data.x_test, data.y_test), "the test split of data"
    else:
        eval_name = "eval_data"
    if eval_data is not None:
        eval_x, eval_y = _split_data(eval_data, eval_name)
        check_split(model, loss, params, state, eval_x, eval_y, f"fit: {eval_name}")
        splits["test"] = (_like(eval_x, x), _like(eval_y, y))  # dtypes alike: one compile
    return x, y, splits


def _mesh(mesh, shard_params: bool, batch_size: int):
    """``(mesh, shard_params)``: ``mesh`` as a jax Mesh (None: one device), checked to
    split ``batch_size`` evenly; ``shard_params`` needs a mesh."""
    mesh = data_parallel.as_mesh(mesh, "fit")
    if mesh is None and shard_params:
        raise ValueError("fit: shard_params=True needs a mesh (mesh='auto' or a jax Mesh)")
    if mesh is not None:
        data_parallel.check_batch(batch_size, mesh, "fit")
    return mesh, shard_params


def _total_steps(epochs, steps, steps_per_epoch: int) -> int:
    """The steps of the whole run: ``steps``, or ``epochs`` (default 10) epochs."""
    if steps is not None:
        return _positive_int(steps, "steps")
    return _positive_int(10 if epochs is None else epochs, "epochs") * steps_per_epoch


# ---------------------------------------------------------------------------- fit

def fit(model: Layer, loss: Loss, params, data, *, key, optimizer=None, learning_rate=None,
        epochs: int | None = None, steps: int | None = None, batch_size: int = 128,
        grad="manual", eval_data=None, eval_batch_size: int = 1024, checkpoint_dir=None,
        resume: bool = False, overwrite: bool = False, stop_on_nonfinite: bool = True,
        loop: str = "auto", progress: bool = True, on_epoch=None, mesh=None,
        shard_params: bool = False, state=None):
    """Train ``params`` of ``model`` on ``loss`` by minibatch gradient descent.

    Args:
      model, loss: a jbp Layer and Loss.
      params: initial params (from ``model.init``).
      data: a :class:`jbp.data.Dataset` (trains on its train split and, unless
        ``eval_data`` is given, evaluates on its test split), a pair ``(x (N, ...), y (N,
        ...))``, or a triple ``(x, y, side)`` whose ``side`` holds side inputs with a row
        per example, e.g. ``{"lengths": (N,)}`` for padded sequences (:mod:`jbp.masks`;
        each batch and evaluation chunk gets its rows).
      key: a PRNG key; it alone decides the shuffling and dropout masks.
      optimizer: ``None``/``"adam"`` (default), ``"sgd"`` (the lecture's plain gradient
        descent), or any optax ``GradientTransformation``.
      learning_rate: for ``"adam"``/``"sgd"``: a positive number (None means 1e-3) or an
        optax schedule (a function ``step -> rate``). An optax GradientTransformation
        carries its own: giving both is an error.
      epochs, steps: how long the whole run is, counting what a resumed checkpoint already
        holds; give at most one (default: 10 epochs). An epoch is ``N // batch_size`` steps
        (the remainder of the shuffled data is left out).
      batch_size: examples per step, at most N.
      grad: ``"manual"`` (hand-written backward), ``"autodiff"`` (``jax.grad``) or a function
        ``(params, x, y) -> (loss, grads)``.
      eval_data: ``(x, y)`` or ``(x, y, side)`` to evaluate on after every epoch (and
        before the first).
      eval_batch_size: evaluation runs over chunks of this many rows (the numbers are the
        same for any size; a smaller one needs less memory).
      checkpoint_dir: save params, optimizer state, step, key and history there after
        every epoch (``checkpoint.npz``, atomically), with the optimizer's name and learning
        rate (or its state's structure).
      resume: continue from the checkpoint in ``checkpoint_dir`` if there is one. It must be
        of the same model, optimizer, batch size and N, and hold at most the steps asked
        for (as many: its params and history come back without training).
      overwrite: start afresh even though ``checkpoint_dir`` holds a checkpoint, and replace
        it after the first epoch. Without ``resume`` or ``overwrite`` an existing checkpoint
        is an error, so that nothing is lost by accident.
      stop_on_nonfinite: raise ``FloatingPointError`` naming the first step (and epoch) whose
        minibatch loss is NaN or inf. Checked after each epoch, before its evaluation and
        checkpoint, so the last checkpoint holds the last good epoch. False trains on.
      loop: ``"auto"`` (the Python loop for a model with convolutions on the CPU, else
        scan: see the module docstring), ``"scan"`` (one ``lax.scan`` per epoch) or
        ``"python"`` (a Python loop over
        the jitted step).
      progress: show a tqdm bar with the current loss.
      on_epoch: called as ``on_epoch(epoch, params, history)`` after every epoch (after
        its evaluation and checkpoint), e.g. to keep snapshots of the params; for a model
        with state as ``on_epoch(epoch, params, history, state=state)``.
      mesh: None (one device, as always), ``"auto"`` (every device on one ``"data"`` axis)
        or a ``jax.sharding.Mesh`` with a ``"data"`` axis: data-parallel training. Every
        batch is split over the data axis (``batch_size`` must divide its size), params
        and optimizer state are replicated, XLA all-reduces the gradients; the result is
        the single-device one up to the order of float sums. In a multi-process run
        (:mod:`jbp.distributed`) every process calls ``fit`` alike, feeds only its own
        devices' rows, and only process 0 shows progress and writes the checkpoint (so
        ``checkpoint_dir`` must be a folder every process sees). Evaluation runs on a host
        copy of the params in every process. The params come back on the mesh.
      shard_params: with a mesh, shard params and optimizer state over the data axis too
        (ZeRO/FSDP style: each leaf along its largest dimension the axis size divides);
        XLA gathers them where the step needs them.
      state: the state of a model that keeps state (``model.init_state(in_shape)``, or what
        an earlier fit returned); the steps update it in training mode, evaluation uses it.

    Returns:
      ``(params, history)``, for a model with state ``(params, state, history)``; ``history["loss"]`` holds the minibatch loss of every step,
      ``history["eval"]`` lists per evaluation ``epoch``, ``step``, ``train_loss``,
      ``train_accuracy`` and, with eval data, ``test_loss`` and ``test_accuracy``
      (accuracies are None where they do not apply: they need integer labels, or targets
      of the output's 2-D shape whose rows are probability vectors, e.g. one-hot).
    """
    cfg = _config(model, loss, params, data, key=key, optimizer=optimizer,
                  learning_rate=learning_rate, epochs=epochs, steps=steps,
                  batch_size=batch_size, grad=grad, eval_data=eval_data,
                  eval_batch_size=eval_batch_size, checkpoint_dir=checkpoint_dir,
                  resume=resume, overwrite=overwrite, stop_on_nonfinite=stop_on_nonfinite,
                  loop=loop, progress=progress, on_epoch=on_epoch, mesh=mesh,
                  shard_params=shard_params, state=state)
    opt_state = cfg.optimizer.init(params)
    described = describe_optimizer(optimizer, learning_rate, opt_state)
    fresh = fit_loop.Run(params, opt_state, cfg.state, 0, cfg.key, {"loss": [], "eval": []})
    started = fit_loop.resume(cfg, fresh, described)
    runner, run = fit_loop.epoch_runner(cfg, model, loss, grad, started)
    books = fit_loop.Bookkeeping(cfg, runner, described, model.stateful)
    if run.step == 0:
        books.record_eval(run, 0)
    with books.progress_bar(run) as bar:
        while run.step < cfg.total_steps:
            epoch = run.step // cfg.steps_per_epoch
            n_steps = min(cfg.steps_per_epoch, cfg.total_steps - run.step)
            batches, keys = _plan(run.key, epoch, cfg.n, cfg.batch_size, n_steps, run.step)
            *trained, losses = runner.run_epoch(run.params, run.opt_state, run.state,
                                                batches, keys, bar)
            run = books.end_epoch(run, trained, losses, epoch + 1, bar)
    return (run.params, run.state, run.history) if model.stateful else (run.params, run.history)
