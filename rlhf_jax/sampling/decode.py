"""One-token decode step of the Llama-family decoder, laid out for a `lax.while_loop` on CPU/GPU.

`models.llama.forward(..., cache=...)` is the reference implementation and serves the prefill. Inside
the decode loop it is slow for a structural reason: its layers are an `nn.scan`, so every step slices
each layer's weights and cache out of the stacked `[L, ...]` arrays (XLA materialises those slices:
the whole model and cache are copied once per token) and writes a new stacked cache. Here the layer
weights are unstacked once per `generate` call, the layers are unrolled, and the cache is a tuple of
per-layer `[B, Hkv, S, hd]` arrays (the layout the attention dots want) updated in place at one slot.

The maths is `llama.py`'s, cast for cast (RMSNorm and softmax in float32, matmuls in the compute dtype,
RoPE from `rope_tables`/`apply_rope`, logits as `Decoder.logits`); a test checks the logits equal
`forward`'s over whole sequences, for every config option (qkv bias, tied head, sliding window). Some
products are written differently, for speed with few rows on XLA's CPU backend: q/k/v as one product
(`fuse_qkv`), the attention dots with (batch, kv head) as their only batch dimensions, the tied head as
table @ hidden.T.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.models.config import DecoderConfig
from rlhf_jax.models.llama import _MASKED, Decoder, KVCache, apply_rope, layer_unroll, rope_tables, wide
from rlhf_jax.models.layout import LAYERS, stack_layers, unstack_layers

Params = Any
# Queries per block of the packed prefill's block-local attention (`packed_prefill`).
_PREFILL_BLOCK = 64


class DecodeCache(flax.struct.PyTreeNode):
    """Per-layer key/value cache for decoding.

    k, v: tuples of L arrays [B, Hkv, S, hd]; valid: [B, S] slot holds a real token; positions: [B, S]
    RoPE position of each slot; next_position: [B] position the next real token of each row gets.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array
    positions: jax.Array
    next_position: jax.Array


def cache_from_prefill(cache: KVCache, capacity: int) -> DecodeCache:
    """Re-lay a prefilled `KVCache` ([L, B, P, Hkv, hd], index = P) into a `DecodeCache` of `capacity` slots."""
    length = cache.k.shape[2]
    extra = capacity - length
    assert extra >= 0, (capacity, length)

    def relayout(stacked):
        stacked = jnp.pad(jnp.swapaxes(stacked, 2, 3), ((0, 0), (0, 0), (0, 0), (0, extra), (0, 0)))
        return tuple(stacked[layer] for layer in range(stacked.shape[0]))

    valid = jnp.pad(cache.valid, ((0, 0), (0, extra)))
    positions = jnp.pad(cache.positions, ((0, 0), (0, extra)))
    next_position = jnp.sum(cache.valid, axis=1).astype(jnp.int32)
    return DecodeCache(k=relayout(cache.k), v=relayout(cache.v), valid=valid, positions=positions,
                       next_position=next_position)


_QKV = ("q_proj", "k_proj", "v_proj")


def fuse_qkv(layers: Params) -> Params:
    """The (stacked or one layer's) `layers` subtree with the q/k/v projections as one `qkv_proj` dense.

    One [D, (H + 2 Hkv) hd] product per layer in place of three: with a few rows (a decode step) each product
    streams its weights from memory, and XLA's CPU dots stream one larger matrix faster than three small
    ones. Layers with LoRA factors on q/k/v are returned as they are.
    """
    attn = layers["self_attn"]
    if any(set(attn[name]) - {"kernel", "bias"} for name in _QKV):
        return layers
    fused = {"kernel": jnp.concatenate([attn[name]["kernel"] for name in _QKV], axis=-1)}
    if all("bias" in attn[name] for name in _QKV):
        fused["bias"] = jnp.concatenate([attn[name]["bias"] for name in _QKV], axis=-1)
    elif any("bias" in attn[name] for name in _QKV):
        return layers
    rest = {name: value for name, value in attn.items() if name not in _QKV}
    return {**layers, "self_attn": {**rest, "qkv_proj": fused}}


def decode_layers(params: Params) -> list[Params]:
    """The `layers` subtree (either layout, `models.layout`) as a list of per-layer subtrees, q/k/v fused (done
    once, outside the loop)."""
    return [fuse_qkv(layer) for layer in unstack_layers(params)[LAYERS]]


