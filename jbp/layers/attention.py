"""Multi-head self-attention with a blocked ("flash") forward and a hand-written backward.

For one head, with queries, keys and values ``q, k, v (T, Dh)`` and ``c = 1/√Dh``::

    s = c · q kᵀ            (T, T) scores        p = softmax(s) along each row
    o = p v                 (T, Dh) output

**Forward, block by block.** The keys and values are cut into blocks of ``block`` rows and a
``lax.scan`` runs over the blocks with an *online softmax*: per query row it carries the
running max ``m``, the normaliser ``l = Σ exp(s − m)`` and the unnormalised output ``acc``.
A new block's scores ``s_j`` (T, block) move the max to ``m' = max(m, rowmax(s_j))``; what
was summed so far is rescaled by ``exp(m − m')``::

    l'   = exp(m − m') · l   + Σ_cols exp(s_j − m')
    acc' = exp(m − m') · acc + exp(s_j − m') v_j

At the end ``o = acc / l``. No (T, T) array is ever formed: a step holds (T, block)
arrays. The cache keeps ``x, q, k, v, o`` and per row ``m`` and ``l`` (and a reference to
``W_o``), O(T) per head.

**Backward, block by block.** With ``do = ∂C/∂o``, ``p`` is recomputed from the cache block
by block, ``p_j = exp(s_j − m − log l)``, and::

    D   = rowsum(do ∘ o)            (T,): equals rowsum(p ∘ dp), since o = p v
    dv_j = p_jᵀ do                  dp_j = do v_jᵀ
    ds_j = p_j ∘ (dp_j − D)         the softmax backward: ∂C/∂s = p ∘ (∂C/∂p − rowsum(p ∘ ∂C/∂p))
    dq  += c · ds_j k_j             dk_j = c · ds_jᵀ q

A row whose normaliser came out as exactly ``l = 1`` (it sees a single key: T = 1, the first
row under a causal mask; or its softmax is saturated beyond working precision) is one-hot to
working precision, and so is the softmax's Jacobian ``diag(p) − p pᵀ`` zero: its ``ds`` is
set to 0. Computed, ``dp − D`` would be the rounding difference of two reductions of
``do·v`` (XLA fuses them differently), and dq, dk would be noise where ``jax.vjp`` gives
exact zeros: at T = 1 the q and k gradients were ~1e-8 (float32) and ~1e-16 (float64) in 4
of 12 small configurations, exactly zero in all 12 with the rule.

Why ``m`` and ``l`` and not their log-sum-exp ``lse = m + log l`` (one array instead of two,
``p_j = exp(s_j − lse)``): where the softmax saturates the scores are in the hundreds, and so
is ``lse``, whose float32 rounding (2⁻¹⁵ ≈ 3e-5 near 300) becomes a relative error of every
``p`` of its row. ``s_j − m`` is small and nearly exact and ``log l`` lies in [0, log T], so
``exp(s_j − m − log l)`` is as accurate as the forward's ``p``. Measured in float32 at
q, k ~ N(0, 25²), v, do ~ N(0, 1) (B 4, H 2, T 40, Dh 8, blocks of 16; median of 5 draws of
the relative error against float64 from the same rounded inputs), dq, dk, dv:

    this backward, from m and l     2.2e-5  2.6e-5  1.1e-6   (causal 1.5e-5  1.9e-5  6.2e-7)
    the same from lse               2.9e-5  3.0e-5  4.6e-6   (causal 2.5e-5  2.8e-5  4.4e-6)
    jax.vjp of the blocked forward  2.1e-5  2.5e-5  1.1e-6   (causal 1.4e-5  1.8e-5  6.2e-7)
    jax.vjp of a plain softmax      2.9e-5  4.2e-5  1.3e-6   (causal 5.7e-5  4.8e-5  1.0e-6)

dq and dk keep only about 5 digits there whichever way they are computed: a saturated row
of ``ds`` sums to nearly zero out of terms of size ``do·v``. Two float32 backwards then
differ by more than 1e-5 from each other, which is why ``check_layer`` judges float32
against float64 where ``jax.vjp`` itself misses 1e-5.

The limit: ``D = rowsum(do ∘ o)`` equals ``rowsum(p ∘ dp)`` only up to rounding, so a row of
``ds`` sums to a rounding error instead of to zero (``jax.vjp``'s rows do sum to zero: it
takes ``D`` from its own ``p`` and ``dp``). Where nearly every row is saturated, the q and k
gradients are made of the few rows that are not, and that rounding swamps them:
``check_layer(jbp.attention(1, 2, block_size=2), (5, 3))`` (one head of 2 features, the
large case's inputs × 30; weight gradients of q and k ~1e-11) finds them off by 9e-7 in
float64 and by 100% in float32 (its rows are one-hot there), where ``jax.vjp`` is off by
8e-5, and fails. A
``D`` consistent with ``dp`` needs a whole row of ``p ∘ dp`` before the first block's
``ds``: a second pass over the key blocks (two more products per block), or a scan over
query blocks, which sees whole rows. Measured at T = 2048 (B 4, H 4, Dh 64), the
query-block scan took 0.87–0.91 × the time of ``jax.grad`` through plain attention, this
one 0.69–0.73 ×, inside the 0.75 target: left out, as FlashAttention leaves it out.

**Blocks and masks.** ``T ≤ block``: one block of all ``T`` keys. Otherwise the keys and
values are padded with zeros to a multiple of ``block`` and the padded keys are masked
(score −∞, probability 0); with ``causal=True`` key ``t'`` is masked for query ``t < t'``.
Every query row sees key 0 in the first block, so the running max is finite after it.

**Causal: only the pairs below the diagonal.** Under ``causal=True`` with more than one
block, key block ``j`` matters to query block ``i`` only when ``j ≤ i``. Forward and backward
then scan the ``n(n+1)/2`` pairs ``(i, j)`` instead of the ``n`` key blocks against every
query (:func:`causal_core`): each step computes one (block, block) tile of scores and
updates rows ``i`` of ``m, l, acc`` (forward) or of ``dq`` and rows ``j`` of ``dk, dv``
(backward) in place, so about half the products and exponentials of the full scan are
skipped, and a step holds a (block, block) array rather than (T, block). A Python loop of
prefixes or diagonals does the same work with larger products, but XLA:CPU's concurrency
scheduler then keeps every step's scores alive at once (measured at T 2048: 324 MiB
temporary for the forward against 2.6 MiB for the scan); the scan keeps them one at a time.

**Side inputs** (:mod:`jbp.masks`): ``lengths`` or ``key_mask`` mask padded keys,
``attention_mask`` any (query, key) pair; each is cut into key blocks with the keys (a
``(B, block)`` or ``(B, H, T, block)`` slice per step), so a padding mask forms no (T, T)
array. A row can then lose every key: its running max stays −∞, which is read as 0 in
``exp(s − m)`` (so ``p = 0``, not NaN), its ``l`` stays 0 and its output is 0; the backward
recomputes ``p = 0`` for it, so its gradients are 0 too. The masks ride in the cache.

Shapes: ``x (B, T, d_model) -> y (B, T, d_model)``. Params: one entry per projection, as a
dense layer's, ``{"q", "v": {"W": (d_model, H·Dh), "b": (H·Dh,)}, "k": {"W": (d_model, H·Dh)},
"o": {"W": (H·Dh, d_model), "b": (d_model,)}}``; ``y = concat_heads(o) @ W_o + b_o``. The keys
have no bias: it would add ``q·b_k`` to every score of a row, which the softmax ignores, so
its gradient is exactly zero and it would never train.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jbp import masks
from jbp.init import constant, normal
from jbp.layer import (Layer, PerExampleRule, as_shape, boolean, cast_like, constructor,
                       kronecker_rows, param_dtype, positive_int)

PROJECTIONS = ("q", "k", "v", "o")


def _blocking(t: int, block: int) -> tuple[int, int]:
    """``(block rows, number of blocks)`` for ``t`` keys: one block when ``t ≤ block``."""
    if t <= block:
        return t, 1
    return block, -(-t // block)


def _key_blocks(a, block: int, n_blocks: int):
    """``a (B, H, T, Dh)``, zero-padded to ``n_blocks·block`` rows, as
    ``(n_blocks, B, H, block, Dh)``."""
    b, h, t, dh = a.shape
    a = jnp.pad(a, ((0, 0), (0, 0), (0, n_blocks * block - t), (0, 0)))
    return a.reshape(b, h, n_blocks, block, dh).transpose(2, 0, 1, 3, 4)


def _from_blocks(a, t: int):
    """``(n_blocks, B, H, block, Dh) -> (B, H, T, Dh)``, the padding dropped."""
    n, b, h, block, dh = a.shape
    return a.transpose(1, 2, 0, 3, 4).reshape(b, h, n * block, dh)[:, :, :t]


def _mask_blocks(mask, block: int, n_blocks: int):
    """A mask ``(..., T_k)``, padded with False to ``n_blocks·block`` keys, as
    ``(n_blocks, ..., block)``; None stays None."""
    if mask is None:
        return None
    pad = [(0, 0)] * (mask.ndim - 1) + [(0, n_blocks * block - mask.shape[-1])]
    mask = jnp.pad(mask, pad).reshape(*mask.shape[:-1], n_blocks, block)
    return jnp.moveaxis(mask, -2, 0)


def _scores(q, k_j, j, block: int, t_k: int, causal: bool, key_mask_j=None, mask_j=None):
    """``s_j = c · q k_jᵀ (B, H, T_q, block)`` with masked keys at −∞, for key block ``j``
    of ``t_k`` keys; ``key_mask_j (B, block)`` and ``mask_j (B, 1 or H, T_q, block)``: the
    side inputs' blocks."""
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k_j) / math.sqrt(q.shape[-1])
    key_pos = j * block + jnp.arange(block)
    keep = key_pos[None, :] < t_k                                    # not padding
    if causal:
        keep = keep & (key_pos[None, :] <= jnp.arange(q.shape[2])[:, None])  # no later key
    if key_mask_j is not None:
        keep = keep & key_mask_j[:, None, None, :]                   # a real key
    if mask_j is not None:
        keep = keep & mask_j
    return jnp.where(keep, s, -jnp.inf)


