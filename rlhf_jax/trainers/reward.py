"""Reward-model training: Bradley-Terry on (chosen, rejected) pairs with a scalar head.

The model is `{"backbone": LM params without lm_head, "head": D -> 1}`; the reward of a sequence is the
head's output at its last non-pad token (`llama.rewards_forward`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rlhf_jax.losses import aggregate, bradley_terry_per_pair, weighted
from rlhf_jax.models import llama
from rlhf_jax.models.config import DecoderConfig
from rlhf_jax.models.lora import LoRASettings
from rlhf_jax.trainers.lora import adapter_loss_sum
from rlhf_jax.training.accumulate import accumulate_gradients
from rlhf_jax.training.state import TrainState


def pair_rewards(config: DecoderConfig, model, batch):
    """Rewards of both sides in one forward: (chosen [B], rejected [B]). A batch of shared-prefix rows
    (`data.batching.share_prefixes`) runs each pair's common prefix once and reads both rewards from its row."""
    if "shared_tokens" in batch:
        segments = batch["shared_segment_ids"]
        values = llama.values_forward(config, model, batch["shared_tokens"], batch["shared_positions"], segments > 0,
                                      segments, shared=batch["shared_prefix"])
        return tuple(jnp.take_along_axis(values, batch[f"{side}_last"][:, None], axis=1)[:, 0]
                     for side in ("chosen", "rejected"))
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)
    mask = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]], axis=0)
    rewards = llama.rewards_forward(config, model, tokens, mask)
    half = batch["chosen_tokens"].shape[0]
    return rewards[:half], rewards[half:]


def reward_loss_sum(config: DecoderConfig, center_coef: float, model, batch, freeze_backbone: bool = False):
    """(Σ pair losses, (pair count, `Weighted` metrics)) for one micro-batch.

    freeze_backbone: no gradient reaches the backbone (only the head learns), so the backward pass skips it.
    With `center_coef` 0 the head's bias gets no gradient (the loss does not depend on it).
    """
    if freeze_backbone:
        model = {"backbone": jax.lax.stop_gradient(model["backbone"]), "head": model["head"]}
    if isinstance(center_coef, (int, float)) and center_coef == 0:
        # Bradley-Terry alone sees r_c - r_r, where the head's bias cancels: its gradient is float rounding, which
        # AdamW would scale into steps of about the learning rate. Held fixed, as in a head without a bias.
        head = {**model["head"], "bias": jax.lax.stop_gradient(model["head"]["bias"])}
        model = {**model, "head": head}
    chosen, rejected = pair_rewards(config, model, batch)
    pair_mask = batch.get("pair_mask", jnp.ones(chosen.shape, bool))
    per_pair = bradley_terry_per_pair(chosen, rejected, margin=batch.get("margin"), pair_mask=pair_mask,
                                      center_coef=center_coef)
    loss_sum, count = aggregate(per_pair, pair_mask)
    metrics = {
        "rm/accuracy": weighted(chosen > rejected, pair_mask),
        "rm/margin": weighted(chosen - rejected, pair_mask),
        "rm/chosen_reward": weighted(chosen, pair_mask),
        "rm/rejected_reward": weighted(rejected, pair_mask),
        "rm/centering": weighted(jnp.square(chosen + rejected), pair_mask),
        "rm/chosen_reward_sq": weighted(jnp.square(chosen), pair_mask),
        "rm/rejected_reward_sq": weighted(jnp.square(rejected), pair_mask),
    }
    return loss_sum, (count, metrics)


def _finish_metrics(loss, metrics):
    out = {"rm/loss": loss, **{k: v for k, v in metrics.items() if not k.endswith("_sq")}}
    for side in ("chosen", "rejected"):
        mean = metrics[f"rm/{side}_reward"]
        out[f"rm/{side}_reward_std"] = jnp.sqrt(jnp.maximum(metrics[f"rm/{side}_reward_sq"] - mean**2, 0.0))
    return out


def reward_train_step(config: DecoderConfig, center_coef: float, num_microbatches: int, state: TrainState, batch,
                      freeze_backbone: bool = False, *, base=None, lora: LoRASettings | None = None):
    """One optimizer step of Bradley-Terry training. Returns (state, metrics). With `lora` (rank > 0)
    `state.params` holds the adapters and the head, `base` the frozen scalar model (`trainers.lora`)."""
    loss_sum = adapter_loss_sum(functools.partial(reward_loss_sum, config, center_coef,
                                                  freeze_backbone=freeze_backbone), lora, base)
    loss, grads, metrics = accumulate_gradients(loss_sum, state.params, batch, num_microbatches,
                                                  per_layer=llama.layers_unrolled(config))
    state = state.apply_gradients(grads)
    return state, _finish_metrics(loss, metrics)


def reward_eval_step(config: DecoderConfig, model, batch):
    """Held-out (chosen, rejected) rewards [B] each; accuracy etc. are computed by the caller."""
    return pair_rewards(config, model, batch)
