"""Model calls shared by the steps: teacher-forced token log-probs and sequence rewards.

Batch convention (see docs/data.md): right- or left-padded `tokens [B, T]`, `attention_mask [B, T]`,
`loss_mask [B, T]` marking tokens to predict at their own positions; optional `segment_ids`,
`positions` for packed rows. Log-probs are aligned to the predicted token: `logprobs[:, t]` is
log p(tokens[:, t] | tokens[:, :t]) and `logprobs[:, 0] = 0`.

The LM head (the [D, V] unembedding and the log-softmax over the vocabulary) is most of a small model's
cost per position, and a completion-only SFT or DPO batch predicts a minority of its positions. A batch may
therefore carry `loss_index` (`pair_loss_index` for preference batches), the positions that carry a loss,
written on the host by :func:`with_loss_index`: the head then runs at those positions only, and every other
position's log-prob is 0. Its shape is bucketed so that few programs are compiled, and laid out so that the
strided micro-batch split (`training.accumulate.split_microbatches`) hands each micro-batch its own list. The
index is as long as the micro-batch with the most positions needs; each micro-batch's head runs at the smallest
of the same sizes that holds its own (`losses.kept_rows_logprobs_from_hidden`, in :func:`logprobs_from_slots`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data.batching import index_bucket
from rlhf_jax.losses import kept_rows_logprobs_from_hidden, logprobs_and_entropy_from_hidden, logprobs_from_hidden
from rlhf_jax.models import llama
from rlhf_jax.models.config import DecoderConfig
from rlhf_jax.sharding.placement import batch_shards


def _shifted_targets(batch) -> tuple[jax.Array, jax.Array]:
    """targets[:, t] = tokens[:, t+1]; `same_segment` is False where t+1 starts a new packed sequence."""
    tokens = batch["tokens"]
    targets = tokens[:, 1:]
    segment_ids = batch.get("segment_ids")
    if segment_ids is None:
        same_segment = jnp.ones(targets.shape, bool)
    else:
        same_segment = segment_ids[:, 1:] == segment_ids[:, :-1]
    return targets, same_segment


def _logprobs_at(config: DecoderConfig, params, hidden, targets, keep, temperature: float, seq_chunk: int | None,
                 with_entropy: bool, kept_chunk: int | None = None):
    """Log-probs (and entropies) of `targets` [B, S] predicted from `hidden` [B, S, D]; 0 where not `keep`.
    With `kept_chunk` the head runs at the `keep` positions only, that many at a time (`losses.logprobs`'
    `masked_first`)."""
    unembedding = llama.unembedding(config, params)
    skip = {} if kept_chunk is None else {"mask": keep, "masked_first": kept_chunk}
    if with_entropy:
        logprobs, entropy = logprobs_and_entropy_from_hidden(hidden, unembedding, targets, temperature,
                                                             seq_chunk=seq_chunk, **skip)
        return jnp.where(keep, logprobs, 0.0), jnp.where(keep, entropy, 0.0)
    return jnp.where(keep, logprobs_from_hidden(hidden, unembedding, targets, temperature, seq_chunk=seq_chunk,
                                                **skip), 0.0)


def teacher_forced_logprobs(config: DecoderConfig, params, batch, temperature: float = 1.0, seq_chunk: int | None = 128,
                   with_entropy: bool = False, index=None):
    """Teacher-forced log p(tokens[t] | tokens[<t]) aligned to t: [B, T] float32 (column 0 is 0).

    Never materialises [B, T, V] logits: the unembedding runs chunk by chunk over T. With
    `with_entropy`, also returns the per-position entropy of the predictive distribution, aligned the
    same way. Positions where t starts a new packed segment get 0.

    index: None, or the positions to compute (a `loss_index` [B', k] from :func:`with_loss_index`, flattened
    to row-major positions of this [B, T] batch; entries >= B·T are padding). The head then runs at those
    positions only and every other position gives 0.
    """
    out = llama.forward(config, params, batch["tokens"], batch.get("positions"), batch.get("attention_mask"),
                        batch.get("segment_ids"), compute_logits=False)
    targets, same_segment = _shifted_targets(batch)
    if index is not None:
        if with_entropy:
            raise ValueError("teacher_forced_logprobs: with_entropy needs every position (index must be None)")
        return _logprobs_at_index(config, params, out.hidden, batch["tokens"], index, temperature)
    result = _logprobs_at(config, params, out.hidden[:, :-1], targets, same_segment, temperature, seq_chunk,
                          with_entropy)
    pad = jnp.zeros((targets.shape[0], 1), jnp.float32)
    if with_entropy:
        return tuple(jnp.concatenate([pad, x], axis=1) for x in result)
    return jnp.concatenate([pad, result], axis=1)


def _logprobs_at_index(config: DecoderConfig, params, hidden, tokens, index, temperature: float):
    """[B, T] log-probs, computed at the flat positions `index` only (0 elsewhere)."""
    rows, length = tokens.shape
    # `with_loss_index` lists the positions in order, padding after them, and there are at most rows·length: a
    # micro-batch cut to a shorter length (`training.accumulate.by_length`) runs the head at no more slots
    flat = index.reshape(-1).astype(jnp.int32)[: rows * length]
    valid = flat < rows * length
    # a position p predicts tokens[p] from hidden[p - 1] (same row: column 0 is never in an index)
    at = jnp.where(valid, flat, 1)
    values = logprobs_from_slots(config, params, hidden.reshape(rows * length, -1), at - 1, tokens.reshape(-1)[at],
                                 valid, temperature)
    return jnp.zeros(rows * length, values.dtype).at[flat].set(values, mode="drop").reshape(rows, length)


def logprobs_from_slots(config: DecoderConfig, params, hidden, slots, targets, valid, temperature: float = 1.0):
    """log p(targets[k] | hidden[slots[k]]) for K entries: [K], 0 where not `valid`. hidden: [N, D] flat.

    The LM head runs at those K hidden states only: the loss index's positions, or a shared-prefix row's loss
    entries (`data.batching.share_prefixes`), whose predicting slot is not always the one before the token.
    """
    # K · V float32 logits per chunk: one chunk up to 2^26 values (256 MiB), no recomputation below that
    chunk = max(128, 2**26 // config.vocab_size)
    count = slots.shape[0]
    if count > chunk:
        return _logprobs_at(config, params, hidden[slots][None], targets[None], valid[None], temperature, chunk,
                            False)[0]
    # one chunk: the head at the smallest leading run of the index's sizes that holds every valid entry (a batch's
    # index is sized by its micro-batch with the most; the others, and entries listed in rows, need fewer)
    order = jnp.argsort(jnp.logical_not(valid), stable=True)  # valid entries first, each group in order
    sizes = tuple(sorted({index_bucket(needed, count) for needed in range(1, count + 1)}))
    weight, vocab_first = llama.stored_unembedding(config, params)
    values = kept_rows_logprobs_from_hidden(hidden[slots[order]], weight, targets[order], valid[order], temperature,
                                            sizes=sizes, vocab_first=vocab_first)
    return jnp.zeros_like(values).at[order].set(values)


def position_index(masks: list[np.ndarray], carriers: int) -> np.ndarray:
    """Flat positions of each micro-batch's True entries, laid out as the strided micro-batch split expects.

    masks: one [r, T] bool array per micro-batch m (its rows in order). Returns [M·b, k] int32 where, after
    `split_microbatches`, micro-batch m's [b, k] block flattens to its positions (row-major in [r, T]),
    padded with r·T. b = `carriers` is the number of rows a micro-batch of the batch carrying the index has.
    """
    rows, length = masks[0].shape
    count = max(int(mask.sum()) for mask in masks)
    size = index_bucket(count, rows * length)
    per_row = -(-size // carriers)
    blocks = np.full((len(masks), carriers * per_row), rows * length, np.int32)
    for m, mask in enumerate(masks):
        positions = np.flatnonzero(mask)
        blocks[m, : positions.size] = positions
    # row j·M + m of the result is block m's j-th slice (micro-batch m holds rows m, m + M, ...)
    return blocks.reshape(len(masks), carriers, per_row).transpose(1, 0, 2).reshape(-1, per_row)


# each loss index a batch may carry: (the token rows it indexes, how many such row blocks its stack holds): a
# preference batch indexes each micro-batch's [chosen rows; rejected rows], KTO's KL rows their own tokens
LOSS_INDEX_KEYS = {"loss_index": ("tokens", 1), "pair_loss_index": ("chosen_tokens", 2),
                   "kl_loss_index": ("kl_tokens", 1)}


def _index_padding(batch: dict, key: str, num_microbatches: int) -> int:
    """The value :func:`position_index` pads `batch[key]` with: a micro-batch's stack rows · T."""
    name, blocks = LOSS_INDEX_KEYS[key]
    tokens = batch[name]
    return blocks * (tokens.shape[0] // num_microbatches) * tokens.shape[1]


def widen_loss_index(batch: dict, num_microbatches: int, widths: dict[str, int]) -> dict:
    """`batch` with each loss index named in `widths` laid out that many entries a row (at least its own): every
    micro-batch's positions as they were, more padding after them. Batches whose indexes differ in width only
    can then be stacked into one call of several steps (`training.calls`). numpy or jax arrays (traced too)."""
    out = dict(batch)
    for key, width in widths.items():
        index = batch[key]
        rows, own = index.shape
        if width == own:
            continue
        if width < own:
            raise ValueError(f"{key}: {own} entries a row cannot be laid out in {width}")
        carriers = rows // num_microbatches
        # row j·M + m holds micro-batch m's j-th slice (`position_index`): each micro-batch's list, then wider
        blocks = index.reshape(carriers, num_microbatches, own).transpose(1, 0, 2).reshape(num_microbatches, -1)
        pad = jnp.full((num_microbatches, carriers * (width - own)), _index_padding(batch, key, num_microbatches),
                       index.dtype)
        blocks = jnp.concatenate([blocks, pad], axis=1)
        out[key] = blocks.reshape(num_microbatches, carriers, width).transpose(1, 0, 2).reshape(rows, width)
    return out


def common_loss_index(batches: list[dict], num_microbatches: int) -> list[dict]:
    """The batches with their loss indexes widened to the widest among them (:func:`widen_loss_index`)."""
    widths = {key: max(batch[key].shape[1] for batch in batches) for key in LOSS_INDEX_KEYS if key in batches[0]}
    return [widen_loss_index(batch, num_microbatches, widths) for batch in batches]


def with_loss_index(batch: dict, num_microbatches: int = 1) -> dict:
    """The batch plus the positions that carry a loss, so the LM head runs there only (host numpy).

    SFT batches (`loss_mask`) get `loss_index`; preference batches (`chosen_loss_mask`, `rejected_loss_mask`)
    get `pair_loss_index`, indexing each micro-batch's [chosen rows; rejected rows] stack as
    `trainers.dpo.pair_logprobs` forms it. Steps read the index when present, so a batch without it computes
    the same numbers at every position; a batch with neither mask is returned as it is.
    """
    def split(array):
        return [np.asarray(array)[m::num_microbatches] for m in range(num_microbatches)]

    if "chosen_loss_mask" in batch:
        masks = [np.concatenate([chosen, rejected]) for chosen, rejected in zip(
            split(predicted_mask({"tokens": batch["chosen_tokens"], "loss_mask": batch["chosen_loss_mask"]})),
            split(predicted_mask({"tokens": batch["rejected_tokens"], "loss_mask": batch["rejected_loss_mask"]})))]
        # the stack has 2b rows per micro-batch; the index travels in the b rows of the pair batch
        return {**batch, "pair_loss_index": position_index(masks, masks[0].shape[0] // 2)}
    if "loss_mask" not in batch:
        return batch
    masks = split(predicted_mask(batch))
    return {**batch, "loss_index": position_index(masks, masks[0].shape[0])}


def continuation_logprobs(config: DecoderConfig, params, tokens, attention_mask, start: int, temperature: float = 1.0,
                          seq_chunk: int | None = 128, with_entropy: bool = False, group_size: int = 1,
                          kept_chunk: int | None = None):
    """Teacher-forced log p(tokens[t] | tokens[<t]) for the columns t >= `start` (static, >= 1): [B, T - start].

    The same numbers as `teacher_forced_logprobs(...)[:, start:]`, but the LM head (the [D, V] unembedding and the
    log-softmax over the vocabulary) runs only at the positions that predict those columns, not over the
    prompt: for RL rollouts (`start` = the prompt length) that is most of the head's cost.

    group_size: rows come in contiguous groups of this many that share their first `start` columns (a prompt
    sampled `group_size` times); the backbone then runs each group's prompt once (:func:`prompt_group_rows`).
    kept_chunk: None, or a number of positions: the head then runs only at the columns that `attention_mask`
    keeps (not after a response's end), gathered from every row and visited that many at a time; the others
    give 0 (`losses.logprobs`' `masked_first`).
    """
    if start < 1:
        raise ValueError(f"start must be >= 1 (column 0 has no prediction), got {start}")
    targets = tokens[:, start:]
    if group_size > 1:
        hidden, slots = over_group_rows(
            lambda *rows, **layout: llama.forward(config, params, *rows, compute_logits=False, **layout).hidden,
            tokens, attention_mask, start, group_size)
        hidden = group_columns(hidden, slots, slice(start - 1, -1))  # column t is predicted from column t - 1
    else:
        hidden = llama.forward(config, params, tokens, None, attention_mask, None, compute_logits=False).hidden
        hidden = hidden[:, start - 1 : -1]
    if kept_chunk is None:
        return _logprobs_at(config, params, hidden, targets, jnp.ones(targets.shape, bool), temperature, seq_chunk,
                            with_entropy)
    # each data shard's rows as one row of positions, so that the sort gathers its response tokens and stays local
    rows, columns = targets.shape
    blocks = batch_blocks(rows)
    keep = attention_mask[:, start:].astype(bool).reshape(blocks, -1)
    recompute = seq_chunk if seq_chunk is not None and seq_chunk < columns else None  # where the plain head does
    result = _logprobs_at(config, params, hidden.reshape(blocks, keep.shape[1], -1), targets.reshape(keep.shape),
                          keep, temperature, recompute, with_entropy, kept_chunk)
    return jax.tree.map(lambda x: x.reshape(rows, columns), result)


def batch_blocks(rows: int) -> int:
    """How many parts the mesh being traced under splits a batch's rows into (`sharding.batch_shards`): 1
    outside a mesh, or when the rows do not split evenly."""
    shards = batch_shards()
    return shards if rows % shards == 0 else 1


def over_group_rows(model_fn, tokens, attention_mask, start: int, group_size: int):
    """`model_fn(tokens, positions, attention_mask, segment_ids, shared=, segments=)` (a backbone forward) over
    :func:`prompt_group_rows`' rows, attention over their visible blocks. Returns (its output, slots)."""
    rows, slots = prompt_group_rows(tokens, attention_mask, start, group_size)
    out = model_fn(rows["tokens"], rows["positions"], rows["attention_mask"], rows["segment_ids"],
                   shared=rows["shared"], segments=(start, group_size))
    return out, slots


def group_columns(grouped: jax.Array, slots: jax.Array, columns: slice) -> jax.Array:
    """`columns` of every original row, read from per-slot values of :func:`prompt_group_rows`' rows.

    grouped: [B/G, L, ...] (hidden states, values) over the group rows; slots: [G, T] from `prompt_group_rows`.
    Returns [B, K, ...]: row b·G + g's columns, K of them, in the original rows' order.
    """
    index = slots[:, columns]  # [G, K]
    picked = grouped[:, index.reshape(-1)]  # [B/G, G·K, ...]
    return picked.reshape(grouped.shape[0] * index.shape[0], index.shape[1], *grouped.shape[2:])


def prompt_group_rows(tokens, attention_mask, start: int, group_size: int) -> tuple[dict, jax.Array]:
    """Each group of `group_size` rows that share a prompt laid out as one row, the prompt once.

    tokens, attention_mask: [B, T], rows b·G .. b·G + G − 1 holding the same (left-padded) prompt in their first
    `start` columns and their own (right-padded) continuations of N = T − start columns after it. Returns
    (row arrays [B/G, start + G·N]: the prompt, then each continuation as a segment of its own that sees the
    prompt (`shared`) and not the other continuations, with the positions each token has in its own row;
    slots [G, T] int32: the slot in its group's row of column t of the group's g-th row, the prompt's columns
    shared by all G).

    Attention computes the same sums as over the separate rows (a masked key adds an exact 0), so the hidden
    states agree to float rounding; the backbone's work falls from B·T positions to B/G·(start + G·N). Pass
    `segments=(start, group_size)` to `llama.forward` with these rows: attention then computes the prompt against
    itself and each continuation against the prompt and itself, not the blocks between continuations.
    """
    batch, length = tokens.shape
    if batch % group_size:
        raise ValueError(f"{batch} rows do not split into groups of {group_size}")
    groups, continuation = batch // group_size, length - start
    tokens = tokens.reshape(groups, group_size, length)
    mask = attention_mask.astype(bool).reshape(groups, group_size, length)
    prompt, prompt_mask = tokens[:, 0, :start], mask[:, 0, :start]
    after_mask = mask[:, :, start:]
    prompt_positions = llama.default_positions(prompt_mask, None)
    # a continuation's token: as in its own row, the count of real tokens before it (prompt and its own)
    prompt_lengths = jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)
    after_positions = prompt_lengths[:, None, None] - 1 + jnp.cumsum(after_mask.astype(jnp.int32), axis=2)
    segments = jnp.broadcast_to(jnp.arange(1, group_size + 1, dtype=jnp.int32)[:, None], (group_size, continuation))
    rows = {
        "tokens": jnp.concatenate([prompt, tokens[:, :, start:].reshape(groups, -1)], axis=1),
        "attention_mask": jnp.concatenate([prompt_mask, after_mask.reshape(groups, -1)], axis=1),
        "positions": jnp.concatenate([prompt_positions, jnp.maximum(after_positions.reshape(groups, -1), 0)], axis=1),
        "segment_ids": jnp.concatenate([jnp.zeros((groups, start), jnp.int32),
                                        jnp.broadcast_to(segments.reshape(-1), (groups, group_size * continuation))],
                                       axis=1),
        "shared": jnp.concatenate([jnp.ones((groups, start), bool),
                                   jnp.zeros((groups, group_size * continuation), bool)], axis=1),
    }
    own = start + jnp.arange(group_size)[:, None] * continuation + jnp.arange(continuation)[None, :]
    slots = jnp.concatenate([jnp.broadcast_to(jnp.arange(start), (group_size, start)), own], axis=1)
    return rows, slots.astype(jnp.int32)


def predicted_mask(batch) -> jax.Array:
    """loss_mask restricted to positions that have a prediction in the same segment: [B, T] bool."""
    mask = batch["loss_mask"].astype(bool)
    _, same_segment = _shifted_targets(batch)
    return mask & jnp.concatenate([jnp.zeros((mask.shape[0], 1), bool), same_segment], axis=1)
