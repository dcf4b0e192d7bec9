"""The layer protocol: one forward definition, two derivatives.

A layer is an immutable value of pure functions::

    init(key, in_shape)                    -> (out_shape, params)   # shapes per example
    forward(params, x, *, key, train)      -> (y, cache)            # x: (B, *in_shape)
    backward(params, cache, dy)            -> (dparams, dx)         # hand-written
    apply(params, x, *, key, train)        =  forward(...)[0]       # what jax.grad differentiates

``backward`` reverses ``forward`` by hand in ``jax.numpy`` and never calls autodiff.
``dparams`` has the structure, shapes and dtypes of ``params``, ``dx`` the shape and dtype
of ``x`` (as ``jax.vjp`` gives them). ``forward`` takes exactly two keywords: ``key`` (a
PRNG key or None) and ``train`` (a Python bool); anything else is an error.

**Composites** (``serial``, ...) write their backward once, as a ``walk``::

    walk(params, cache, dy, visit) -> (results, dx)

the composite's backward with every call of a child's backward replaced by
``visit(child, child_params, child_cache, child_dy) -> (child_result, child_dx)``.
``results`` has the structure of ``params`` with every child's params replaced by its
result. With ``visit`` calling ``child.backward`` this *is* the backward (the Layer derives
``backward`` from it); the gradient functions use other visits to collect each child's
delta and to check what every backward returns, and the per-example functions to reach
each layer's (cache, delta) pair. A composite that gives ``backward`` but no ``walk`` is a
black box: its own backward runs, and it is one layer to the machinery.

**State** (batch norm's running statistics) is a pytree apart from the params, which the
optimizer never sees. A layer that keeps state gives ``init_state(in_shape) -> state``, and
its forward takes one keyword more and gives one value more::

    forward(params, x, *, key, train, state) -> (y, cache, new_state)

(``new_state`` is ``state`` in evaluation mode.) A composite of such layers keeps state too:
its state mirrors its params (``{}`` for a child without state), :func:`composite_forward`
gives it the right forward, :func:`composite_init_state` its ``init_state``. A model
without stateful layers keeps every signature above; :func:`run` calls any layer alike.

**Side inputs** (a padded batch's ``lengths``, attention masks: :mod:`jbp.masks`) reach
the layers that declare them in ``side_inputs``; their forward takes one keyword more,
``side`` (a dict of those names). Composites list their children's, take ``side`` and hand
every child its part, as they thread state; no other layer sees them.

**Per-example quantities** need a declaration (``per_example``): ``EXAMPLEWISE`` for a
layer without parameters that maps every example on its own (activations, dropout, serial),
or a :class:`PerExampleRule` for a layer with parameters. ``None`` (the default): the
per-example functions refuse the layer with an error that names it.

**Models are values**: layers built by the same constructor from equal arguments compare
equal, hash alike (so ``jax.jit`` takes them as static arguments, or as ordinary ones: a
Layer is a pytree without leaves) and print as the call that built them.
"""

import dataclasses
import functools
import inspect
import operator
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jbp import masks

Params = Any
Shape = tuple[int, ...]

EXAMPLEWISE = "examplewise"
"""``per_example`` of a weightless layer that treats every example of a batch on its own."""


def per_example_rows(a):
    """``a (B, ..., n)`` as ``(B, T, n)``: example i's positions (every axis between the batch
    and the last) in row block i; for a per-example rule of a layer on the last axis."""
    return a.reshape(a.shape[0], -1, a.shape[-1])


