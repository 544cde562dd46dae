"""Adapter-only training: the train state holds the LoRA adapters; the base params are a frozen input.

    state.params = adapters,  state.opt_state = optimizer state of the adapters only,
    loss(adapters) = loss_sum(apply_lora(base_params, adapters)),  grads w.r.t. adapters only.

Any `(params, batch) -> (loss_sum, (count, metrics))` loss becomes an adapter loss with
`adapter_loss_sum`; exact micro-batch accumulation is unchanged. The frozen reference policy of
PPO/DPO is `base_params` itself (`policy_and_reference`): one backbone in memory, not two.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from rlhf_jax.models.config import DecoderConfig
from rlhf_jax.models.lora import LoRAConfig, apply_lora
from rlhf_jax.trainers.sft import sft_loss_sum
from rlhf_jax.training.accumulate import accumulate_gradients
from rlhf_jax.training.state import TrainState


def adapter_loss_sum(loss_sum_fn: Callable, lora_config: LoRAConfig, base_params) -> Callable:
    """`loss_sum_fn(params, batch)` as a function of the adapters: `(adapters, batch) -> loss_fn(base + adapters)`."""

    def loss(adapters, batch):
        return loss_sum_fn(apply_lora(base_params, adapters, lora_config), batch)

    return loss


def policy_and_reference(base_params, adapters, lora_config: LoRAConfig) -> tuple[Any, Any]:
    """(policy params, reference params) of a LoRA run: base + adapters, and the base itself.

    Both trees hold the very same backbone arrays (the policy only adds the small `lora_a`/`lora_b`
    leaves), so a LoRA PPO/DPO run keeps one backbone in memory instead of a trainable copy plus a
    frozen reference copy.
    """
    return apply_lora(base_params, adapters, lora_config), base_params


def lora_sft_train_step(config: DecoderConfig, lora_config: LoRAConfig, num_microbatches: int, base_params,
                        state: TrainState, batch):
    """One SFT optimizer step on the adapters `state.params`; `base_params` is never differentiated or
    updated. Returns (state, metrics) with the metrics of `sft_train_step`."""
    loss_fn = adapter_loss_sum(functools.partial(sft_loss_sum, config), lora_config, base_params)
    loss, grads, _ = accumulate_gradients(loss_fn, state.params, batch, num_microbatches)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
    state = state.apply_gradients(grads)
    return state, {"sft/loss": loss, "sft/perplexity": jnp.exp(loss), "optim/grad_norm": grad_norm}
