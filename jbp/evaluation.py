"""Evaluation: a model's mean loss and accuracy on data splits, a chunk of rows at a time.

:func:`make_evaluator` stacks the rows of the splits (train and test), pads them to a
multiple of the chunk size and runs :func:`make_evaluate` over the chunks with ``lax.map``
inside one jitted call: memory grows with the chunk, not with the data, and the splits
share one compile. Accuracy compares the output's argmax with the target's class where a
class is defined (integer labels, or rows of probabilities such as one-hot targets).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from jbp.layer import Layer, run
from jbp.losses import Loss
from jbp.masks import split_side


def make_evaluate(model: Layer, loss: Loss):
    """``evaluate(params, state, x (N, ...), y (N, ...)) -> (losses (N,), correct (N,))`` in
    evaluation mode (``state``: the model's, ``{}`` for a model without): per-example losses, and whether the argmax of the output (N, C) is the
    class of the target: an integer label (N,), or the argmax of a target row (N, C), C > 1,
    that is a probability vector (non-negative, summing to 1: one-hot or smoothed). NaN
    where accuracy does not apply (other targets, e.g. regression).
    """

    def evaluate(params, state, x, y):
        x, side = split_side(x)
        out = run(model, params, x, train=False, state=state, side=side)[0]
        losses = loss.per_example(out, y)
        correct = jnp.full(losses.shape, jnp.nan, jnp.float32)
        if out.ndim == 2 and y.ndim == 1 and jnp.issubdtype(y.dtype, jnp.integer):
            correct = (jnp.argmax(out, axis=-1) == y).astype(jnp.float32)
        elif out.ndim == 2 and y.shape == out.shape and out.shape[1] > 1:
            hit = (jnp.argmax(out, axis=-1) == jnp.argmax(y, axis=-1)).astype(jnp.float32)
            probability = jnp.all(y >= 0, axis=-1) & (jnp.abs(jnp.sum(y, axis=-1) - 1) <= 1e-3)
            correct = jnp.where(probability, hit, correct)
        return losses, correct

    return evaluate


def make_evaluate_chunks(evaluate):
    """``evaluate`` over rows stacked in chunks ``xs (K, C, ...)``, ``ys (K, C, ...)``,
    one chunk at a time (``lax.map``): ``(params, state, xs, ys) -> (losses (K*C,), correct
    (K*C,))``."""

    def evaluate_chunks(params, state, xs, ys):
        losses, correct = jax.lax.map(lambda chunk: evaluate(params, state, *chunk), (xs, ys))
        return losses.reshape(-1), correct.reshape(-1)

    return evaluate_chunks


def check_split(model, loss, params, state, x, y, name):
    """Trace the evaluation on one split's shapes (``eval_shape``: no compile, no FLOPs), so
    a mismatch is reported with that split's name and the shapes the user passed."""
    try:
        jax.eval_shape(make_evaluate(model, loss), params, state, x, y)
    except (TypeError, ValueError, IndexError) as err:
        x = split_side(x)[0]
        raise ValueError(f"{name} (inputs {x.dtype}{list(x.shape)}, targets "
                         f"{y.dtype}{list(y.shape)}) does not fit the model and loss: "
                         f"{err}") from None


def _stack(arrays, chunk):
    """The rows of ``arrays`` (arrays, or pytrees of them alike) one after another,
    zero-padded and shaped ``(K, chunk, ...)``."""

    def stack(*leaves):
        rows = jnp.concatenate(leaves) if len(leaves) > 1 else leaves[0]
        rows = jnp.pad(rows, [(0, -len(rows) % chunk)] + [(0, 0)] * (rows.ndim - 1))
        return rows.reshape(-1, chunk, *rows.shape[1:])

    return jax.tree_util.tree_map(stack, *arrays)


def make_evaluator(evaluate_chunks, splits, eval_batch_size):
    """``(params, state) -> {"<split>_loss": ..., "<split>_accuracy": ...}`` for ``splits``
    (``{"train": (x, y), "test": (x, y)}``): each split's mean per-example loss and accuracy
    (None where it does not apply), evaluated in chunks of ``eval_batch_size`` rows.
    Splits whose examples share shape and dtype are stacked into one call, so evaluation
    compiles once; the padding rows of the last chunk are dropped before the means.
    """
    names = list(splits)
    leaves = {name: jax.tree_util.tree_leaves(splits[name]) for name in names}
    alike = all(jax.tree_util.tree_structure(splits[name]) == jax.tree_util.tree_structure(
        splits[names[0]]) and all(a.shape[1:] == b.shape[1:] and a.dtype == b.dtype
                                  for a, b in zip(leaves[names[0]], leaves[name]))
        for name in names)
    plans = []
    for group in [names] if alike else [[name] for name in names]:
        sizes = [len(splits[name][1]) for name in group]
        chunk = min(eval_batch_size, sum(sizes))
        xs, ys = (_stack([splits[name][i] for name in group], chunk) for i in (0, 1))
        ends = np.cumsum(sizes)
        plans.append((xs, ys, {name: slice(end - size, end)
                               for name, size, end in zip(group, sizes, ends)}))

    def evaluator(params, state):
        entry = {}
        for xs, ys, rows in plans:
            losses, correct = (np.asarray(a, np.float64)
                               for a in evaluate_chunks(params, state, xs, ys))
            for name, r in rows.items():
                entry[f"{name}_loss"] = float(np.mean(losses[r]))
                accuracy = float(np.mean(correct[r]))
                entry[f"{name}_accuracy"] = None if math.isnan(accuracy) else accuracy
        return entry

    return evaluator