def _dense(x: jax.Array, layer: Params, dtype) -> jax.Array:
    # `llama.Dense`: promote inputs and params to the compute dtype, dot, add bias, and the low-rank update
    # (x a) b of LoRA params (`models.lora.apply_lora`) when the layer holds one.
    out = jnp.dot(x.astype(dtype), layer["kernel"].astype(dtype))
    if "bias" in layer:
        out = out + layer["bias"].astype(dtype)
    if "lora_a" in layer:
        out = out + (x.astype(dtype) @ layer["lora_a"].astype(dtype)) @ layer["lora_b"].astype(dtype)
    return out


def _rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * scale.astype(jnp.float32)).astype(dtype)


def _layer(config: DecoderConfig, layer: Params, hidden: jax.Array, cos: jax.Array, sin: jax.Array, write_kv):
    """One pre-norm block: h += attn(norm(h)); h += mlp(norm(h)).

    hidden: [B, T, D]; cos, sin: [B, T, hd]; `write_kv(k, v) -> (keys, values, allowed, stored)` takes the
    chunk's keys/values ([B, Hkv, T, hd]) and returns what the queries attend to ([B, Hkv, S, hd] twice), the
    visibility mask [B, T, S] and what the caller keeps (the updated cache, say). Returns (hidden, stored).
    """
    c = config
    dtype = jnp.dtype(c.dtype)
    batch, length, _ = hidden.shape
    attn = layer["self_attn"]
    x = _rms_norm(hidden, layer["input_layernorm"]["scale"], c.rms_norm_eps, dtype)
    if "qkv_proj" in attn:  # `fuse_qkv`
        q, k, v = jnp.split(_dense(x, attn["qkv_proj"], dtype),
                            [c.num_heads * c.head_dim, (c.num_heads + c.num_kv_heads) * c.head_dim], axis=-1)
    else:
        q, k, v = (_dense(x, attn[name], dtype) for name in _QKV)
    q = apply_rope(q.reshape(batch, length, c.num_heads, c.head_dim), cos, sin)
    k = apply_rope(k.reshape(batch, length, c.num_kv_heads, c.head_dim), cos, sin)
    v = v.reshape(batch, length, c.num_kv_heads, c.head_dim)
    keys, values, allowed, stored = write_kv(jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))
    # A kv head's queries as one [G·T, hd] matrix, so both attention dots have only (b, k) as batch dims.
    # With T = 1 (a decode step) the transposes are reshapes, and on XLA's CPU backend these 4-d dots run
    # about 2.5x faster than the 5-d einsums over [B, T, Hkv, G, hd] (docs/performance.md, item 19).
    groups, kv_heads = c.num_heads // c.num_kv_heads, c.num_kv_heads
    q = jnp.transpose(q.reshape(batch, length, kv_heads, groups, c.head_dim), (0, 2, 3, 1, 4))
    q = q.reshape(batch, kv_heads, groups * length, c.head_dim)
    heads_dims = ((0, 1), (0, 1))
    if length == 1:  # a decode step: as a product and a sum, which XLA fuses into one pass over the keys
        # (with 64 rows, 2x faster than the dot on XLA's CPU backend)
        scores = jnp.sum(q[:, :, :, None, :].astype(jnp.float32) * keys[:, :, None, :, :].astype(jnp.float32),
                         axis=-1)  # [B, Hkv, G, S]
    else:
        scores = jax.lax.dot_general(q, keys.astype(dtype), (((3,), (3,)), heads_dims),
                                     preferred_element_type=jnp.float32)  # [B, Hkv, G·T, S]
    scores = scores.reshape(batch, kv_heads, groups, length, -1) / math.sqrt(c.head_dim)
    scores = jnp.where(allowed[:, None, None, :, :], scores, _MASKED)
    weights = jax.nn.softmax(scores, axis=-1).astype(dtype).reshape(batch, kv_heads, groups * length, -1)
    out = jax.lax.dot_general(weights, values.astype(dtype), (((3,), (2,)), heads_dims))  # [B, Hkv, G·T, hd]
    out = jnp.transpose(out.reshape(batch, kv_heads, groups, length, c.head_dim), (0, 3, 1, 2, 4))
    hidden = hidden + _dense(out.reshape(batch, length, c.num_heads * c.head_dim), attn["o_proj"], dtype)
    mlp = layer["mlp"]
    x = _rms_norm(hidden, layer["post_attention_layernorm"]["scale"], c.rms_norm_eps, dtype)
    gate = _dense(x, mlp["gate_proj"], dtype)
    up = _dense(x, mlp["up_proj"], dtype)
    return hidden + _dense(jax.nn.silu(gate) * up, mlp["down_proj"], dtype), stored


