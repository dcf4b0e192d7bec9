"""Checkpoints: a pytree of arrays as one atomic ``.npz``, never pickle.

:func:`save` flattens the tree (params, optax state, step, PRNG key, …) into numbered
arrays and stores a JSON description beside them: every leaf's path, shape and dtype, the
tree structure as text, and optional JSON metadata. :func:`load` reads with
``allow_pickle=False`` and rebuilds the tree from a *template* (the same tree as freshly
initialised, e.g. ``{"params": params, "opt_state": optimizer.init(params), ...}``): a
checkpoint whose leaves differ from the template's in path, shape or dtype is refused with
a :class:`Mismatch` error (a ValueError) naming the first mismatching leaf. PRNG keys
(typed key arrays) are stored as their key data and rewrapped with the template's
implementation.

>>> save("run/checkpoint.npz", {"params": params, "step": 3})  # doctest: +SKIP
>>> tree, meta = load("run/checkpoint.npz", {"params": params, "step": 0})  # doctest: +SKIP
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jbp.io import write_atomic

FORMAT = "jbp-checkpoint-1"
_INDEX = "__index__"


class Mismatch(ValueError):
    """A checkpoint that does not fit the template. ``leaf`` is the path (``keystr``) of the
    first leaf that differs, in the tree's flattening order, or None when only the tree
    structure differs: e.g. ``fit`` tells a different model from a different optimizer by it."""

    def __init__(self, message: str, leaf: str | None):
        super().__init__(message)
        self.leaf = leaf


def _is_key(leaf) -> bool:
    return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _describe(tree):
    """(paths, host arrays, structure text) of ``tree``; keys become their key data."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths, arrays = [], []
    for path, leaf in flat:
        paths.append(jax.tree_util.keystr(path))
        arrays.append(np.asarray(jax.random.key_data(leaf) if _is_key(leaf) else leaf))
    return paths, arrays, str(treedef)


def save(path, tree, meta=None) -> Path:
    """Write ``tree`` (a pytree of arrays / scalars) and JSON-able ``meta`` to ``path``.

    The write is atomic: a reader sees the previous checkpoint or this one, never a torn file.
    """
    paths, arrays, structure = _describe(tree)
    index = {
        "format": FORMAT,
        "structure": structure,
        "leaves": [{"path": p, "shape": list(a.shape), "dtype": a.dtype.str}
                   for p, a in zip(paths, arrays)],
        "meta": meta,
    }
    payload = {f"leaf_{i}": a for i, a in enumerate(arrays)}
    payload[_INDEX] = np.array(json.dumps(index))
    return write_atomic(path, lambda f: np.savez(f, **payload))


def read_meta(path):
    """Only the JSON metadata stored with a checkpoint."""
    with np.load(Path(path), allow_pickle=False) as f:
        return _read_index(f)["meta"]


def _read_index(f) -> dict:
    try:
        index = json.loads(str(f[_INDEX]))
    except (KeyError, ValueError) as err:
        raise ValueError(f"not a jbp checkpoint ({err})") from None
    if index.get("format") != FORMAT:
        raise ValueError(f"unknown checkpoint format {index.get('format')!r}, expected {FORMAT!r}")
    return index


def _first_difference(want, got):
    """``(path, text)`` of the first leaf where the template's ``(path, shape, dtype)`` list
    ``want`` and the checkpoint's ``got`` part, in flattening order: a difference early in
    the tree (e.g. the params) is named before its consequences later on (their optimizer
    state)."""
    at = next(i for i, (a, b) in enumerate(zip(want + [None], got + [None])) if a != b)
    w = want[at] if at < len(want) else None
    g = got[at] if at < len(got) else None
    if w is not None and g is not None and w[0] == g[0]:  # same leaf, other shape or dtype
        stored = {p: rest for p, *rest in got}
        bad = [p for p, *rest in want if p in stored and stored[p] != rest]
        return w[0], (f"has shape {g[1]} dtype {g[2]} in the checkpoint, the model expects "
                      f"shape {w[1]} dtype {w[2]}; {len(bad)} leaves differ: "
                      f"{', '.join(bad[:8])}{', ...' if len(bad) > 8 else ''}")
    t_paths, s_paths = [p for p, *_ in want], [p for p, *_ in got]
    missing = [p for p in t_paths if p not in s_paths]
    extra = [p for p in s_paths if p not in t_paths]
    if w is not None and w[0] in missing:
        return w[0], f"is missing from the checkpoint (missing {missing}, unexpected {extra})"
    return g[0], f"differs (missing {missing}, unexpected {extra})"


def load(path, template):
    """Read the checkpoint at ``path`` into the structure of ``template``.

    Returns ``(tree, meta)``: ``tree`` has ``template``'s structure, with numpy arrays
    (typed PRNG keys and Python scalars where the template has them); ``meta`` is what
    :func:`save` was given. Raises FileNotFoundError for a missing file, ValueError for a
    corrupt one and :class:`Mismatch` for one that does not fit ``template``, naming the
    leaf that differs.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    t_paths, t_arrays, t_structure = _describe(template)
    t_leaves, treedef = jax.tree_util.tree_flatten(template)
    try:
        with np.load(path, allow_pickle=False) as f:
            index = _read_index(f)
            stored = [f[f"leaf_{i}"] for i in range(len(index["leaves"]))]
    except Exception as err:  # not a zip, truncated, bad CRC, missing member, bad index
        raise ValueError(f"{path}: corrupt or unreadable checkpoint "
                         f"({type(err).__name__}: {err})") from None
    template_leaves = [(p, a.shape, a.dtype) for p, a in zip(t_paths, t_arrays)]
    stored_leaves = [(leaf["path"], a.shape, a.dtype) for leaf, a in zip(index["leaves"], stored)]
    if template_leaves != stored_leaves:
        leaf, text = _first_difference(template_leaves, stored_leaves)
        raise Mismatch(f"{path}: checkpoint is from a different model: leaf {leaf} {text}", leaf)
    if index["structure"] != t_structure:
        raise Mismatch(f"{path}: checkpoint tree structure differs from the template:\n"
                       f"  checkpoint: {index['structure']}\n  template:   {t_structure}", None)
    leaves = []
    for want, got in zip(t_leaves, stored):
        if _is_key(want):
            leaves.append(jax.random.wrap_key_data(got, impl=jax.random.key_impl(want)))
        elif isinstance(want, (bool, int, float)):
            leaves.append(type(want)(got))
        else:
            leaves.append(got)
    return jax.tree_util.tree_unflatten(treedef, leaves), index["meta"]