def _by_pairs(causal: bool, q, k, block: int) -> bool:
    """Whether the core runs :func:`causal_core`'s scan over the block pairs at or below the
    diagonal: causal self-attention (as many queries as keys) of more than one block."""
    return causal and q.shape[2] == k.shape[2] > block


def _finite_max(m):
    """``m`` with the max of a row that has seen no key yet (−∞) taken as 0, so that
    ``exp(s − m)`` is 0 there rather than NaN (only where a mask can empty a row)."""
    return jnp.where(m == -jnp.inf, 0, m)


def attention_core(q, k, v, *, causal: bool, block: int, key_mask=None, mask=None):
    """``q (B, H, T_q, Dh)``, ``k, v (B, H, T_k, Dh) -> (o (B, H, T_q, Dh), m (B, H, T_q),
    l (B, H, T_q))`` by the online softmax: per row the max score ``m`` and the normaliser
    ``l = Σ exp(s − m)``. ``key_mask (B, T_k)``, ``mask (B, 1 or H, T_q, T_k)``: bool, False
    where a key is masked; a row with every key masked gives ``o = 0`` (and ``m = −∞``,
    ``l = 0``)."""
    t = k.shape[2]
    if _by_pairs(causal, q, k, block):
        return causal_core(q, k, v, block=block, key_mask=key_mask, mask=mask)
    block, n_blocks = _blocking(t, block)
    masked = key_mask is not None or mask is not None
    finite = _finite_max if masked else (lambda m: m)

    def step(carry, kv_j):
        m, l, acc = carry
        k_j, v_j, j, key_mask_j, mask_j = kv_j
        s = _scores(q, k_j, j, block, t, causal, key_mask_j, mask_j)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_use = finite(m_new)
        alpha = jnp.exp(m - m_use)                                   # rescales what came before
        p = jnp.exp(s - m_use[..., None])
        l = alpha * l + jnp.sum(p, axis=-1)
        acc = alpha[..., None] * acc + jnp.einsum("bhqk,bhkd->bhqd", p, v_j)
        return (m_new, l, acc), None

    rows = q.shape[:3]
    carry = (jnp.full(rows, -jnp.inf, q.dtype), jnp.zeros(rows, q.dtype), jnp.zeros_like(q))
    blocks = (_key_blocks(k, block, n_blocks), _key_blocks(v, block, n_blocks),
              jnp.arange(n_blocks), _mask_blocks(key_mask, block, n_blocks),
              _mask_blocks(mask, block, n_blocks))
    (m, l, acc), _ = lax.scan(step, carry, blocks)
    if masked:
        return acc / jnp.where(l == 0, 1, l)[..., None], m, l
    return acc / l[..., None], m, l


