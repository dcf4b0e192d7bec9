"""Encoder–decoder models: cross-attention, the decoder block, and the composite that joins
an encoder and a decoder.

A layer here takes one array, so the two sequences of an encoder–decoder travel as one:
the source's positions first, then the target's, ``x (B, S + T, ...)`` with ``S`` (the
source length, padded) fixed when the model is built. Inside the decoder the same holds for
the hidden states: ``z = [memory ; h] (B, S + T, d)``, the encoder's output (the memory)
riding along in front of the target's states, so that every layer keeps one input and one
output and the hand-written backward hands ∂C/∂memory back to the encoder like any other
delta.

- ``cross_attention(heads, head_dim, S)``: ``z = [m ; h] -> [0 ; attend(q = h, k = v = m)]``:
  the target's positions attend to the memory's; the memory's positions output 0, so
  ``residual(cross_attention)`` leaves the memory as it is. Its backward is attention's
  (:mod:`jbp.layers.attention`, the same blocked online softmax): δq goes to ``h``; δk and
  δv meet at ``m``, ∂C/∂m = δk W_kᵀ + δv W_vᵀ.
- ``on_target(layer, S)``: ``layer`` on the target's positions, the memory passed through.
- ``decoder_block(d_model, heads, head_dim, mlp_hidden, S)``: the pre-norm block
  ``h += causal self-attention(LN(h)); h += cross-attention(LN(h), m); h += MLP(LN(h))``.
- ``encoder_decoder(encoder, embed, decoder, S)``: ``x = [src ; tgt] ->`` the decoder's
  output at the target's positions; ``embed`` maps the target's tokens to the decoder's
  width (the encoder embeds its own).

Side inputs (:mod:`jbp.masks`): ``source_lengths`` ``(B,)`` masks the padded memory keys in
cross-attention and is the encoder's ``lengths``; ``lengths`` (and the attention masks) are
the target's.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from jbp import masks
from jbp.layer import (EXAMPLEWISE, Layer, PerExampleRule, as_shape, cast_like, constructor,
                       forward_child, noting_position, param_dtype, positive_int)
from jbp.layers.activations import gelu
from jbp.layers.attention import (Cache, attention, attention_core, init_projections,
                                  inputs_and_deltas, merge_heads, projection_grads, rule,
                                  split_heads)
from jbp.layers.branches import residual
from jbp.layers.dense import dense
from jbp.layers.norm import layer_norm
from jbp.layers.serial import serial


def _split_shape(in_shape, source_length: int, who: str):
    """``(S + T, ...) -> (T, ...)``, or an error naming ``who``."""
    shape = as_shape(in_shape, who)
    if len(shape) < 1 or shape[0] <= source_length:
        raise ValueError(f"{who}: expects a per-example shape (S + T, ...) with the source's "
                         f"S = {source_length} positions first and at least one target "
                         f"position, got {shape}")
    return shape


@constructor
def cross_attention(heads: int, head_dim: int, source_length: int, *, block_size: int = 128,
                    dtype=jnp.float32) -> Layer:
    """Multi-head cross-attention on ``z = [m ; h] (B, S + T, d) -> [0 ; y] (B, S + T, d)``:
    queries from the target's states ``h``, keys and values from the memory ``m``.

    Params: attention's (``{"q", "k", "v", "o"}``, keys without bias). Side input:
    ``source_lengths`` masks the padded memory keys. Cache: attention's :class:`Cache`, its
    ``x`` the queries' input and ``memory`` the keys'. Per example: attention's rule.
    """
    who = "cross_attention"
    heads, head_dim, source_length, block_size = (positive_int(v, n, who) for n, v in (
        ("heads", heads), ("head_dim", head_dim), ("source_length", source_length),
        ("block_size", block_size)))
    width, S = heads * head_dim, source_length
    who = f"cross_attention({heads}, {head_dim}, {S})"

    def init(key, in_shape):
        shape = _split_shape(in_shape, S, who)
        if len(shape) != 2:
            raise ValueError(f"{who}: expects a per-example shape (S + T, d_model), got {shape}")
        return shape, init_projections(key, shape[1], width, param_dtype(dtype, who))

    def forward(params, z, *, key=None, train=False, state=None, side=None):
        if z.ndim != 3 or z.shape[1] <= S or z.shape[2] != params["o"]["W"].shape[1]:
            raise ValueError(f"{who}: expected input of shape (B, S + T, d_model) with S = {S} "
                             f"memory positions first (d_model = {params['o']['W'].shape[1]}, "
                             f"the params' width), got {tuple(z.shape)}")
        m, h = z[:, :S], z[:, S:]
        lengths = masks.lengths_of(side, z.shape[0], S, who, "source_lengths")
        key_mask = None if lengths is None else masks.positions(lengths, S)
        q = split_heads(h @ params["q"]["W"] + params["q"]["b"], heads)
        k = split_heads(m @ params["k"]["W"], heads)
        v = split_heads(m @ params["v"]["W"] + params["v"]["b"], heads)
        o, mx, l = attention_core(q, k, v, causal=False, block=block_size, key_mask=key_mask)
        y = merge_heads(o) @ params["o"]["W"] + params["o"]["b"]
        y = jnp.concatenate([jnp.zeros(m.shape, y.dtype), y], axis=1)
        return y, Cache(h, q, k, v, o, mx, l, key_mask, None, m), state

    def backward(params, cache, dy):
        pairs = inputs_and_deltas(params, cache, dy[:, S:], False, block_size)  # [0 ; y]: y's part
        dh = pairs["q"][1] @ params["q"]["W"].T
        dm = pairs["k"][1] @ params["k"]["W"].T + pairs["v"][1] @ params["v"]["W"].T
        dz = jnp.concatenate([dm, dh], axis=1)
        return projection_grads(params, pairs), cast_like(dz, cache.x)

    attention_rule = rule(False, block_size)  # on the target's part of the delta

    def per_example_grads(params, cache, delta):
        return attention_rule.grads(params, cache, delta[:, S:])

    return Layer(who, init, forward, backward, per_example=PerExampleRule(per_example_grads),
                 side_inputs=("source_lengths",))


@constructor
def on_target(layer: Layer, source_length: int) -> Layer:
    """``[m ; h] (B, S + T, ...) -> [m ; layer(h)]``: ``layer`` on the target's positions,
    the first ``S`` passed through (∂C/∂m = its part of ∂C/∂output)."""
    S = positive_int(source_length, "source_length", "on_target")
    if not isinstance(layer, Layer):
        raise TypeError(f"on_target: layer must be a Layer, got {type(layer).__name__}")
    name = f"on_target({layer.name}, {S})"

    def init(key, in_shape):
        shape = _split_shape(in_shape, S, name)
        out, params = layer.init(key, (shape[0] - S,) + shape[1:])
        if tuple(out[1:]) != shape[1:]:
            raise ValueError(f"{name}: the layer must keep the features {shape[1:]} (the "
                             f"memory's positions are concatenated with its output), but "
                             f"it gives {tuple(out)}")
        return (S + out[0],) + shape[1:], params

    def forward(params, z, *, key=None, train=False, state=None, side=None):
        if z.ndim < 2 or z.shape[1] <= S:
            raise ValueError(f"{name}: expected input of shape (B, S + T, ...) with S = {S} "
                             f"memory positions first, got {tuple(z.shape)}")
        with noting_position(0, layer, name, "forward"):
            y, cache, _ = forward_child(layer, params, z[:, S:], key=key, train=train, state={},
                                        side=side)
        return jnp.concatenate([z[:, :S], y], axis=1), cache, state

    def walk(params, cache, dy, visit):
        result, dh = visit(layer, params, cache, dy[:, S:])
        return result, jnp.concatenate([dy[:, :S], dh], axis=1)

    if layer.stateful:
        raise ValueError(f"{name}: a layer that keeps state is not supported here")
    return Layer(name, init, forward, layers=(layer,), walk=walk, per_example=EXAMPLEWISE)


@constructor
def decoder_block(d_model: int, heads: int, head_dim: int, mlp_hidden: int,
                  source_length: int, *, block_size: int = 128, dtype=jnp.float32) -> Layer:
    """The pre-norm decoder block on ``[m ; h] (B, S + T, d_model)``, the memory passed
    through: ``h += self-attention(LN h)`` (causal), ``h += cross-attention(LN h, m)``,
    ``h += dense(d)(gelu(dense(mlp_hidden)(LN h)))``. A ``serial`` of ``on_target`` and
    ``residual`` around the layers, so every child reaches the backward's walk.

    Params: ``((ln, attention), ((ln,), cross_attention), (ln, dense, {}, dense))``.
    """
    d, S = (positive_int(v, n, "decoder_block") for n, v in (
        ("d_model", d_model), ("source_length", source_length)))
    mlp = serial(layer_norm(dtype=dtype), dense(mlp_hidden, gain=math.sqrt(2), dtype=dtype),
                 gelu(), dense(d, dtype=dtype))
    block = serial(
        on_target(residual(serial(layer_norm(dtype=dtype), attention(
            heads, head_dim, causal=True, block_size=block_size, dtype=dtype))), S),
        residual(serial(on_target(layer_norm(dtype=dtype), S), cross_attention(
            heads, head_dim, S, block_size=block_size, dtype=dtype))),
        on_target(residual(mlp), S))
    return block.replace(name=f"decoder_block({d}, {heads}, {head_dim}, {mlp_hidden}, {S})")


@constructor
def encoder_decoder(encoder: Layer, embed: Layer, decoder: Layer, source_length: int) -> Layer:
    """``x = [src ; tgt] (B, S + T, ...) -> y (B, T, d)``: the memory ``m = encoder(src)``
    and ``h = embed(tgt)`` (both ``(·, d)``), then ``decoder([m ; h])`` (e.g. a serial of
    :func:`decoder_block`), of which ``y`` is the target's part.

    Params ``(encoder's, embed's, decoder's)``. Side inputs: ``source_lengths`` (the
    encoder's ``lengths``, and cross-attention's) and the target's. Integer inputs (token
    ids) get the ``float0`` cotangent of an integer input.
    """
    S = positive_int(source_length, "source_length", "encoder_decoder")
    children = (encoder, embed, decoder)
    for name, child in zip(("encoder", "embed", "decoder"), children):
        if not isinstance(child, Layer):
            raise TypeError(f"encoder_decoder: {name} must be a Layer, got "
                            f"{type(child).__name__}")
        if child.stateful:
            raise ValueError(f"encoder_decoder: {name} {child.name} keeps state, which is not "
                             f"supported here")
    name = f"encoder_decoder({encoder.name}, {embed.name}, {decoder.name}, {S})"

    def init(key, in_shape):
        shape = _split_shape(in_shape, S, name)
        k_enc, k_emb, k_dec = jax.random.split(key, 3)
        m_shape, p_enc = encoder.init(k_enc, (S,) + shape[1:])
        h_shape, p_emb = embed.init(k_emb, (shape[0] - S,) + shape[1:])
        if tuple(m_shape) != (S,) + tuple(h_shape[1:]):
            raise ValueError(f"{name}: the encoder gives {tuple(m_shape)} per example and the "
                             f"embed {tuple(h_shape)}; the decoder needs both (·, d), the "
                             f"encoder's with S = {S} positions")
        out, p_dec = decoder.init(k_dec, (S + h_shape[0],) + tuple(h_shape[1:]))
        return (out[0] - S,) + tuple(out[1:]), (p_enc, p_emb, p_dec)

    def forward(params, x, *, key=None, train=False, state=None, side=None):
        if x.ndim < 2 or x.shape[1] <= S:
            raise ValueError(f"{name}: expected input of shape (B, S + T, ...) with the "
                             f"source's S = {S} positions first, got {tuple(x.shape)}")
        keys = jax.random.split(key, 3) if key is not None else [None] * 3
        source = ({"lengths": side["source_lengths"]} if "source_lengths" in side else {})
        with noting_position(0, encoder, name, "forward"):
            m, c_enc, _ = forward_child(encoder, params[0], x[:, :S], key=keys[0], train=train,
                                        state={}, side=source)
        with noting_position(1, embed, name, "forward"):
            h, c_emb, _ = forward_child(embed, params[1], x[:, S:], key=keys[1], train=train,
                                        state={}, side=side)
        with noting_position(2, decoder, name, "forward"):
            z, c_dec, _ = forward_child(decoder, params[2], jnp.concatenate([m, h], axis=1),
                                        key=keys[2], train=train, state={}, side=side)
        return z[:, S:], (c_enc, c_emb, c_dec), state

    def walk(params, cache, dy, visit):
        c_enc, c_emb, c_dec = cache
        dz = jnp.concatenate([jnp.zeros((dy.shape[0], S) + dy.shape[2:], dy.dtype), dy], axis=1)
        r_dec, dmh = visit(decoder, params[2], c_dec, dz)
        r_emb, dtgt = visit(embed, params[1], c_emb, dmh[:, S:])
        r_enc, dsrc = visit(encoder, params[0], c_enc, dmh[:, :S])
        if dsrc.dtype == jax.dtypes.float0:  # token ids: no cotangent
            shape = (dsrc.shape[0], dsrc.shape[1] + dtgt.shape[1]) + dsrc.shape[2:]
            return (r_enc, r_emb, r_dec), np.zeros(shape, jax.dtypes.float0)
        return (r_enc, r_emb, r_dec), jnp.concatenate([dsrc, dtgt], axis=1)

    return Layer(name, init, forward, layers=children, walk=walk, per_example=EXAMPLEWISE,
                 side_inputs=("source_lengths",))
