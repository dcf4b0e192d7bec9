"""The training loop behind :func:`jbp.fit`, given arguments that ``jbp.train`` checked.

Four parts, in the order fit uses them:

- :class:`FitConfig`: fit's arguments once checked (``jbp.train._config`` builds it);
- :func:`resume`: the :class:`Run` to start from, fresh or restored from a checkpoint;
- :func:`epoch_runner`: how an epoch's steps run (one ``lax.scan``, a Python loop over the
  jitted step, or either data-parallel over a mesh) behind one :class:`EpochRunner`;
- :class:`Bookkeeping`: what happens after each epoch (the NaN check, history, progress,
  evaluation, checkpoint, ``on_epoch``).
"""

from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jbp import checkpoint, data_parallel
from jbp.evaluation import make_evaluator


# ---------------------------------------------------------------------------- configuration

class FitConfig(NamedTuple):
    """:func:`jbp.fit`'s arguments once checked (by ``jbp.train._config``): what the run
    goes by."""

    optimizer: optax.GradientTransformation  # make_optimizer's
    fns: NamedTuple  # jbp.train.Compiled: the jitted step, epoch and evaluation
    state: object  # the model's state to start from; {} for a model without
    loop: str  # "scan" or "python" ("auto" decided)
    key: jax.Array  # a typed PRNG key
    x: object  # training inputs: an array, or a WithSide of the inputs and side inputs
    y: jax.Array  # training targets, one row per example
    splits: dict  # what is evaluated: {"train": (x, y)} and "test" with eval data
    batch_size: int
    eval_batch_size: int
    total_steps: int  # the whole run's, a resumed checkpoint's steps included
    stop_on_nonfinite: bool
    resume: bool
    overwrite: bool
    checkpoint_path: Path | None  # checkpoint_dir / jbp.train.CHECKPOINT_FILE, or None
    mesh: object  # a jax Mesh with a "data" axis, or None for one device
    shard_params: bool
    progress: bool
    on_epoch: Callable | None

    @property
    def n(self) -> int:
        """The number of training examples."""
        return len(self.y)

    @property
    def steps_per_epoch(self) -> int:
        """``n // batch_size``: the remainder of the shuffled data is left out."""
        return self.n // self.batch_size

    @property
    def run_config(self) -> dict:
        """What a checkpoint must share with this run to be continued by it (JSON)."""
        return {"batch_size": self.batch_size, "n": self.n}


# ---------------------------------------------------------------------------- resume

class Run(NamedTuple):
    """Where a training run stands: what a checkpoint holds, and what an epoch starts from."""

    params: object
    opt_state: object
    state: object  # the model's state; {} for a model without
    step: int  # the steps taken so far
    key: jax.Array  # the run's PRNG key: with the step, it decides every batch and dropout mask
    history: dict  # {"loss": [...], "eval": [...]}, as fit returns it


def _checkpoint_tree(run: Run) -> dict:
    """What a checkpoint stores of ``run`` (its history goes in the metadata)."""
    # "params" sorts before "state", so a different model is reported by a params leaf first.
    tree = {"params": run.params,
            "state": {"opt_state": run.opt_state, "step": run.step, "key": run.key}}
    if jax.tree_util.tree_leaves(run.state):  # batch_norm's running statistics
        tree["state"]["model_state"] = run.state
    return tree


_OPT_STATE = "['state']['opt_state']"  # where the optimizer state's leaves live in that tree


def _restore(path, template, config, optimizer):
    """``(tree, meta)`` of the checkpoint at ``path`` if it continues this run: the same
    model (else "different model", naming the leaf), the same optimizer (else "different
    optimizer"; ``optimizer`` is :func:`jbp.train.describe_optimizer`'s) and the same
    ``config`` (:attr:`FitConfig.run_config`)."""
    try:
        tree, meta = checkpoint.load(path, template)
    except checkpoint.Mismatch as err:
        saved = checkpoint.read_meta(path).get("optimizer")
        if (err.leaf or "").startswith(_OPT_STATE):
            raise _different_optimizer(path, saved, optimizer, err.leaf) from None
        if err.leaf is None and saved not in (None, optimizer):  # only the structure differs
            raise _different_optimizer(path, saved, optimizer) from None
        raise
    if meta.get("optimizer") not in (None, optimizer):  # None: written before it was recorded
        raise _different_optimizer(path, meta["optimizer"], optimizer)
    if meta["config"] != config:
        raise ValueError(f"fit: checkpoint {path} was written with {meta['config']}, "
                         f"this run has {config}; resuming would not repeat the same run")
    return tree, meta


