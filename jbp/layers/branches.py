"""Branches: ``residual(block)`` and ``parallel(*branches)``, fan-out and fan-in.

Lecture map: when a neuron's output feeds several layers, ∂C/∂a is the *sum* over the
layers it feeds. Here that sum is one line of each walk: ``x`` feeds every branch (and, in a
residual block, the identity path too), so ∂C/∂x is the sum of what the branches send back.

- ``residual(block)``: y = x + block(x); ∂C/∂x = ∂C/∂y + block's ∂C/∂x. Params: the block's.
- ``parallel(*branches, combine="sum")``: y = Σ_i branch_i(x); each branch receives ∂C/∂y.
- ``parallel(*branches, combine="concat")``: y = [branch_1(x), ..., branch_n(x)] along the
  last axis; branch i receives its slice of ∂C/∂y. Params: a tuple, one entry per branch.

Both are composites written as a ``walk`` (see :mod:`jbp.layer`), so ``backprop``, the
checks and the per-example functions reach every layer inside; they nest.
"""

import jax
import jax.numpy as jnp

from jbp.layer import (EXAMPLEWISE, Layer, as_shape, child_states, composite_init_state,
                       composite_state, constructor, forward_child, noting_position)

COMBINE = ("sum", "concat")


def _check_layers(who, layers):
    if not layers:
        raise ValueError(f"{who}: needs at least one branch")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"{who}: branch {i} must be a Layer, got {type(layer).__name__}")


@constructor
def residual(block: Layer) -> Layer:
    """``y = x + block(x)``; ``block`` must keep the per-example shape."""
    _check_layers("residual", (block,))
    name = f"residual({block.name})"

    def init(key, in_shape):
        shape = as_shape(in_shape, name)
        out_shape, params = block.init(key, shape)
        if tuple(out_shape) != shape:
            raise ValueError(f"{name}: the block must keep the per-example shape {shape} (the "
                             f"identity path adds x to its output), but it gives {tuple(out_shape)}")
        return shape, params

    def forward(params, x, *, key=None, train=False, state=None, side=None):
        y, cache, new_state = forward_child(block, params, x, key=key, train=train, state=state,
                                            side=side)
        if y.shape != x.shape:
            raise ValueError(f"{name}: the block maps {tuple(x.shape)} to {tuple(y.shape)}; "
                             f"x + block(x) needs the shapes equal")
        return x + y, cache, new_state

    def walk(params, cache, dy, visit):
        result, dx_block = visit(block, params, cache, dy)
        return result, dy + dx_block  # the identity path's delta plus the block's

    return Layer(name, init, forward, layers=(block,),
                 walk=walk, per_example=EXAMPLEWISE, init_state=block.init_state)  # the block's state, as its params


@constructor
def parallel(*branches: Layer, combine: str = "sum") -> Layer:
    """Every branch on the same input; their outputs summed (``combine="sum"``: equal
    shapes) or concatenated along the last axis (``"concat"``: equal but for the last)."""
    _check_layers("parallel", branches)
    if combine not in COMBINE:
        raise ValueError(f"parallel: combine must be one of {COMBINE}, got {combine!r}")
    n = len(branches)
    name = f"parallel[{combine}](" + ", ".join(b.name for b in branches) + ")"

    def init(key, in_shape):
        shape = as_shape(in_shape, name)
        shapes, params = [], []
        for i, (branch, k) in enumerate(zip(branches, jax.random.split(key, n))):
            with noting_position(i, branch, name, "init"):
                out_shape, p = branch.init(k, shape)
            shapes.append(tuple(out_shape))
            params.append(p)
        heads = {s if combine == "sum" else s[:-1] for s in shapes}
        if len(heads) != 1 or (combine == "concat" and not all(shapes)):
            need = "equal shapes" if combine == "sum" else "shapes equal but for the last axis"
            raise ValueError(f"{name}: combine={combine!r} needs {need}; the branches give "
                             f"{', '.join(map(str, shapes))}")
        out = shapes[0] if combine == "sum" else shapes[0][:-1] + (sum(s[-1] for s in shapes),)
        return out, tuple(params)

    def forward(params, x, *, key=None, train=False, state=None, side=None):
        keys = jax.random.split(key, n) if key is not None else [None] * n
        ys, caches, states = [], [], list(child_states(state, n))
        for i, branch in enumerate(branches):
            with noting_position(i, branch, name, "forward"):
                y, cache, states[i] = forward_child(branch, params[i], x, key=keys[i],
                                                    train=train, state=states[i], side=side)
            ys.append(y)
            caches.append(cache)
        if combine == "sum":
            return sum(ys[1:], ys[0]), tuple(caches), composite_state(states)
        widths = tuple(y.shape[-1] for y in ys)  # static: where each branch's slice starts
        return jnp.concatenate(ys, axis=-1), (tuple(caches), widths), composite_state(states)

    def init_state(in_shape):
        return composite_init_state(branches, [as_shape(in_shape, name)] * n)

    def walk(params, cache, dy, visit):
        if combine == "sum":
            caches, slices = cache, [dy] * n  # every branch receives ∂C/∂y
        else:
            caches, widths = cache
            ends = [sum(widths[: i + 1]) for i in range(n)]
            slices = [dy[..., end - w:end] for w, end in zip(widths, ends)]
        results, dx = [None] * n, None
        for i, branch in enumerate(branches):
            with noting_position(i, branch, name, "backward"):
                results[i], dx_i = visit(branch, params[i], caches[i], slices[i])
            dx = dx_i if dx is None else dx + dx_i  # x feeds every branch: the deltas add up
        return tuple(results), dx

    stateful = any(branch.stateful for branch in branches)
    return Layer(name, init, forward,
                 layers=tuple(branches), walk=walk, per_example=EXAMPLEWISE,
                 init_state=init_state if stateful else None)
