"""Model calls shared by the steps: teacher-forced token log-probs and sequence rewards.

Batch convention (see docs/data.md): right- or left-padded `tokens [B, T]`, `attention_mask [B, T]`,
`loss_mask [B, T]` marking tokens to predict at their own positions; optional `segment_ids`,
`positions` for packed rows. Log-probs are aligned to the predicted token: `logprobs[:, t]` is
log p(tokens[:, t] | tokens[:, :t]) and `logprobs[:, 0] = 0`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses import logprobs_and_entropy_from_hidden, logprobs_from_hidden
from rlhf_jax.models import llama
from rlhf_jax.models.config import DecoderConfig


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
                 with_entropy: bool):
    """Log-probs (and entropies) of `targets` [B, S] predicted from `hidden` [B, S, D]; 0 where not `keep`."""
    unembedding = llama.unembedding(config, params)
    if with_entropy:
        logprobs, entropy = logprobs_and_entropy_from_hidden(hidden, unembedding, targets, temperature,
                                                             seq_chunk=seq_chunk)
        return jnp.where(keep, logprobs, 0.0), jnp.where(keep, entropy, 0.0)
    return jnp.where(keep, logprobs_from_hidden(hidden, unembedding, targets, temperature, seq_chunk=seq_chunk), 0.0)


def token_logprobs(config: DecoderConfig, params, batch, temperature: float = 1.0, seq_chunk: int | None = 128,
                   with_entropy: bool = False):
    """Teacher-forced log p(tokens[t] | tokens[<t]) aligned to t: [B, T] float32 (column 0 is 0).

    Never materialises [B, T, V] logits: the unembedding runs chunk by chunk over T. With
    `with_entropy`, also returns the per-position entropy of the predictive distribution, aligned the
    same way. Positions where t starts a new packed segment get 0.
    """
    out = llama.forward(config, params, batch["tokens"], batch.get("positions"), batch.get("attention_mask"),
                        batch.get("segment_ids"), compute_logits=False)
    targets, same_segment = _shifted_targets(batch)
    result = _logprobs_at(config, params, out.hidden[:, :-1], targets, same_segment, temperature, seq_chunk,
                          with_entropy)
    pad = jnp.zeros((targets.shape[0], 1), jnp.float32)
    if with_entropy:
        return tuple(jnp.concatenate([pad, x], axis=1) for x in result)
    return jnp.concatenate([pad, result], axis=1)


def continuation_logprobs(config: DecoderConfig, params, tokens, attention_mask, start: int, temperature: float = 1.0,
                          seq_chunk: int | None = 128, with_entropy: bool = False):
    """Teacher-forced log p(tokens[t] | tokens[<t]) for the columns t >= `start` (static, >= 1): [B, T - start].

    The same numbers as `token_logprobs(...)[:, start:]`, but the LM head (the [D, V] unembedding and the
    log-softmax over the vocabulary) runs only at the positions that predict those columns, not over the
    prompt: for RL rollouts (`start` = the prompt length) that is most of the head's cost.
    """
    if start < 1:
        raise ValueError(f"start must be >= 1 (column 0 has no prediction), got {start}")
    out = llama.forward(config, params, tokens, None, attention_mask, None, compute_logits=False)
    targets = tokens[:, start:]
    return _logprobs_at(config, params, out.hidden[:, start - 1 : -1], targets, jnp.ones(targets.shape, bool),
                        temperature, seq_chunk, with_entropy)


def predicted_mask(batch) -> jax.Array:
    """loss_mask restricted to positions that have a prediction in the same segment: [B, T] bool."""
    mask = batch["loss_mask"].astype(bool)
    _, same_segment = _shifted_targets(batch)
    return mask & jnp.concatenate([jnp.zeros((mask.shape[0], 1), bool), same_segment], axis=1)
