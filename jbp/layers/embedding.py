"""Embedding: integer token ids in, rows of a learnable table out, ``y = E[ids]``.

Lecture map: an embedding is a dense layer whose input is one-hot: ``E[id] = onehot(id) @ E``,
so ∂C/∂E = aᵀ·δ with ``a`` the one-hot rows. The product with a one-hot matrix only adds
each δ into the row of its id, so the backward is a **scatter-add**,
``dE = zeros.at[ids].add(dy)``: a token that occurs several times collects the sum of its
deltas. The ids themselves are integers: they have no gradient (``jax.vjp`` gives a
``float0`` array of zeros for an integer input, and so does this backward), so an
embedding is where the backward pass ends.

Shapes: ``ids (B, ...)`` of any integer dtype (``(B,)`` one token per example, ``(B, T)``
a sequence, ...) -> ``y (B, ..., dim)`` in the table's dtype; any shape works, a single id
included (so ``jax.vmap`` over examples works, as for dense). Params ``{"E": (vocab_size,
dim)}``, drawn from N(0, 1). Cache: the ids. ``dx``: ``float0`` zeros of the ids' shape.

Ids outside ``[0, vocab_size)``: where the ids are concrete (not traced), the forward raises
a ValueError naming the layer and the first bad id. Under ``jax.jit`` nothing can be raised:
the row of a bad id (negative ones included, which are *not* counted from the end as
NumPy would) is filled with NaN, so the loss and both gradients turn NaN and the
mistake surfaces; the backward drops the deltas of bad ids, as ``jax.grad`` of the
forward does. (Plain ``E[ids]`` would silently clamp a too-large id to the last row and
wrap a negative one.)

Per example (the rule built by ``_rule``): ∂ℓ_i/∂E is the scatter of example i's deltas
alone, a ``(vocab_size, dim)`` array per example (fine for small vocabularies). Its squared
norm needs no such array: ‖Σ_t e_{id_t} δ_tᵀ‖² = Σ_{t,s} [id_t = id_s] δ_t·δ_s, pairs of
positions of example i with the same id; the sum of squares over the batch is built the
same way.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jbp.init import normal
from jbp.layer import Layer, PerExampleRule, as_shape, constructor, param_dtype, positive_int


def _valid(ids, vocab_size):
    return (ids >= 0) & (ids < vocab_size)


def _per_example(ids, delta, vocab_size):
    """ids ``(B, T)``, delta ``(B, T, D)`` with the deltas of bad ids zeroed."""
    ids2 = ids.reshape(ids.shape[0], -1)
    d3 = delta.reshape(ids2.shape + (delta.shape[-1],))
    return ids2, jnp.where(_valid(ids2, vocab_size)[..., None], d3, 0)


def _rule(vocab_size):
    def grads(params, ids, delta):
        ids2, d3 = _per_example(ids, delta, vocab_size)
        batch, dim = ids2.shape[0], d3.shape[-1]
        rows = jnp.arange(batch)[:, None]
        dE = jnp.zeros((batch, vocab_size, dim), d3.dtype).at[rows, ids2].add(
            d3, mode="drop", wrap_negative_indices=False)
        return {"E": dE}

    def same_id_products(ids, delta):
        """``(ids2, c)`` with ``c_it = δ_it ⊙ Σ_s [id_is = id_it] δ_is``: δ_it times row
        ``id_it`` of example i's gradient, ``(B, T, D)``."""
        ids2, d3 = _per_example(ids, delta, vocab_size)
        same = (ids2[:, :, None] == ids2[:, None, :]).astype(d3.dtype)  # (B, T, T)
        return ids2, d3 * jnp.einsum("bts,bsd->btd", same, d3)

    def sq_norms(params, ids, delta):
        _, c = same_id_products(ids, delta)
        return {"E": jnp.sum(c, axis=(1, 2))}  # Σ_{t,s} [id_t = id_s] δ_t·δ_s

    def sum_sq(params, ids, delta):
        # Σ_i (∂ℓ_i/∂E_v)² = Σ_i Σ_t [id_it = v] c_it: scatter the c's into their rows.
        ids2, c = same_id_products(ids, delta)
        zeros = jnp.zeros((vocab_size, c.shape[-1]), c.dtype)
        return {"E": zeros.at[ids2].add(c, mode="drop", wrap_negative_indices=False)}

    return PerExampleRule(grads, sq_norms, sum_sq)


@constructor
def embedding(vocab_size: int, dim: int, *, dtype=jnp.float32) -> Layer:
    """A table of ``vocab_size`` learnable vectors of size ``dim``, looked up by id.

    Args:
      vocab_size: the number of ids; valid ids are ``0 .. vocab_size − 1``.
      dim: the size of each vector.
      dtype: of the table (and of the output).

    Params ``{"E": (vocab_size, dim)}`` ~ N(0, 1). Shapes: ``ids (B, ...)`` integer ->
    ``y (B, ..., dim)``; backward ``dy (B, ..., dim) -> ({"E": (vocab_size, dim)}, float0
    zeros of ids' shape)``.
    """
    vocab_size = positive_int(vocab_size, "vocab_size", "embedding")
    dim = positive_int(dim, "dim", "embedding")
    who = f"embedding({vocab_size}, {dim})"

    def init(key, in_shape):
        shape = as_shape(in_shape, who)
        return shape + (dim,), {"E": normal(key, (vocab_size, dim), param_dtype(dtype, who))}

    def check_ids(ids):
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"{who}: expected integer token ids, got an input of dtype "
                            f"{ids.dtype} and shape {tuple(ids.shape)} (cast with "
                            f".astype(jnp.int32) if the values are ids)")
        if isinstance(ids, jax.core.Tracer) or ids.size == 0:
            return  # under jit: bad ids give NaN rows (see the module docstring)
        concrete = np.asarray(ids)
        bad = (concrete < 0) | (concrete >= vocab_size)
        if bad.any():
            where = tuple(int(i) for i in np.unravel_index(np.argmax(bad), bad.shape))
            raise ValueError(f"{who}: token ids must lie in [0, {vocab_size}); found "
                             f"{int(concrete[where])} at index {where} ({int(bad.sum())} id(s) "
                             f"out of range)")

    def forward(params, ids, *, key=None, train=False, state=None, side=None):
        check_ids(ids)
        E = jnp.asarray(params["E"])
        y = E.at[ids].get(mode="fill", fill_value=jnp.nan, wrap_negative_indices=False)
        return y, ids, state

    def backward(params, ids, dy):
        E = params["E"]
        dE = jnp.zeros(E.shape, dy.dtype).at[ids].add(dy, mode="drop",
                                                       wrap_negative_indices=False)
        return {"E": dE.astype(E.dtype)}, np.zeros(ids.shape, jax.dtypes.float0)

    return Layer(who, init, forward, backward, per_example=_rule(vocab_size))