def _different_optimizer(path, saved, optimizer, leaf=None) -> ValueError:
    return ValueError(f"fit: checkpoint {path} was written with a different optimizer: "
                      f"{_optimizer_text(saved)}; this run uses {_optimizer_text(optimizer)}"
                      + (f" (the optimizer state differs at leaf {leaf})" if leaf else ""))


def _optimizer_text(description) -> str:
    if description is None:
        return "an optimizer it did not record"
    if description["name"] is None:
        return f"an optax GradientTransformation with state {description['state']}"
    if description["learning_rate"] == "schedule":
        return f"{description['name']!r} with a learning-rate schedule"
    return f"{description['name']!r} with learning_rate {description['learning_rate']:g}"


def _epochs(steps, steps_per_epoch) -> str:
    epochs = steps / steps_per_epoch
    return f"{epochs:g} epoch{'' if epochs == 1 else 's'}"


def resume(cfg: FitConfig, fresh: Run, optimizer: dict) -> Run:
    """The run to go on from: ``fresh`` (step 0), or the one restored from the checkpoint at
    ``cfg.checkpoint_path`` with ``cfg.resume``. A checkpoint there without ``resume`` or
    ``overwrite`` is refused (overwrite: it is replaced after the first epoch); one to resume
    must continue this run (:func:`_restore`; ``optimizer`` is
    :func:`jbp.train.describe_optimizer`'s) and hold at most ``cfg.total_steps`` steps."""
    path = cfg.checkpoint_path
    if path is None or not path.exists():
        return fresh
    if not (cfg.resume or cfg.overwrite):
        _refuse_overwrite(path)
    if not cfg.resume:
        return fresh
    saved, meta = _restore(path, _checkpoint_tree(fresh), cfg.run_config, optimizer)
    kept = saved["state"]
    run = Run(saved["params"], kept["opt_state"], kept.get("model_state", fresh.state),
              kept["step"], kept["key"], meta["history"])
    held, asked, per_epoch = run.step, cfg.total_steps, cfg.steps_per_epoch
    if held > asked:
        raise ValueError(f"fit: checkpoint {path} already holds {held} steps "
                         f"({_epochs(held, per_epoch)}); asked for {asked} steps "
                         f"({_epochs(asked, per_epoch)}). epochs/steps count the whole run, "
                         f"the checkpoint's steps included")
    return run


def _refuse_overwrite(path):
    try:
        held = f" ({len(checkpoint.read_meta(path)['history']['loss'])} steps)"
    except Exception:  # unreadable: refuse all the same, without the count
        held = ""
    raise ValueError(f"fit: {path} already holds a checkpoint{held}; pass resume=True to "
                     f"continue it, or overwrite=True to start afresh and replace it")


# ---------------------------------------------------------------------------- epoch runners

class EpochRunner(NamedTuple):
    """How the steps of an epoch run: one ``lax.scan``, a Python loop over the jitted step,
    or either of them data-parallel over a mesh; the rest of fit does not tell them apart."""

    # (params, opt_state, state, batches (S, B), keys (S,), bar) -> (params, opt_state,
    # state, losses (S,)): the S steps over the rows in batches, counted on the tqdm bar
    run_epoch: Callable
    to_host: Callable  # tree -> the tree on this host (on a mesh every process must call it)
    is_main: bool  # whether this process shows progress and writes the checkpoint


def epoch_runner(cfg: FitConfig, model, loss, grad, run: Run) -> tuple[EpochRunner, Run]:
    """The runner of ``cfg.loop`` on one device or, with ``cfg.mesh``, data-parallel; and
    ``run`` where that runner wants it (on a mesh: params, optimizer state and model state
    placed on it, once every process has agreed to start at ``run.step``)."""
    if cfg.mesh is None:
        return _one_device_runner(cfg.fns, cfg.loop, cfg.x, cfg.y), run
    dp = data_parallel.DataParallel(model, loss, grad, cfg.optimizer, cfg.mesh,
                                    cfg.shard_params, cfg.x, cfg.y)
    dp.agree(run.step, cfg.checkpoint_path)
    run = run._replace(params=dp.place(run.params), opt_state=dp.place(run.opt_state),
                       state=data_parallel.place(run.state, cfg.mesh))

    def run_epoch(params, opt_state, state, batches, keys, bar):
        return dp.run_epoch(params, opt_state, state, batches, keys, cfg.loop, bar)

    return EpochRunner(run_epoch, data_parallel.gather, dp.is_main), run