def attention_core_backward(q, k, v, o, m, l, do, *, causal: bool, block: int, key_mask=None,
                            mask=None):
    """``do = ∂C/∂o (B, H, T_q, Dh) -> (dq, dk, dv)``, shaped like ``q, k, v``; ``p``
    recomputed block by block from the rows' ``m`` and ``l`` (a row with every key masked:
    p = 0)."""
    t = k.shape[2]
    block, n_blocks = _blocking(t, block)
    c = 1 / math.sqrt(q.shape[-1])
    D = jnp.sum(do * o, axis=-1, keepdims=True)                       # (B, H, T, 1)
    if key_mask is not None or mask is not None:
        m, l = _finite_max(m), jnp.where(l == 0, 1, l)  # an empty row's s − m stays −∞
    log_l = jnp.log(l)[..., None]
    one_hot = (l == 1)[..., None]  # rows whose softmax is one-hot to working precision
    if _by_pairs(causal, q, k, block):
        return causal_core_backward(q, k, v, D, m[..., None], log_l, one_hot, do, block=block,
                                    key_mask=key_mask, mask=mask)

    def step(dq, kv_j):
        k_j, v_j, j, key_mask_j, mask_j = kv_j
        s = _scores(q, k_j, j, block, t, causal, key_mask_j, mask_j)
        p = jnp.exp(s - m[..., None] - log_l)
        dv_j = jnp.einsum("bhqk,bhqd->bhkd", p, do)
        dp = jnp.einsum("bhqd,bhkd->bhqk", do, v_j)
        ds = jnp.where(one_hot, 0, p * (dp - D))
        dq = dq + c * jnp.einsum("bhqk,bhkd->bhqd", ds, k_j)
        dk_j = c * jnp.einsum("bhqk,bhqd->bhkd", ds, q)
        return dq, (dk_j, dv_j)

    blocks = (_key_blocks(k, block, n_blocks), _key_blocks(v, block, n_blocks),
              jnp.arange(n_blocks), _mask_blocks(key_mask, block, n_blocks),
              _mask_blocks(mask, block, n_blocks))
    dq, (dk, dv) = lax.scan(step, jnp.zeros_like(q), blocks)
    return dq, _from_blocks(dk, t), _from_blocks(dv, t)


