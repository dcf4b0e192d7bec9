"""The custom_vjp bridge: a model whose JAX derivative *is* the hand-written backward.

``as_custom_vjp(model)`` returns ``apply(params, x, *, key=None, train=False)``, a
``jax.custom_vjp`` function: its forward rule is ``model.forward`` (the residuals are the
layers' caches, plus ``params``), its backward rule is ``model.backward``. So plain
``jax.grad``, ``jax.jit``, ``jax.vmap`` and any optax loop run the manual backward, and
``jax.test_util.check_grads(apply, ..., modes=["rev"])`` checks it from outside. Second
derivatives (``order=2``, ``jax.hessian``: forward over reverse) differentiate the backward
itself, which is ``jax.numpy``. Forward mode of ``apply`` itself (``jax.jvp``,
``jax.jacfwd``) is not defined, as for every ``custom_vjp`` function; the error says so and
what to use instead (reverse mode, ``jax.hessian``, ``jbp.hvp``).

Residuals of a ``custom_vjp`` must be arrays, but some caches hold static Python data
(flatten keeps the input's shape, evaluation-mode dropout keeps ``None``). Non-array leaves
are wrapped in :class:`_Static`, a pytree node without leaves: the value travels in the
residuals' tree structure, which JAX hands back to the backward rule unchanged.

>>> import jax, jax.numpy as jnp, jbp
>>> model = jbp.mlp([3, 4, 2], activation="tanh")
>>> _, params = model.init(jax.random.key(0), (3,))
>>> apply = jbp.as_custom_vjp(model)
>>> g = jax.grad(lambda p: jnp.sum(apply(p, jnp.ones((5, 3))) ** 2))(params)
>>> g[0]["W"].shape
(3, 4)
"""

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jbp.layer import Layer, check_like, check_state, run


@dataclass(frozen=True)
class _Static:
    """A hashable non-array cache value, carried in a pytree's structure (no leaves)."""

    value: Any


jax.tree_util.register_static(_Static)


def _is_array(leaf) -> bool:
    return isinstance(leaf, (jax.Array, jax.core.Tracer))


def _hide_static(cache):
    """Wrap every non-array leaf of ``cache`` in :class:`_Static`."""
    return jax.tree_util.tree_map(lambda leaf: leaf if _is_array(leaf) else _Static(leaf), cache)


def _unhide_static(cache):
    return jax.tree_util.tree_map(lambda leaf: leaf.value if isinstance(leaf, _Static) else leaf,
                                  cache, is_leaf=lambda leaf: isinstance(leaf, _Static))


def as_custom_vjp(model: Layer):
    """``model.apply`` as a ``jax.custom_vjp`` whose VJP is ``model.backward``.

    Returns ``apply(params, x, *, key=None, train=False, side=None) -> y``: ``x (B,
    *in_shape)``, ``y (B, *out_shape)``, exactly ``model.apply``'s value. Under
    ``jax.grad``/``jax.vjp`` the cotangent of ``y`` (shape and dtype of ``y``) goes through
    the hand-written backward; ``key`` and the side inputs (:mod:`jbp.masks`) get none. A model that keeps state takes ``state=`` and
    returns ``(y, new_state)``; the state gets a zero cotangent. The raw rules are attached
    as ``apply.fwd(params, x, key, train, state=None, side=None) -> (y, residuals)`` and
    ``apply.bwd(residuals, dy) -> (dparams, dx, None, None)``; ``bwd`` raises a ValueError for a cotangent whose shape or dtype is not ``y``'s,
    and for a backward whose gradients are not shaped like ``params`` and ``x``. An integer
    ``x`` (raw uint8 images) gets the ``float0`` cotangent JAX expects of it.
    """
    if not isinstance(model, Layer):
        raise TypeError(f"as_custom_vjp: model must be a jbp Layer, got {type(model).__name__}")
    who = f"as_custom_vjp({model.name})"

    def fwd(params, x, key, train, state=None, side=None):
        y, cache, new_state = run(model, params, x, key=key, train=train, state=state, side=side)
        spec = _Static((jax.ShapeDtypeStruct(y.shape, y.dtype),
                        jax.ShapeDtypeStruct(x.shape, x.dtype),
                        jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                                               state)))
        return ((y, new_state) if model.stateful else y), (params, _hide_static(cache), spec)

    def bwd(residuals, dy):
        params, cache, spec = residuals
        y_spec, x_spec, state_spec = spec.value
        # key and side get no cotangent; the state a zero one (the new state is not
        # differentiated)
        if model.stateful:
            dy, _ = dy
            rest = (None, None,
                    jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), state_spec))
        else:
            rest = (None, None)
        if not hasattr(dy, "shape"):
            raise TypeError(f"{who}: the cotangent must be an array, got {type(dy).__name__}")
        if tuple(dy.shape) != tuple(y_spec.shape) or jnp.result_type(dy) != y_spec.dtype:
            raise ValueError(f"{who}: cotangent of the output has shape {tuple(dy.shape)} and "
                             f"dtype {jnp.result_type(dy)}, expected the output's shape "
                             f"{tuple(y_spec.shape)} and dtype {y_spec.dtype}")
        dparams, dx = model.backward(params, _unhide_static(cache), dy)
        check_like(who, "the backward's dparams", dparams, params)
        if not jnp.issubdtype(x_spec.dtype, jnp.inexact):  # integer input: no cotangent
            return dparams, np.zeros(x_spec.shape, jax.dtypes.float0), *rest
        check_like(who, "the backward's dx", dx, x_spec)
        return dparams, dx, *rest

    def make(train: bool):
        @jax.custom_vjp
        def apply(params, x, key, side, *state):
            return fwd(params, x, key, train, *state, side=side)[0]

        apply.defvjp(lambda params, x, key, side, *state: fwd(params, x, key, train, *state,
                                                              side=side), bwd)
        return apply

    rules = {False: make(False), True: make(True)}

    def apply(params, x, *, key=None, train=False, state=None, side=None):
        check_state(model, state)
        try:
            return rules[bool(train)](params, x, key, side,
                                      *([state] if model.stateful else []))
        except TypeError as err:
            if "forward-mode" not in str(err):
                raise
            raise TypeError(f"{who}: forward-mode autodiff (jax.jvp, jax.jacfwd) "
                            f"of this function is not defined: its derivative is the "
                            f"hand-written backward, a reverse-mode rule. Use reverse mode "
                            f"(jax.grad, jax.vjp, jax.jacrev); for second derivatives "
                            f"jax.hessian (forward over reverse) or jbp.hvp(model, loss) "
                            f"work") from None

    apply.fwd = fwd
    apply.bwd = bwd
    apply.__doc__ = f"{model.name}.apply with its hand-written backward as the VJP."
    return apply
