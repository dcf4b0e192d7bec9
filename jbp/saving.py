"""Saving a trained model for later: the model's description, its params and its state in
one file, rebuilt without ``eval`` or pickle.

A layer built by a :func:`jbp.constructor` knows the call that built it (``layer.spec.key``:
the constructor's qualified name and its arguments). :func:`save_model` writes that call as
JSON, arguments that are layers (``serial``'s children, ``residual``'s block) as calls of
their own, beside the arrays; :func:`load_model` looks every name up in a registry of
constructors and calls them again. The registry holds jbp's own constructors; a layer of
your own joins it with :func:`register_constructor`. Nothing else in the file is executed.

The file is an ``.npz`` (``np.load(allow_pickle=False)``) written atomically, with a format
version and a sha256 over the description and every array: a file of another version, or
one changed after it was written, is refused with a ValueError saying which.

>>> save_model("model.npz", model, params)            # doctest: +SKIP
>>> model, params, state = load_model("model.npz")    # doctest: +SKIP
>>> logits = predict(model, params, x_test, batch_size=256)   # doctest: +SKIP
"""

import hashlib
import inspect
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jbp.io import write_atomic
from jbp.layer import Layer, constructor

FORMAT = "jbp-model-1"
_INDEX = "__index__"
# Every function that jbp.constructor returns runs this one code object: how a constructor
# is told from any other function without a mark on it.
_BUILD_CODE = constructor(lambda: None).__code__
_REGISTRY: dict = {}


class FormatError(ValueError):
    """A file that is not a jbp model of this format version, or was changed."""


# ---------------------------------------------------------------------------- the registry

def _is_constructor(fn) -> bool:
    return getattr(fn, "__code__", None) is _BUILD_CODE


def _qualified_name(fn) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"  # as jbp.constructor records it in spec.key


def register_constructor(fn, name: str | None = None):
    """Let :func:`load_model` rebuild layers made by ``fn``, a function decorated with
    :func:`jbp.constructor`; returns ``fn``, so it also works as a decorator (above
    ``@jbp.constructor``). ``name`` defaults to the qualified name that ``fn``'s layers
    record (``module.function``); give it where the loading program defines ``fn`` in
    another module than the saving one did."""
    if not _is_constructor(fn):
        raise TypeError(f"register_constructor: expected a function decorated with "
                        f"@jbp.constructor, got {fn!r}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"register_constructor: name must be a str, got {name!r}")
    _REGISTRY[name or _qualified_name(fn)] = fn
    return fn


def _registry() -> dict:
    """jbp's own constructors (found in its loaded modules) and the registered ones."""
    found = {}
    for module_name, module in list(sys.modules.items()):
        if module_name == "jbp" or module_name.startswith("jbp."):
            for value in vars(module).values():
                if _is_constructor(value) and value.__module__.startswith("jbp"):
                    found[_qualified_name(value)] = value
    return {**found, **_REGISTRY}


# ---------------------------------------------------------------------------- describing

def _scalar_type_name(value):
    """``'float32'`` for ``jnp.float32`` / ``np.float32`` (a scalar type), else None."""
    if isinstance(value, type) and (hasattr(value, "dtype") or issubclass(value, np.generic)):
        try:
            return jnp.dtype(value).name
        except TypeError:
            return None
    return None


def _encode(value, where: str):
    """A constructor argument as JSON: numbers, strings, None and bools as they are; tuples,
    dtypes and layers as tagged objects. Anything else raises, naming ``where``."""
    if type(value).__name__ == "_ById":  # jbp.layer's wrapper of an argument with a shape
        value = value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Layer):
        return {"layer": describe(value)}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, where) for v in value]}
    name = _scalar_type_name(value)
    if name is not None:
        kind = "jax" if getattr(jnp, name, None) is value else "numpy"
        return {"scalar_type": name, "of": kind}
    if isinstance(value, np.dtype):
        return {"dtype": value.name}
    raise ValueError(f"save_model: {where} cannot be saved: it is a "
                     f"{type(value).__name__} ({value!r:.60}); a saved model's constructor "
                     f"arguments must be numbers, strings, bools, None, tuples, dtypes or "
                     f"layers")


def describe(layer: Layer) -> dict:
    """The JSON description of ``layer``: ``{"constructor": name, "args": [[arg, value],
    ...]}`` from the call that built it. Raises a ValueError naming the layer that cannot
    be described (not built by a constructor, or an argument JSON cannot hold)."""
    if not isinstance(layer, Layer):
        raise TypeError(f"save_model: model must be a jbp Layer, got {type(layer).__name__}")
    if layer.spec is None:
        raise ValueError(f"save_model: layer {layer!r} cannot be saved: it was not built by a "
                         f"function decorated with @jbp.constructor, so there is no call to "
                         f"record")
    name, arguments = layer.spec.key
    args = [[arg, _encode(value, f"argument {arg!r} of {layer!r}")] for arg, value in arguments]
    return {"constructor": name, "args": args}