def _embed(config: DecoderConfig, params: Params, tokens: jax.Array) -> jax.Array:
    return params["embed_tokens"]["embedding"].astype(jnp.dtype(config.dtype))[tokens]


def _logits(config: DecoderConfig, params: Params, hidden: jax.Array) -> jax.Array:
    """Final norm, then `Decoder.logits`: hidden [B, D] -> float32 [B, V]."""
    dtype = jnp.dtype(config.dtype)
    hidden = _rms_norm(hidden, params["norm"]["scale"], config.rms_norm_eps, dtype)
    if not config.tie_word_embeddings:
        return Decoder(config).apply({"params": params}, hidden[:, None], method="logits")[:, 0]
    # `nn.Embed.attend` computed as [V, D] x [D, B]: with a few rows XLA's CPU dot streams the table about
    # 1.6x faster in this orientation than as hidden @ table.T, and the barrier keeps XLA from folding the
    # transpose back into the dot.
    table = params["embed_tokens"]["embedding"].astype(dtype)
    logits = jax.lax.optimization_barrier(jnp.dot(table, hidden.T)).T
    return logits.astype(wide(logits.dtype))


def decode_step(config: DecoderConfig, params: Params, layers: list[Params], cache: DecodeCache,
                tokens: jax.Array, token_mask: jax.Array, slot: jax.Array) -> tuple[jax.Array, DecodeCache]:
    """Feed one token per row at cache slot `slot`; return (logits [B, V] float32, updated cache).

    tokens: [B] int; token_mask: [B] bool (False: the token is padding, never attended to and the row's
    position does not advance); layers: `decode_layers(params)`.
    """
    c = config
    capacity = cache.valid.shape[1]
    position = jnp.where(token_mask, cache.next_position, jnp.maximum(cache.next_position - 1, 0))
    valid = jax.lax.dynamic_update_slice(cache.valid, token_mask[:, None], (0, slot))
    key_positions = jax.lax.dynamic_update_slice(cache.positions, position[:, None], (0, slot))
    allowed = valid & (jnp.arange(capacity)[None, :] <= slot)
    if c.sliding_window is not None:
        allowed &= (position[:, None] - key_positions) < c.sliding_window
    cos, sin = rope_tables(c, position[:, None])  # [B, 1, hd]

    hidden = _embed(c, params, tokens)[:, None, :]  # [B, 1, D]
    new_k, new_v = [], []
    for layer, cache_k, cache_v in zip(layers, cache.k, cache.v):
        def write_kv(k, v, cache_k=cache_k, cache_v=cache_v):
            # in place at `slot`: the loop carries the buffers, nothing is copied
            cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, 0, slot, 0))
            cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, 0, slot, 0))
            return cache_k, cache_v, allowed[:, None, :], (cache_k, cache_v)

        hidden, (cache_k, cache_v) = _layer(c, layer, hidden, cos, sin, write_kv)
        new_k.append(cache_k)
        new_v.append(cache_v)
    cache = DecodeCache(k=tuple(new_k), v=tuple(new_v), valid=valid, positions=key_positions,
                        next_position=cache.next_position + token_mask.astype(jnp.int32))
    return _logits(c, params, hidden[:, 0]), cache