class PerExampleRule(NamedTuple):
    """Per-example gradients of a layer with parameters, from its cache and delta.

    Each function takes ``(cache, delta)``: the layer's forward cache and ``delta``, the
    per-example cotangent of its output (row i is ∂ℓ_i/∂output_i), shape ``(B, ...)``.
    Only ``grads`` is required; the other two default to sums over ``grads``.
    """

    grads: Callable  # -> pytree like params, each leaf (B, *leaf.shape): ∇ℓ_i
    sq_norms: Callable | None = None  # -> (B,): Σ over the layer's params of (∂ℓ_i/∂θ)²
    sum_sq: Callable | None = None  # -> pytree like params: Σ_i (∂ℓ_i/∂θ)², element-wise

    def squared_norms(self, cache, delta):
        if self.sq_norms is not None:
            return self.sq_norms(cache, delta)
        leaves = jax.tree_util.tree_leaves(self.grads(cache, delta))
        return sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in leaves)

    def sum_of_squares(self, cache, delta):
        if self.sum_sq is not None:
            return self.sum_sq(cache, delta)
        return jax.tree_util.tree_map(lambda g: jnp.sum(g * g, axis=0), self.grads(cache, delta))


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Layer:
    """A layer (or a whole model: composites are layers too).

    Attributes:
      name: short human-readable name, used in error messages and reports.
      init: ``(key, in_shape) -> (out_shape, params)``.
      forward: ``(params, x, *, key=None, train=False) -> (y, cache)``.
      backward: ``(params, cache, dy) -> (dparams, dx)``; derived from ``walk`` if omitted.
      layers: the children of a composite, else ``()``.
      walk: a composite's backward through its children (see the module docstring).
      per_example: ``EXAMPLEWISE``, a :class:`PerExampleRule`, or None (not declared).
      init_state: ``(in_shape) -> state`` for a layer that keeps state (see the module
        docstring), else None.
      side_inputs: the names of the side inputs (:mod:`jbp.masks`) the forward reads from
        its ``side`` keyword; a composite's include every child's.
      spec: set by :func:`constructor`: what built the layer, for ``==``, ``hash``, ``repr``.
    """

    name: str
    init: Callable
    forward: Callable
    backward: Callable | None = None
    layers: tuple = ()
    walk: Callable | None = None
    per_example: Any = None
    init_state: Callable | None = None
    side_inputs: tuple = ()
    spec: Any = None

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise TypeError(f"Layer: name must be a str, got {type(self.name).__name__}")
        for field in ("init", "forward"):
            if not callable(getattr(self, field)):
                raise TypeError(f"Layer {self.name!r}: {field} must be a function")
        derived = getattr(self.backward, "walk", None) is self.walk is not None
        if (self.backward is None) == (self.walk is None) and not derived:
            raise TypeError(f"Layer {self.name!r}: give exactly one of backward (a leaf layer "
                            f"or a black-box composite) and walk (a composite)")
        if self.per_example not in (None, EXAMPLEWISE) and not isinstance(
                self.per_example, PerExampleRule):
            raise TypeError(f"Layer {self.name!r}: per_example must be None, EXAMPLEWISE or a "
                            f"PerExampleRule, got {self.per_example!r}")
        object.__setattr__(self, "layers", tuple(self.layers))
        unknown = set(self.side_inputs) - set(masks.SIDE_INPUTS)
        if isinstance(self.side_inputs, str) or unknown:
            raise TypeError(f"Layer {self.name!r}: side_inputs must be a tuple of names from "
                            f"{list(masks.SIDE_INPUTS)}, got {self.side_inputs!r}")
        read = set(self.side_inputs).union(*(c.side_inputs for c in self.layers))
        object.__setattr__(self, "side_inputs", tuple(sorted(read)))
        keeping = [c.name for c in self.layers if c.stateful]
        if keeping and self.init_state is None:
            raise TypeError(f"Layer {self.name!r}: its child {keeping[0]} keeps state, so the "
                            f"composite must too: give init_state and thread state through its "
                            f"forward (jbp.layer.composite_init_state, composite_forward)")
        if self.backward is None:
            object.__setattr__(self, "backward", _backward_of(self.walk))

    @property
    def stateful(self) -> bool:
        """Whether the layer keeps state (batch norm's running statistics, see above)."""
        return self.init_state is not None

    def apply(self, params: Params, x: jax.Array, *, key=None, train: bool = False,
              state=None, side=None):
        """The layer as a plain function of ``params`` and ``x``: ``forward(...)[0]``; for a
        layer that keeps state ``(y, new_state)``."""
        y, _, new_state = run(self, params, x, key=key, train=train, state=state, side=side)
        return (y, new_state) if self.stateful else y

    def replace(self, **changes) -> "Layer":
        """A copy with some attributes changed (the ``spec`` is dropped unless given)."""
        return dataclasses.replace(self, **{"spec": None, **changes})

    def _identity(self):
        if self.spec is not None:
            return self.spec.key
        return (self.name, self.init, self.forward, self.backward, self.layers, self.walk,
                self.per_example, self.init_state, self.side_inputs)

    def __eq__(self, other):
        if not isinstance(other, Layer):
            return NotImplemented
        return self._identity() == other._identity()

    def __hash__(self):
        return hash(self._identity())

    def __repr__(self):
        return self.spec.text if self.spec is not None else f"Layer({self.name!r})"


