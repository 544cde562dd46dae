"""Llama-family causal decoder in Flax (Llama 2/3, SmolLM2, Mistral, Qwen2).

One implementation parameterised by `DecoderConfig`: grouped-query attention, RoPE (plain, linear or
Llama-3 scaled), RMSNorm, SwiGLU MLP, tied or untied embeddings, optional qkv bias (Qwen2) and
sliding-window attention (Mistral). Layers are stacked (`nn.scan`), so every layer param has a
leading `[num_layers]` axis and compile time does not grow with depth.

Param names follow Hugging Face's, e.g. `layers/self_attn/q_proj/kernel: [L, D, H*hd]`, so the
import table is a transpose and a stack.

Attention masks are built from `attention_mask` (left padding), `segment_ids` (packed sequences)
and slot order (causality), never from token ids, so pad = EOS is safe.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.losses.masked import last_token_index
from rlhf_jax.models.config import DecoderConfig
from rlhf_jax.models.layout import stack_layers

Params = Any
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: fully masked rows stay NaN-free
HIDDEN_AXES = ("batch", "length", "embed")  # logical axes of [B, T, D] hidden states (rlhf_jax.sharding)


def constrain_hidden(hidden: jax.Array) -> jax.Array:
    """Shard hidden states [B, T, D] by the logical-axis rules in context; a no-op outside
    `rlhf_jax.sharding.use_mesh` (no rules, no mesh)."""
    return nn.with_logical_constraint(hidden, HIDDEN_AXES)


class KVCache(flax.struct.PyTreeNode):
    """Key/value cache for incremental decoding.

    k, v: [L, B, S, Hkv, hd]; valid: [B, S] slot holds a real token; positions: [B, S] RoPE position
    of each slot; index: [] next free slot (shared by the batch: prompts are left-padded).
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    positions: jax.Array
    index: jax.Array


