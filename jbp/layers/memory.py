"""Memory by design: backwards that choose what the forward keeps.

``jax.grad`` keeps every layer's activations for the backward, so a deep net's training
memory grows linearly with its depth. A hand-written backward may keep less and compute
the rest again on the way down:

- ``remat(layer)`` (recomputation, Chen et al. 2016): the cache is the layer's input
  alone; the backward reruns the layer's forward from it to get the inside's caches,
  then walks the inside. ``serial(*layers, remat_every=k)`` does the same for segments of
  ``k`` layers, keeping only each segment's input: with ``k`` ≈ √n (``remat_every="sqrt"``)
  an n-layer chain keeps √n inputs and one segment's caches at a time, O(√n) instead of
  O(n), for one more forward pass.
- ``reversible(F, G)`` (RevNet, Gomez et al. 2017): the channels (last axis) are split in
  two halves, ``y₁ = x₁ + F(x₂)``, ``y₂ = x₂ + G(y₁)``. The inputs follow from the output,
  ``x₂ = y₂ − G(y₁)``, ``x₁ = y₁ − F(x₂)``, so the block's cache is its output ``y`` and
  nothing of the inside: the backward reconstructs ``x``, rerunning G's and F's forwards
  on the way (which gives their caches), then backpropagates through G and F with their
  own backwards. ``reversible_serial(*blocks)`` chains such blocks and keeps only the
  final output: each block's backward receives its own output from the reconstruction of
  the block above, so activation memory does not grow with depth.

All three are composites written as a ``walk`` (:mod:`jbp.layer`) whose cache holds what
recomputing needs (:class:`Kept`); the walk recomputes the children's caches and then
visits every child with its ``(params, recomputed cache, delta)``, so everything built on
the walk (``backprop``'s deltas, the per-example functions, ``ggn_diagonal``, ``hvp``,
``as_custom_vjp``, ``fit``, ``check_layer``) reaches every layer inside as it would
without them. The recomputation is tied to the delta that reaches the layer in the
backward (:func:`tied`), so XLA can neither merge it with the forward nor run it early
and keep its values after all (``jax.checkpoint``'s optimisation barrier does not prevent
the second on XLA:CPU: docs/performance.md).

**Randomness.** The cache keeps the forward's PRNG ``key`` (and ``train`` and the side
inputs), and the recomputation runs every child with the key it had: dropout draws the
same mask again, so the gradient is the one of the forward that ran.

**State.** A child that keeps state (batch_norm) is refused with an error naming it: the
recomputation would have to run with the state the forward started from (in evaluation
mode its running statistics are the normalisation itself), which these caches do not
keep; rather than recompute with other statistics, it is not supported. layer_norm keeps
no state and works.

**Numerics of reconstruction.** ``x₂ = y₂ − G(y₁)`` is exact in real numbers, not in
floating point: each block adds a rounding error of the size of ``ε·|y|`` (ε = 2⁻²⁴ in
float32), and the reconstruction of the block below starts from the reconstructed, not
the true, output, so the errors add up (and are amplified by F's and G's Lipschitz
constants) from the top of the stack down. The gradient is then the exact gradient at
slightly different activations. ``tests/test_memory.py`` bounds the relative error of
the reconstructed input of a 32-block float32 stack (by 1e-4; measured 2e-6 to 1.2e-5);
docs/performance.md has it against depth (3.7e-7 at 4 blocks of width 128, 9.0e-4 at
128, 2.2e-2 at 256). It matters where it is of the size of what training resolves:
with float32 and hundreds of blocks whose F and G have large gains; float64 reconstructs
to its own rounding.
"""

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jbp.layer import (EXAMPLEWISE, Layer, as_integer, as_shape, child_keys, constructor,
                       forward_chain, forward_child, noting_position)


@dataclasses.dataclass(frozen=True)
class Kept:
    """The cache of a recomputing layer: ``array`` (the input of a recomputed forward,
    a tuple of them for segments, or a reversible block's output) and what reruns the
    forward around it: its PRNG ``key``, its ``side`` inputs and ``train`` (static)."""

    array: Any
    key: Any
    side: Any
    train: bool


