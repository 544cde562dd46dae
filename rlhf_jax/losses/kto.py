"""KTO: Kahneman-Tversky optimisation on unpaired binary feedback (Ethayarajh et al. 2024, "KTO: Model Alignment
as Prospect Theoretic Optimization", eqs. 7-8), as TRL 1.16's ``KTOTrainer(loss_type="kto")`` computes it.

Each example is a prompt x, a response y and a label (desirable or undesirable). With summed response log-probs
and the log-ratio ``ρ(y) = log π(y|x) − log π_ref(y|x)``, the reference point is

    z = max(0, mean_b[log π(y'_b|x_b) − log π_ref(y'_b|x_b)])     (no gradient)

where ``y'_b`` is a *mismatched* response (TRL: the batch's responses cycled by one, ``y'_b = y_{b−1}``), and

    ℓ_b = λ_D (1 − σ(β (ρ_b − z)))   desirable
    ℓ_b = λ_U (1 − σ(β (z − ρ_b)))   undesirable

The loss is the mean of ℓ over every example of the batch (TRL's ``losses.nanmean()``; the weights do not
renormalise it). z is a batch statistic: for micro-batching to stay exact it must come from the *global* batch's
mismatched rows, so :func:`kto_reference_point` is a function of its own and :func:`kto_per_example` takes z as an
input (`rlhf_jax.trainers.kto` computes z in a forward-only pass over the whole batch before the micro-batched
backward pass).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses.aggregation import Weighted, aggregate, metric_values, weighted
from rlhf_jax.losses.masked import as_bool, as_float


def _sanitised(mask, *values):
    """Broadcast ``values`` [B] and ``mask`` (default all True) and zero the masked entries, so neither the value
    nor the gradient sees what they hold."""
    values = jnp.broadcast_arrays(*(as_float(value) for value in values))
    mask = jnp.ones(values[0].shape, bool) if mask is None else jnp.broadcast_to(as_bool(mask), values[0].shape)
    return mask, tuple(jnp.where(mask, value, 0) for value in values)


def kto_reference_point(policy_kl_logps, reference_kl_logps, mask=None) -> jnp.ndarray:
    """KTO's reference point ``z = max(0, mean_b[log π(y'_b|x_b) − log π_ref(y'_b|x_b)])``, gradient stopped.

    policy_kl_logps, reference_kl_logps: [B] summed log-probs of the mismatched rows (prompt x_b with another
    example's response y'_b) under the policy and the frozen reference; mask: [B] bool/{0, 1} (default all).
    The mean is over the rows in the mask (0 when there are none). Pass the *whole* batch's rows: z is then the
    same for every micro-batch, and accumulation stays exact. Returns a float32 scalar.
    """
    mask, (policy, reference) = _sanitised(mask, policy_kl_logps, reference_kl_logps)
    return jax.lax.stop_gradient(jnp.maximum(weighted(policy - reference, mask).value(), 0.0))


def kto_per_example(policy_logps, reference_logps, labels, reference_point, *, beta: float,
                    desirable_weight: float = 1.0, undesirable_weight: float = 1.0, mask=None):
    """Per-example KTO losses and their metrics: ``(ℓ [B], {name: Weighted})``; ℓ is 0 under the mask.

    With ``ρ = policy_logps − reference_logps`` and z = ``reference_point`` (:func:`kto_reference_point`, a
    constant here): ``ℓ_b = λ_D (1 − σ(β (ρ_b − z)))`` when ``labels[b]`` (desirable), else
    ``λ_U (1 − σ(β (z − ρ_b)))`` (λ_D = ``desirable_weight``, λ_U = ``undesirable_weight``).

    policy_logps, reference_logps: [B] summed response log-probs; labels: [B] bool; reference_point: scalar;
    mask: [B] bool/{0, 1} (default all). ``aggregate(ℓ, mask)`` gives the exact ``(Σ ℓ, #examples)``, whose
    ratio is TRL's loss. Metrics, each the mean over its own side (TRL's names): ``rewards/chosen``,
    ``rewards/rejected`` (the implicit rewards ``β ρ`` of desirable and undesirable examples), ``logps/chosen``,
    ``logps/rejected`` (summed policy log-probs), and ``rewards/accuracies``, over all examples: the fraction
    whose reward is on its label's side of the reference point, ``ρ > z`` for a desirable example and ``ρ < z``
    for an undesirable one (each loss term is then below λ/2; ties count as wrong).
    """
    mask, (policy, reference) = _sanitised(mask, policy_logps, reference_logps)
    desirable = jnp.broadcast_to(as_bool(labels), policy.shape)
    logratio = policy - reference
    # 1 − σ(a) = σ(−a): the desirable argument is β (ρ − z), the undesirable one β (z − ρ)
    margin = jnp.where(desirable, logratio - reference_point, reference_point - logratio)
    per_example = jnp.where(desirable, desirable_weight, undesirable_weight) * jax.nn.sigmoid(-beta * margin)
    rewards = beta * logratio
    chosen, rejected = mask & desirable, mask & ~desirable
    metrics = {
        "rewards/chosen": weighted(rewards, chosen),
        "rewards/rejected": weighted(rewards, rejected),
        "rewards/accuracies": weighted(margin > 0, mask),
        "logps/chosen": weighted(policy, chosen),
        "logps/rejected": weighted(policy, rejected),
    }
    return jnp.where(mask, per_example, 0), metrics


def with_reward_margins(values: dict) -> dict:
    """``values`` plus TRL's ``rewards/margins``: the desirable side's mean reward minus the undesirable side's
    (after accumulation; a side with no example in the batch counts as 0, where TRL leaves the margin out)."""
    return {**values, "rewards/margins": values["rewards/chosen"] - values["rewards/rejected"]}


def kto_loss(policy_logps, reference_logps, labels, policy_kl_logps, reference_kl_logps, *, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0, mask=None):
    """The KTO loss of a whole batch, as TRL computes it: z from the batch's mismatched rows
    (:func:`kto_reference_point`), then the mean over the examples in the mask of :func:`kto_per_example`.

    Shapes as there, every array [B] (the KL rows share the mask). Returns ``(loss, metrics)`` with the metrics'
    values, ``loss``, ``kl`` (z, TRL's name) and ``rewards/margins``; 0 for an empty batch. At ``π = π_ref`` every
    reward and z are 0 and the loss is ``mean_b λ_b / 2``.
    """
    reference_point = kto_reference_point(policy_kl_logps, reference_kl_logps, mask)
    per_example, metrics = kto_per_example(policy_logps, reference_logps, labels, reference_point, beta=beta,
                                           desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                                           mask=mask)
    mask = jnp.ones(per_example.shape, bool) if mask is None else mask
    loss = Weighted(*aggregate(per_example, mask)).value()
    return loss, with_reward_margins({"loss": loss, "kl": reference_point, **metric_values(metrics)})
