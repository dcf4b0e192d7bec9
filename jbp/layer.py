"""The layer protocol: one forward definition, two derivatives.

A layer is an immutable value of pure functions::

    init(key, in_shape)                                   -> (out_shape, params)
    forward(params, x, *, key, train, state, side)        -> (y, cache, new_state)
    backward(params, cache, dy)                           -> (dparams, dx)     # by hand
    apply(params, x, ...)                                 =  forward(...)[0]   # for jax.grad

Shapes in ``init`` are per example; ``x`` is batch-first. ``backward`` reverses ``forward``
by hand in ``jax.numpy`` and never calls autodiff. ``dparams`` has the structure, shapes
and dtypes of ``params``, ``dx`` the shape and dtype of ``x`` (as ``jax.vjp`` gives them).
Every forward takes the same four keywords, whether it reads them or not:

- ``key``: a PRNG key or None (dropout reads it);
- ``train``: a Python bool (dropout and batch norm read it);
- ``state``: the layer's state (batch norm's running statistics), ``{}`` for a layer
  without state, which gives it back as it came as ``new_state``;
- ``side``: the side inputs it declares in ``side_inputs`` (:mod:`jbp.masks`: a padded
  batch's ``lengths``, attention masks), ``{}`` where it declares none.

A forward written for the older protocol (``forward(params, x, *, key, train) -> (y,
cache)``, with ``state`` for a layer that keeps state) is adapted when the Layer is built.

**The model's boundary** (:func:`run`, which ``apply`` and every function built on the
backward call) validates once what a model is given: ``train``, ``state``, ``side``, the
input, and the params against ``jax.eval_shape`` of the model's ``init`` (an error names
the layer and the path). Inside, layers call their children's forwards unchecked; a leaf
forward checks only what needs its input (e.g. the input's width against ``W``).

**Composites** (``serial``, ...) write their backward once, as a ``walk``::

    walk(params, cache, dy, visit) -> (results, dx)

the composite's backward with every call of a child's backward replaced by
``visit(child, child_params, child_cache, child_dy) -> (child_result, child_dx)``.
``results`` has the structure of ``params`` with every child's params replaced by its
result. With ``visit`` calling ``child.backward`` this *is* the backward (the Layer derives
``backward`` from it); the gradient functions use other visits to collect each child's
delta and to check what every backward returns, and the per-example functions to reach
each layer's (params, cache, delta). A composite that gives ``backward`` but no ``walk`` is
a black box: its own backward runs, and it is one layer to the machinery.

**State** is a pytree apart from the params, which the optimizer never sees. A layer that
keeps state gives ``init_state(in_shape) -> state``; a composite's state is a tuple with
one entry per child (``{}`` for a child without state, :func:`composite_init_state`), and
a composite without stateful children passes ``{}``. **Side inputs** reach the layers that
declare them: composites list their children's names and hand every child its part
(:func:`forward_child`), as they thread state; no other layer sees them.

**Per-example quantities** need a declaration (``per_example``): ``EXAMPLEWISE`` for a
layer without parameters that maps every example on its own (activations, dropout, serial),
or a :class:`PerExampleRule` for a layer with parameters. ``None`` (the default): the
per-example functions refuse the layer with an error that names it.

**Models are values**: layers built by the same constructor from equal arguments compare
equal, hash alike (so ``jax.jit`` takes them as static arguments, or as ordinary ones: a
Layer is a pytree without leaves) and print as the call that built them.
"""

