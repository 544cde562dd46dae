"""Losses on preference pairs: the reward model's Bradley-Terry loss and the DPO family."""

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


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_per_pair(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                 beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 pair_mask=None) -> jnp.ndarray:
    """Per-pair DPO-family loss on the implicit-reward margin ``h``; 0 under the mask.

    With ``h = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))`` (sequence log-probs):

    - ``sigmoid`` (DPO, Rafailov et al. 2023; conservative DPO, Mitchell 2023, with label smoothing ε):
      ``ℓ = −(1 − ε) log σ(β h) − ε log σ(−β h)``;
    - ``ipo`` (IPO, Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
      Preferences", eq. 17): ``ℓ = (h − 1/(2β))²``;
    - ``hinge`` (SLiC, Zhao et al. 2023): ``ℓ = max(0, 1 − β h)``.

    ``label_smoothing`` applies to ``sigmoid`` only (as in TRL); the others must have it 0. All inputs [B]
    (or broadcastable); ``pair_mask`` [B] bool/{0,1} (default: all). ``aggregate(ℓ, pair_mask)`` gives the
    exact ``(Σ ℓ, #pairs)`` for micro-batch accumulation. Returns [B] float32 (float64 for float64 inputs).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"DPO loss_type {loss_type!r}: expected one of {DPO_LOSS_TYPES}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing={label_smoothing} applies to the sigmoid DPO loss only, not {loss_type!r}")
    margin, _, _, pair_mask = _dpo_margins(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                           reference_rejected_logps, pair_mask)
    if loss_type == "sigmoid":
        per_pair = -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * margin)
        if label_smoothing:
            per_pair = per_pair - label_smoothing * jax.nn.log_sigmoid(-beta * margin)
    elif loss_type == "ipo":
        per_pair = jnp.square(margin - 1 / (2 * beta))
    else:
        per_pair = jax.nn.relu(1 - beta * margin)
    return jnp.where(pair_mask, per_pair, 0)


def _dpo_margins(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                 pair_mask):
    arrays = jnp.broadcast_arrays(*(as_float(x) for x in (policy_chosen_logps, policy_rejected_logps,
                                                          reference_chosen_logps, reference_rejected_logps)))
    if pair_mask is None:
        pair_mask = jnp.ones(arrays[0].shape, bool)
    pair_mask = jnp.broadcast_to(as_bool(pair_mask), arrays[0].shape)
    # Sanitise padded pairs first so neither the value nor the gradient sees what they hold.
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = (jnp.where(pair_mask, x, 0)
                                                                            for x in arrays)
    chosen_log_ratio = policy_chosen - reference_chosen
    rejected_log_ratio = policy_rejected - reference_rejected
    return chosen_log_ratio - rejected_log_ratio, chosen_log_ratio, rejected_log_ratio, pair_mask


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0, pair_mask=None):
    """Direct preference optimisation: mean over pairs of :func:`dpo_per_pair` (formulas there).

    ``loss = mean_b ℓ_b``; for ``sigmoid`` without smoothing (Rafailov et al. 2023, "Direct Preference
    Optimization: Your Language Model is Secretly a Reward Model", eq. 7)

        ``loss = −mean_b log σ(β [(log π − log π_ref)(y_c) − (log π − log π_ref)(y_r)])``.

    The implicit rewards are ``r = β (log π(y) − log π_ref(y))``; at ``π = π_ref`` the sigmoid loss is ``log 2``
    and every reward 0.

    Inputs: sequence log-probs [B] of the policy and the frozen reference for the chosen and rejected
    responses; ``pair_mask`` [B]. Means are over the pairs in the mask; 0 if there are none.

    Returns ``(loss, metrics)`` with TRL's metric names: ``dpo/loss``, ``rewards/chosen``, ``rewards/rejected``
    (mean implicit rewards), ``rewards/accuracies`` (fraction with ``r_c > r_r``; ties count as wrong),
    ``rewards/margins`` (mean ``r_c − r_r``), ``logps/chosen``, ``logps/rejected`` (mean policy log-probs).
    """
    per_pair = dpo_per_pair(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                            reference_rejected_logps, beta, loss_type, label_smoothing, pair_mask)
    _, chosen_log_ratio, rejected_log_ratio, pair_mask = _dpo_margins(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, pair_mask)
    chosen_rewards, rejected_rewards = beta * chosen_log_ratio, beta * rejected_log_ratio
    loss = masked_mean(per_pair, pair_mask)
    metrics = {
        "dpo/loss": loss,
        "rewards/chosen": masked_mean(chosen_rewards, pair_mask),
        "rewards/rejected": masked_mean(rejected_rewards, pair_mask),
        "rewards/accuracies": masked_mean(chosen_rewards > rejected_rewards, pair_mask),
        "rewards/margins": masked_mean(chosen_rewards - rejected_rewards, pair_mask),
        "logps/chosen": masked_mean(policy_chosen_logps, pair_mask),
        "logps/rejected": masked_mean(policy_rejected_logps, pair_mask),
    }
    return loss, metrics