def _triangle(n_blocks: int):
    """``(i, j)`` for every query block ``i`` and key block ``j ≤ i``, row by row: the
    ``n(n+1)/2`` block pairs a causal mask leaves (int32 arrays, scanned over)."""
    i, j = np.tril_indices(n_blocks)
    return jnp.asarray(i, jnp.int32), jnp.asarray(j, jnp.int32)


def _pad_rows(a, rows: int):
    """``a (B, H, T, ...)`` padded with zeros (False) to ``rows`` rows along axis 2."""
    pad = [(0, 0), (0, 0), (0, rows - a.shape[2])] + [(0, 0)] * (a.ndim - 3)
    return jnp.pad(a, pad)


def _rows(a, i, block: int):
    """Rows ``i·block … i·block + block − 1`` of ``a`` along axis 2 (``i`` traced)."""
    return lax.dynamic_slice_in_dim(a, i * block, block, axis=2)


def _add_rows(a, i, block: int, update):
    """``a`` with ``update`` added to rows ``i·block …`` along axis 2, in place in a loop."""
    return lax.dynamic_update_slice_in_dim(a, _rows(a, i, block) + update, i * block, axis=2)


def _pair_scores(q, k, i, j, block: int, key_mask, mask):
    """``q_i k_jᵀ (B, H, block, block)`` for query block ``i`` and key block ``j``, keys
    after their query and masked keys at −∞; ``q`` (already scaled by ``c``), ``k`` (B, H,
    rows, Dh) padded to whole blocks, ``key_mask (B, rows)`` and ``mask (B, 1 or H, rows,
    rows)`` likewise, or None."""
    s = jnp.einsum("bhqd,bhkd->bhqk", _rows(q, i, block), _rows(k, j, block))
    pos = jnp.arange(block)
    keep = (j * block + pos)[None, :] <= (i * block + pos)[:, None]
    if key_mask is not None:
        keep = keep & lax.dynamic_slice_in_dim(key_mask, j * block, block, axis=1)[:, None, None]
    if mask is not None:
        rows = lax.dynamic_slice_in_dim(mask, i * block, block, axis=2)
        keep = keep & lax.dynamic_slice_in_dim(rows, j * block, block, axis=3)
    return jnp.where(keep, s, -jnp.inf)


