"""Batched autoregressive sampling with a KV cache, jit-compiled once per shape bucket.

`generate` is a pure function of (params, left-padded prompts, key, settings): `prefill`, one forward over
the prompts (optionally packed into one row, skipping the padding), then `decode`, one-token decode steps
(`decode.decode_step`) in a `lax.while_loop` that stops as soon as every row has emitted an EOS id (or
after `max_new_tokens`). It returns, per row, the response tokens, their
log-probabilities under the distribution actually sampled from, and a response mask built from lengths
(never from token ids: SmolLM2's pad id is its EOS id).

`Sampler` wraps `generate` for Python callers: it pads batch and prompt length up to buckets so a run
compiles a handful of times rather than once per batch, runs `prefill` and `decode` as two programs (a new
packed length compiles only the first), prefills each distinct prompt of a batch once (the rows of a GRPO
group share it), and counts its compilations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.errors import UserError
from rlhf_jax.models.config import DecoderConfig
from rlhf_jax.models.llama import Decoder, forward, init_cache
from rlhf_jax.sampling.decode import DecodeCache, cache_from_prefill, decode_layers, decode_step, packed_prefill

Params = Any


@flax.struct.dataclass
class SamplingSettings:
    """How to pick each new token.

    Static fields (part of the compiled program; changing one recompiles): `max_new_tokens`, `greedy`,
    `top_k`, `eos_token_ids`, `pad_token_id`, and whether `top_p` is None. Traced fields (changing the
    value reuses the compiled program): `temperature` and the value of `top_p`.

    greedy: argmax of the raw logits; temperature / top_k / top_p are then ignored and the returned
        log-probs are `log_softmax(logits)` (temperature 1, no filter).
    top_k: keep the k largest logits (0 = off); ties with the k-th are kept too.
    top_p: nucleus sampling, keep the smallest set of most probable tokens whose mass reaches `top_p`
        (after temperature and top-k); None = off. `top_p=1.0` keeps every token but still pays the sort.
    eos_token_ids: a row stops after emitting any of these; None = the model config's `eos_token_id`;
        () = never stop early (every row gets `max_new_tokens` tokens, e.g. for benchmarks).
    pad_token_id: fills the response after a row stopped; None = the config's pad id (else EOS, else 0).
    """

    temperature: float = 1.0
    top_p: float | None = None
    max_new_tokens: int = flax.struct.field(pytree_node=False, default=64)
    greedy: bool = flax.struct.field(pytree_node=False, default=False)
    top_k: int = flax.struct.field(pytree_node=False, default=0)
    eos_token_ids: tuple[int, ...] | None = flax.struct.field(pytree_node=False, default=None)
    pad_token_id: int | None = flax.struct.field(pytree_node=False, default=None)


def validate_settings(settings: SamplingSettings, vocab_size: int | None = None) -> None:
    """Raise `UserError` for settings no sampler can honour."""
    problems = []
    if settings.max_new_tokens < 1:
        problems.append(f"max_new_tokens={settings.max_new_tokens} must be at least 1")
    if not settings.greedy:
        if not isinstance(settings.temperature, jax.Array) and not settings.temperature > 0:
            problems.append(f"temperature={settings.temperature} must be > 0 (use greedy for argmax decoding)")
        if settings.top_p is not None and not isinstance(settings.top_p, jax.Array) and not 0 < settings.top_p <= 1:
            problems.append(f"top_p={settings.top_p} must be in (0, 1]")
    if settings.top_k < 0:
        problems.append(f"top_k={settings.top_k} must be >= 0 (0 = off)")
    if vocab_size is not None:
        for token in settings.eos_token_ids or ():
            if not 0 <= token < vocab_size:
                problems.append(f"eos token id {token} is outside the vocabulary [0, {vocab_size})")
    if problems:
        raise UserError("sampling settings: " + "; ".join(problems))


def resolve_settings(config: DecoderConfig, settings: SamplingSettings) -> SamplingSettings:
    """Fill the EOS and pad ids from the model config where the settings leave them unset."""
    eos = settings.eos_token_ids
    if eos is None:
        eos = (config.eos_token_id,) if config.eos_token_id is not None else ()
    pad = settings.pad_token_id
    if pad is None:
        pad = next((p for p in (config.pad_token_id, config.eos_token_id) if p is not None), 0)
    return settings.replace(eos_token_ids=tuple(int(t) for t in eos), pad_token_id=int(pad))


class SamplerOutput(NamedTuple):
    """What `generate` returns, all [B, N] with N = max_new_tokens unless noted.

    response_tokens: int32, `pad_token_id` after a row stopped.
    response_logprobs: float32 log-prob of each token under the distribution it was drawn from
        (0 where the mask is False).
    response_mask: bool, True up to and including the EOS token.
    response_lengths: [B] int32, tokens in each response (EOS included).
    ended_with_eos: [B] bool, the row stopped on an EOS id rather than on `max_new_tokens`.
    """

    response_tokens: jax.Array
    response_logprobs: jax.Array
    response_mask: jax.Array
    response_lengths: jax.Array
    ended_with_eos: jax.Array


# ---- the sampling distribution ----------------------------------------------------------------------


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Set logits below the k-th largest of the last axis to -inf. logits: [..., V]."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_filter(logits: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """Nucleus filter (Holtzman et al. 2019): keep the most probable tokens while the mass before them < top_p.

    With p sorted in decreasing order, token i is kept iff sum_{j<i} p_j < top_p, so the most probable
    token always survives; the kept set is every logit >= the smallest kept one. logits: [..., V].
    """
    sorted_logits = -jnp.sort(-logits, axis=-1)
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    num_kept = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
    num_kept = jnp.where(top_p >= 1, logits.shape[-1], num_kept)  # float32 mass can reach 1 before the tail
    threshold = jnp.take_along_axis(sorted_logits, num_kept - 1, axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sampling_logits(logits: jax.Array, settings: SamplingSettings) -> jax.Array:
    """The logits of the distribution `generate` samples from: logits / T, then top-k, then top-p.

    log_softmax of the result is the sampling log-distribution; removed tokens are -inf. Greedy returns
    the raw logits (T = 1, no filter). logits: [..., V] -> float32 [..., V].
    """
    logits = logits.astype(jnp.float32)
    if settings.greedy:
        return logits
    logits = logits / jnp.asarray(settings.temperature, jnp.float32)
    logits = top_k_filter(logits, settings.top_k)
    if settings.top_p is not None:
        logits = top_p_filter(logits, jnp.asarray(settings.top_p, jnp.float32))
    return logits


def sampler_logprobs(logits: jax.Array, tokens: jax.Array, settings: SamplingSettings) -> jax.Array:
    """log p(token) under the sampling distribution of `settings`: the teacher-forced twin of `generate`'s
    log-probs. logits: [..., V]; tokens: [...] -> float32 [...]."""
    log_probs = jax.nn.log_softmax(sampling_logits(logits, settings), axis=-1)
    return jnp.take_along_axis(log_probs, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def first_argmax(values: jax.Array) -> jax.Array:
    """`jnp.argmax(values, axis=-1)` (the first index of the largest value) as int32, for values without NaN.

    XLA's CPU backend runs argmax as one reduction over (value, index) pairs that it does not vectorise: over
    [8, 49152] logits it takes 3x as long as this max followed by a min over the indices that reach it.
    """
    largest = jnp.max(values, axis=-1, keepdims=True)
    index = jnp.arange(values.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(values == largest, index, values.shape[-1] - 1), axis=-1)


def sample_from_logits(logits: jax.Array, key: jax.Array, settings: SamplingSettings) -> tuple[jax.Array, jax.Array]:
    """Draw one token per row. logits: [B, V]. Returns (tokens [B] int32, their log-probs [B] float32).

    Row b uses `fold_in(key, b)`, so a row's draw does not depend on how many rows share the batch.
    """
    scaled = sampling_logits(logits, settings)
    if settings.greedy:
        tokens = first_argmax(scaled)
    else:  # `jax.random.categorical`'s draw (the Gumbel-max trick), bit for bit, with the faster argmax
        row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(scaled.shape[0]))
        gumbel = jax.vmap(lambda row_key: jax.random.gumbel(row_key, scaled.shape[1:], scaled.dtype))(row_keys)
        tokens = first_argmax(gumbel + scaled)
    log_probs = jax.nn.log_softmax(scaled, axis=-1)
    return tokens, jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]


# ---- generation ---------------------------------------------------------------------------------------


def _last_logits(config: DecoderConfig, params: Params, hidden: jax.Array) -> jax.Array:
    """Logits [B, V] of the last position only: the prefill never builds [B, P, V]."""
    return Decoder(config).apply({"params": params}, hidden[:, -1:], method="logits")[:, 0]


def prefill(config: DecoderConfig, params: Params, prompt_tokens: jax.Array, prompt_mask: jax.Array,
            capacity: int, packed_length: int | None = None) -> tuple[jax.Array, DecodeCache]:
    """The prompts' forward pass: (logits [B, V] float32 after each prompt's last token, a `DecodeCache` of
    `capacity` slots whose first P hold the prompts as `prompt_tokens` lays them out).

    prompt_tokens, prompt_mask: [B, P], left-padded; packed_length: as in `generate`. Pure and jittable
    (`config`, `capacity` and `packed_length` static).
    """
    # Both paths loop over the layers (`scan_unroll=1`) where a CPU's training forward unrolls them: SmolLM2's
    # prefill then compiles 3-4x faster and runs no slower (docs/performance.md, item 25).
    config = dataclasses.replace(config, scan_unroll=1)
    prompt_mask = prompt_mask.astype(bool)
    if packed_length is not None:
        return packed_prefill(config, params, prompt_tokens, prompt_mask, packed_length, capacity)
    batch, prompt_length = prompt_tokens.shape  # the reference model over the padded batch
    out = forward(config, params, prompt_tokens.astype(jnp.int32), attention_mask=prompt_mask,
                  cache=init_cache(config, batch, prompt_length), compute_logits=False)
    return _last_logits(config, params, out.hidden), cache_from_prefill(out.cache, capacity)


def generate(config: DecoderConfig, params: Params, prompt_tokens: jax.Array, prompt_mask: jax.Array,
             key: jax.Array, settings: SamplingSettings, packed_length: int | None = None,
             prompt_rows: jax.Array | None = None) -> SamplerOutput:
    """Sample up to `settings.max_new_tokens` tokens after each left-padded prompt: `prefill`, then `decode`.

    prompt_tokens: [B, P] int, left-padded (the last column holds each row's last prompt token);
    prompt_mask: [B, P] bool, True on real prompt tokens. A row with no prompt token is batch padding: it
    generates nothing (length 0, mask all False). key: a PRNG key; step t uses `fold_in(key, t)`.
    packed_length: None prefills the [B, P] batch as it is (cost B * P tokens); an int (static, at least
    the number of real prompt tokens) packs the prompts into one row of that length first (see
    `decode.packed_prefill`), which skips the padding's compute. Pure and jittable (`config`,
    `packed_length` and the static part of `settings` must be static), so it can run inside a training
    step. Returns `SamplerOutput` ([B, N] arrays, N = max_new_tokens).
    prompt_rows: None, or [B] int: `prompt_tokens`/`prompt_mask` then hold U distinct prompts ([U, P]) and
    output row b continues prompt `prompt_rows[b]`. Each distinct prompt is prefilled once and its cache
    copied to its rows (a GRPO group's samples share one prefill); the decode is the same as for the [B, P]
    batch of repeated prompts.
    """
    capacity = decode_capacity(prompt_tokens.shape[1], settings)
    last_logits, cache = prefill(config, params, prompt_tokens, prompt_mask, capacity, packed_length)
    return decode(config, params, last_logits, cache, prompt_mask, key, settings, prompt_rows)


def decode_capacity(prompt_length: int, settings: SamplingSettings) -> int:
    """Slots of the decode cache: the prompt's P and N - 1 new tokens (the last one is never fed back)."""
    return prompt_length + settings.max_new_tokens - 1


def decode(config: DecoderConfig, params: Params, last_logits: jax.Array, cache: DecodeCache,
           prompt_mask: jax.Array, key: jax.Array, settings: SamplingSettings,
           prompt_rows: jax.Array | None = None) -> SamplerOutput:
    """`generate`'s sampling loop from a `prefill` of the prompts (`last_logits` [U, V], `cache` of
    `decode_capacity` slots, `prompt_mask` [U, P]); `prompt_rows` as in `generate`. Pure and jittable."""
    settings = resolve_settings(config, settings)
    batch, prompt_length = prompt_mask.shape
    max_new = settings.max_new_tokens
    pad_id = settings.pad_token_id
    eos_ids = jnp.asarray(settings.eos_token_ids or (-1,), jnp.int32)
    prompt_mask = prompt_mask.astype(bool)
    if prompt_rows is not None:  # each row takes its prompt's prefill
        last_logits, cache, prompt_mask = jax.tree.map(lambda leaf: jnp.take(leaf, prompt_rows, axis=0),
                                                       (last_logits, cache, prompt_mask))
        batch = prompt_rows.shape[0]
    layers = decode_layers(params)

    def record(state, step, logits):
        """Sample token `step` from `logits` [B, V] and write it into the response buffers."""
        tokens_buf, logprobs_buf, finished, lengths, ended = state
        token, logprob = sample_from_logits(logits, jax.random.fold_in(key, step), settings)
        token = jnp.where(finished, pad_id, token)
        logprob = jnp.where(finished, 0.0, logprob)
        tokens_buf = jax.lax.dynamic_update_slice(tokens_buf, token[:, None], (0, step))
        logprobs_buf = jax.lax.dynamic_update_slice(logprobs_buf, logprob[:, None], (0, step))
        lengths = lengths + (~finished).astype(jnp.int32)
        hit_eos = ~finished & jnp.any(token[:, None] == eos_ids[None, :], axis=-1)
        return (tokens_buf, logprobs_buf, finished | hit_eos, lengths, ended | hit_eos), token

    empty_row = ~jnp.any(prompt_mask, axis=1)
    state = (
        jnp.full((batch, max_new), pad_id, jnp.int32),
        jnp.zeros((batch, max_new), jnp.float32),
        empty_row,
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch,), bool),
    )
    state, token = record(state, 0, last_logits)

    def keep_going(carry):
        step, _, _, state = carry
        return (step < max_new) & ~jnp.all(state[2])

    def next_token(carry):
        step, cache, token, state = carry
        # Token `step - 1` goes into slot P + step - 1; a finished row's pad is fed masked (never attended to).
        logits, cache = decode_step(config, params, layers, cache, token, ~state[2], prompt_length + step - 1)
        state, token = record(state, step, logits)
        return step + 1, cache, token, state

    _, _, _, state = jax.lax.while_loop(keep_going, next_token, (jnp.int32(1), cache, token, state))
    tokens_buf, logprobs_buf, _, lengths, ended = state
    response_mask = jnp.arange(max_new)[None, :] < lengths[:, None]
    return SamplerOutput(
        response_tokens=tokens_buf,
        response_logprobs=jnp.where(response_mask, logprobs_buf, 0.0),
        response_mask=response_mask,
        response_lengths=lengths,
        ended_with_eos=ended,
    )