import contextlib
import dataclasses
import functools
import inspect
import operator
from collections.abc import Mapping
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
    """Per-example gradients of a layer with parameters, from its params, cache and delta.

    Each function takes ``(params, cache, delta)``: the layer's params, its forward cache
    and ``delta``, the per-example cotangent of its output (row i is ∂ℓ_i/∂output_i), shape
    ``(B, ...)``. Only ``grads`` is required; the other two default to sums over ``grads``.
    ``kronecker`` (optional) gives the rows of the layer's Kronecker-factored curvature
    blocks (:mod:`jbp.kronecker`); a layer without it has none.
    """

    grads: Callable  # -> pytree like params, each leaf (B, *leaf.shape): ∇ℓ_i
    sq_norms: Callable | None = None  # -> (B,): Σ over the layer's params of (∂ℓ_i/∂θ)²
    sum_sq: Callable | None = None  # -> pytree like params: Σ_i (∂ℓ_i/∂θ)², element-wise
    kronecker: Callable | None = None  # -> a jbp.kronecker.Block, or a dict of them

    def squared_norms(self, params, cache, delta):
        if self.sq_norms is not None:
            return self.sq_norms(params, cache, delta)
        leaves = jax.tree_util.tree_leaves(self.grads(params, cache, delta))
        return sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in leaves)

    def sum_of_squares(self, params, cache, delta):
        if self.sum_sq is not None:
            return self.sum_sq(params, cache, delta)
        return jax.tree_util.tree_map(lambda g: jnp.sum(g * g, axis=0),
                                      self.grads(params, cache, delta))


class KroneckerBlock(NamedTuple):
    """The rows behind one Kronecker-factored curvature block ``A ⊗ G`` of a weight matrix
    ``M (n_in, n_out)``: ``W`` reshaped to ``(-1, n_out)``, with the bias as one more row
    (see :mod:`jbp.kronecker`). ``a (B, T, n_in)``: what multiplies ``M`` at each of the T
    positions that share it (a dense layer's input, a convolution's patches; a column of
    ones for the bias); ``g (B, T, n_out)``: the delta there."""

    a: jax.Array
    g: jax.Array


def kronecker_rows(a, delta, bias: bool) -> KroneckerBlock:
    """The :class:`KroneckerBlock` of a layer ``z = a @ W (+ b)`` on the last axis of
    ``a (B, ..., n_in)`` and ``delta (B, ..., n_out)``."""
    a3, g3 = per_example_rows(a), per_example_rows(delta)
    if bias:
        a3 = jnp.concatenate([a3, jnp.ones(a3.shape[:-1] + (1,), a3.dtype)], axis=-1)
    return KroneckerBlock(a3, g3)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Layer:
    """A layer (or a whole model: composites are layers too).

    Attributes:
      name: short human-readable name, used in error messages and reports.
      init: ``(key, in_shape) -> (out_shape, params)``.
      forward: ``(params, x, *, key, train, state, side) -> (y, cache, new_state)``.
      backward: ``(params, cache, dy) -> (dparams, dx)``; derived from ``walk`` if omitted.
      layers: the children of a composite, else ``()``.
      walk: a composite's backward through its children (see the module docstring).
      per_example: ``EXAMPLEWISE``, a :class:`PerExampleRule`, or None (not declared).
      init_state: ``(in_shape) -> state`` for a layer that keeps state (see the module
        docstring), else None.
      side_inputs: the names of the side inputs (:mod:`jbp.masks`) the forward reads from
        its ``side`` keyword; a composite's include every child's.
      info: what the layer's family tells other code (hashable; e.g. an activation's init
        gain, a recurrent layer's options, a convolution's geometry), else None.
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
    info: Any = None
    spec: Any = None

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise TypeError(f"Layer: name must be a str, got {type(self.name).__name__}")
        for field in ("init", "forward"):
            if not callable(getattr(self, field)):
                raise TypeError(f"Layer {self.name!r}: {field} must be a function")
        derived = isinstance(self.backward, _WalkBackward) and self.backward.walk is self.walk
        if (self.backward is None) == (self.walk is None) and not derived:
            raise TypeError(f"Layer {self.name!r}: give exactly one of backward (a leaf layer "
                            f"or a black-box composite) and walk (a composite)")
        _check_rule(self.per_example, self.name)
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
                            f"composite must too: give init_state (jbp.layer."
                            f"composite_init_state) and thread state through its forward")
        object.__setattr__(self, "forward", _adapted(self.forward))
        if self.backward is None:
            object.__setattr__(self, "backward", _WalkBackward(self.walk))

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
                self.per_example, self.init_state, self.side_inputs, self.info)

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


@dataclasses.dataclass(frozen=True)
class _WalkBackward:
    """A composite's backward: its walk with every child's own backward."""

    walk: Callable

    def __call__(self, params, cache, dy):
        return self.walk(params, cache, dy, call_backward)


def _check_rule(rule, who: str) -> None:
    if rule not in (None, EXAMPLEWISE) and not isinstance(rule, PerExampleRule):
        raise TypeError(f"Layer {who!r}: per_example must be None, EXAMPLEWISE or a "
                        f"PerExampleRule, got {rule!r}")
    for fn in rule if isinstance(rule, PerExampleRule) else ():
        n = _positional_count(fn)
        if fn is not None and n is not None and n < 3:
            raise TypeError(f"Layer {who!r}: a PerExampleRule's functions take (params, cache, "
                            f"delta); {getattr(fn, '__name__', fn)} takes {n} arguments (the "
                            f"older (cache, delta)): add params in front")


def _positional_count(fn):
    """How many positional arguments ``fn`` takes (None: unknown, or any number)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


