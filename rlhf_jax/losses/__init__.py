"""The RLHF maths: pure, jit/grad/vmap-able functions of arrays and masks (see docs/losses.md).

Masks are bool or {0, 1} and applied with ``jnp.where`` (never by multiplication); arithmetic is float32 at
least; losses return ``(loss, metrics)`` with ``group/name`` metric keys, and per-token forms reduce with
:func:`aggregate` to ``(loss_sum, count)`` for exact gradient accumulation.
"""

from rlhf_jax.losses.advantages import (
    ADVANTAGE_ESTIMATORS,
    CRITIC_ESTIMATORS,
    dr_grpo,
    gae,
    get_advantage_estimator,
    grpo,
    needs_critic,
    reinforce,
    reinforce_pp,
    rloo,
    sequence_to_token_advantages,
    whiten_advantages,
)
from rlhf_jax.losses.aggregation import AGGREGATION_MODES, aggregate, aggregate_mean, check_aggregation_mode
from rlhf_jax.losses.controllers import (
    KLController,
    KLControllerState,
    adaptive_kl_coef,
    adaptive_kl_controller,
    fixed_kl_controller,
)
from rlhf_jax.losses.kl import (
    KL_ESTIMATORS,
    get_kl_estimator,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalized_rewards,
    last_token_mask,
)
from rlhf_jax.losses.logprobs import (
    chunked_token_entropy,
    chunked_token_logprobs,
    logprobs_and_entropy_from_hidden,
    logprobs_from_hidden,
    token_entropy,
    token_logprobs,
)
from rlhf_jax.losses.masked import masked_count, masked_mean, masked_sum, masked_var, masked_whiten
from rlhf_jax.losses.policy import (
    entropy_bonus,
    explained_variance,
    ppo_policy_loss,
    ppo_policy_loss_per_token,
    value_loss,
    value_loss_per_token,
)
from rlhf_jax.losses.preference import (
    DPO_LOSS_TYPES,
    bradley_terry_loss,
    bradley_terry_per_pair,
    dpo_loss,
    dpo_per_pair,
)
from rlhf_jax.losses.sft import nll_per_token, sft_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATION_MODES",
    "CRITIC_ESTIMATORS",
    "DPO_LOSS_TYPES",
    "KL_ESTIMATORS",
    "KLController",
    "KLControllerState",
    "adaptive_kl_coef",
    "adaptive_kl_controller",
    "aggregate",
    "aggregate_mean",
    "bradley_terry_loss",
    "bradley_terry_per_pair",
    "check_aggregation_mode",
    "chunked_token_entropy",
    "chunked_token_logprobs",
    "dpo_loss",
    "dpo_per_pair",
    "dr_grpo",
    "entropy_bonus",
    "explained_variance",
    "fixed_kl_controller",
    "gae",
    "get_advantage_estimator",
    "get_kl_estimator",
    "grpo",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalized_rewards",
    "last_token_mask",
    "logprobs_and_entropy_from_hidden",
    "logprobs_from_hidden",
    "masked_count",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "needs_critic",
    "nll_per_token",
    "ppo_policy_loss",
    "ppo_policy_loss_per_token",
    "reinforce",
    "reinforce_pp",
    "rloo",
    "sequence_to_token_advantages",
    "sft_loss",
    "token_entropy",
    "token_logprobs",
    "value_loss",
    "value_loss_per_token",
    "whiten_advantages",
]
