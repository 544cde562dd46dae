"""PPO's clipped policy and value losses, explained variance and the entropy bonus.

Each loss comes in two forms: ``*_per_token`` returns the unreduced ``[B, T]`` loss (0 under the mask) and
metrics, to be reduced with :func:`rlhf_jax.losses.aggregate` into ``(loss_sum, count)`` for exact gradient
accumulation; the plain form reduces it with an aggregation mode and returns ``(loss, metrics)``.
"""

from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.losses.aggregation import aggregate_mean
from rlhf_jax.losses.masked import as_bool, as_float, masked_mean, masked_var, safe_divide


def _masked_max(values, mask) -> jnp.ndarray:
    values = as_float(values)
    largest = jnp.max(jnp.where(mask, values, -jnp.inf))
    return jnp.where(jnp.any(mask), largest, 0)


def ppo_policy_loss_per_token(logprobs, old_logprobs, advantages, mask, clip_eps: float = 0.2,
                              clip_eps_high: float | None = None, dual_clip: float | None = None):
    """PPO clipped surrogate loss per token (Schulman et al. 2017), with optional asymmetric and dual clip.

    ``ρ = exp(logp − logp_old)``,  ``ℓ = max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high))``
    with ``ε_low = clip_eps`` and ``ε_high = clip_eps_high`` (default ``clip_eps``; the asymmetric "clip-higher"
    of DAPO, Yu et al. 2025). Dual clip (Ye et al. 2020), for ``dual_clip = c > 1``: where ``A < 0``,
    ``ℓ = min(ℓ, −c·A)``, bounding the loss when ``ρ`` is very large.

    logprobs (current policy), old_logprobs (sampling policy), advantages, mask: [B, T].
    Returns ``(per_token_loss [B, T], metrics)``; the loss is 0 under the mask. Metrics, means over masked
    tokens: ``policy/clipfrac`` (fraction where the clipped term is the larger one), ``policy/approx_kl``
    (``(ρ − 1) − log ρ``: the k3 estimator of KL(π_old ‖ π_θ) from samples of π_old; non-negative),
    ``policy/ratio_mean``, ``policy/ratio_max`` (max over masked tokens), and with dual clip
    ``policy/dual_clipfrac`` (fraction of ``A < 0`` tokens where the dual bound is active).
    """
    if clip_eps_high is None:
        clip_eps_high = clip_eps
    if dual_clip is not None and isinstance(dual_clip, (int, float)) and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1 (Ye et al. 2020), got {dual_clip}")
    mask = as_bool(mask)
    logprobs = jnp.where(mask, as_float(logprobs), 0)
    old_logprobs = jnp.where(mask, as_float(old_logprobs), 0)
    advantages = jnp.where(mask, as_float(advantages), 0)

    log_ratio = logprobs - old_logprobs
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps_high)
    loss = jnp.maximum(unclipped, clipped)
    metrics = {
        "policy/clipfrac": masked_mean(clipped > unclipped, mask),
        "policy/approx_kl": masked_mean(jnp.expm1(log_ratio) - log_ratio, mask),
        "policy/ratio_mean": masked_mean(ratio, mask),
        "policy/ratio_max": _masked_max(ratio, mask),
    }
    if dual_clip is not None:
        negative = advantages < 0
        bound = -dual_clip * advantages
        metrics["policy/dual_clipfrac"] = masked_mean(loss > bound, mask & negative)
        loss = jnp.where(negative, jnp.minimum(loss, bound), loss)
    return jnp.where(mask, loss, 0), metrics


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps: float = 0.2,
                    clip_eps_high: float | None = None, dual_clip: float | None = None,
                    mode: str = "token-mean", normaliser: float | None = None):
    """:func:`ppo_policy_loss_per_token` reduced by :func:`rlhf_jax.losses.aggregate` with ``mode``.

    Shapes as there. Returns ``(loss, metrics)``, metrics including ``policy/loss``.
    """
    per_token, metrics = ppo_policy_loss_per_token(logprobs, old_logprobs, advantages, mask, clip_eps,
                                                   clip_eps_high, dual_clip)
    loss = aggregate_mean(per_token, mask, mode, normaliser)
    return loss, {"policy/loss": loss, **metrics}


def value_loss_per_token(values, old_values, returns, mask, clip_eps: float | None = 0.2):
    """Clipped value loss per token (PPO as in OpenAI baselines and Ziegler et al. 2019).

    ``ℓ = ½ · max((V − R)², (clip(V, V_old − ε_v, V_old + ε_v) − R)²)``; with ``clip_eps=None``,
    ``ℓ = ½ (V − R)²``.

    values (current), old_values (at sampling time), returns, mask: [B, T].
    Returns ``(per_token_loss [B, T], metrics)``, loss 0 under the mask; metrics ``value/clipfrac`` (fraction
    of masked tokens where the clipped error is the larger one; 0 without clipping).
    """
    mask = as_bool(mask)
    values = jnp.where(mask, as_float(values), 0)
    old_values = jnp.where(mask, as_float(old_values), 0)
    returns = jnp.where(mask, as_float(returns), 0)
    unclipped = jnp.square(values - returns)
    if clip_eps is None:
        loss, clipfrac = 0.5 * unclipped, jnp.zeros((), unclipped.dtype)
    else:
        clipped_values = jnp.clip(values, old_values - clip_eps, old_values + clip_eps)
        clipped = jnp.square(clipped_values - returns)
        loss = 0.5 * jnp.maximum(unclipped, clipped)
        clipfrac = masked_mean(clipped > unclipped, mask)
    return jnp.where(mask, loss, 0), {"value/clipfrac": clipfrac}


def value_loss(values, old_values, returns, mask, clip_eps: float | None = 0.2, mode: str = "token-mean",
               normaliser: float | None = None):
    """:func:`value_loss_per_token` reduced with ``mode``. Returns ``(loss, metrics)``, metrics ``value/loss``,
    ``value/clipfrac``."""
    per_token, metrics = value_loss_per_token(values, old_values, returns, mask, clip_eps)
    loss = aggregate_mean(per_token, mask, mode, normaliser)
    return loss, {"value/loss": loss, **metrics}


def explained_variance(values, returns, mask) -> jnp.ndarray:
    """How much of the returns' variance the value head explains: ``1 − Var(R − V) / Var(R)`` (masked).

    1 is perfect, 0 is no better than a constant, negative is worse. Defined as 0 when ``Var(R) = 0``.
    values, returns, mask: [B, T]. Returns a float32 scalar.
    """
    mask = as_bool(mask)
    values = jnp.where(mask, as_float(values), 0)
    returns = jnp.where(mask, as_float(returns), 0)
    return_var = masked_var(returns, mask)
    residual_var = masked_var(returns - values, mask)
    return jnp.where(return_var > 0, 1 - safe_divide(residual_var, return_var), 0)


def entropy_bonus(entropy, mask, coef: float, mode: str = "token-mean", normaliser: float | None = None):
    """Entropy bonus as a loss term: ``−coef · H`` per token, reduced with ``mode``.

    Per token it is ``−coef · entropy``; to accumulate over micro-batches pass that to ``aggregate``.
    entropy, mask: [B, T]. Returns ``(loss, metrics)`` with ``policy/entropy`` (the masked token-mean entropy).
    """
    mask = as_bool(mask)
    entropy = jnp.where(mask, as_float(entropy), 0)
    loss = aggregate_mean(-coef * entropy, mask, mode, normaliser)
    return loss, {"policy/entropy": masked_mean(entropy, mask)}