@dataclasses.dataclass(frozen=True)
class _OlderForward:
    """A forward written for the protocol before every forward took ``state`` and ``side``
    and gave ``new_state``: it is given the keywords it takes, and a ``(y, cache)`` it
    gives back gets the ``state`` it came with."""

    fn: Callable
    takes_state: bool
    takes_side: bool

    def __call__(self, params, x, *, key=None, train=False, state=None, side=None):
        extra = {"state": state} if self.takes_state else {}
        if self.takes_side:
            extra["side"] = side
        out = self.fn(params, x, key=key, train=train, **extra)
        return (*out, state) if len(out) == 2 else out


def _adapted(forward):
    """``forward`` in the protocol's one signature (see the module docstring); a forward
    that names both ``state`` and ``side`` keeps it already."""
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return forward
    names = {p.name for p in params}
    if {"state", "side"} <= names:
        return forward
    anything = any(p.kind is p.VAR_KEYWORD for p in params)
    return _OlderForward(forward, anything or "state" in names, anything or "side" in names)


# ---------------------------------------------------------------------------- running

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
    """A model's forward at its boundary, as ``(y, cache, new_state)``: what the model is
    given is checked here, once (``train``, ``state``, ``side``, the input, the params and
    state against the model's ``init``: :func:`check_params`); a model without state gives
    back the ``state`` it got (None or ``{}``). A NumPy input becomes a JAX array first
    (NumPy's float64 is then JAX's default float, not a dtype layers would ask for by name)."""
    check_train(train, layer.name)
    check_state(layer, state)
    masks.check_side(layer, side)
    if isinstance(x, np.ndarray):
        x = jnp.asarray(x)
    check_array(x, layer.name)
    state, side = (state if layer.stateful else {}), (side or {})

    def forward(p, x_):
        return layer.forward(p, x_, key=key, train=train, state=state, side=side)

    try:
        check_params(layer, params, x)
        if layer.stateful:
            check_params(layer, state, x, "state")
    except ValueError:  # a shape: the input may be what is wrong, a layer's check says so
        _raise_input_error(layer, forward, params, x)
        raise
    y, cache, new_state = forward(params, x)
    return y, cache, (new_state if layer.stateful else state)


def _raise_input_error(layer: Layer, forward, params, x) -> None:
    """Raise the error a layer of ``layer`` gives for input ``x`` (its forward run, on the
    error's path only), if its message names the layer (a check of the input, not an error
    from deep inside JAX)."""
    names = tuple(_names(layer))
    try:
        forward(params, x)
    except ValueError as err:
        if str(err).startswith(names):
            raise
    except Exception:
        pass


def _names(layer: Layer):
    yield layer.name
    for child in layer.layers:
        yield from _names(child)


@contextlib.contextmanager
def noting_position(i: int, layer: Layer, parent: str, stage: str):
    """Re-raise any error from the block with a note of where it happened: ``in the forward
    of layer 2 (relu) of serial(...)`` (type, message and traceback stay the error's own)."""
    try:
        yield
    except Exception as err:
        err.add_note(f"in the {stage} of layer {i} ({layer.name}) of {parent}")
        raise


