"""Reward-model training loss on preference pairs (Bradley-Terry)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses.masked import as_bool, as_float, masked_mean


def _sanitised_pairs(chosen_rewards, rejected_rewards, margin, pair_mask):
    chosen, rejected = jnp.broadcast_arrays(as_float(chosen_rewards), as_float(rejected_rewards))
    if pair_mask is None:
        pair_mask = jnp.ones(chosen.shape, bool)
    pair_mask = jnp.broadcast_to(as_bool(pair_mask), chosen.shape)
    # Sanitise padded pairs first so neither the value nor the gradient sees what they hold.
    chosen = jnp.where(pair_mask, chosen, 0)
    rejected = jnp.where(pair_mask, rejected, 0)
    margin = jnp.zeros_like(chosen) if margin is None else jnp.where(pair_mask, as_float(margin), 0)
    return chosen, rejected, margin, pair_mask


def _add_centering(preference_loss, centering, center_coef):
    if isinstance(center_coef, (int, float)) and center_coef == 0:
        return preference_loss  # and an overflowing (r_c + r_r)² cannot turn a 0 coefficient into NaN
    return preference_loss + center_coef * centering


def bradley_terry_per_pair(chosen_rewards, rejected_rewards, margin=None, pair_mask=None,
                           center_coef: float = 0.0) -> jnp.ndarray:
    """Per-pair Bradley-Terry loss ``ℓ_b = −log σ(r_c − r_r − m) + center_coef · (r_c + r_r)²``; 0 under the mask.

    For exact accumulation over micro-batches: ``aggregate(ℓ, pair_mask)`` gives ``(Σ_b ℓ_b, #pairs)``, whose
    ratio is :func:`bradley_terry_loss`. Shapes as there; returns [B] float32.
    """
    chosen, rejected, margin, pair_mask = _sanitised_pairs(chosen_rewards, rejected_rewards, margin, pair_mask)
    per_pair = _add_centering(-jax.nn.log_sigmoid(chosen - rejected - margin), jnp.square(chosen + rejected),
                              center_coef)
    return jnp.where(pair_mask, per_pair, 0)


def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=None, pair_mask=None, center_coef: float = 0.0):
    """Bradley-Terry negative log-likelihood of the preferred response, with optional margin and centering.

    ``loss = mean_b[−log σ(r_c − r_r − m)] + center_coef · mean_b[(r_c + r_r)²]``

    The first term is the pairwise preference loss of Ouyang et al. 2022 (InstructGPT); ``m`` is an optional
    per-pair margin (Llama 2, Touvron et al. 2023). The second is the reward-centering auxiliary term of
    Eisenstein et al. 2023, which pins the rewards' mean near 0 (the Bradley-Terry loss only sees
    differences). ``−log σ`` is computed as ``−jax.nn.log_sigmoid`` so differences of ±1e4 stay finite.

    chosen_rewards, rejected_rewards: [B]; margin: [B] or scalar (default 0); pair_mask: [B] bool/{0,1}
    (default: all pairs count). Means are over the pairs in the mask; 0 if there are none.

    Returns ``(loss, metrics)`` with metrics ``rm/loss``, ``rm/accuracy`` (fraction with ``r_c > r_r``; ties
    count as wrong), ``rm/margin`` (mean of ``r_c − r_r``), ``rm/chosen_reward``, ``rm/rejected_reward`` and
    ``rm/centering`` (mean of ``(r_c + r_r)²``, reported whatever ``center_coef``).
    """
    chosen, rejected, margin, pair_mask = _sanitised_pairs(chosen_rewards, rejected_rewards, margin, pair_mask)
    difference = chosen - rejected
    centering = masked_mean(jnp.square(chosen + rejected), pair_mask)
    preference_loss = masked_mean(-jax.nn.log_sigmoid(difference - margin), pair_mask)
    loss = _add_centering(preference_loss, centering, center_coef)
    metrics = {
        "rm/loss": loss,
        "rm/accuracy": masked_mean(chosen > rejected, pair_mask),
        "rm/margin": masked_mean(difference, pair_mask),
        "rm/chosen_reward": masked_mean(chosen, pair_mask),
        "rm/rejected_reward": masked_mean(rejected, pair_mask),
        "rm/centering": centering,
    }
    return loss, metrics