def _causal_inputs(q, k, v, key_mask, mask, block: int):
    """``(rows, n_blocks, c·q, k, v, key_mask, mask)`` padded to whole blocks (padded keys
    lie after every real query, so the causal mask already hides them); ``c = 1/√Dh`` is
    applied to ``q`` once rather than to every score."""
    n_blocks = -(-q.shape[2] // block)
    rows = n_blocks * block
    q, k, v = (_pad_rows(a, rows) for a in (q / math.sqrt(q.shape[-1]), k, v))
    if key_mask is not None:
        key_mask = jnp.pad(key_mask, ((0, 0), (0, rows - key_mask.shape[1])))
    if mask is not None:
        pad = rows - mask.shape[-1]
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, pad)))
    return rows, n_blocks, q, k, v, key_mask, mask


def causal_core(q, k, v, *, block: int, key_mask=None, mask=None):
    """:func:`attention_core` under a causal mask (``T_q = T_k > block``), visiting only the
    ``n(n+1)/2`` block pairs at or below the diagonal: one ``lax.scan`` over the pairs, row by
    row, updating the rows' running max, normaliser and output in place. A (block, block)
    array per step; the ``n(n−1)/2`` pairs above the diagonal are never computed."""
    t = q.shape[2]
    rows, n_blocks, q, k, v, key_mask, mask = _causal_inputs(q, k, v, key_mask, mask, block)
    finite = _finite_max if key_mask is not None or mask is not None else (lambda m: m)

    def step(carry, ij):
        m, l, acc = carry
        i, j = ij
        s = _pair_scores(q, k, i, j, block, key_mask, mask)
        m_i = _rows(m, i, block)
        m_new = jnp.maximum(m_i, jnp.max(s, axis=-1))
        m_use = finite(m_new)
        alpha = jnp.exp(m_i - m_use)
        p = jnp.exp(s - m_use[..., None])
        l_i = alpha * _rows(l, i, block) + jnp.sum(p, axis=-1)
        acc_i = alpha[..., None] * _rows(acc, i, block) + jnp.einsum(
            "bhqk,bhkd->bhqd", p, _rows(v, j, block))
        m, l, acc = (lax.dynamic_update_slice_in_dim(a, a_i, i * block, axis=2)
                     for a, a_i in ((m, m_new), (l, l_i), (acc, acc_i)))
        return (m, l, acc), None

    shape = q.shape[:3]
    carry = (jnp.full(shape, -jnp.inf, q.dtype), jnp.zeros(shape, q.dtype), jnp.zeros_like(q))
    (m, l, acc), _ = lax.scan(step, carry, _triangle(n_blocks))
    m, l, acc = m[:, :, :t], l[:, :, :t], acc[:, :, :t]
    return acc / jnp.where(l == 0, 1, l)[..., None], m, l


