"""Training: minibatch gradient descent with any optax optimizer on either gradient.

Lecture map: "pick the best function". :func:`fit` repeats ``θ ← θ − η ∇C(θ)`` (or Adam's
version of it) over shuffled minibatches; ∇C comes from the hand-written backward
(``grad="manual"``), from ``jax.grad`` (``grad="autodiff"``), or from any function with
the signature ``(params, x, y) -> (loss, grads)``.

How it runs: the data are put on the device once; each epoch draws a permutation from
``fold_in(key, epoch)`` and runs the update step over it, either as one ``lax.scan`` per
epoch (``loop="scan"``, the default, faster on a 2-core CPU) or as a Python loop over the
jitted step (``loop="python"``). The same key gives bit-identical params on the same
machine, and a run resumed from a checkpoint ends where an uninterrupted run ends.
"""

import functools
import math
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jbp import checkpoint
from jbp.data import Dataset
from jbp.grads import autodiff_value_and_grad, manual_value_and_grad
from jbp.layer import Layer
from jbp.losses import Loss

OPTIMIZERS = {"adam": optax.adam, "sgd": optax.sgd}
GRADS = {"manual": manual_value_and_grad, "autodiff": autodiff_value_and_grad}
LOOPS = ("scan", "python")
CHECKPOINT_FILE = "checkpoint.npz"


# ---------------------------------------------------------------------------- arguments

def _positive_int(value, name):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"fit: {name} must be a positive int, got {value!r}")
    return int(value)


@functools.lru_cache(maxsize=16)
def _named_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    # The same name and rate give the same object, so compiled steps can be reused.
    return OPTIMIZERS[name](learning_rate)


def make_optimizer(optimizer=None, learning_rate: float = 1e-3) -> optax.GradientTransformation:
    """``None``/``"adam"`` → ``optax.adam(learning_rate)``, ``"sgd"`` → ``optax.sgd``;
    a GradientTransformation is returned as it is (its own learning rate applies)."""
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    if optimizer is None:
        optimizer = "adam"
    if not isinstance(optimizer, str) or optimizer not in OPTIMIZERS:
        raise ValueError(f"fit: unknown optimizer {optimizer!r}; use one of "
                         f"{', '.join(map(repr, OPTIMIZERS))} or an optax GradientTransformation")
    if (not isinstance(learning_rate, (int, float)) or isinstance(learning_rate, bool)
            or not learning_rate > 0):
        raise ValueError(f"fit: learning_rate must be a positive number, got {learning_rate!r}")
    return _named_optimizer(optimizer, float(learning_rate))


def make_grad_fn(model: Layer, loss: Loss, grad) -> Callable:
    """The gradient source as ``f(params, x, y, key) -> (loss, grads)``.

    ``"manual"`` and ``"autodiff"`` run the model in training mode with a per-step key (for
    dropout); a user function is called as ``grad(params, x, y)``.
    """
    if isinstance(grad, str) and grad in GRADS:
        value_and_grad = GRADS[grad](model, loss)
        return lambda params, x, y, key: value_and_grad(params, x, y, key=key, train=True)
    if callable(grad) and not isinstance(grad, str):
        return lambda params, x, y, key: grad(params, x, y)
    raise ValueError(f"fit: unknown gradient source {grad!r}; use 'manual', 'autodiff' or a "
                     f"function (params, x, y) -> (loss, grads)")


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
    if isinstance(data, Dataset):
        return data.x_train, data.y_train
    try:
        x, y = data
    except (TypeError, ValueError):
        raise ValueError(f"fit: {name} must be a jbp.data.Dataset or a pair (x, y)") from None
    if len(x) != len(y):
        raise ValueError(f"fit: {name} has {len(x)} inputs but {len(y)} targets")
    return x, y


# ---------------------------------------------------------------------------- compiled steps

