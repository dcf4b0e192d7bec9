"""A model as a table: every layer (children indented under their composite), its output
shape, its parameter count and dtype, and the total, like Keras' ``model.summary()`` and
Flax's ``tabulate``.

Shapes come from ``jax.eval_shape`` (nothing is computed, no params are drawn): the forward
runs abstractly on a batch of one, then the backward's walk visits every child of every
composite with the gradient it would receive, whose shape is the child's output shape.

>>> import jbp
>>> print(jbp.summary(jbp.mlp([4, 8, 3], activation="tanh"), (4,)))
layer                              output shape  params  dtype
--------------------------------------------------------------
input                              (B, 4)
mlp([4, 8, 3], activation='tanh')  (B, 3)            67  float32
  dense(8)                         (B, 8)            40  float32
  tanh()                           (B, 8)             0
  dense(3)                         (B, 3)            27  float32
--------------------------------------------------------------
total: 67 params (268 B)
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jbp.layer import Layer, as_shape, run

_MAX_NAME = 48  # a longer layer name is cut with "…"


class Row(NamedTuple):
    """One layer of the table: its nesting ``depth``, the layer, its per-example output
    shape, and its params' element count and dtype names (a composite's include its
    children's)."""

    depth: int
    layer: Layer
    out_shape: tuple
    params: int
    dtypes: tuple


class _Seen(NamedTuple):
    """What the summary's visit returns for one child: its rows (its own first)."""

    rows: list


def _params_of(tree) -> tuple[int, tuple]:
    leaves = jax.tree_util.tree_leaves(tree)
    dtypes = tuple(sorted({jnp.dtype(a.dtype).name for a in leaves}))
    return sum(int(np.prod(a.shape)) for a in leaves), dtypes


def _rows(layer: Layer, params, cache, dy, depth: int) -> tuple[list, jax.Array]:
    """``layer``'s rows (itself, then its children in the order of its params) and the
    gradient its input would receive."""
    rows = [Row(depth, layer, tuple(dy.shape[1:]), *_params_of(params))]
    if layer.walk is None:
        _, dx = layer.backward(params, cache, dy)
        return rows, dx

    def visit(child, child_params, child_cache, child_dy):
        child_rows, child_dx = _rows(child, child_params, child_cache, child_dy, depth + 1)
        return _Seen(child_rows), child_dx

    seen, dx = layer.walk(params, cache, dy, visit)
    for s in jax.tree_util.tree_leaves(seen, is_leaf=lambda r: isinstance(r, _Seen)):
        rows += s.rows
    return rows, dx


def _trace(model: Layer, in_shape: tuple, input_dtype) -> tuple[list[Row], int, int]:
    """The rows, the params' bytes and the state's element count of ``model``."""
    found = []

    def go(key):
        _, params = model.init(key, in_shape)
        state = model.init_state(in_shape) if model.stateful else None
        x = jnp.zeros((1, *in_shape), input_dtype)
        y, cache, _ = run(model, params, x, state=state)
        rows, _ = _rows(model, params, cache, jnp.zeros_like(y), 0)
        n_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(params))
        found.append((rows, n_bytes, _params_of(state)[0] if state is not None else 0))

    jax.eval_shape(go, jax.random.key(0))
    return found[0]


def _holds_layers(value) -> bool:
    return isinstance(value, Layer) or (isinstance(value, tuple)
                                        and any(_holds_layers(v) for v in value))


def _name(row: Row) -> str:
    """The layer as its call; a composite whose children follow as rows as ``serial(…)``."""
    layer = row.layer
    text = repr(layer)
    if layer.walk is not None and layer.spec is not None and any(
            _holds_layers(v) for _, v in layer.spec.key[1]):  # built from layers given
        text = layer.spec.constructor + "(…)"
    text = "  " * row.depth + text
    return text if len(text) <= _MAX_NAME else text[:_MAX_NAME - 1] + "…"


def _shape_text(shape) -> str:
    return "(" + ", ".join(["B", *map(str, shape)]) + ")"


def _size_text(n_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n_bytes < 1024 or unit == "MiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return ""


def summary(model: Layer, in_shape, *, input_dtype=None) -> str:
    """The table of ``model`` on inputs of per-example shape ``in_shape`` (e.g. ``(40,)``;
    ``(T,)`` token ids for a model that starts with an embedding): one row per layer,
    children indented under their composite, output shapes with ``B`` for the batch, the
    params each layer holds, and the total (with the state a batch_norm keeps). A string;
    :func:`print_summary` prints it.

    ``input_dtype``: the inputs' dtype; None tries float32, then int32 (token ids).
    """
    if not isinstance(model, Layer):
        raise TypeError(f"summary: model must be a jbp Layer, got {type(model).__name__}")
    in_shape = as_shape(in_shape, "summary")
    if input_dtype is not None:
        rows, n_bytes, state_size = _trace(model, in_shape, input_dtype)
    else:
        try:
            rows, n_bytes, state_size = _trace(model, in_shape, jnp.float32)
        except Exception as float_error:  # noqa: BLE001 (a model of token ids, or bad input)
            try:
                rows, n_bytes, state_size = _trace(model, in_shape, jnp.int32)
            except Exception:  # noqa: BLE001
                raise float_error from None
    names = [_name(row) for row in rows]
    shapes = [_shape_text(row.out_shape) for row in rows]
    w_name = max(len("layer"), *map(len, names))
    w_shape = max(len("output shape"), len(_shape_text(in_shape)), *map(len, shapes))
    w_params = max(len("params"), *(len(f"{row.params:,}") for row in rows))
    lines = [f"{'layer':<{w_name}}  {'output shape':<{w_shape}}  {'params':>{w_params}}  dtype"]
    rule = "-" * len(lines[0])
    lines += [rule, f"{'input':<{w_name}}  {_shape_text(in_shape)}"]
    for row, name, shape in zip(rows, names, shapes):
        lines.append(f"{name:<{w_name}}  {shape:<{w_shape}}  {row.params:>{w_params},}  "
                     f"{', '.join(row.dtypes)}".rstrip())
    total = rows[0].params
    kept = f", state: {state_size:,} values (not trained)" if state_size else ""
    lines += [rule, f"total: {total:,} params ({_size_text(n_bytes)}){kept}"]
    return "\n".join(lines)


def print_summary(model: Layer, in_shape, *, input_dtype=None) -> None:
    """Print :func:`summary`'s table."""
    print(summary(model, in_shape, input_dtype=input_dtype))