def causal_core_backward(q, k, v, D, m, log_l, one_hot, do, *, block: int, key_mask=None,
                         mask=None):
    """:func:`attention_core_backward` over the block pairs of :func:`causal_core`; ``D``,
    ``m``, ``log_l``, ``one_hot`` (B, H, T, 1) as prepared there."""
    t = q.shape[2]
    c = 1 / math.sqrt(q.shape[-1])
    rows, n_blocks, q, k, v, key_mask, mask = _causal_inputs(q, k, v, key_mask, mask, block)
    do, D, m, log_l, one_hot = (_pad_rows(a, rows) for a in (do, D, m, log_l, one_hot))

    def step(grads, ij):
        dq, dk, dv = grads
        i, j = ij
        s = _pair_scores(q, k, i, j, block, key_mask, mask)
        p = jnp.exp(s - _rows(m, i, block) - _rows(log_l, i, block))
        q_i, do_i, k_j = _rows(q, i, block), _rows(do, i, block), _rows(k, j, block)
        dv = _add_rows(dv, j, block, jnp.einsum("bhqk,bhqd->bhkd", p, do_i))
        dp = jnp.einsum("bhqd,bhkd->bhqk", do_i, _rows(v, j, block))
        ds = jnp.where(_rows(one_hot, i, block), 0, p * (dp - _rows(D, i, block)))
        dq = _add_rows(dq, i, block, c * jnp.einsum("bhqk,bhkd->bhqd", ds, k_j))
        dk = _add_rows(dk, j, block, jnp.einsum("bhqk,bhqd->bhkd", ds, q_i))  # q_i holds c
        return (dq, dk, dv), None

    zeros = jnp.zeros_like(q)
    (dq, dk, dv), _ = lax.scan(step, (zeros, zeros, zeros), _triangle(n_blocks))
    return dq[:, :, :t], dk[:, :, :t], dv[:, :, :t]