def _decode(value, who: str):
    if not isinstance(value, dict):
        return value
    if "layer" in value:
        return build(value["layer"], who)
    if "tuple" in value:
        return tuple(_decode(v, who) for v in value["tuple"])
    if "scalar_type" in value:
        return getattr(jnp if value["of"] == "jax" else np, value["scalar_type"])
    if "dtype" in value:
        return np.dtype(value["dtype"])
    raise ValueError(f"{who}: unknown argument encoding {value!r}")


def build(description: dict, who: str = "load_model") -> Layer:
    """The layer that :func:`describe` described, rebuilt by calling its constructor from
    the registry (see :func:`register_constructor`) with the recorded arguments."""
    name = description["constructor"]
    registry = _registry()
    if name not in registry:
        short = name.rsplit(".", 1)[-1]
        how = ("register it first, with jbp.register_constructor({0}): load_model rebuilds "
               "only the constructors it knows" if who == "save_model" else
               "import the module that defines it and call jbp.register_constructor({0}) "
               "(or jbp.register_constructor({0}, name={1!r})) before loading")
        raise ValueError(f"{who}: unknown constructor {name!r}: " + how.format(short, name))
    fn = registry[name]
    parameters = inspect.signature(fn).parameters
    args, kwargs = [], {}
    for arg, encoded in description["args"]:
        if arg not in parameters:
            raise ValueError(f"{who}: constructor {name!r} takes no argument {arg!r}; "
                             f"its arguments are {list(parameters)}")
        value, kind = _decode(encoded, who), parameters[arg].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            args.extend(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            kwargs.update(dict(value))
        elif kind is inspect.Parameter.KEYWORD_ONLY:
            kwargs[arg] = value
        else:
            args.append(value)
    return fn(*args, **kwargs)


# ---------------------------------------------------------------------------- pytrees

def _flatten(tree, leaves: list, what: str):
    """``tree`` (dicts with str keys, tuples, lists, None, arrays) as JSON with every array
    replaced by its index into ``leaves``."""
    if isinstance(tree, dict):
        if not all(isinstance(k, str) for k in tree):
            raise ValueError(f"save_model: {what} has a dict with non-str keys {list(tree)}")
        return {"dict": {k: _flatten(v, leaves, what) for k, v in tree.items()}}
    if isinstance(tree, (tuple, list)) and not hasattr(tree, "_fields"):
        kind = "tuple" if isinstance(tree, tuple) else "list"
        return {kind: [_flatten(v, leaves, what) for v in tree]}
    if tree is None:
        return None
    if isinstance(tree, (jax.Array, np.ndarray, np.generic, int, float)) and not isinstance(
            tree, bool):
        if isinstance(tree, jax.Array) and jnp.issubdtype(tree.dtype, jax.dtypes.prng_key):
            raise ValueError(f"save_model: {what} holds a PRNG key, which is not a parameter")
        leaves.append(np.asarray(tree))
        return {"leaf": len(leaves) - 1}
    raise ValueError(f"save_model: {what} holds a {type(tree).__name__}; params and state "
                     f"must be dicts, tuples and lists of arrays")


def _unflatten(node, leaves: list):
    if node is None:
        return None
    if "dict" in node:
        return {k: _unflatten(v, leaves) for k, v in node["dict"].items()}
    if "tuple" in node:
        return tuple(_unflatten(v, leaves) for v in node["tuple"])
    if "list" in node:
        return [_unflatten(v, leaves) for v in node["list"]]
    return leaves[node["leaf"]]


def _digest(index: dict, arrays: list) -> str:
    """sha256 over the JSON description and every array's dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(index, sort_keys=True).encode())
    for a in arrays:
        h.update(f"|{a.dtype.name}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------- save and load

def _check_fits(model: Layer, params, in_shape, where: str):
    """Raise a ValueError unless ``params`` has the structure, shapes and dtypes that
    ``model.init`` gives for ``in_shape``."""
    _, want = jax.eval_shape(lambda k: model.init(k, in_shape), jax.random.key(0))
    spec = lambda t: jax.tree_util.tree_map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype).name), t)  # noqa: E731
    got_tree, want_tree = spec(params), spec(want)
    if got_tree != want_tree:
        raise ValueError(f"{where}: params do not fit {model!r} on inputs of shape "
                         f"{tuple(in_shape)}: expected {want_tree}, got {got_tree}")


def save_model(path, model: Layer, params, state=None, *, in_shape=None) -> Path:
    """Write ``model`` (its description), ``params`` and ``state`` (a model with batch_norm
    keeps state; None otherwise) to ``path`` (an ``.npz``), atomically.

    ``in_shape`` (per example, e.g. ``(40,)``) is optional: given, the params are checked
    against ``model.init`` for it now and again at load time, and it is stored for
    :func:`load_model`'s caller. Raises a ValueError naming the layer or argument that
    cannot be saved, before anything is written.
    """
    description = describe(model)
    if build(description, "save_model") != model:  # e.g. an argument JSON holds only approximately
        raise ValueError(f"save_model: {model!r} does not rebuild to an equal model from its "
                         f"description {description}")
    if in_shape is not None:
        in_shape = tuple(int(d) for d in in_shape)
        _check_fits(model, params, in_shape, "save_model")
    arrays: list = []
    index = {"format": FORMAT, "model": description, "text": repr(model),
             "in_shape": None if in_shape is None else list(in_shape),
             "params": _flatten(params, arrays, "params"),
             "state": _flatten(state, arrays, "state"),
             "arrays": [{"dtype": a.dtype.name, "shape": list(a.shape)} for a in arrays]}
    index["sha256"] = _digest(index, arrays)
    payload = {f"a{i}": a.view(np.uint8) if a.dtype.name == "bfloat16" else a
               for i, a in enumerate(arrays)}
    payload[_INDEX] = np.array(json.dumps(index))
    return write_atomic(path, lambda f: np.savez(f, **payload))


def read_index(path) -> dict:
    """The JSON index of a model file (format, description, ``text``, ``in_shape``, the
    tree layout of params and state, sha256), without loading the arrays."""
    with np.load(Path(path), allow_pickle=False) as f:
        return _read_index(f, Path(path))


def _read_index(f, path: Path) -> dict:
    try:
        index = json.loads(str(f[_INDEX]))
    except KeyError:
        raise FormatError(f"load_model: {path} is not a jbp model file (no description in it; "
                         f"a checkpoint of fit is read by jbp.checkpoint.load)") from None
    except ValueError as err:
        raise FormatError(f"load_model: {path}: the description is not JSON ({err})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        got = index.get("format") if isinstance(index, dict) else None
        raise FormatError(f"load_model: {path} is of format {got!r}; this jbp reads {FORMAT!r}"
                         + (" (a checkpoint of fit: read it with jbp.checkpoint.load)"
                            if str(got).startswith("jbp-checkpoint") else ""))
    return index


def load_model(path):
    """Read a file written by :func:`save_model`: ``(model, params, state)``, params and
    state as NumPy arrays in the saved dtypes (state None where none was saved).

    Raises FileNotFoundError for a missing file and ValueError for a file that is not a
    jbp model, of another format version, changed since it was written (its sha256 does
    not match), or naming a constructor that is not registered.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"load_model: {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            index = _read_index(f, path)
            arrays = [f[f"a{i}"] for i in range(len(index["arrays"]))]
    except FormatError:
        raise
    except Exception as err:  # not a zip, truncated, bad CRC, missing member
        raise ValueError(f"load_model: {path}: corrupt or unreadable "
                         f"({type(err).__name__}: {err})") from None
    for i, meta in enumerate(index["arrays"]):
        if meta["dtype"] == "bfloat16":
            arrays[i] = arrays[i].view(jnp.bfloat16)
    stored = index.pop("sha256", None)
    if stored != _digest(index, arrays):
        raise FormatError(f"load_model: {path} was changed after it was written (its sha256 "
                         f"does not match its contents): refusing to load it")
    model = build(index["model"])
    params = _unflatten(index["params"], arrays)
    state = _unflatten(index["state"], arrays)
    if index["in_shape"] is not None:
        _check_fits(model, params, tuple(index["in_shape"]), "load_model")
    return model, params, state


# ---------------------------------------------------------------------------- inference

@jax.jit
def _apply(model, params, x, state):
    y = model.apply(params, x, state=state)
    return y[0] if model.stateful else y


def predict(model: Layer, params, x, *, batch_size: int = 1024, state=None) -> jax.Array:
    """``model``'s output (evaluation mode) for ``x`` (``(N, *in_shape)``), computed in
    chunks of ``batch_size`` rows: ``(N, *out_shape)``. The last chunk is padded to a whole
    one (one compiled program for every chunk) and the padding dropped. A model with
    batch_norm needs its ``state``."""
    if not isinstance(model, Layer):
        raise TypeError(f"predict: model must be a jbp Layer, got {type(model).__name__}")
    if (not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool)
            or batch_size <= 0):
        raise ValueError(f"predict: batch_size must be a positive int, got {batch_size!r}")
    x = jnp.asarray(x) if isinstance(x, np.ndarray) else x
    if not hasattr(x, "shape") or x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"predict: x must be an array of shape (N, ...) with N > 0, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    n = x.shape[0]
    size = min(int(batch_size), n)
    pad = -n % size
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
    chunks = [_apply(model, params, x[i:i + size], state) for i in range(0, n + pad, size)]
    return jnp.concatenate(chunks)[:n]
