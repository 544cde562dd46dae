"""Direct preference optimisation: the policy's sequence log-probs on (chosen, rejected) pairs against a frozen
reference (Rafailov et al. 2023; loss formulas in `rlhf_jax.losses.preference.dpo_per_pair`).

The reference's log-probs do not depend on the policy, so they are computed by their own jitted function,
:func:`reference_logprobs`, from the frozen reference params (no optimizer state, no gradient), once per
batch before the train step, and travel in the batch as ``reference_chosen_logps`` / ``reference_rejected_logps``
[B]. The train step then never holds the reference's weights or activations beside the policy's backward
pass, it splits the reference log-probs into micro-batches with the rest of the batch, and the same step
accepts log-probs precomputed once for a whole dataset (TRL's ``precompute_ref_log_probs``).

Sequence log-probs are sums over the response tokens (`chosen_loss_mask` / `rejected_loss_mask`), as in the
DPO and IPO papers (TRL averages them per token for IPO; pass such averages to the loss to get that form).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rlhf_jax.losses import dpo_loss
from rlhf_jax.models.config import DecoderConfig
from rlhf_jax.models.lora import LoRAConfig
from rlhf_jax.trainers.lora import adapter_loss_sum
from rlhf_jax.trainers.common import predicted_mask, token_logprobs
from rlhf_jax.training.accumulate import accumulate_gradients, split_microbatches
from rlhf_jax.training.state import TrainState

PAIR_KEYS = ("chosen_tokens", "chosen_attention_mask", "chosen_loss_mask", "rejected_tokens",
             "rejected_attention_mask", "rejected_loss_mask")
REFERENCE_KEYS = ("reference_chosen_logps", "reference_rejected_logps")


def sequence_logprobs(config: DecoderConfig, params, tokens, attention_mask, loss_mask, index=None):
    """Σ_t log p(tokens[t] | tokens[<t]) over the response tokens of each row: [B] float32.

    tokens, attention_mask, loss_mask: [B, T] (right-padded; loss_mask marks the response tokens at their own
    positions, as the preference collator writes it). index: None or the flat positions carrying a loss
    (`trainers.common.with_loss_index`), where alone the LM head then runs.
    """
    batch = {"tokens": tokens, "attention_mask": attention_mask, "loss_mask": loss_mask}
    logprobs = token_logprobs(config, params, batch, index=index)
    return jnp.sum(jnp.where(predicted_mask(batch), logprobs, 0.0), axis=-1)


def pair_logprobs(config: DecoderConfig, params, batch):
    """Sequence log-probs of both sides in one forward over [2B, T]: (chosen [B], rejected [B])."""
    tokens, attention_mask, loss_mask = (
        jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]], axis=0)
        for key in ("tokens", "attention_mask", "loss_mask"))
    logps = sequence_logprobs(config, params, tokens, attention_mask, loss_mask, batch.get("pair_loss_index"))
    half = batch["chosen_tokens"].shape[0]
    return logps[:half], logps[half:]


def reference_logprobs(config: DecoderConfig, reference_params, batch, num_microbatches: int = 1) -> dict:
    """The frozen reference's sequence log-probs, keyed as the train step reads them from the batch.

    Jit it on its own (`make_reference_fn`) and merge the result into the batch:
    ``{**batch, **reference_logprobs(config, reference_params, batch, M)}``. It goes through the batch in the
    train step's `num_microbatches` (the same activation memory, and a `pair_loss_index` laid out for them).
    """
    reference_params = jax.lax.stop_gradient(reference_params)
    microbatches = split_microbatches(batch, num_microbatches)
    chosen, rejected = jax.lax.map(lambda microbatch: pair_logprobs(config, reference_params, microbatch),
                                   microbatches)

    def unsplit(x):  # [M, B/M] -> [B]: micro-batch m holds rows m, m + M, ...
        return jnp.swapaxes(x, 0, 1).reshape(-1)

    return {"reference_chosen_logps": unsplit(chosen), "reference_rejected_logps": unsplit(rejected)}


def dpo_loss_sum(config: DecoderConfig, beta: float, loss_type: str, label_smoothing: float, params,
                 reference_logprobs, batch):
    """(Σ pair losses, (pair count, summed metrics)) for one micro-batch.

    reference_logprobs: (chosen [B], rejected [B]) sequence log-probs of the frozen reference.
    """
    policy_chosen, policy_rejected = pair_logprobs(config, params, batch)
    reference_chosen, reference_rejected = reference_logprobs
    pair_mask = batch.get("pair_mask", jnp.ones(policy_chosen.shape, bool))
    loss, metrics = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta,
                             loss_type, label_smoothing, pair_mask)
    count = jnp.sum(pair_mask).astype(jnp.float32)
    return loss * count, (count, {name: value * count for name, value in metrics.items() if name != "dpo/loss"})


def dpo_train_step(config: DecoderConfig, beta: float, loss_type: str, label_smoothing: float,
                   num_microbatches: int, state: TrainState, batch, *, base=None, lora: LoRAConfig | None = None):
    """One optimizer step over `batch` split into `num_microbatches`. Returns (state, metrics).
    With `lora` (rank > 0) `state.params` is the adapters and `base` the frozen weights (`trainers.lora`).

    batch: the preference arrays (`PAIR_KEYS`) and the reference's `REFERENCE_KEYS` [B] (from
    :func:`reference_logprobs`). The loss is the mean over the global batch's pairs (exact under
    micro-batching).
    """

    def loss_sum(params, microbatch):
        reference = (microbatch["reference_chosen_logps"], microbatch["reference_rejected_logps"])
        return dpo_loss_sum(config, beta, loss_type, label_smoothing, params, reference, microbatch)

    loss, grads, metrics = accumulate_gradients(adapter_loss_sum(loss_sum, lora, base), state.params, batch,
                                                num_microbatches)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
    state = state.apply_gradients(grads)
    return state, {"dpo/loss": loss, **metrics, "optim/grad_norm": grad_norm}


def dpo_eval_step(config: DecoderConfig, params, batch):
    """Held-out policy sequence log-probs (chosen [B], rejected [B]); the loss and accuracy are the caller's."""
    return pair_logprobs(config, params, batch)


def make_reference_fn(config: DecoderConfig, num_microbatches: int = 1):
    """`reference_logprobs` jitted for `config`: (reference_params, batch) -> {REFERENCE_KEYS: [B]}."""
    return jax.jit(functools.partial(reference_logprobs, config, num_microbatches=num_microbatches))