jax.tree_util.register_static(Layer)


def call_backward(child: Layer, params, cache, dy):
    """The plain ``visit`` of a walk: the child's own backward."""
    return child.backward(params, cache, dy)


def _backward_of(walk):
    """A composite's backward: its walk with every child's own backward."""

    def backward(params, cache, dy):
        return walk(params, cache, dy, call_backward)

    backward.walk = walk
    return backward


# ---------------------------------------------------------------------------- state

def _empty(tree) -> bool:
    return tree is None or (isinstance(tree, (dict, tuple, list)) and len(tree) == 0)


def check_state(layer: Layer, state) -> None:
    """Raise a TypeError unless ``state`` is given exactly when ``layer`` keeps state (a layer
    without state takes None or ``{}``)."""
    if not layer.stateful and not _empty(state):
        raise TypeError(f"{layer.name}: this model keeps no state, but state= was given "
                        f"(only models with batch_norm keep state)")
    if layer.stateful and _empty(state):
        raise TypeError(f"{layer.name}: this model keeps state (batch_norm's running "
                        f"statistics): pass state=model.init_state(in_shape), or the state "
                        f"that the last training step returned")


def run(layer: Layer, params, x, *, key=None, train=False, state=None, side=None):
    """Any layer's forward as ``(y, cache, new_state)``; a layer without state gives back
    the ``state`` it got (None or ``{}``). ``side``: the side inputs (:mod:`jbp.masks`),
    given to a layer that reads them. A NumPy input becomes a JAX array first (NumPy's
    float64 is then JAX's default float, not a dtype that layers would ask for by name)."""
    check_train(train, layer.name)
    check_state(layer, state)
    masks.check_side(layer, side)
    if isinstance(x, np.ndarray):
        x = jnp.asarray(x)
    extra = {"side": side or {}} if layer.side_inputs else {}
    if not layer.stateful:
        y, cache = layer.forward(params, x, key=key, train=train, **extra)
        return y, cache, state
    return layer.forward(params, x, key=key, train=train, state=state, **extra)


def out_shape(layer: Layer, in_shape) -> Shape:
    """The per-example output shape of ``layer`` for ``in_shape``, from its ``init`` traced
    abstractly (no params are drawn)."""
    shapes = []

    def init(key):
        shape, params = layer.init(key, in_shape)
        shapes.append(tuple(shape))
        return params

    jax.eval_shape(init, jax.random.key(0))
    return shapes[0]


def composite_init_state(children, in_shapes):
    """A composite's state: a tuple with ``child.init_state(in_shape)`` for every child that
    keeps state and ``{}`` for the others (``in_shapes``: each child's per-example input)."""
    return tuple(c.init_state(s) if c.stateful else {} for c, s in zip(children, in_shapes))


def composite_forward(run_children, children, who: str):
    """The forward of a composite, from ``run_children(params, x, key, train, state, side)
    -> (y, cache, new_state)`` (``state``: a tuple, one entry per child, as
    :func:`composite_init_state` builds it; ``side``: the side inputs, which the children
    take through :func:`run` with :func:`jbp.masks.side_for`): with a ``state`` keyword if
    a child keeps state, else the plain ``(y, cache)`` forward (the children then get
    ``{}``). Either takes ``side``."""
    n = len(children)

    if not any(c.stateful for c in children):
        def forward(params, x, *, key=None, train=False, side=None):
            return run_children(params, x, key, train, ({},) * n, side)[:2]

        return forward

    def forward(params, x, *, key=None, train=False, state=None, side=None):
        if not isinstance(state, (tuple, list)) or len(state) != n:
            got = (f"a {type(state).__name__} of length {len(state)}"
                   if isinstance(state, (tuple, list)) else type(state).__name__)
            raise ValueError(f"{who}: state must be a tuple with one entry per child ({n}), "
                             f"got {got}; is it the state of another model?")
        y, cache, new_state = run_children(params, x, key, train, tuple(state), side)
        return y, cache, tuple(new_state)

    return forward


