"""Reduce a per-token loss to ``(loss_sum, count)`` so that gradient accumulation is exact.

A trainer that splits a batch into micro-batches sums ``grad(loss_sum)`` and ``count`` over them and divides
once by the total count; the result equals the gradient of the big-batch loss ``loss_sum / count`` exactly
(Tunix style), instead of the "mean of means" that goes wrong when micro-batches hold different numbers of
tokens. For every mode the count is additive over micro-batches that split the batch by sequences.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from rlhf_jax.losses.masked import as_bool, as_float, safe_divide

AGGREGATION_MODES = ("token-mean", "sequence-mean", "sum-fixed")


def check_aggregation_mode(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`AGGREGATION_MODES`, else raise ``ValueError`` naming them."""
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; expected one of {', '.join(AGGREGATION_MODES)}")
    return mode


def aggregate(per_token_loss, mask, mode: str = "token-mean", normaliser: float | None = None):
    """Reduce ``per_token_loss`` over the masked tokens to ``(loss_sum, count)``; the loss is their ratio.

    per_token_loss: [B, T]; mask: [B, T] (any leading axes stand for B). With ``ℓ`` the loss and ``m`` the mask:

    * ``"token-mean"``:    ``loss_sum = Σ_{b,t} m ℓ``,              ``count = Σ_{b,t} m``
    * ``"sequence-mean"``: ``loss_sum = Σ_b (Σ_t m ℓ / Σ_t m)``,    ``count = #{b : Σ_t m > 0}``
      (mean within each sequence, then over the sequences that have at least one token)
    * ``"sum-fixed"``:     ``loss_sum = Σ_{b,t} m ℓ``,              ``count = normaliser · B``
      with ``normaliser`` a fixed per-sequence token budget (default ``T``), e.g. the maximum response
      length as in Dr. GRPO (Liu et al. 2025), so the loss does not depend on response lengths.

    Returns float32 (or float64) scalars ``(loss_sum, count)``.
    """
    check_aggregation_mode(mode)
    per_token_loss = as_float(per_token_loss)
    mask = jnp.broadcast_to(as_bool(mask), per_token_loss.shape)
    dtype = per_token_loss.dtype
    token_sums = jnp.sum(jnp.where(mask, per_token_loss, 0), axis=-1)
    if mode == "sequence-mean":
        token_counts = jnp.sum(mask, axis=-1, dtype=dtype)
        return jnp.sum(safe_divide(token_sums, token_counts)), jnp.sum(token_counts > 0, dtype=dtype)
    if mode == "sum-fixed":
        tokens_per_sequence = mask.shape[-1] if normaliser is None else normaliser
        num_sequences = token_sums.size
        return jnp.sum(token_sums), jnp.asarray(tokens_per_sequence, dtype) * num_sequences
    return jnp.sum(token_sums), jnp.sum(mask, dtype=dtype)


def aggregate_mean(per_token_loss, mask, mode: str = "token-mean", normaliser: float | None = None) -> jnp.ndarray:
    """``loss_sum / count`` from :func:`aggregate`; 0 when the count is 0. Shapes as there; returns a scalar."""
    loss_sum, count = aggregate(per_token_loss, mask, mode, normaliser)
    return safe_divide(loss_sum, count)


class Weighted(NamedTuple):
    """A metric as ``(total, count)``: its value is ``total / count`` (0 when the count is 0).

    Metrics travel through micro-batch accumulation in this form, each with its own denominator (pairs for a
    preference metric, response tokens for a per-token one), and are divided once at the end
    (:func:`metric_values`): no trainer rescales a metric by another metric's count.
    """

    total: jnp.ndarray
    count: jnp.ndarray

    def value(self) -> jnp.ndarray:
        return safe_divide(self.total, self.count)


def weighted(values, mask=None) -> Weighted:
    """``Weighted(Σ mask·values, Σ mask)`` over every axis: the masked mean, kept as its sum and count.

    values: any shape (bool/int values count as {0, 1}, so an accuracy is a weighted mean too); mask:
    broadcastable to it (default: every entry counts). Masked entries are dropped with ``jnp.where``.
    """
    values = as_float(values)
    mask = jnp.ones(values.shape, bool) if mask is None else jnp.broadcast_to(as_bool(mask), values.shape)
    return Weighted(jnp.sum(jnp.where(mask, values, 0)), jnp.sum(mask, dtype=values.dtype))


def metric_values(metrics: dict) -> dict:
    """``{name: Weighted}`` (or already-final scalars) -> ``{name: value}``."""
    return {name: metric.value() if isinstance(metric, Weighted) else metric for name, metric in metrics.items()}
