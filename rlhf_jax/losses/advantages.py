"""Advantage estimators: GAE (Schulman et al. 2016) with a critic over masked token sequences, whitening, and the
critic-free outcome-reward estimators (GRPO, Dr. GRPO, RLOO, REINFORCE, REINFORCE++) chosen by name."""

from __future__ import annotations

import operator
from typing import Callable

import jax.numpy as jnp
from jax import lax

from rlhf_jax.losses.masked import as_bool, as_float, masked_whiten


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimates and returns, by a reverse ``lax.scan`` over the valid tokens.

    ``δ_t = r_t + γ V_{t'} − V_t``,  ``A_t = δ_t + γλ A_{t'}``,  ``R_t = A_t + V_t``,

    where ``t'`` is the next valid position after ``t`` (masked positions are skipped, so a masked-out gap
    inside a response does not break the recursion) and ``V_{t'} = A_{t'} = 0`` past the last valid token
    (the episode ends there: bootstrap value 0). Advantages and returns at masked positions are 0, and what
    rewards/values hold there (even NaN) is ignored.

    rewards, values, mask: [B, T] (any leading axes); gamma γ, lam λ: scalars (may be traced).
    Returns ``(advantages, returns)``, each [B, T] float32.
    """
    rewards = as_float(rewards)
    values = as_float(values)
    dtype = jnp.promote_types(rewards.dtype, values.dtype)
    rewards, values = jnp.broadcast_arrays(rewards.astype(dtype), values.astype(dtype))
    mask = jnp.broadcast_to(as_bool(mask), rewards.shape)
    rewards = jnp.where(mask, rewards, 0)
    values = jnp.where(mask, values, 0)
    gamma = jnp.asarray(gamma, dtype)
    lam = jnp.asarray(lam, dtype)

    def step(carry, inputs):
        next_value, next_advantage = carry
        reward, value, valid = inputs
        delta = reward + gamma * next_value - value
        advantage = delta + gamma * lam * next_advantage
        carry = (jnp.where(valid, value, next_value), jnp.where(valid, advantage, next_advantage))
        return carry, jnp.where(valid, advantage, 0)

    time_major = [jnp.moveaxis(x, -1, 0) for x in (rewards, values, mask)]
    zeros = jnp.zeros(rewards.shape[:-1], dtype)
    _, advantages = lax.scan(step, (zeros, zeros), time_major, reverse=True)
    advantages = jnp.moveaxis(advantages, 0, -1)
    returns = jnp.where(mask, advantages + values, 0)
    return advantages, returns


def whiten_advantages(advantages, mask, shift_mean: bool = True, eps: float = 1e-8) -> jnp.ndarray:
    """Whitened advantages ``(A − μ) / sqrt(σ² + eps)`` over the masked tokens of the whole batch; 0 elsewhere.

    μ, σ² are the masked mean and (population) variance. advantages, mask: [B, T]. Returns [B, T] float32.
    """
    return masked_whiten(advantages, mask, shift_mean=shift_mean, eps=eps)


# Critic-free estimators over outcome rewards. Every one has the signature ``(scores, group_size, eps)``:
# scores: [B] float, one per sequence, with B = num_prompts * group_size and the group_size samples of prompt p in
# rows p*k .. p*k + k − 1; group_size (k) is a static Python int; eps may be traced. Each returns advantages [B]
# in the scores' float dtype (float32 at least); :func:`sequence_to_token_advantages` spreads them over tokens.

DEFAULT_EPS = 1e-4  # TRL's GRPO constant: A = (r − mean) / (std + 1e-4)


def _grouped(scores, group_size: int) -> jnp.ndarray:
    """``scores: [B]`` as float ``[P, k]`` (row p holds prompt p's samples); ``ValueError`` on a bad layout."""
    try:
        group_size = operator.index(group_size)
    except TypeError:
        raise ValueError(f"group_size must be a static Python int, got {type(group_size).__name__}") from None
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    scores = as_float(scores)
    if scores.ndim != 1:
        raise ValueError(f"scores must be [B], one per sequence, got shape {scores.shape}")
    if scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores do not split into groups of group_size={group_size}: expected "
                         f"B = num_prompts * group_size, with the samples of a prompt in contiguous rows")
    return scores.reshape(-1, group_size)