@functools.lru_cache(maxsize=512)
def _expected(layer: Layer, what: str, in_shape: Shape, x64: bool):
    """ShapeDtypeStructs of what ``layer.init`` (``what="params"``) or ``layer.init_state``
    (``"state"``) gives for ``in_shape``; None where they refuse ``in_shape`` (then the
    forward's own input checks speak). ``x64``: part of the key, it decides the dtypes."""
    make = ((lambda: layer.init(jax.random.key(0), in_shape)[1]) if what == "params"
            else (lambda: layer.init_state(in_shape)))
    try:  # the key is drawn inside: no op of it is staged into a trace that calls run
        return jax.eval_shape(make)
    except Exception:
        return None


def check_params(layer: Layer, tree, x, what: str = "params") -> None:
    """Raise unless ``tree``, the params (or the state: ``what="state"``), has the structure
    and shapes that ``layer``'s init gives for ``x``'s per-example shape; the error names
    the innermost layer that owns the wrong entry, and where it sits in the model."""
    expected = _expected(layer, what, tuple(x.shape[1:]), bool(jax.config.jax_enable_x64))
    if expected is not None:
        _match(layer, what, tree, expected, "")


def _describe(tree, keys: bool = True) -> str:
    if isinstance(tree, Mapping) and keys:
        return str(sorted(tree))
    if isinstance(tree, (tuple, list)):
        return f"{type(tree).__name__} of length {len(tree)}"
    return type(tree).__name__


def _shapes(tree) -> str:
    if isinstance(tree, Mapping):
        return "{" + ", ".join(f"{k!r}: {_shapes(v)}" for k, v in tree.items()) + "}"
    return str(tuple(tree.shape)) if hasattr(tree, "shape") else type(tree).__name__


def _match(owner: Layer, what: str, got, expected, path: str) -> None:
    """Compare ``got`` with ``expected`` node by node; a tuple with one entry per child of
    ``owner`` (or a single child's params, as ``residual`` holds them) is the child's."""
    children = owner.layers
    if len(children) == 1 and not (isinstance(expected, tuple) and len(expected) == 1) \
            and not path:
        return _match(children[0], what, got, expected, "")
    if what == "state" and not isinstance(expected, tuple) and _shapes(got) != _shapes(expected):
        raise ValueError(f"{owner.name}: state{path} must be {_shapes(expected)}, got "
                         f"{_shapes(got)}; is it the state of another model?")
    if isinstance(expected, Mapping):
        if not expected and not _empty(got):
            raise TypeError(f"{owner.name}: this layer has no weights, its params must be "
                            f"{{}}, got {type(got).__name__}")
        if expected and (not isinstance(got, Mapping) or set(got) != set(expected)):
            keys = sorted(expected)
            raise TypeError(f"{owner.name}: {what}{path} must be a dict with "
                            f"{'the key' if len(keys) == 1 else 'keys'} {keys}, got "
                            f"{_describe(got)}")
        for k in expected:
            _match(owner, what, got[k], expected[k], f"{path}[{k!r}]")
    elif isinstance(expected, (tuple, list)):
        per_child = len(children) == len(expected) and not path
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            each = "one entry per child" if what == "state" else "one entry per layer"
            raise (ValueError if what == "state" else TypeError)(
                f"{owner.name}: {what}{path} must be a tuple with "
                f"{each if per_child else 'one entry each'} ({len(expected)}), got "
                f"{_describe(got, keys=False)}" + ("; is it the state of another model?"
                                       if what == "state" else ""))
        for i, (g, e) in enumerate(zip(got, expected)):
            if per_child:
                with noting_position(i, children[i], owner.name, "forward"):
                    _match(children[i], what, g, e, "")
            else:
                _match(owner, what, g, e, f"{path}[{i}]")
    elif expected is None:
        if got is not None:
            raise TypeError(f"{owner.name}: {what}{path} must be None, got {_describe(got)}")
    elif not hasattr(got, "shape"):
        raise TypeError(f"{owner.name}: {what}{path} must be an array of shape "
                        f"{tuple(expected.shape)}, got {type(got).__name__}")
    elif tuple(got.shape) != tuple(expected.shape):
        raise ValueError(f"{owner.name}: expected {what}{path} shaped {tuple(expected.shape)}, "
                         f"got {tuple(got.shape)}")