jax.tree_util.register_dataclass(Kept, data_fields=["array", "key", "side"],
                                 meta_fields=["train"])


def tied(kept, dy):
    """``kept`` with every float array made to depend on ``dy``, the delta
    that reaches the layer in the backward (``+ 0·dy[first]``, one scalar added), so that a
    recomputation from ``kept`` can neither be merged with the forward's (XLA's
    common-subexpression elimination) nor be scheduled early, during the forward, and hold
    its values until the backward: both would undo what recomputing is for. XLA's
    ``optimization_barrier``, which ``jax.checkpoint`` uses, does neither on the CPU
    backend: it is removed before scheduling, and the recomputation is then run early.
    (``0·dy[first]`` is 0 unless ``dy`` holds an inf or a NaN, which the backward, linear
    in ``dy``, spreads to the gradients anyway. Under ``jax.vmap`` over the deltas, as
    ``ggn_diagonal`` runs one backward per column of the loss Hessian's factor, ``kept``
    is batched with them: the recomputation runs once per column.)"""
    zero = jnp.sum(jnp.ravel(dy)[:1]) * 0

    def tie(a):
        return a + zero.astype(a.dtype) if jnp.issubdtype(a.dtype, jnp.inexact) else a

    return jax.tree_util.tree_map(tie, kept)


def _refuse_state(who: str, layers) -> None:
    for layer in layers:
        if layer.stateful:
            raise ValueError(f"{who}: {layer.name} keeps state (batch_norm's running "
                             f"statistics), which recomputing forwards does not support "
                             f"(see jbp.layers.memory); use layer_norm inside, or keep the "
                             f"stateful layer outside")


def _check_layers(who: str, layers, what: str = "argument") -> None:
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"{who}: {what} {i} must be a Layer, got {type(layer).__name__}")


# ---------------------------------------------------------------------------- remat

@constructor
def remat(layer: Layer) -> Layer:
    """``layer`` whose cache is only its input: the backward reruns its forward.

    Params: ``layer``'s. Shapes: ``layer``'s. Cache: :class:`Kept` with the input.
    Per example: ``layer``'s (the walk visits it with the recomputed cache).
    """
    _check_layers("remat", (layer,))
    name = f"remat({layer.name})"
    _refuse_state(name, (layer,))

    def forward(params, x, *, key=None, train=False, state=None, side=None):
        y, _, _ = forward_child(layer, params, x, key=key, train=train, state={}, side=side)
        return y, Kept(x, key, side, train), state

    def walk(params, kept, dy, visit):
        _, cache, _ = forward_child(layer, params, tied(kept.array, dy), key=kept.key,
                                    train=kept.train, state={}, side=kept.side)
        return visit(layer, params, cache, dy)

    return Layer(name, layer.init, forward, layers=(layer,), walk=walk,
                 per_example=EXAMPLEWISE)


def segment_length(remat_every, n: int, who: str) -> int:
    """``remat_every`` as a number of layers per segment: a positive int, or ``"sqrt"`` for
    ⌈√n⌉ (Chen et al.'s choice, which balances the kept inputs against one segment's
    caches)."""
    if remat_every == "sqrt":
        return math.isqrt(n - 1) + 1 if n > 1 else 1
    k = as_integer(remat_every)
    if k is None or k <= 0:
        raise ValueError(f"{who}: remat_every must be a positive int or 'sqrt', got "
                         f"{remat_every!r}")
    return k


def recomputed_segments(layers, k: int, name: str):
    """``(forward, walk)`` of a chain of ``layers`` that keeps only the input of every
    segment of ``k`` layers and reruns each segment's forward in the backward (params: one
    entry per layer, as ``serial``'s)."""
    n = len(layers)
    _refuse_state(name, layers)
    segments = [range(s, min(s + k, n)) for s in range(0, n, k)]

    def forward(params, x, *, key=None, train=False, state=None, side=None):
        keys, inputs = child_keys(key, n), []
        for segment in segments:
            inputs.append(x)
            x, _ = forward_chain(layers, segment, params, x, keys=keys, train=train,
                                 states=[{}] * n, side=side, parent=name)
        return x, Kept(tuple(inputs), key, side, train), state

    def walk(params, kept, dy, visit):
        keys, results = child_keys(kept.key, n), [None] * n
        for segment, x in zip(reversed(segments), reversed(kept.array)):
            _, caches = forward_chain(layers, segment, params, tied(x, dy), keys=keys,
                                      train=kept.train, states=[{}] * n, side=kept.side,
                                      parent=name)
            for i, cache in zip(reversed(segment), reversed(caches)):
                with noting_position(i, layers[i], name, "backward"):
                    results[i], dy = visit(layers[i], params[i], cache, dy)
        return tuple(results), dy

    return forward, walk