def split_heads(a, heads: int):
    """``(B, T, H·Dh) -> (B, H, T, Dh)``."""
    b, t, width = a.shape
    return a.reshape(b, t, heads, width // heads).transpose(0, 2, 1, 3)


def merge_heads(a):
    """``(B, H, T, Dh) -> (B, T, H·Dh)``."""
    b, h, t, dh = a.shape
    return a.transpose(0, 2, 1, 3).reshape(b, t, h * dh)


class Cache(NamedTuple):
    """What the backward (and the per-example rule) needs beside the params."""

    x: jax.Array    # (B, T, d_model), the input of the q, k, v projections
    q: jax.Array    # (B, H, T, Dh)
    k: jax.Array
    v: jax.Array
    o: jax.Array    # (B, H, T, Dh), the input of the output projection (heads concatenated)
    m: jax.Array    # (B, H, T), each row's max score
    l: jax.Array    # (B, H, T), each row's Σ exp(s − m)
    key_mask: jax.Array | None = None  # (B, T_k) bool, from the side inputs
    mask: jax.Array | None = None      # (B, 1 or H, T, T) bool, the side input attention_mask
    memory: jax.Array | None = None    # (B, T_k, d_model): the k, v projections' input where
    #                                    it is not x (cross-attention, jbp.layers.seq2seq)


def inputs_and_deltas(params, cache: Cache, dy, causal: bool, block: int):
    """``{name: (a, δ)}`` for the four projections: input (B, T, ·) and ∂C/∂output."""
    heads = cache.q.shape[1]
    do = split_heads(dy @ params["o"]["W"].T, heads)
    dq, dk, dv = attention_core_backward(cache.q, cache.k, cache.v, cache.o, cache.m, cache.l, do,
                                         causal=causal, block=block, key_mask=cache.key_mask,
                                         mask=cache.mask)
    kv = cache.x if cache.memory is None else cache.memory
    return {"q": (cache.x, merge_heads(dq)), "k": (kv, merge_heads(dk)),
            "v": (kv, merge_heads(dv)), "o": (merge_heads(cache.o), dy)}


def projection_grads(params, pairs):
    """∂C/∂params of the four projections from ``{name: (a, δ)}``: Σ aᵀδ and Σ δ."""
    grads = {}
    for name, (a, d) in pairs.items():
        a2, d2 = a.reshape(-1, a.shape[-1]), d.reshape(-1, d.shape[-1])
        grads[name] = {"W": (a2.T @ d2).astype(params[name]["W"].dtype)}
        if name != "k":
            grads[name]["b"] = jnp.sum(d2, axis=0).astype(params[name]["b"].dtype)
    return grads


def init_projections(key, d: int, width: int, dtype) -> dict:
    """The four projections' params for ``d_model = d`` and ``H·Dh = width``."""
    params = {}
    for name, k in zip(PROJECTIONS, jax.random.split(key, 4)):
        n_in, n_out = (width, d) if name == "o" else (d, width)
        params[name] = {"W": normal(k, (n_in, n_out), dtype) / math.sqrt(n_in)}
        if name != "k":
            params[name]["b"] = constant(0, (n_out,), dtype)
    return params


def rule(causal: bool, block: int) -> PerExampleRule:
    """∂ℓ_i/∂W = Σ_t a_it δ_itᵀ per projection. Attention mixes an example's positions,
    never examples: the blocked backward run on the per-example delta (row i: ∂ℓ_i/∂y_i) gives
    example i's own δ at every projection, so the batched backward *is* the per-example one;
    only the sums over the batch are left out."""

    def grads(params, cache, delta):
        pairs = inputs_and_deltas(params, cache, delta, causal, block)
        grads = {name: {"W": jnp.einsum("bti,bto->bio", a, d), "b": jnp.sum(d, axis=1)}
                 for name, (a, d) in pairs.items()}
        del grads["k"]["b"]
        return grads

    def kronecker(params, cache, delta):  # one block per projection, positions expanded
        pairs = inputs_and_deltas(params, cache, delta, causal, block)
        return {name: kronecker_rows(a, d, bias=name != "k") for name, (a, d) in pairs.items()}

    return PerExampleRule(grads, kronecker=kronecker)


@constructor
def attention(heads: int, head_dim: int, *, causal: bool = False, block_size: int = 128,
              dtype=jnp.float32) -> Layer:
    """Multi-head self-attention, ``x (B, T, d_model) -> y (B, T, d_model)``.

    Args:
      heads, head_dim: ``H`` heads of ``Dh`` features; scores are scaled by ``1/√Dh``.
      causal: mask every key after its query (a decoder's self-attention).
        Side inputs ``lengths``, ``key_mask`` and ``attention_mask`` mask more
        (:mod:`jbp.masks`; combined with ``causal`` by "and").
      block_size: keys per block of the online softmax (see the module docstring).
      dtype: of the params. The q, k, v weights ~ N(0, 1/d_model), the output weight
        ~ N(0, 1/(H·Dh)) (LeCun, as dense), biases zero.

    Cache: :class:`Cache`. Per example: :func:`rule`.
    """
    who = "attention"
    heads, head_dim, block_size = (positive_int(value, name, who) for name, value in (
        ("heads", heads), ("head_dim", head_dim), ("block_size", block_size)))
    causal = boolean(causal, "causal", who)
    width = heads * head_dim
    who = f"attention({heads}, {head_dim}{', causal' if causal else ''})"

    def init(key, in_shape):
        shape = as_shape(in_shape, who)
        if len(shape) != 2:
            raise ValueError(f"{who}: expects a per-example shape (T, d_model), got {shape}")
        return shape, init_projections(key, shape[1], width, param_dtype(dtype, who))

    def forward(params, x, *, key=None, train=False, state=None, side=None):
        d = params["o"]["W"].shape[1]
        if x.ndim != 3 or x.shape[-1] != d:
            raise ValueError(f"{who}: expected input of shape (B, T, {d}) (batch, positions, "
                             f"the {d} features the params were built for), got {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError(f"{who}: expected at least one position, got T = 0 in "
                             f"{tuple(x.shape)}")
        b, t = x.shape[:2]
        key_mask = masks.key_mask_of(side, b, t, who)
        mask = masks.attention_mask_of(side, b, heads, t, t, who)
        q = split_heads(x @ params["q"]["W"] + params["q"]["b"], heads)
        k = split_heads(x @ params["k"]["W"], heads)
        v = split_heads(x @ params["v"]["W"] + params["v"]["b"], heads)
        o, m, l = attention_core(q, k, v, causal=causal, block=block_size, key_mask=key_mask,
                                 mask=mask)
        y = merge_heads(o) @ params["o"]["W"] + params["o"]["b"]
        return y, Cache(x, q, k, v, o, m, l, key_mask, mask), state

    def backward(params, cache, dy):
        pairs = inputs_and_deltas(params, cache, dy, causal, block_size)
        dx = sum(pairs[n][1] @ params[n]["W"].T for n in "qkv")  # x feeds q, k and v
        return projection_grads(params, pairs), cast_like(dx, cache.x)

    return Layer(who, init, forward, backward, per_example=rule(causal, block_size),
                 side_inputs=("lengths", "key_mask", "attention_mask"))