def _centred(groups: jnp.ndarray) -> jnp.ndarray:
    """``r − mean`` per row of ``groups: [P, k]``; exactly 0 for a row of equal scores.

    The float mean of k equal scores can be off by an ulp (3 × 0.1 / 3 ≠ 0.1), and GRPO would then divide that
    ulp by a std of the same size: ±O(1) advantages from nothing when eps is small.
    """
    constant = jnp.max(groups, axis=-1, keepdims=True) == jnp.min(groups, axis=-1, keepdims=True)
    return jnp.where(constant, 0, groups - jnp.mean(groups, axis=-1, keepdims=True))


def _standardised(groups: jnp.ndarray, eps) -> jnp.ndarray:
    """``(r − mean) / (std + eps)`` per row of ``groups: [P, k]``, std the sample std (divisor ``k − 1``).

    0 where the std is 0 (a row of equal scores, or ``k = 1``), even with ``eps = 0``; the inner ``where``s keep
    the gradient finite there too.
    """
    centred = _centred(groups)
    size = groups.shape[-1]
    if size == 1:
        return jnp.zeros_like(groups)
    var = jnp.sum(jnp.square(centred), axis=-1, keepdims=True) / (size - 1)
    positive = var > 0
    std = jnp.sqrt(jnp.where(positive, var, 1))
    return jnp.where(positive, centred / jnp.where(positive, std + jnp.asarray(eps, groups.dtype), 1), 0)


def grpo(scores, group_size: int, eps: float = DEFAULT_EPS) -> jnp.ndarray:
    """GRPO's group-normalised outcome advantages (Shao et al. 2024, DeepSeekMath, §4.1.2).

    ``A_i = (r_i − mean_g r) / (std_g r + eps)`` over the k samples of the prompt of sequence i, with ``std_g``
    the **sample** standard deviation (divisor ``k − 1``), as TRL's ``GRPOTrainer`` computes it (``torch.std``
    is unbiased by default). A group of one (``k = 1``) or of equal scores has no signal: its advantages are 0
    (std is taken as 0, not NaN).

    scores: [B] with B = P·k, prompt p's samples in rows p·k .. p·k + k − 1; group_size k: static int.
    Returns advantages [B].
    """
    return _standardised(_grouped(scores, group_size), eps).reshape(-1)


def dr_grpo(scores, group_size: int, eps: float = DEFAULT_EPS) -> jnp.ndarray:
    """Dr. GRPO advantages (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective").

    ``A_i = r_i − mean_g r``: GRPO without the division by the group's std, which up-weights prompts that are
    nearly always or never solved (pair it with the "sum-fixed" aggregation to drop the length bias too).
    ``eps`` is unused (uniform signature). scores: [B] = P·k, grouped as in :func:`grpo`. Returns [B].
    """
    del eps
    return _centred(_grouped(scores, group_size)).reshape(-1)