# ---------------------------------------------------------------------------- constructors

class _Spec(NamedTuple):
    key: tuple  # (qualified constructor name, frozen arguments): equality and hash
    text: str  # the call, for repr


class _ById:
    """An unhashable argument, compared by identity."""

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, _ById) and other.value is self.value

    def __hash__(self):
        return id(self.value)


def _freeze(value):
    if isinstance(value, np.generic):  # np.int64(8) builds what 8 builds
        return value.item()
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    try:
        hash(value)
    except TypeError:
        return _ById(value)
    return value if not hasattr(value, "shape") else _ById(value)


def _show(value) -> str:
    if isinstance(value, type) and hasattr(value, "dtype"):  # jnp.float32 and friends
        return jnp.dtype(value).name
    if isinstance(value, np.generic):  # np.int64(8) shows as 8, as it builds the same layer
        return repr(value.item())
    if isinstance(value, list):
        return "[" + ", ".join(map(_show, value)) + "]"
    if callable(value) and hasattr(value, "__name__") and not isinstance(value, Layer):
        return value.__name__
    return repr(value)


def constructor(fn: Callable) -> Callable:
    """Decorate a function that returns a Layer: layers it builds from equal arguments
    compare equal and hash alike, and ``repr`` shows the call (defaults left out).

    >>> import jbp
    >>> jbp.mlp([4, 8, 3]) == jbp.mlp([4, 8, 3])
    True
    >>> jbp.dense(8)
    dense(8)
    """
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def build(*args, **kwargs):
        layer = fn(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        shown = []
        for name, value in bound.arguments.items():
            param = signature.parameters[name]
            if param.kind is param.VAR_POSITIONAL:
                shown += [_show(v) for v in value]
            elif param.kind is param.VAR_KEYWORD:
                shown += [f"{k}={_show(v)}" for k, v in value.items()]
            elif param.default is param.empty:
                shown.append(_show(value))
            elif not _same(value, param.default):
                shown.append(f"{name}={_show(value)}")
        key = (f"{fn.__module__}.{fn.__qualname__}",
               tuple((k, _freeze(v)) for k, v in bound.arguments.items()))
        text = f"{fn.__name__}({', '.join(shown)})"
        return dataclasses.replace(layer, spec=_Spec(key, text))

    return build


def _same(a, b) -> bool:
    a = a.item() if isinstance(a, np.generic) else a
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:
        return a is b


# ---------------------------------------------------------------------------- checks

def as_integer(value):
    """``value`` as a Python int if it is of an integer type (int, np.int64, a 0-d integer
    array; not a bool), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def positive_int(value, what: str, who: str) -> int:
    """``value`` as a Python int ≥ 1 (any integer type: ``8``, ``np.int64(8)``), or a
    ValueError that names ``who`` and ``what``."""
    n = as_integer(value)
    if n is None or n <= 0:
        raise ValueError(f"{who}: {what} must be a positive int, got {value!r}")
    return n


def as_shape(in_shape, who: str) -> Shape:
    """``in_shape`` as a tuple of positive Python ints (each of any integer type), or an error
    that names ``who``: a float (``8.7``), a bool or a string is refused, not coerced."""
    if isinstance(in_shape, (str, bytes)) or not hasattr(in_shape, "__iter__"):
        raise TypeError(f"{who}: in_shape must be a tuple of ints (per example, no batch "
                        f"dimension), got {in_shape!r}")
    dims = tuple(in_shape)
    shape = tuple(as_integer(d) for d in dims)
    if any(d is None for d in shape):
        raise TypeError(f"{who}: in_shape must be a tuple of ints (per example, no batch "
                        f"dimension), got {in_shape!r}")
    if any(d <= 0 for d in shape):
        raise ValueError(f"{who}: in_shape must hold positive sizes, got {shape}")
    return shape


def param_dtype(dtype, who: str):
    """``dtype`` as a NumPy dtype for params, or an error where JAX would silently truncate it:
    a 64-bit type needs ``jax_enable_x64``."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"{who}: dtype must be a floating dtype, got {dtype!r}") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{who}: dtype must be a floating dtype, got {dt.name}")
    if dt.itemsize == 8 and not jax.config.jax_enable_x64:
        raise ValueError(f"{who}: dtype {dt.name} needs JAX's 64-bit mode, which is off (JAX "
                         f"would silently give float32): call jax.config.update("
                         f"'jax_enable_x64', True) or set JAX_ENABLE_X64=1 before building "
                         f"the params, or use jax.enable_x64(True) as a context")
    return dt