def _one_device_runner(fns, loop: str, x, y) -> EpochRunner:
    """The runner on the default device: ``fns.epoch`` (one scan) for ``loop="scan"``,
    ``fns.step`` once per batch for ``"python"``; the data ``x, y`` are indexed on device."""

    def scan_epoch(params, opt_state, state, batches, keys, bar):
        params, opt_state, state, losses = fns.epoch(params, opt_state, state, x, y,
                                                     batches, keys)
        bar.update(len(batches))
        return params, opt_state, state, losses

    def python_epoch(params, opt_state, state, batches, keys, bar):
        losses = []
        for i in range(len(batches)):
            params, opt_state, state, value = fns.step(params, opt_state, state, x, y,
                                                       batches[i], keys[i])
            losses.append(value)
            bar.update(1)
        return params, opt_state, state, jnp.stack(losses)

    return EpochRunner(scan_epoch if loop == "scan" else python_epoch,
                       to_host=lambda tree: tree, is_main=True)


# ---------------------------------------------------------------------------- bookkeeping

def _check_finite(values, first_step, epoch):
    """Raise FloatingPointError naming the first non-finite minibatch loss in ``values``."""
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        at = first_step + int(bad[0])
        raise FloatingPointError(
            f"fit: the minibatch loss is {values[bad[0]]} at step {at + 1} "
            f"(history['loss'][{at}]), epoch {epoch}; stopped before that epoch's evaluation "
            f"and checkpoint. Lower the learning rate, or look for NaN/inf in the params and "
            f"data and for labels outside [0, classes); stop_on_nonfinite=False trains on "
            f"regardless")


class Bookkeeping:
    """What fit does around the epochs, besides training: it evaluates into the history,
    records each epoch's minibatch losses (stopping at a non-finite one), shows progress,
    writes the checkpoint and calls ``on_epoch``.

    ``optimizer`` is :func:`jbp.train.describe_optimizer`'s (the checkpoint records it);
    ``stateful`` says whether ``on_epoch`` is given the model's state."""

    def __init__(self, cfg: FitConfig, runner: EpochRunner, optimizer: dict, stateful: bool):
        self.cfg, self.runner, self.optimizer, self.stateful = cfg, runner, optimizer, stateful
        self.evaluate = make_evaluator(cfg.fns.evaluate, cfg.splits, cfg.eval_batch_size)

    def progress_bar(self, run: Run) -> tqdm:
        """A tqdm bar over the run's steps, from ``run.step`` on; silent without
        ``cfg.progress`` and in every process but the main one."""
        return tqdm(total=self.cfg.total_steps, initial=run.step, unit="step",
                    disable=not self.cfg.progress or not self.runner.is_main,
                    dynamic_ncols=True, leave=False)

    def record_eval(self, run: Run, epoch: int) -> None:
        """Append the evaluation of ``run``'s params and state after ``epoch`` epochs (0:
        before the first) to ``run.history["eval"]``."""
        params, state = self.runner.to_host((run.params, run.state))
        run.history["eval"].append({"epoch": epoch, "step": run.step,
                                    **self.evaluate(params, state)})

    def end_epoch(self, run: Run, trained, losses, epoch: int, bar) -> Run:
        """The run after epoch ``epoch`` (counting from 1), which took ``run`` to
        ``trained = (params, opt_state, state)`` with minibatch ``losses (S,)``: checked
        for NaN/inf (``cfg.stop_on_nonfinite``: before anything is recorded), its losses in
        the history and on the bar, evaluated, checkpointed, and passed to ``on_epoch``."""
        losses = np.asarray(losses, np.float64)
        if self.cfg.stop_on_nonfinite:
            _check_finite(losses, run.step, epoch)
        params, opt_state, state = trained
        run = run._replace(params=params, opt_state=opt_state, state=state,
                           step=run.step + len(losses))
        run.history["loss"].extend(losses.tolist())
        bar.set_postfix(epoch=epoch, loss=f"{run.history['loss'][-1]:.4f}")
        self.record_eval(run, epoch)
        if self.cfg.checkpoint_path is not None:
            self.save(run)
        if self.cfg.on_epoch is not None:
            self.cfg.on_epoch(epoch, run.params, run.history,
                              **({"state": run.state} if self.stateful else {}))
        return run

    def save(self, run: Run) -> None:
        """Write ``run`` to ``cfg.checkpoint_path`` (atomically), with the run's config,
        optimizer and history. On a mesh every process must call it (the gather is a
        collective); only the main one writes."""
        tree = self.runner.to_host(_checkpoint_tree(run))
        if self.runner.is_main:
            checkpoint.save(self.cfg.checkpoint_path, tree,
                            meta={"config": self.cfg.run_config, "optimizer": self.optimizer,
                                  "history": run.history})