# ---------------------------------------------------------------------------- reversible

class Reversible(NamedTuple):
    """``info`` of a reversible block: its two functions (what ``reversible_serial`` and
    :func:`invert` read)."""

    f: Layer
    g: Layer


class Stack(NamedTuple):
    """``info`` of a ``reversible_serial`` stack: its blocks."""

    blocks: tuple


class Inside(NamedTuple):
    """A reversible block's cache after reconstruction: F's and G's caches."""

    f: Any
    g: Any


def _halves(a):
    half = a.shape[-1] // 2
    return a[..., :half], a[..., half:]


def _check_channels(who: str, shape) -> None:
    if not shape or shape[-1] % 2:
        raise ValueError(f"{who}: splits the channels (the last axis) into two halves, so it "
                         f"needs an even number of them; got the shape {tuple(shape)}")


def _check_kept(who: str, which: Layer, shape, got) -> None:
    if tuple(got) != tuple(shape):
        raise ValueError(f"{who}: {which.name} must keep the shape of a half {tuple(shape)} "
                         f"(its output is added to the other half), but gives {tuple(got)}")


def _split_key(key):
    return (None, None) if key is None else tuple(jax.random.split(key))


def _reconstruct(pair: Reversible, params, kept: Kept):
    """``(x, Inside)``: a block's input from its output ``kept.array``, x₂ = y₂ − G(y₁),
    x₁ = y₁ − F(x₂), and F's and G's caches from the forwards that this reruns."""
    f, g = pair
    y1, y2 = _halves(kept.array)
    key_f, key_g = _split_key(kept.key)
    g_out, cache_g, _ = forward_child(g, params[1], y1, key=key_g, train=kept.train,
                                      state={}, side=kept.side)
    x2 = y2 - g_out
    f_out, cache_f, _ = forward_child(f, params[0], x2, key=key_f, train=kept.train,
                                      state={}, side=kept.side)
    return jnp.concatenate([y1 - f_out, x2], axis=-1), Inside(cache_f, cache_g)