def init_cache(config: DecoderConfig, batch_size: int, max_length: int, dtype=None) -> KVCache:
    """An empty cache for `batch_size` rows of up to `max_length` tokens."""
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (config.num_layers, batch_size, max_length, config.num_kv_heads, config.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        valid=jnp.zeros((batch_size, max_length), bool),
        positions=jnp.zeros((batch_size, max_length), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


class DecoderOutput(NamedTuple):
    logits: jax.Array | None  # [B, T, V] float32, or None when not requested
    hidden: jax.Array  # [B, T, D] final-norm hidden states (compute dtype)
    cache: KVCache | None


def wide(dtype) -> jnp.dtype:
    """The dtype of the numerically sensitive parts (norms, rope, attention scores, logits): float32, or the
    compute dtype when it is wider (a float64 model computes in float64 throughout)."""
    return jnp.promote_types(dtype, jnp.float32)


def rope_inverse_frequencies(config: DecoderConfig) -> jax.Array:
    """inv_freq[i] = theta^(-2i/hd), then linear or Llama-3 band-wise scaling. Returns [hd/2] (float32 or wider)."""
    exponents = jnp.arange(0, config.head_dim, 2, dtype=wide(config.dtype)) / config.head_dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # Llama 3.1: long wavelengths divided by `factor`, short kept, a smooth blend in between.
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def rope_tables(config: DecoderConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin: [B, T, hd] float32 (or wider) for integer positions [B, T] (HF half-rotation layout)."""
    angles = positions.astype(wide(config.dtype))[..., None] * rope_inverse_frequencies(config)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, H, hd]; rotate pairs (i, i + hd/2) by the position angle, in float32 (or wider)."""
    half = x.shape[-1] // 2
    x32 = x.astype(wide(x.dtype))
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def attention_mask_bias(
    query_slots: jax.Array,
    key_slots: jax.Array,
    key_valid: jax.Array,
    query_segments: jax.Array | None,
    key_segments: jax.Array | None,
    query_positions: jax.Array,
    key_positions: jax.Array,
    sliding_window: int | None,
    key_shared: jax.Array | None = None,
) -> jax.Array:
    """Boolean [B, T, S]: key s visible to query t (causal by slot, valid key, same segment or a shared key,
    window). `key_shared` [B, S] marks a prefix that every later segment of its row continues (the common
    prompt of a preference pair laid out once, `data.batching.share_prefixes`)."""
    allowed = key_slots[:, None, :] <= query_slots[:, :, None]
    allowed &= key_valid[:, None, :]
    if query_segments is not None:
        same = query_segments[:, :, None] == key_segments[:, None, :]
        allowed &= same if key_shared is None else same | key_shared[:, None, :]
    if sliding_window is not None:
        allowed &= (query_positions[:, :, None] - key_positions[:, None, :]) < sliding_window
    return allowed


class PrefixSegments(NamedTuple):
    """Which keys each query sees in rows laid out as a prefix of P slots followed by G segments of N slots, each
    segment continuing the prefix and not seeing the other segments (a prompt sampled G times laid out once,
    `trainers.common.prompt_group_rows`). Attention then computes only the blocks that can be visible: the
    prefix against itself, and each segment against the prefix and itself, P² + G·N·(P + N) scores a row instead
    of (P + G·N)².

    prefix: [B, P, P] bool, the prefix's queries against its keys; segments: [B, G, N, P + N] bool, segment g's
    queries against the prefix's keys, then its own.
    """

    prefix: jax.Array
    segments: jax.Array


def prefix_segment_masks(slots, valid, segment_ids, positions, sliding_window, shared, prefix: int,
                         groups: int) -> PrefixSegments:
    """`attention_mask_bias` of a row laid out as a prefix of `prefix` slots then `groups` equal segments, at
    the blocks `PrefixSegments` keeps: each block's entries are the full mask's."""
    batch, length = slots.shape
    if segment_ids is None or shared is None or (length - prefix) % groups or length <= prefix:
        raise ValueError(f"rows of {length} slots with segment ids and a shared prefix are needed to lay out a prefix "
                         f"of {prefix} slots and {groups} equal segments")
    size = (length - prefix) // groups
    own = prefix + np.arange(groups)[:, None] * size + np.arange(size)[None, :]  # [G, N]
    keys = np.concatenate([np.broadcast_to(np.arange(prefix), (groups, prefix)), own], axis=1)  # [G, P + N]

    def at(array, index):  # [B, ...] columns `index` [G, K] -> [B·G, K]
        return array[:, index].reshape(batch * groups, index.shape[1])

    head = attention_mask_bias(*(a[:, :prefix] for a in (slots, slots, valid, segment_ids, segment_ids, positions,
                                                          positions)), sliding_window, shared[:, :prefix])
    tail = attention_mask_bias(at(slots, own), at(slots, keys), at(valid, keys), at(segment_ids, own),
                               at(segment_ids, keys), at(positions, own), at(positions, keys), sliding_window,
                               at(shared, keys))
    return PrefixSegments(head, tail.reshape(batch, groups, size, prefix + size))


# `grouped_query_attention(..., causal=True)` splits rows of at least _CAUSAL_MIN_LENGTH queries into at most
# _CAUSAL_BLOCKS blocks of at least _CAUSAL_BLOCK. Measured on SmolLM2 (2-core CPU, 4 micro-batches): the
# shared-prefix reward-model step on rows of 320 went from 10.3-10.6 s to 9.5-9.8 s in blocks of 64 and was no
# faster in blocks of 128; the SFT step on rows of 256 was no faster in blocks of 64, and 5 s longer to compile.
_CAUSAL_BLOCK = 64
_CAUSAL_BLOCKS = 8
_CAUSAL_MIN_LENGTH = 320


def grouped_query_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array,
                            causal: bool = False) -> jax.Array:
    """softmax(q k^T / sqrt(hd) + mask) v with Hkv key heads shared by H/Hkv query heads.

    q: [B, T, H, hd]; k, v: [B, S, Hkv, hd]; allowed: [B, T, S] bool. Returns [B, T, H, hd].
    Scores and softmax in float32 (or wider); a row with no visible key gets uniform (finite) weights (over
    the keys of its block, with `causal`).

    causal: the last T keys are the queries' own slots (S >= T; the S - T keys before them are a prefix that
    every query may see) and `allowed` never shows a query a later slot (as `attention_mask_bias` builds it).
    Rows of at least 320 queries are then split into blocks of max(64, T / 8) and block [a, b) attends to keys
    [0, S - T + b) only: the same result for every row with a visible key, without computing the scores above
    the diagonal's blocks (at T = S = 512 in blocks of 64: 56% of the score FLOPs).

    The backward pass recomputes the probabilities from q and k (flash attention's backward, untiled)
    instead of keeping each layer's [B, H, T, S] scores and probabilities from the forward pass: a layer
    keeps q, k, v, its output and the softmax's row max and sum. For SmolLM2 at 16 x 256 that is 1.1 GiB of
    saved float32 per step instead of 7, at the price of one more q k^T per layer (3% of its FLOPs).
    """
    if isinstance(allowed, PrefixSegments):
        return _prefix_segment_attention(q, k, v, allowed, causal)
    length = q.shape[1]
    offset = k.shape[1] - length  # keys before the queries' own slots
    block = max(_CAUSAL_BLOCK, -(-length // _CAUSAL_BLOCKS))
    if not causal or offset < 0 or length < _CAUSAL_MIN_LENGTH:
        return _attention(q, k, v, allowed)
    return jnp.concatenate([_attention(q[:, start:start + block], k[:, :offset + start + block],
                                       v[:, :offset + start + block],
                                       allowed[:, start:start + block, :offset + start + block])
                            for start in range(0, length, block)], axis=1)


def _prefix_segment_attention(q, k, v, allowed: PrefixSegments, causal: bool) -> jax.Array:
    """`grouped_query_attention` over the blocks of a `PrefixSegments` layout: the prefix's queries against its
    keys, then each segment's against the prefix's keys and its own (the segments as rows of a batch of B·G;
    a segment of 320 slots or more in causal blocks)."""
    if not causal or k.shape[1] != q.shape[1]:
        raise ValueError("a prefix-and-segments layout needs the queries' own slots as keys (no cache)")
    prefix = allowed.prefix.shape[1]
    batch, groups, size = allowed.segments.shape[:3]
    head = grouped_query_attention(q[:, :prefix], k[:, :prefix], v[:, :prefix], allowed.prefix, causal=True)

    def segments(x):  # [B, P + G·N, ...] -> [B·G, N, ...]
        return x[:, prefix:].reshape(batch * groups, size, *x.shape[2:])

    def with_prefix(x):  # [B, P + G·N, ...] -> [B·G, P + N, ...]: the prefix, then the segment's own slots
        shared = jnp.broadcast_to(x[:, None, :prefix], (batch, groups, *x[:, :prefix].shape[1:]))
        return jnp.concatenate([shared.reshape(batch * groups, *x[:, :prefix].shape[1:]), segments(x)], axis=1)

    tail = grouped_query_attention(segments(q), with_prefix(k), with_prefix(v),
                                   allowed.segments.reshape(batch * groups, size, prefix + size), causal=True)
    return jnp.concatenate([head, tail.reshape(batch, groups * size, *tail.shape[2:])], axis=1)


def _heads_first(q, k, v):
    """q [B, T, H, hd] -> [B, Hkv, G, T, hd]; k, v [B, S, Hkv, hd] -> [B, Hkv, S, hd]."""
    batch, length, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    q = q.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _masked_scores(q, k, allowed):
    """q [B, Hkv, G, T, hd], k [B, Hkv, S, hd] -> q k^T / sqrt(hd), masked: [B, Hkv, G, T, S] (float32 or wider)."""
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=wide(q.dtype)) / math.sqrt(q.shape[-1])
    return jnp.where(allowed[:, None, None, :, :], scores, _MASKED)


@jax.custom_vjp
def _attention(q, k, v, allowed):
    return _attention_forward(q, k, v, allowed)[0]


def _attention_forward(q, k, v, allowed):
    qh, kh, vh = _heads_first(q, k, v)
    scores = _masked_scores(qh, kh, allowed)
    top = jnp.max(scores, axis=-1, keepdims=True)
    unnormalised = jnp.exp(scores - top)
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    weights = (unnormalised / total).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", weights, vh)  # [B, Hkv, G, T, hd]
    batch, length, num_heads, head_dim = q.shape
    result = out.transpose(0, 3, 1, 2, 4).reshape(batch, length, num_heads, head_dim)
    # the row max and sum, [B, Hkv, G, T, 1] each (not their log-sum-exp, which loses log S against the
    # mask value of a row with no visible key)
    return result, (q, k, v, allowed, out, top, total)


def _attention_backward(residuals, d_result):
    q, k, v, allowed, out, top, total = residuals
    qh, kh, vh = _heads_first(q, k, v)
    d_out = _heads_first(d_result, k, v)[0]  # [B, Hkv, G, T, hd]
    weights = jnp.exp(_masked_scores(qh, kh, allowed) - top) / total
    d_v = jnp.einsum("bkgts,bkgtd->bksd", weights.astype(v.dtype), d_out, preferred_element_type=weights.dtype)
    d_weights = jnp.einsum("bkgtd,bksd->bkgts", d_out, vh, preferred_element_type=weights.dtype)
    # softmax's backward: dS = P (dP - rowsum(dP P)), and rowsum(dP P) = rowsum(dO O)
    row = jnp.sum(d_out.astype(weights.dtype) * out.astype(weights.dtype), axis=-1, keepdims=True)
    d_scores = jnp.where(allowed[:, None, None, :, :], weights * (d_weights - row), 0.0) / math.sqrt(q.shape[-1])
    d_q = jnp.einsum("bkgts,bksd->bkgtd", d_scores, kh.astype(d_scores.dtype))
    d_k = jnp.einsum("bkgts,bkgtd->bksd", d_scores, qh.astype(d_scores.dtype))
    d_q = d_q.transpose(0, 3, 1, 2, 4).reshape(q.shape)
    return (d_q.astype(q.dtype), d_k.transpose(0, 2, 1, 3).astype(k.dtype), d_v.transpose(0, 2, 1, 3).astype(v.dtype),
            None)


_attention.defvjp(_attention_forward, _attention_backward)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) * scale, computed in float32 (or wider)."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(wide(x.dtype))
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(x32.dtype)).astype(self.dtype)


class Dense(nn.Dense):
    """`nn.Dense`, plus a low-rank update when the params also hold `lora_a: [in, r]`, `lora_b: [r, out]`.

    y = x W (+ bias) + (x a) b: the adapted layer never forms W + a b, so LoRA training keeps no
    merged [in, out] weight or weight-sized gradient (see `rlhf_jax.models.lora`). Plain params
    (no `lora_*` entries) give exactly `nn.Dense`.
    """

    @nn.compact
    def __call__(self, inputs):
        # One 2-D matmul over the flattened leading axes: with [B, T, D] inputs XLA's CPU backend computes the
        # weight gradient through transposed copies of the [B, T, out] gradient (a third of an MLP's
        # backward time at SmolLM2's size); flattened it needs none. The same arithmetic either way.
        leading = inputs.shape[:-1]
        inputs = inputs.reshape(-1, inputs.shape[-1])
        outputs = super().__call__(inputs)
        if self.has_variable("params", "lora_a"):
            lora_a = self.get_variable("params", "lora_a").astype(self.dtype)
            lora_b = self.get_variable("params", "lora_b").astype(self.dtype)
            outputs = outputs + ((inputs.astype(self.dtype) @ lora_a) @ lora_b).astype(outputs.dtype)
        return outputs.reshape(*leading, outputs.shape[-1])


def _dense(config: DecoderConfig, features: int, name: str, use_bias: bool = False) -> nn.Dense:
    return Dense(
        features,
        use_bias=use_bias,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        kernel_init=nn.initializers.normal(0.02),
        name=name,
    )


class SelfAttention(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, hidden, cos, sin, allowed, layer_kv, cache_index):
        c = self.config
        batch, length, _ = hidden.shape
        q = _dense(c, c.num_heads * c.head_dim, "q_proj", c.attention_bias)(hidden)
        k = _dense(c, c.num_kv_heads * c.head_dim, "k_proj", c.attention_bias)(hidden)
        v = _dense(c, c.num_kv_heads * c.head_dim, "v_proj", c.attention_bias)(hidden)
        q = apply_rope(q.reshape(batch, length, c.num_heads, c.head_dim), cos, sin)
        k = apply_rope(k.reshape(batch, length, c.num_kv_heads, c.head_dim), cos, sin)
        v = v.reshape(batch, length, c.num_kv_heads, c.head_dim)
        if layer_kv is not None:
            cache_k, cache_v = layer_kv
            start = (0, cache_index, 0, 0)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
            cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
            layer_kv = (cache_k, cache_v)
            k, v = cache_k.astype(q.dtype), cache_v.astype(q.dtype)
        # without a cache the keys are these queries' own slots: causal blocks skip the scores above them
        out = grouped_query_attention(q, k, v, allowed, causal=layer_kv is None)
        out = _dense(c, c.hidden_size, "o_proj")(out.reshape(batch, length, c.num_heads * c.head_dim))
        return out, layer_kv


class SwiGLU(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate = _dense(c, c.intermediate_size, "gate_proj")(x)
        up = _dense(c, c.intermediate_size, "up_proj")(x)
        return _dense(c, c.hidden_size, "down_proj")(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm block: h += attn(norm(h)); h += mlp(norm(h)). Scanned over layers."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, hidden, cos, sin, allowed, cache_index, layer_kv):
        c = self.config
        norm = functools.partial(RMSNorm, c.rms_norm_eps, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype))
        attn_out, layer_kv = SelfAttention(c, name="self_attn")(
            norm(name="input_layernorm")(hidden), cos, sin, allowed, layer_kv, cache_index
        )
        hidden = hidden + attn_out
        hidden = hidden + SwiGLU(c, name="mlp")(norm(name="post_attention_layernorm")(hidden))
        return constrain_hidden(hidden), layer_kv


def default_positions(attention_mask: jax.Array, segment_ids: jax.Array | None, start: jax.Array | None = None):
    """Positions counting only real tokens: left pads get 0, each packed segment restarts at 0.

    attention_mask: [B, T] bool; segment_ids: [B, T] or None; start: [B] tokens already in the cache.
    """
    mask = attention_mask.astype(jnp.int32)
    if segment_ids is None:
        positions = jnp.cumsum(mask, axis=1) - 1
    else:
        # index within the run of equal segment ids
        index = jnp.arange(mask.shape[1])[None, :]
        is_start = jnp.concatenate(
            [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
        )
        segment_start = jax.lax.cummax(jnp.where(is_start, index, 0), axis=1)
        positions = index - segment_start
    if start is not None:
        positions = positions + start[:, None]
    return jnp.maximum(positions, 0).astype(jnp.int32)


def layer_unroll(config: DecoderConfig) -> int:
    """Layers per iteration of the scan over layers: `config.scan_unroll`, or by default every layer on a CPU
    (XLA's CPU backend spends about half of a training step copying the scan's stacked residuals and
    gradients; unrolled, the step takes half the time and compiles no slower for small models) and one
    elsewhere (the accelerators' compile time grows with the unrolled program; `docs/performance.md`)."""
    if config.scan_unroll is not None:
        return max(1, min(config.scan_unroll, config.num_layers))
    return config.num_layers if jax.default_backend() == "cpu" else 1


def layers_unrolled(config: DecoderConfig) -> bool:
    """Whether the forward runs every layer unrolled: then a micro-batch loop takes the layers' weights one
    array per layer (`training.accumulate`'s `per_layer`) rather than slicing them out of the stack."""
    return layer_unroll(config) == config.num_layers


class Decoder(nn.Module):
    """The Llama-family causal LM.

    __call__(tokens [B, T] int, positions [B, T] | None, attention_mask [B, T] | None,
             segment_ids [B, T] | None, cache: KVCache | None, compute_logits: bool, shared [B, T] | None,
             segments: (P, G) | None)
      -> DecoderOutput(logits [B, T, V] f32 | None, hidden [B, T, D], cache)

    `shared` (with `segment_ids` and explicit `positions`, no cache): keys that every later token of the row
    sees whatever its segment, e.g. a prompt followed by two responses that each see it but not each other.
    `segments` (static, with `shared`): every row is a prefix of P slots then G segments of (T − P) / G slots
    that each see the prefix and not each other; attention then skips the blocks between segments
    (`PrefixSegments`), with the same result wherever a query sees a key.
    """

    config: DecoderConfig

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype),
            embedding_init=nn.initializers.normal(0.02),
        )
        layer = DecoderLayer
        if c.remat:
            layer = nn.remat(layer, prevent_cse=False, policy=getattr(jax.checkpoint_policies, c.remat_policy))
        self.layers = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
            length=c.num_layers,
            unroll=layer_unroll(c),
        )(c)
        self.norm = RMSNorm(c.rms_norm_eps, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype))
        if not c.tie_word_embeddings:
            self.lm_head = _dense(c, c.vocab_size, "lm_head")

    def __call__(self, tokens, positions=None, attention_mask=None, segment_ids=None, cache=None,
                 compute_logits=True, shared=None, segments=None):
        c = self.config
        batch, length = tokens.shape
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), bool) if segment_ids is None else segment_ids > 0
        attention_mask = attention_mask.astype(bool)
        if cache is None:
            if positions is None:
                positions = default_positions(attention_mask, segment_ids)
            slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
            if segments is None:
                allowed = attention_mask_bias(slots, slots, attention_mask, segment_ids, segment_ids,
                                              positions, positions, c.sliding_window, shared)
            else:
                allowed = prefix_segment_masks(slots, attention_mask, segment_ids, positions, c.sliding_window,
                                               shared, *segments)
            layer_kv = None
            cache_index = jnp.zeros((), jnp.int32)
        else:
            if positions is None:
                seen = jnp.sum(cache.valid, axis=1).astype(jnp.int32)
                positions = default_positions(attention_mask, None, start=seen)
            cache_index = cache.index
            valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, cache_index))
            key_positions = jax.lax.dynamic_update_slice(cache.positions, positions.astype(jnp.int32), (0, cache_index))
            capacity = cache.valid.shape[1]
            query_slots = jnp.broadcast_to(cache_index + jnp.arange(length, dtype=jnp.int32), (batch, length))
            key_slots = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), (batch, capacity))
            allowed = attention_mask_bias(query_slots, key_slots, valid, None, None,
                                          positions, key_positions, c.sliding_window)
            layer_kv = (cache.k, cache.v)
        cos, sin = rope_tables(c, positions)
        hidden = constrain_hidden(self.embed_tokens(tokens))
        hidden, layer_kv = self.layers(hidden, cos, sin, allowed, cache_index, layer_kv)
        hidden = self.norm(hidden)
        if cache is not None:
            cache = KVCache(k=layer_kv[0], v=layer_kv[1], valid=valid, positions=key_positions,
                            index=cache_index + length)
        logits = self.logits(hidden) if compute_logits else None
        return DecoderOutput(logits=logits, hidden=hidden, cache=cache)

    def logits(self, hidden):
        """hidden [B, T, D] -> logits [B, T, V] float32 (float64 for a float64 model)."""
        if self.config.tie_word_embeddings:
            logits = self.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return logits.astype(wide(logits.dtype))