def make_update(grad_fn, optimizer):
    """One optimisation step on the batch ``x[idx], y[idx]`` (pure; jit or scan it)."""

    def update(params, opt_state, x, y, idx, key):
        value, grads = grad_fn(params, x[idx], y[idx], key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return update


def make_epoch(update):
    """Run ``update`` over the rows of ``batches (S, B)`` as one ``lax.scan``."""

    def epoch(params, opt_state, x, y, batches, keys):
        def body(carry, step):
            idx, key = step
            params, opt_state, value = update(*carry, x, y, idx, key)
            return (params, opt_state), value

        (params, opt_state), values = jax.lax.scan(body, (params, opt_state), (batches, keys))
        return params, opt_state, values

    return epoch


def make_evaluate(model: Layer, loss: Loss):
    """``evaluate(params, x (N, ...), y (N, ...)) -> (losses (N,), correct (N,))`` in
    evaluation mode: per-example losses and whether the argmax of the output equals the
    integer label (NaN where accuracy does not apply). One call covers train and test
    sets stacked together, so evaluation compiles once.
    """

    def evaluate(params, x, y):
        out = model.apply(params, x, train=False)
        losses = loss.per_example(out, y)
        if out.ndim == 2 and jnp.issubdtype(y.dtype, jnp.integer):
            correct = (jnp.argmax(out, axis=-1) == y).astype(jnp.float32)
        else:
            correct = jnp.full(losses.shape, jnp.nan, jnp.float32)
        return losses, correct

    return evaluate


class Compiled(NamedTuple):
    """The jitted functions of one (model, loss, gradient source, optimizer)."""

    step: Callable  # (params, opt_state, x, y, idx (B,), key) -> (params, opt_state, loss)
    epoch: Callable  # (params, opt_state, x, y, batches (S, B), keys (S,)) -> (..., losses (S,))
    evaluate: Callable  # (params, x, y) -> (losses (N,), correct (N,))


def _compile(model, loss, grad, optimizer) -> Compiled:
    update = make_update(make_grad_fn(model, loss, grad), optimizer)
    return Compiled(jax.jit(update), jax.jit(make_epoch(update)),
                    jax.jit(make_evaluate(model, loss)))


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


# ---------------------------------------------------------------------------- fit

def _checkpoint_tree(params, opt_state, step, key):
    # "params" sorts before "state", so a different model is reported by a params leaf first.
    return {"params": params, "state": {"opt_state": opt_state, "step": step, "key": key}}


def fit(model: Layer, loss: Loss, params, data, *, key, optimizer=None,
        learning_rate: float = 1e-3, epochs: int | None = None, steps: int | None = None,
        batch_size: int = 128, grad="manual", eval_data=None, checkpoint_dir=None,
        resume: bool = False, loop: str = "scan", progress: bool = True, on_epoch=None):
    """Train ``params`` of ``model`` on ``loss`` by minibatch gradient descent.

    Args:
      model, loss: a jbp Layer and Loss.
      params: initial params (from ``model.init``).
      data: a :class:`jbp.data.Dataset` (trains on its train split and, unless
        ``eval_data`` is given, evaluates on its test split) or a pair ``(x (N, ...), y (N, ...))``.
      key: a PRNG key; it alone decides the shuffling and dropout masks.
      optimizer: ``None``/``"adam"`` (default), ``"sgd"`` (the lecture's plain gradient
        descent), or any optax ``GradientTransformation``.
      learning_rate: for ``"adam"``/``"sgd"``.
      epochs, steps: how long; give at most one (default: 10 epochs). An epoch is
        ``N // batch_size`` steps (the remainder of the shuffled data is left out).
      batch_size: examples per step, at most N.
      grad: ``"manual"`` (hand-written backward), ``"autodiff"`` (``jax.grad``) or a function
        ``(params, x, y) -> (loss, grads)``.
      eval_data: ``(x, y)`` to evaluate on after every epoch (and before the first).
      checkpoint_dir: save params, optimizer state, step, key and history there after
        every epoch (``checkpoint.npz``, atomically). With ``resume=True`` an existing
        checkpoint there is loaded and training goes on from its step.
      loop: ``"scan"`` (one ``lax.scan`` per epoch) or ``"python"`` (a Python loop over
        the jitted step).
      progress: show a tqdm bar with the current loss.
      on_epoch: called as ``on_epoch(epoch, params, history)`` after every epoch (after
        its evaluation and checkpoint), e.g. to keep snapshots of the params.

    Returns:
      ``(params, history)``; ``history["loss"]`` holds the minibatch loss of every step,
      ``history["eval"]`` lists per evaluation ``epoch``, ``step``, ``train_loss``,
      ``train_accuracy`` and, with eval data, ``test_loss`` and ``test_accuracy``
      (accuracies are None where they do not apply).
    """
    optimizer = make_optimizer(optimizer, learning_rate)
    fns = compiled(model, loss, grad, optimizer)
    if loop not in LOOPS:
        raise ValueError(f"fit: loop must be one of {LOOPS}, got {loop!r}")
    key = _as_key(key)
    x, y = _split_data(data, "data")
    if eval_data is None and isinstance(data, Dataset):
        eval_data = (data.x_test, data.y_test)
    if eval_data is not None:
        eval_data = _split_data(eval_data, "eval_data")
    n = len(x)
    batch_size = _positive_int(batch_size, "batch_size")
    if batch_size > n:
        raise ValueError(f"fit: batch_size {batch_size} is larger than the data ({n} examples)")
    steps_per_epoch = n // batch_size
    if epochs is not None and steps is not None:
        raise ValueError("fit: give epochs or steps, not both")
    if steps is not None:
        total_steps = _positive_int(steps, "steps")
    else:
        total_steps = _positive_int(10 if epochs is None else epochs, "epochs") * steps_per_epoch
    if resume and checkpoint_dir is None:
        raise ValueError("fit: resume=True needs a checkpoint_dir")

    x, y = jax.device_put(jnp.asarray(x)), jax.device_put(jnp.asarray(y))
    splits = {"train": slice(0, n)}
    if eval_data is None:
        eval_x, eval_y = x, y
    else:
        splits["test"] = slice(n, n + len(eval_data[0]))
        eval_x = jax.device_put(jnp.concatenate([x, jnp.asarray(eval_data[0], x.dtype)]))
        eval_y = jax.device_put(jnp.concatenate([y, jnp.asarray(eval_data[1], y.dtype)]))

    opt_state = optimizer.init(params)
    step = 0
    history = {"loss": [], "eval": []}
    config = {"batch_size": batch_size, "n": n}
    ck_path = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_FILE
    if resume and ck_path.exists():
        saved, meta = checkpoint.load(ck_path, _checkpoint_tree(params, opt_state, 0, key))
        if meta["config"] != config:
            raise ValueError(f"fit: checkpoint {ck_path} was written with {meta['config']}, "
                             f"this run has {config}; resuming would not repeat the same run")
        params, state = saved["params"], saved["state"]
        opt_state, step, key = state["opt_state"], state["step"], state["key"]
        history = meta["history"]

    def record_eval(epoch):
        entry = {"epoch": epoch, "step": step}
        losses, correct = (np.asarray(a, np.float64) for a in fns.evaluate(params, eval_x, eval_y))
        for split, rows in splits.items():
            entry[f"{split}_loss"] = float(np.mean(losses[rows]))
            accuracy = float(np.mean(correct[rows]))
            entry[f"{split}_accuracy"] = None if math.isnan(accuracy) else accuracy
        history["eval"].append(entry)

    if step == 0:
        record_eval(0)
    bar = tqdm(total=total_steps, initial=step, disable=not progress, unit="step",
               dynamic_ncols=True, leave=False)
    while step < total_steps:
        epoch = step // steps_per_epoch
        n_steps = min(steps_per_epoch, total_steps - step)
        batches, keys = _plan(key, epoch, n, batch_size, n_steps, step)
        if loop == "scan":
            params, opt_state, values = fns.epoch(params, opt_state, x, y, batches, keys)
            bar.update(n_steps)
        else:
            values = []
            for i in range(n_steps):
                params, opt_state, value = fns.step(params, opt_state, x, y, batches[i], keys[i])
                values.append(value)
                bar.update(1)
            values = jnp.stack(values)
        step += n_steps
        history["loss"].extend(np.asarray(values, np.float64).tolist())
        bar.set_postfix(epoch=epoch + 1, loss=f"{history['loss'][-1]:.4f}")
        record_eval(epoch + 1)
        if ck_path is not None:
            checkpoint.save(ck_path, _checkpoint_tree(params, opt_state, step, key),
                            meta={"config": config, "history": history})
        if on_epoch is not None:
            on_epoch(epoch + 1, params, history)
    bar.close()
    return params, history