@constructor
def reversible(f: Layer, g: Layer) -> Layer:
    """A reversible residual block (RevNet): ``y = [x₁ + F(x₂), x₂ + G(y₁)]`` for
    ``x = [x₁, x₂]`` split in halves along the last axis.

    Args:
      f, g: layers (or composites) that keep the shape of a half, ``(..., C/2)``.

    Params: ``(params_f, params_g)``. Shapes: ``x (B, ..., C) -> y (B, ..., C)``, C even.
    Cache: :class:`Kept` with the output ``y`` (and the key): nothing of the inside; the
    backward reconstructs ``x`` and F's and G's caches (see the module docstring), or takes
    them from ``reversible_serial``'s reconstruction. Per example: F's and G's.
    """
    _check_layers("reversible", (f, g))
    name = f"reversible({f.name}, {g.name})"
    _refuse_state(name, (f, g))

    def init(key, in_shape):
        shape = as_shape(in_shape, name, min_ndim=1, layout="(..., channels)")
        _check_channels(name, shape)
        half = shape[:-1] + (shape[-1] // 2,)
        key_f, key_g = jax.random.split(key)
        params = []
        for layer, k in ((f, key_f), (g, key_g)):
            out, p = layer.init(k, half)
            _check_kept(name, layer, half, out)
            params.append(p)
        return shape, tuple(params)

    def forward(params, x, *, key=None, train=False, state=None, side=None):
        _check_channels(name, x.shape[1:])
        x1, x2 = _halves(x)
        key_f, key_g = _split_key(key)
        f_out, _, _ = forward_child(f, params[0], x2, key=key_f, train=train, state={},
                                    side=side)
        _check_kept(name, f, x2.shape, f_out.shape)
        y1 = x1 + f_out
        g_out, _, _ = forward_child(g, params[1], y1, key=key_g, train=train, state={},
                                    side=side)
        _check_kept(name, g, y1.shape, g_out.shape)
        y = jnp.concatenate([y1, x2 + g_out], axis=-1)
        return y, Kept(y, key, side, train), state

    def walk(params, cache, dy, visit):
        if isinstance(cache, Kept):  # its own forward's: reconstruct (in a stack: done)
            cache = _reconstruct(Reversible(f, g), params, tied(cache, dy))[1]
        dy1, dy2 = _halves(dy)
        result_g, dy1_g = visit(g, params[1], cache.g, dy2)
        dy1 = dy1 + dy1_g  # y₁ feeds y₁ itself and G
        result_f, dx2_f = visit(f, params[0], cache.f, dy1)
        return (result_f, result_g), jnp.concatenate([dy1, dy2 + dx2_f], axis=-1)

    return Layer(name, init, forward, layers=(f, g), walk=walk, per_example=EXAMPLEWISE,
                 info=Reversible(f, g))


@constructor
def reversible_serial(*blocks: Layer) -> Layer:
    """Chain ``reversible`` blocks keeping only the final output: activation memory that
    does not grow with the number of blocks.

    Params: a tuple, one entry per block. Cache: :class:`Kept` with the output. The walk
    reconstructs each block's input from its output, top down, and visits the block with
    F's and G's caches from that reconstruction (so the machinery sees every block, and
    every layer inside, as in ``serial``).
    """
    if not blocks:
        raise ValueError("reversible_serial: needs at least one block")
    _check_layers("reversible_serial", blocks, "block")
    for i, block in enumerate(blocks):
        if not isinstance(block.info, Reversible):
            raise TypeError(f"reversible_serial: block {i} ({block.name}) must be a "
                            f"jbp.reversible(F, G) block, whose input follows from its output")
    n = len(blocks)
    name = "reversible_serial(" + ", ".join(b.name for b in blocks) + ")"

    def init(key, in_shape):
        shape = as_shape(in_shape, name)
        params = []
        for i, (block, k) in enumerate(zip(blocks, jax.random.split(key, n))):
            with noting_position(i, block, name, "init"):
                params.append(block.init(k, shape)[1])  # a block keeps the shape
        return shape, tuple(params)

    def forward(params, x, *, key=None, train=False, state=None, side=None):
        y, _ = forward_chain(blocks, range(n), params, x, keys=child_keys(key, n),
                             train=train, states=[{}] * n, side=side, parent=name)
        return y, Kept(y, key, side, train), state

    def walk(params, kept, dy, visit):
        y, keys, results = kept.array, child_keys(kept.key, n), [None] * n
        for i in reversed(range(n)):
            y = tied(y, dy)  # block i is reconstructed when its delta is there
            with noting_position(i, blocks[i], name, "backward"):
                y, inside = _reconstruct(blocks[i].info, params[i],
                                         Kept(y, keys[i], kept.side, kept.train))
                results[i], dy = visit(blocks[i], params[i], inside, dy)
        return tuple(results), dy

    return Layer(name, init, forward, layers=blocks, walk=walk, per_example=EXAMPLEWISE,
                 info=Stack(blocks))


def invert(model: Layer, params, y, *, key=None, train=False, side=None):
    """The input of a ``reversible`` block or a ``reversible_serial`` stack, reconstructed
    from its output ``y`` as its backward does (``key``, ``train``, ``side``: the forward's).
    For measuring the reconstruction error; float64 reconstructs to its own rounding."""
    side = side or {}
    if isinstance(model.info, Reversible):
        return _reconstruct(model.info, params, Kept(y, key, side, train))[0]
    if not isinstance(model.info, Stack):
        raise TypeError(f"invert: {model.name} is neither a jbp.reversible block nor a "
                        f"jbp.reversible_serial stack")
    blocks = model.info.blocks
    keys = child_keys(key, len(blocks))
    for i in reversed(range(len(blocks))):
        y = _reconstruct(blocks[i].info, params[i], Kept(y, keys[i], side, train))[0]
    return y
