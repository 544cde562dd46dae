"""Supervised fine-tuning: next-token NLL on response tokens.

loss = Σ_{t ∈ loss_mask} −log p(x_t | x_<t) / |loss_mask| over the global batch (exact under
micro-batching: the step sums over micro-batches and divides once).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rlhf_jax.models import llama
from rlhf_jax.models.config import DecoderConfig
from rlhf_jax.models.lora import LoRASettings
from rlhf_jax.trainers.common import predicted_mask, teacher_forced_logprobs
from rlhf_jax.trainers.lora import adapter_loss_sum
from rlhf_jax.training.accumulate import accumulate_gradients
from rlhf_jax.training.state import TrainState


def sft_loss_sum(config: DecoderConfig, params, batch):
    """(Σ NLL over predicted response tokens, (count, {})) for one micro-batch."""
    logprobs = teacher_forced_logprobs(config, params, batch, index=batch.get("loss_index"))
    mask = predicted_mask(batch)
    loss_sum = jnp.sum(jnp.where(mask, -logprobs, 0.0))
    return loss_sum, (jnp.sum(mask).astype(jnp.float32), {})


def sft_train_step(config: DecoderConfig, num_microbatches: int, state: TrainState, batch, *, base=None,
                   lora: LoRASettings | None = None):
    """One optimizer step over `batch` split into `num_microbatches`. Returns (state, metrics).

    With `lora` (rank > 0) `state.params` is the trainable tree and `base` the frozen weights (`trainers.lora`).
    """
    loss_fn = adapter_loss_sum(functools.partial(sft_loss_sum, config), lora, base)
    loss, grads, _ = accumulate_gradients(loss_fn, state.params, batch, num_microbatches,
                                        per_layer=llama.layers_unrolled(config))
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
    state = state.apply_gradients(grads)
    return state, {"sft/loss": loss, "sft/perplexity": jnp.exp(loss), "optim/grad_norm": grad_norm}


def sft_eval_step(config: DecoderConfig, params, batch):
    """(NLL sum, token count) on a held-out batch; the state is untouched."""
    loss_sum, (count, _) = sft_loss_sum(config, params, batch)
    return loss_sum, count