# ---- buckets and the caching wrapper -------------------------------------------------------------------


def prompt_bucket(length: int, minimum: int = 16, step: int = 64) -> int:
    """Padded prompt length: a power of two from `minimum` up to `step`, then a multiple of `step`.

    e.g. 5 -> 16, 40 -> 64, 65 -> 128, 130 -> 192: at most `step` wasted columns beyond `step`.
    """
    length = max(int(length), 1)
    if length <= step:
        return max(minimum, 1 << (length - 1).bit_length())
    return step * math.ceil(length / step)


def packed_bucket(tokens: int, minimum: int = 64) -> int:
    """Length of a packed prefill row: a multiple of 1/8 of the next power of two (at most 12.5% waste).

    e.g. 100 -> 128, 883 -> 896, 1100 -> 1280.
    """
    tokens = max(int(tokens), minimum)
    step = max(minimum, (1 << (tokens - 1).bit_length()) // 8)
    return step * math.ceil(tokens / step)


def batch_bucket(size: int) -> int:
    """Padded batch size: the next power of two."""
    return 1 << (max(int(size), 1) - 1).bit_length()


def left_pad(prompts: Sequence[Sequence[int]], length: int | None = None, pad_id: int = 0,
             rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists into (tokens [rows, length] int32, mask [rows, length] bool).

    length defaults to the longest prompt, rows to len(prompts); extra rows are all padding.
    """
    length = max((len(p) for p in prompts), default=1) if length is None else length
    rows = len(prompts) if rows is None else rows
    tokens = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), bool)
    for row, prompt in enumerate(prompts):
        if len(prompt) > length:
            raise UserError(f"prompt {row} has {len(prompt)} tokens, more than the {length} allowed")
        if len(prompt):
            tokens[row, length - len(prompt):] = prompt
            mask[row, length - len(prompt):] = True
    return tokens, mask


class Completion(NamedTuple):
    """One prompt's response, trimmed to its length (EOS included when it ended on EOS)."""

    prompt_tokens: list[int]
    tokens: list[int]
    logprobs: list[float]
    ended_with_eos: bool

    @property
    def sum_logprob(self) -> float:
        return float(sum(self.logprobs))


_traces = 0  # how many times the Sampler's programs (`prefill`, `decode`) have been traced (= compiled)


def _counted(function):
    @functools.wraps(function)  # the program keeps the function's name (`jit(prefill)` in logs and profiles)
    def traced(*args):
        global _traces
        _traces += 1  # runs only while tracing
        return function(*args)

    return traced


def distinct_prompts(tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the distinct rows of a left-padded prompt batch, in order of first appearance: tokens [U, P], mask
    [U, P]; each row's index among them [B]). Rows with the same real tokens at the same slots are the same
    prompt whatever their padding slots hold."""
    index: dict[bytes, int] = {}
    first_rows: list[int] = []
    rows = np.empty(len(tokens), np.int32)
    for row, held in enumerate(np.where(mask, tokens, -1)):  # -1: a padding slot (token ids are >= 0)
        key = held.tobytes()
        if key not in index:
            index[key] = len(first_rows)
            first_rows.append(row)
        rows[row] = index[key]
    return tokens[first_rows], mask[first_rows], rows


def _whole_on_host(array, dtype) -> np.ndarray:
    """The whole value as numpy; a global array of a multi-process run is gathered (a collective: every
    process calls it)."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        from jax.experimental import multihost_utils

        array = multihost_utils.process_allgather(array, tiled=True)
    return np.asarray(array, dtype)


# One jit of each program for every Sampler: samplers of the same model share compiled programs. The prefill
# and the sampling loop are two programs, so a batch whose prompts pack into a new length compiles only the
# prefill (about 1.3 s for SmolLM2 on a 2-core CPU, against 9-11 s for the two as one program).
_compiled_prefill = jax.jit(_counted(prefill), static_argnums=(0, 4, 5))
_compiled_decode = jax.jit(_counted(decode), static_argnums=(0,))


class Sampler:
    """`generate` for one model, compiled per (batch bucket, prompt bucket, static settings) and reused: its
    `prefill` and its `decode` are two programs, the prefill's also keyed by its packed length.

    `sampler(params, prompt_tokens, prompt_mask, key, settings)` pads arrays to the buckets and returns the
    unpadded `SamplerOutput`; `sampler.complete(params, prompts, key, settings, batch_size)` takes token
    lists. The prefill is packed (`generate(..., packed_length=packed_bucket(real tokens))`) when that
    saves at least a quarter of the padded batch's tokens and the packed row has at most
    `max_packed_length` tokens (its activations grow with that length; its attention is block-local,
    linear in it). With `share_prompts` (the default) rows that hold the same prompt (a GRPO or RLOO group,
    best-of-n) share one prefill: the distinct prompts are prefilled (`distinct_prompts`, their own batch
    bucket) and each row's decode starts from its prompt's cache (`generate(..., prompt_rows=...)`); not when
    a mesh splits the rows over devices.
    `num_compilations` counts the programs this sampler's calls compiled (the jit caches are shared by all
    samplers in the process, keyed by model config, shapes and static settings).
    With a `mesh` (`rlhf_jax.sharding`), the padded prompt rows are split over ("data", "fsdp") (the
    batch bucket is rounded up to a multiple of data*fsdp) and `params` may be sharded by
    `param_shardings`; the output equals the unsharded one (row keys do not depend on placement). In a
    multi-process run every process calls it with the same prompts (host arrays, or global arrays from
    `place_batch`) and gets the global outputs.
    """

    def __init__(self, config: DecoderConfig, *, min_prompt_bucket: int = 16, prompt_bucket_step: int = 64,
                 max_packed_length: int = 16384, mesh=None, share_prompts: bool = True):
        self.config = config
        self.share_prompts = share_prompts
        self.mesh = mesh
        self.max_packed_length = max_packed_length
        self.min_prompt_bucket = min_prompt_bucket
        self.prompt_bucket_step = prompt_bucket_step
        self.num_compilations = 0

    def __call__(self, params: Params, prompt_tokens, prompt_mask, key: jax.Array,
                 settings: SamplingSettings, chunk_rows: int | None = None) -> SamplerOutput:
        """With `chunk_rows`, the rows are generated `chunk_rows` at a time (chunk c with `fold_in(key, c)`)
        and the outputs concatenated: the KV cache holds one chunk, not the whole batch."""
        if chunk_rows is not None and chunk_rows < np.shape(prompt_tokens)[0]:
            tokens, mask = _whole_on_host(prompt_tokens, np.int32), _whole_on_host(prompt_mask, bool)
            parts = [self(params, tokens[start:start + chunk_rows], mask[start:start + chunk_rows],
                          jax.random.fold_in(key, index), settings)
                     for index, start in enumerate(range(0, len(tokens), chunk_rows))]
            return SamplerOutput(*(jnp.concatenate(field, axis=0) for field in zip(*parts)))
        validate_settings(settings, self.config.vocab_size)
        prompt_tokens = _whole_on_host(prompt_tokens, np.int32)
        prompt_mask = _whole_on_host(prompt_mask, bool)
        batch, length = prompt_tokens.shape
        rows = batch_bucket(batch)
        if self.mesh is not None:
            from rlhf_jax.sharding import batch_shards

            shards = batch_shards(self.mesh)
            rows = shards * math.ceil(rows / shards)
        columns = prompt_bucket(length, self.min_prompt_bucket, self.prompt_bucket_step)
        padded_tokens = np.zeros((rows, columns), np.int32)
        padded_mask = np.zeros((rows, columns), bool)
        padded_tokens[:batch, columns - length:] = prompt_tokens
        padded_mask[:batch, columns - length:] = prompt_mask
        split = self.mesh is not None and shards > 1  # the rows are split over the batch axes
        prompt_rows = None
        if self.share_prompts and not split:  # a prompt that several rows share (a GRPO group) is prefilled once
            distinct_tokens, distinct_mask, index = distinct_prompts(padded_tokens, padded_mask)
            distinct = batch_bucket(len(distinct_tokens))
            if distinct < rows:
                count = len(distinct_tokens)
                padded_tokens = np.zeros((distinct, columns), np.int32)
                padded_mask = np.zeros((distinct, columns), bool)
                padded_tokens[:count], padded_mask[:count] = distinct_tokens, distinct_mask
                prompt_rows = index
        packed_length = packed_bucket(padded_mask.sum())
        if split or packed_length > min(self.max_packed_length, 0.75 * padded_mask.size):
            packed_length = None  # (one packed row cannot be split over the batch axes)
        traces_before = _traces
        capacity = decode_capacity(columns, settings)
        on_mesh = contextlib.nullcontext()
        if self.mesh is not None:
            from rlhf_jax.sharding import batch_sharding, place_state, replicated, use_mesh

            # every process holds the whole padded batch and places its own devices' rows of it
            sharding = batch_sharding(self.mesh)
            padded_tokens, padded_mask = place_state((padded_tokens, padded_mask), (sharding, sharding))
            if prompt_rows is not None:
                prompt_rows = place_state(prompt_rows, replicated(self.mesh))
            on_mesh = use_mesh(self.mesh)
        with on_mesh:
            prefilled = _compiled_prefill(self.config, params, padded_tokens, padded_mask, capacity, packed_length)
            out = _compiled_decode(self.config, params, *prefilled, padded_mask, key, settings, prompt_rows)
        self.num_compilations += _traces - traces_before
        return SamplerOutput(*(array[:batch] for array in out))

    def complete(self, params: Params, prompts: Sequence[Sequence[int]], key: jax.Array,
                 settings: SamplingSettings, batch_size: int = 8) -> list[Completion]:
        """Responses to token-list prompts, `batch_size` at a time (batch b uses `fold_in(key, b)`)."""
        completions = []
        for batch_index, start in enumerate(range(0, len(prompts), batch_size)):
            chunk = [list(map(int, p)) for p in prompts[start:start + batch_size]]
            if any(not p for p in chunk):
                raise UserError(f"prompt {start + next(i for i, p in enumerate(chunk) if not p)} has no tokens")
            tokens, mask = left_pad(chunk)
            out = jax.device_get(self(params, tokens, mask, jax.random.fold_in(key, batch_index), settings))
            for row, prompt in enumerate(chunk):
                n = int(out.response_lengths[row])
                completions.append(Completion(
                    prompt_tokens=prompt,
                    tokens=[int(t) for t in out.response_tokens[row, :n]],
                    logprobs=[float(x) for x in out.response_logprobs[row, :n]],
                    ended_with_eos=bool(out.ended_with_eos[row]),
                ))
        return completions
