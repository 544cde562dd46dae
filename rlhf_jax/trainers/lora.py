"""Adapter training for every stage: the train state holds what `lora.trainable_params` gives (the adapters,
plus a scalar model's head); the base params are a frozen input of the step.

    loss(trainable) = loss_sum(full_params(base, trainable)),  grads w.r.t. the trainable tree only.

Any `(params, batch) -> (loss_sum, (count, metrics))` loss becomes one of the trainable tree with
`adapter_loss_sum`; exact micro-batch accumulation is unchanged. Without LoRA (`lora is None` or rank 0) it is
the loss itself. The frozen reference policy of PPO/DPO under LoRA is `base` itself (`policy_and_reference`):
one backbone in memory, not two.
"""

from __future__ import annotations

from typing import Any, Callable

from rlhf_jax.models.lora import LoRASettings, full_params


def adapter_loss_sum(loss_sum_fn: Callable, lora_config: LoRASettings | None, base_params) -> Callable:
    """`loss_sum_fn(params, batch)` as a function of the trainable tree: `(trainable, batch) ->
    loss_sum_fn(full_params(base, trainable), batch)`; `loss_sum_fn` itself without LoRA."""
    if lora_config is None or lora_config.rank == 0:
        return loss_sum_fn

    def loss(trainable, batch):
        return loss_sum_fn(full_params(base_params, trainable, lora_config), batch)

    return loss


def policy_and_reference(base_params, trainable, lora_config: LoRASettings) -> tuple[Any, Any]:
    """(policy params, reference params) of a LoRA run: base + adapters, and the base itself.

    Both trees hold the very same backbone arrays (the policy only adds the small `lora_a`/`lora_b`
    leaves), so a LoRA PPO/DPO run keeps one backbone in memory instead of a trainable copy plus a
    frozen reference copy.
    """
    return full_params(base_params, trainable, lora_config), base_params