def packed_prefill(config: DecoderConfig, params: Params, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                   packed_length: int, capacity: int) -> tuple[jax.Array, DecodeCache]:
    """Run the prompts packed end to end in one row, then lay their keys/values out left-padded.

    A left-padded batch [B, P] costs B * P token-forwards whatever the prompt lengths; packed, the prefill
    costs `packed_length` >= the number of real tokens (attention is restricted to each prompt, positions
    restart at 0 per prompt, as `forward` computes them for left padding). Returns (logits [B, V] float32
    of each prompt's last token, a `DecodeCache` of `capacity` slots whose first P hold the prompts, laid
    out exactly as `prompt_tokens`). The caller guarantees `packed_length >= prompt_mask.sum()`.
    """
    c = config
    batch, prompt_length = prompt_tokens.shape
    mask = prompt_mask.astype(bool)
    lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)
    offsets = jnp.cumsum(lengths) - lengths  # [B] first packed index of each prompt
    index_in_prompt = jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1  # [B, P]
    source = offsets[:, None] + jnp.maximum(index_in_prompt, 0)  # packed index of each real slot
    target = jnp.where(mask, source, packed_length)  # padding scatters out of bounds: dropped
    rows = jnp.broadcast_to(jnp.arange(1, batch + 1, dtype=jnp.int32)[:, None], mask.shape)

    def scatter(values, fill):
        return jnp.full((packed_length,), fill, values.dtype).at[target.ravel()].set(values.ravel(), mode="drop")

    tokens = scatter(prompt_tokens.astype(jnp.int32), 0)[None]
    segments = scatter(rows, 0)  # 0 = packing filler
    positions = scatter(jnp.maximum(index_in_prompt, 0), 0)
    # Attention is block-local: a prompt spans at most P slots, so a block of queries sees no key more than
    # P - 1 slots before the block. Each block of `block` queries attends to its window of block + P - 1
    # slots, not to the whole row (8 HH prompts packed into 1024 slots: 255 keys per query, not 1024).
    block, reach = _PREFILL_BLOCK, prompt_length - 1
    if packed_length % block or block + reach >= packed_length:
        block, reach = packed_length, 0
    blocks = packed_length // block
    query_slots = jnp.arange(packed_length).reshape(blocks, block)
    key_slots = query_slots[:, :1] - reach + jnp.arange(block + reach)[None, :]  # [blocks, W]; < 0: none
    key_segments = jnp.where(key_slots >= 0, segments[jnp.maximum(key_slots, 0)], 0)
    query_segments = segments.reshape(blocks, block)
    allowed = (key_slots[:, None, :] <= query_slots[:, :, None]) & (key_segments[:, None, :] > 0)
    allowed &= key_segments[:, None, :] == query_segments[:, :, None]
    if c.sliding_window is not None:
        key_positions = positions[jnp.maximum(key_slots, 0)]
        allowed &= (positions.reshape(blocks, block)[:, :, None] - key_positions[:, None, :]) < c.sliding_window
    cos, sin = (table.reshape(blocks, block, -1) for table in rope_tables(c, positions[None]))

    def write_kv(k, v):  # [blocks, Hkv, block, hd] -> each block's window of the packed row, and the row
        packed_kv = tuple(jnp.swapaxes(x, 0, 1).reshape(x.shape[1], packed_length, x.shape[3]) for x in (k, v))
        if blocks == 1:
            return k, v, allowed, packed_kv
        keys, values = (jnp.swapaxes(jnp.take(x, jnp.maximum(key_slots, 0), axis=1), 0, 1) for x in packed_kv)
        return keys, values, allowed, packed_kv

    def layer_step(hidden, layer):
        return _layer(c, layer, hidden, cos, sin, write_kv)  # stacks the rows [Hkv, T, hd]

    hidden = _embed(c, params, tokens).reshape(blocks, block, -1)
    hidden, (keys, values) = jax.lax.scan(layer_step, hidden, fuse_qkv(stack_layers(params)[LAYERS]),
                                         unroll=layer_unroll(c))
    last = jnp.take(hidden.reshape(packed_length, -1), jnp.clip(offsets + lengths - 1, 0, packed_length - 1),
                    axis=0)  # [B, D]

    def unpack(stacked):  # [L, Hkv, T, hd] -> L x [B, Hkv, capacity, hd], prompt slots left-padded
        gathered = jnp.take(stacked, jnp.where(mask, source, 0), axis=2)  # [L, Hkv, B, P, hd]
        gathered = jnp.pad(jnp.moveaxis(gathered, 2, 1), ((0, 0),) * 3 + ((0, capacity - prompt_length), (0, 0)))
        return tuple(gathered[layer] for layer in range(gathered.shape[0]))

    cache = DecodeCache(
        k=unpack(keys), v=unpack(values),
        valid=jnp.pad(mask, ((0, 0), (0, capacity - prompt_length))),
        positions=jnp.pad(jnp.maximum(index_in_prompt, 0), ((0, 0), (0, capacity - prompt_length))),
        next_position=lengths,
    )
    return _logits(c, params, last), cache
