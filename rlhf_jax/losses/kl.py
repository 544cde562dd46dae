"""Per-token KL estimators and the KL-shaped per-token rewards of RLHF-PPO.

With ``logp`` the policy's and ``logq`` the reference model's log-probability of the sampled token (the token
is drawn from the policy), each estimator is a per-sample estimate of ``KL(π ‖ π_ref)`` (Schulman 2020,
"Approximating KL divergence", http://joschu.net/blog/kl-approx.html):

* ``k1 = logp − logq``                                  unbiased, high variance, can be negative per token
* ``k2 = ½ (logp − logq)²``                             biased, low variance, non-negative
* ``k3 = exp(logq − logp) − 1 − (logq − logp)``         unbiased, low variance, non-negative
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from rlhf_jax.losses.masked import as_bool, as_float, last_token_index, masked_mean


def kl_k1(logprobs, ref_logprobs) -> jnp.ndarray:
    """``k1 = logp − logq``. logprobs, ref_logprobs: [B, T]. Returns [B, T] float32."""
    return as_float(logprobs) - as_float(ref_logprobs)


def kl_k2(logprobs, ref_logprobs) -> jnp.ndarray:
    """``k2 = ½ (logp − logq)²``. logprobs, ref_logprobs: [B, T]. Returns [B, T] float32."""
    return 0.5 * jnp.square(as_float(logprobs) - as_float(ref_logprobs))


def kl_k3(logprobs, ref_logprobs) -> jnp.ndarray:
    """``k3 = exp(logq − logp) − 1 − (logq − logp)``, computed with ``expm1`` for accuracy near 0.

    logprobs, ref_logprobs: [B, T]. Returns [B, T] float32, non-negative.
    """
    reverse_log_ratio = as_float(ref_logprobs) - as_float(logprobs)
    return jnp.expm1(reverse_log_ratio) - reverse_log_ratio


KL_ESTIMATORS: dict[str, Callable] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def get_kl_estimator(name: str) -> Callable:
    """The estimator called ``name`` ("k1", "k2" or "k3"); ``ValueError`` naming the choices otherwise."""
    try:
        return KL_ESTIMATORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown KL estimator {name!r}; expected one of {', '.join(KL_ESTIMATORS)}") from None


def kl_estimate(logprobs, ref_logprobs, estimator: str = "k1", mask=None) -> jnp.ndarray:
    """Per-token KL estimate ``k(logp, logq)`` by estimator name; 0 where ``mask`` is False.

    logprobs: [B, T] (policy); ref_logprobs: [B, T] (reference); mask: [B, T] or None. Returns [B, T] float32.
    """
    estimate = get_kl_estimator(estimator)
    if mask is None:
        return estimate(logprobs, ref_logprobs)
    mask = as_bool(mask)
    # Sanitise before the estimator so NaN/inf under the mask reach neither the value nor the gradient.
    return jnp.where(mask, estimate(jnp.where(mask, logprobs, 0), jnp.where(mask, ref_logprobs, 0)), 0)


def last_token_mask(mask) -> jnp.ndarray:
    """True at the last True position of each row of ``mask``; all False for an empty row.

    Found from the mask itself (never from token ids, which breaks when pad = EOS). mask: [B, T] -> [B, T] bool.
    """
    mask = as_bool(mask)
    return (jnp.arange(mask.shape[-1]) == last_token_index(mask)[..., None]) & jnp.any(mask, axis=-1, keepdims=True)


def kl_penalized_rewards(scores, logprobs, ref_logprobs, response_mask, kl_coef, estimator: str = "k1"):
    """Per-token rewards for PPO: ``r_t = −β·KL_t`` on response tokens, plus the score at the last one.

    ``r_t = m_t · (−β · k(logp_t, logq_t)) + [t = last response token] · score``  (Ziegler et al. 2019;
    Stiennon et al. 2020). The score lands on the last True position of ``response_mask`` in each row; a row
    with no response token gets no score (and no NaN). Rewards are float32 whatever the input dtypes.

    scores: [B]; logprobs, ref_logprobs, response_mask: [B, T]; kl_coef β: scalar (may be traced).
    Returns ``(rewards [B, T], metrics)``; metrics (means over sequences with ≥1 response token):
    ``kl/sequence_kl`` (Σ_t KL_t, the quantity an adaptive controller should track), ``kl/token_kl`` (mean per
    token), ``kl/coef``, ``reward/score``, ``reward/kl_penalty`` (Σ_t −β KL_t), ``reward/total`` (Σ_t r_t).
    """
    response_mask = as_bool(response_mask)
    per_token_kl = kl_estimate(logprobs, ref_logprobs, estimator, mask=response_mask)
    kl_coef = as_float(kl_coef)
    scores = as_float(scores)
    is_last = last_token_mask(response_mask)
    penalty = jnp.where(response_mask, -kl_coef * per_token_kl, 0)
    rewards = penalty + jnp.where(is_last, scores[..., None], 0)

    has_response = jnp.any(response_mask, axis=-1)
    sequence_kl = jnp.sum(per_token_kl, axis=-1)
    metrics = {
        "kl/sequence_kl": masked_mean(sequence_kl, has_response),
        "kl/token_kl": masked_mean(per_token_kl, response_mask),
        "kl/coef": kl_coef,
        "reward/score": masked_mean(scores, has_response),
        "reward/kl_penalty": masked_mean(jnp.sum(penalty, axis=-1), has_response),
        "reward/total": masked_mean(jnp.sum(rewards, axis=-1), has_response),
    }
    return rewards, metrics