def check_array(x, who: str) -> None:
    """Raise a TypeError unless ``x`` is an array (has a shape and a dtype)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{who}: input must be an array, got {type(x).__name__}")


def check_empty_params(params: Params, who: str) -> None:
    """Raise a TypeError unless ``params`` is the empty entry of a weightless layer."""
    if params is not None and not (isinstance(params, (dict, tuple, list)) and len(params) == 0):
        raise TypeError(f"{who}: this layer has no weights, its params must be {{}}, "
                        f"got {type(params).__name__}")


def check_train(train, who: str) -> None:
    """Raise a TypeError unless ``train`` is a Python bool (it decides the traced program; a
    string such as ``"False"`` would be truthy)."""
    if isinstance(train, jax.core.Tracer):
        raise TypeError(f"{who}: train must be a Python bool, got a traced value; under "
                        f"jax.jit mark it static (static_argnames='train')")
    if not isinstance(train, bool):
        raise TypeError(f"{who}: train must be a Python bool (True or False), got "
                        f"{type(train).__name__} {train!r}")


def cast_like(g, like):
    """``g`` in the dtype of ``like`` where ``like`` is floating (a cotangent has its primal's
    dtype); for an integer primal ``g`` stays as it is (its cotangent is ``float0``)."""
    return g.astype(like.dtype) if jnp.issubdtype(like.dtype, jnp.inexact) else g


def check_like(who: str, what: str, got, expected, *, dtypes: bool = True) -> None:
    """Raise a ValueError unless the pytrees ``got`` and ``expected`` match in structure,
    shapes and (floating) dtypes (shapes only with ``dtypes=False``: params in any float
    dtype); ``expected`` may hold arrays or ShapeDtypeStructs."""
    tree_g, tree_e = jax.tree_util.tree_structure(got), jax.tree_util.tree_structure(expected)
    if tree_g != tree_e:
        raise ValueError(f"{who}: {what} has structure {tree_g}, expected {tree_e} "
                         f"(the structure of params)")
    paths = jax.tree_util.tree_flatten_with_path(expected)[0]
    for (path, e), g in zip(paths, jax.tree_util.tree_leaves(got)):
        where = jax.tree_util.keystr(path)
        if not hasattr(g, "shape"):
            raise ValueError(f"{who}: {what}{where} is a {type(g).__name__}, expected an array "
                             f"of shape {tuple(e.shape)}")
        if tuple(g.shape) != tuple(e.shape):
            hint = ("; a backward must sum over the batch (e.g. delta.sum(0))"
                    if tuple(g.shape[1:]) == tuple(e.shape) else "")
            raise ValueError(f"{who}: {what}{where} has shape {tuple(g.shape)}, expected "
                             f"{tuple(e.shape)}{hint}")
        want = jnp.dtype(e.dtype)
        if dtypes and jnp.issubdtype(want, jnp.inexact) and jnp.dtype(g.dtype) != want:
            raise ValueError(f"{who}: {what}{where} has dtype {jnp.dtype(g.dtype)}, expected "
                             f"{want} (gradients have the dtype of what they differentiate)")