def rloo(scores, group_size: int, eps: float = DEFAULT_EPS) -> jnp.ndarray:
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics").

    ``A_i = r_i − (1 / (k − 1)) Σ_{j≠i} r_j = k / (k − 1) · (r_i − mean_g r)``: each sample's baseline is the
    mean of the other samples of its prompt, so it does not depend on the sample and the gradient estimate is
    unbiased. Needs ``group_size ≥ 2`` (``ValueError`` otherwise). ``eps`` is unused. scores: [B] = P·k, grouped
    as in :func:`grpo`. Returns [B].
    """
    del eps
    groups = _grouped(scores, group_size)
    if group_size < 2:
        raise ValueError(f"rloo needs group_size >= 2 (a leave-one-out baseline needs another sample), "
                         f"got {group_size}")
    return (group_size / (group_size - 1) * _centred(groups)).reshape(-1)


def reinforce(scores, group_size: int, eps: float = DEFAULT_EPS) -> jnp.ndarray:
    """REINFORCE with a batch-mean baseline (Williams 1992): ``A_i = r_i − mean_B r``.

    The baseline is the mean over the whole batch, ignoring groups; ``group_size`` only checks the layout and
    ``eps`` is unused. scores: [B]. Returns [B].
    """
    del eps
    return _centred(_grouped(scores, group_size).reshape(1, -1)).reshape(-1)


def reinforce_pp(scores, group_size: int, eps: float = DEFAULT_EPS) -> jnp.ndarray:
    """REINFORCE++ advantages (Hu 2025, arXiv:2501.03262): whitened over the global batch, no critic.

    ``A_i = (r_i − mean_B r) / (std_B r + eps)``, with the sample std as in :func:`grpo`: this is
    ``grpo(scores, B, eps)``, one group spanning the batch. REINFORCE++ puts the per-token KL penalty into the
    reward; here ``scores`` must already hold it summed over the sequence (``score − β Σ_t KL_t``, the return
    from the first token). The paper's token-level form (a return-to-go per token, whitened over tokens) is
    ``whiten_advantages(gae(kl_penalized_rewards(...)[0], 0, mask, 1.0, 1.0)[0], mask)``.
    ``group_size`` only checks the layout. scores: [B]. Returns [B].
    """
    return _standardised(_grouped(scores, group_size).reshape(1, -1), eps).reshape(-1)


def sequence_to_token_advantages(advantages, response_mask) -> jnp.ndarray:
    """Broadcast sequence advantages over response tokens: ``A_{b,t} = A_b`` where ``m_{b,t}``, else 0.

    advantages: [B]; response_mask: [B, T] (bool or {0, 1}). Returns [B, T] float32 (float64 if the advantages
    are). Applied with ``where``: a NaN advantage of a row with no response token does not leak.
    """
    advantages = as_float(advantages)
    mask = as_bool(response_mask)
    return jnp.where(mask, advantages[..., None], jnp.zeros((), advantages.dtype))


ADVANTAGE_ESTIMATORS: dict[str, Callable] = {
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "rloo": rloo,
    "reinforce": reinforce,
    "reinforce_pp": reinforce_pp,
}
CRITIC_ESTIMATORS = ("gae",)  # need a value model and per-token rewards: call gae(...) directly


def _unknown_estimator(name) -> ValueError:
    choices = ", ".join((*ADVANTAGE_ESTIMATORS, *CRITIC_ESTIMATORS))
    return ValueError(f"unknown advantage estimator {name!r}; expected one of {choices}")


def needs_critic(name: str) -> bool:
    """Whether the estimator ``name`` needs a critic (``"gae"``); ``ValueError`` naming the choices if unknown."""
    if isinstance(name, str) and name in CRITIC_ESTIMATORS:
        return True
    if isinstance(name, str) and name in ADVANTAGE_ESTIMATORS:
        return False
    raise _unknown_estimator(name)


def get_advantage_estimator(name: str) -> Callable:
    """The critic-free estimator ``name``, ``fn(scores [B], group_size, eps) -> [B]``; ``ValueError`` otherwise.

    ``"gae"`` is refused with a pointer to :func:`gae`, whose inputs differ (token rewards, values, mask).
    """
    if needs_critic(name):
        raise ValueError(f"advantage estimator {name!r} needs a critic: call gae(rewards, values, mask, gamma, lam), "
                         f"not a sequence-score estimator ({', '.join(ADVANTAGE_ESTIMATORS)})")
    return ADVANTAGE_ESTIMATORS[name]
