"""Supervised fine-tuning: next-token negative log-likelihood on the masked (response) tokens."""

from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.losses.aggregation import aggregate
from rlhf_jax.losses.masked import as_bool, as_float, safe_divide


def nll_per_token(logprobs, mask) -> jnp.ndarray:
    """``ℓ_t = −log p(y_t | y_<t)`` where ``mask`` is True, 0 elsewhere.

    logprobs: [B, T] (log-probabilities of the target tokens, e.g. from ``logprobs_from_logits(logits[:, :-1],
    tokens[:, 1:])``); mask: [B, T]. Returns [B, T] float32.
    """
    mask = as_bool(mask)
    return jnp.where(mask, -as_float(logprobs), 0)


def sft_loss(logprobs, mask, mode: str = "token-mean", normaliser: float | None = None):
    """Next-token NLL reduced with ``mode`` (see :func:`rlhf_jax.losses.aggregate`).

    ``loss = Σ m ℓ / count``. logprobs, mask: [B, T]. Returns ``(loss, metrics)``: ``sft/loss``,
    ``sft/perplexity`` (``exp`` of the token-mean NLL, whatever ``mode``), ``sft/tokens`` (masked token count).
    """
    per_token = nll_per_token(logprobs, mask)
    loss_sum, count = aggregate(per_token, mask, mode, normaliser)
    loss = safe_divide(loss_sum, count)
    token_sum, token_count = aggregate(per_token, mask, "token-mean")
    metrics = {
        "sft/loss": loss,
        "sft/perplexity": jnp.exp(safe_divide(token_sum, token_count)),
        "sft/tokens": token_count,
    }
    return loss, metrics