def init_params(config: DecoderConfig, key: jax.Array) -> Params:
    """Random params (normal(0.02) kernels, unit norms) as a plain nested dict."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Decoder(config).init(key, tokens)["params"]


def abstract_params(config: DecoderConfig) -> Params:
    """`jax.ShapeDtypeStruct` pytree of the params (no allocation)."""
    return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))


def forward(config: DecoderConfig, params: Params, tokens, positions=None, attention_mask=None,
            segment_ids=None, cache=None, compute_logits=True, shared=None, segments=None) -> DecoderOutput:
    """Pure forward pass: see `Decoder.__call__` for shapes. `params` in either layout (`models.layout`)."""
    return Decoder(config).apply({"params": stack_layers(params)}, tokens, positions, attention_mask, segment_ids, cache,
                                 compute_logits, shared, segments)


def unembedding(config: DecoderConfig, params: Params) -> jax.Array:
    """The [D, V] matrix mapping final hidden states to logits (tied or not)."""
    weight, vocab_first = stored_unembedding(config, params)
    return weight.T if vocab_first else weight


def stored_unembedding(config: DecoderConfig, params: Params) -> tuple[jax.Array, bool]:
    """(the unembedding as it is stored, whether its vocabulary axis comes first): a tied embedding [V, D], an LM
    head's kernel [D, V]."""
    if config.tie_word_embeddings:
        return params["embed_tokens"]["embedding"], True
    return params["lm_head"]["kernel"], False