def forward_child(child: Layer, params, x, *, key, train, state, side):
    """A child's forward inside a composite's: unchecked (the model's boundary checked what
    it was given), with the child's part of ``side`` (:func:`jbp.masks.side_for`)."""
    return child.forward(params, x, key=key, train=train, state=state,
                         side=masks.side_for(child, side))


def child_keys(key, n: int):
    """A composite's PRNG ``key`` split into one per child (``None`` each without a key)."""
    return jax.random.split(key, n) if key is not None else [None] * n


def forward_chain(layers, indices, params, x, *, keys, train, states, side, parent: str):
    """``layers[i]`` for every ``i`` of ``indices`` in turn, each on the output of the one
    before (params, keys and states indexed by ``i``; ``states`` is updated in place):
    ``(y, caches)``, one cache per layer run. Errors gain a note naming the layer."""
    caches = []
    for i in indices:
        with noting_position(i, layers[i], parent, "forward"):
            x, cache, states[i] = forward_child(layers[i], params[i], x, key=keys[i],
                                                train=train, state=states[i], side=side)
        caches.append(cache)
    return x, caches


def child_states(state, n: int) -> tuple:
    """A composite's ``state`` as one entry per child (``{}`` each for a composite whose
    children keep none)."""
    return tuple(state) if not _empty(state) else ({},) * n


def composite_state(states) -> Any:
    """The children's new states as the composite's: a tuple, or ``{}`` if none keeps any."""
    return tuple(states) if not all(_empty(s) for s in states) else {}


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


# ---------------------------------------------------------------------------- constructors

class _Spec(NamedTuple):
    key: tuple  # (qualified constructor name, frozen arguments): equality and hash
    text: str  # the call, for repr
    constructor: str  # the constructor's name, e.g. "serial"


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
        key = (f"{fn.__module__}.{fn.__qualname__}",
               tuple((k, _freeze(v)) for k, v in bound.arguments.items()))
        return dataclasses.replace(layer, spec=_Spec(key, call_text(fn, *args, **kwargs),
                                                     fn.__name__))

    return build


def call_text(fn: Callable, *args, **kwargs) -> str:
    """The call ``fn(*args, **kwargs)`` as :func:`constructor` shows it (defaults left out),
    e.g. for a layer's name: ``conv(8, 3, stride=2)``."""
    signature = inspect.signature(fn)
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
    return f"{fn.__name__}({', '.join(shown)})"


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


def positive_number(value, what: str, who: str) -> float:
    """``value`` if it is a real number > 0 (not a bool), or a ValueError naming ``who``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)) \
            or not value > 0:
        raise ValueError(f"{who}: {what} must be a positive number, got {value!r}")
    return value


def boolean(value, what: str, who: str) -> bool:
    """``value`` if it is a bool, or a TypeError naming ``who`` (a string such as ``"no"``
    would be truthy)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{who}: {what} must be a bool, got {value!r}")
    return bool(value)


def as_shape(in_shape, who: str, *, ndim: int | None = None, min_ndim: int = 0,
             layout: str = "") -> Shape:
    """``in_shape`` as a tuple of positive Python ints (each of any integer type), or an error
    that names ``who``: a float (``8.7``), a bool or a string is refused, not coerced. With
    ``ndim`` (exactly) or ``min_ndim`` (at least) axes, else an error that shows ``layout``
    (e.g. ``"(T, d_model)"``)."""
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
    if len(shape) < min_ndim or (ndim is not None and len(shape) != ndim):
        raise ValueError(f"{who}: expects a per-example shape {layout}, got {shape}")
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
