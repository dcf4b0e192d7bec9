"""Checkpoints: a pytree of arrays as one atomic ``.npz``, never pickle.

:func:`save` flattens the tree (params, optax state, step, PRNG key, …) into numbered
arrays and stores a JSON description beside them: every leaf's path, shape and dtype, the
tree structure as text, and optional JSON metadata. :func:`load` reads with
``allow_pickle=False`` and rebuilds the tree from a *template* (the same tree as freshly
initialised, e.g. ``{"params": params, "opt_state": optimizer.init(params), ...}``): a
checkpoint whose leaves differ from the template's in path, shape or dtype is refused with
an error naming the first mismatching leaf. PRNG keys (typed key arrays) are stored as
their key data and rewrapped with the template's implementation.

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


def load(path, template):
    """Read the checkpoint at ``path`` into the structure of ``template``.

    Returns ``(tree, meta)``: ``tree`` has ``template``'s structure, with numpy arrays
    (typed PRNG keys and Python scalars where the template has them); ``meta`` is what
    :func:`save` was given. Raises FileNotFoundError for a missing file and ValueError for
    a corrupt one or one from a different model, naming the leaf that differs.
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
    s_paths = [leaf["path"] for leaf in index["leaves"]]
    if s_paths != t_paths:
        missing = [p for p in t_paths if p not in s_paths]
        extra = [p for p in s_paths if p not in t_paths]
        first = missing[0] if missing else extra[0] if extra else next(
            a for a, b in zip(t_paths, s_paths) if a != b)
        raise ValueError(f"{path}: checkpoint is from a different model: leaf {first} "
                         f"{'is missing from the checkpoint' if first in missing else 'differs'}"
                         f" (missing {missing}, unexpected {extra})")
    bad = [(p, want, got) for p, want, got in zip(t_paths, t_arrays, stored)
           if want.shape != got.shape or want.dtype != got.dtype]
    if bad:
        p, want, got = bad[0]
        raise ValueError(f"{path}: checkpoint is from a different model: leaf {p} has "
                         f"shape {got.shape} dtype {got.dtype} in the checkpoint, the model "
                         f"expects shape {want.shape} dtype {want.dtype}; {len(bad)} leaves "
                         f"differ: {', '.join(b[0] for b in bad[:8])}"
                         f"{', ...' if len(bad) > 8 else ''}")
    if index["structure"] != t_structure:
        raise ValueError(f"{path}: checkpoint tree structure differs from the template:\n"
                         f"  checkpoint: {index['structure']}\n  template:   {t_structure}")
    leaves = []
    for want, got in zip(t_leaves, stored):
        if _is_key(want):
            leaves.append(jax.random.wrap_key_data(got, impl=jax.random.key_impl(want)))
        elif isinstance(want, (bool, int, float)):
            leaves.append(type(want)(got))
        else:
            leaves.append(got)
    return jax.tree_util.tree_unflatten(treedef, leaves), index["meta"]