# ---- scalar heads: value (per token) and reward (per sequence) ------------------------------------


def init_scalar_head(config: DecoderConfig, key: jax.Array) -> Params:
    """A fresh linear head D -> 1: kernel ~ N(0, 1/(D+1)) as in TRL's value head, zero bias."""
    kernel = jax.random.normal(key, (config.hidden_size, 1), jnp.float32) / math.sqrt(config.hidden_size + 1)
    return {"kernel": kernel.astype(config.param_dtype), "bias": jnp.zeros((1,), config.param_dtype)}


def scalar_head(head: Params, hidden: jax.Array) -> jax.Array:
    """hidden [B, T, D] -> per-token scalars [B, T] float32 (float64 for a float64 model, as `wide`)."""
    dtype = wide(hidden.dtype)
    out = jnp.einsum("btd,do->bto", hidden.astype(dtype), head["kernel"].astype(dtype))
    return out[..., 0] + head["bias"].astype(dtype)[0]


def init_scalar_model(config: DecoderConfig, lm_params: Params, key: jax.Array) -> Params:
    """A value / reward model from an LM checkpoint: same backbone, fresh head, no LM head."""
    backbone = {name: value for name, value in lm_params.items() if name != "lm_head"}
    return {"backbone": backbone, "head": init_scalar_head(config, key)}


def _backbone_config(config: DecoderConfig) -> DecoderConfig:
    # The LM head is not part of a scalar model; tie_word_embeddings=True makes Decoder skip it.
    import dataclasses

    return dataclasses.replace(config, tie_word_embeddings=True)


def values_forward(config: DecoderConfig, model: Params, tokens, positions=None, attention_mask=None,
                   segment_ids=None, shared=None, segments=None) -> jax.Array:
    """Per-token values [B, T] float32 of a scalar model {"backbone", "head"}."""
    out = forward(_backbone_config(config), model["backbone"], tokens, positions, attention_mask, segment_ids,
                  compute_logits=False, shared=shared, segments=segments)
    return scalar_head(model["head"], out.hidden)


def rewards_forward(config: DecoderConfig, model: Params, tokens, attention_mask, positions=None) -> jax.Array:
    """Sequence rewards [B]: the head's value at the last non-pad token of each row."""
    values = values_forward(config, model, tokens, positions, attention_mask)
    index = last_token_index(attention_mask)
    return jnp.take_along_axis(values, index[:, None], axis=1)[:, 0]
