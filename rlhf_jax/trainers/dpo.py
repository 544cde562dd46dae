"""Preference optimisation: the policy's sequence log-probs on (chosen, rejected) pairs, and, for the losses that
need one (DPO, IPO, hinge), a frozen reference's (Rafailov et al. 2023; the loss table is
`rlhf_jax.losses.preference.PREFERENCE_LOSSES`).

The step receives the stage's own loss config (`config.PreferenceLoss`: `type`, `beta`, ...): its fields reach
the per-pair function by name (:func:`loss_keywords`), never by position.

The reference's log-probs do not depend on the policy, so they are computed by their own jitted function,
:func:`reference_logprobs`, from the frozen reference params (no optimizer state, no gradient), once per
batch before the train step, and travel in the batch as ``reference_chosen_logps`` / ``reference_rejected_logps``
[B]. The train step then never holds the reference's weights or activations beside the policy's backward
pass, it splits the reference log-probs into micro-batches with the rest of the batch, and the same step
accepts log-probs precomputed once for a whole dataset (TRL's ``precompute_ref_log_probs``). Reference-free
losses (SimPO, CPO, ORPO) need neither.

Sequence log-probs are records of the sum over the response tokens (`chosen_loss_mask` /
`rejected_loss_mask`) and their count (`losses.SequenceLogps`), so length-normalised losses read the mean.
A batch may instead hold each pair in one row with its common prefix once (the stage's ``shared_prefix``,
`data.batching.share_prefixes`): the same records from fewer tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rlhf_jax.losses import (PairLogps, SequenceLogps, aggregate, preference_hyperparameters, preference_loss_kind,
                             preference_per_pair)
from rlhf_jax.models import llama
from rlhf_jax.models.config import DecoderConfig
from rlhf_jax.models.lora import LoRASettings
from rlhf_jax.trainers.lora import adapter_loss_sum
from rlhf_jax.trainers.common import logprobs_from_slots, predicted_mask, teacher_forced_logprobs
from rlhf_jax.training.accumulate import accumulate_gradients, map_microbatches
from rlhf_jax.training.state import TrainState

PAIR_KEYS = ("chosen_tokens", "chosen_attention_mask", "chosen_loss_mask", "rejected_tokens",
             "rejected_attention_mask", "rejected_loss_mask")
REFERENCE_KEYS = ("reference_chosen_logps", "reference_rejected_logps")
_NOT_KEYWORDS = ("type", "nll_coef")


def loss_keywords(loss) -> dict:
    """The fields of a loss config (`config.PreferenceLoss`) that its type's per-pair function reads, by name.

    A field the function does not read must hold its default: ``ValueError`` names it otherwise (a SimPO
    ``gamma`` set on a DPO run would silently do nothing).
    """
    reads = preference_hyperparameters(str(loss.type))
    for field in dataclasses.fields(loss):
        if field.name in _NOT_KEYWORDS or field.name in reads:
            continue
        if getattr(loss, field.name) != field.default:
            raise ValueError(f"loss.{field.name}={getattr(loss, field.name)!r} is not read by the {loss.type!r} "
                             f"loss (it reads {', '.join(reads)}); leave it at {field.default!r}")
    return {name: getattr(loss, name) for name in reads}


def needs_reference(loss) -> bool:
    """Whether the loss config's type reads a frozen reference's log-probs."""
    return preference_loss_kind(str(loss.type)).needs_reference


def sequence_logprobs(config: DecoderConfig, params, tokens, attention_mask, loss_mask, index=None):
    """Σ_t log p(tokens[t] | tokens[<t]) over the response tokens of each row, and their number: a
    `SequenceLogps` of [B] float32.

    tokens, attention_mask, loss_mask: [B, T] (right-padded; loss_mask marks the response tokens at their own
    positions, as the preference collator writes it). index: None or the flat positions carrying a loss
    (`trainers.common.with_loss_index`), where alone the LM head then runs.
    """
    batch = {"tokens": tokens, "attention_mask": attention_mask, "loss_mask": loss_mask}
    logprobs = teacher_forced_logprobs(config, params, batch, index=index)
    mask = predicted_mask(batch)
    return SequenceLogps(jnp.sum(jnp.where(mask, logprobs, 0.0), axis=-1), jnp.sum(mask, axis=-1, dtype=jnp.float32))


def pair_logprobs(config: DecoderConfig, params, batch) -> PairLogps:
    """Sequence log-prob records of both sides in one forward over [2B, T]: `PairLogps` of [B] records. A batch
    of shared-prefix rows goes through :func:`shared_pair_logprobs`."""
    if "shared_tokens" in batch:
        return shared_pair_logprobs(config, params, batch)
    tokens, attention_mask, loss_mask = (
        jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]], axis=0)
        for key in ("tokens", "attention_mask", "loss_mask"))
    logps = sequence_logprobs(config, params, tokens, attention_mask, loss_mask, batch.get("pair_loss_index"))
    half = batch["chosen_tokens"].shape[0]
    return PairLogps(*(SequenceLogps(logps.total[rows], logps.count[rows]) for rows in (slice(None, half),
                                                                                       slice(half, None))))


def shared_pair_logprobs(config: DecoderConfig, params, batch) -> PairLogps:
    """Both sides' records from one forward over shared-prefix rows [B, L] (`data.batching.share_prefixes` with
    ``loss_entries``): each pair's common prefix computed once, the LM head run at its loss entries only. The
    same records as the padded pair's: under causal attention a prefix slot's hidden state is the same in both
    sequences, and each entry names the slot that predicts its token."""
    segments = batch["shared_segment_ids"]
    out = llama.forward(config, params, batch["shared_tokens"], batch["shared_positions"], segments > 0, segments,
                        compute_logits=False, shared=batch["shared_prefix"])
    rows, length = segments.shape
    sides = batch["shared_loss_sides"]
    slots = batch["shared_loss_slots"] + length * jnp.arange(rows, dtype=jnp.int32)[:, None]
    values = logprobs_from_slots(config, params, out.hidden.reshape(rows * length, -1), slots.reshape(-1),
                                 batch["shared_loss_tokens"].reshape(-1), sides.reshape(-1) > 0).reshape(sides.shape)

    def side(number):
        mask = sides == number
        return SequenceLogps(jnp.sum(jnp.where(mask, values, 0.0), axis=-1), jnp.sum(mask, axis=-1, dtype=jnp.float32))

    return PairLogps(side(1), side(2))


def reference_logprobs(config: DecoderConfig, reference_params, batch, num_microbatches: int = 1) -> dict:
    """The frozen reference's sequence log-probs, keyed as the train step reads them from the batch.

    Jit it on its own (the stage's `StagePrograms.reference_pass`) and merge the result into the batch:
    ``{**batch, **reference_logprobs(config, reference_params, batch, M)}``. It goes through the batch in the
    train step's `num_microbatches` (the same activation memory, a `pair_loss_index` laid out for them, and
    each at its own length when the batch carries one, `training.accumulate.by_length`).
    """
    chosen, rejected = map_microbatches(
        lambda params, rows: tuple(side.total for side in pair_logprobs(config, params, rows)), reference_params,
        batch, num_microbatches, per_layer=llama.layers_unrolled(config))
    return {"reference_chosen_logps": chosen, "reference_rejected_logps": rejected}


def chosen_tokens_per_pair(batch) -> jax.Array:
    """The mean number of predicted chosen tokens per pair in the mask, over the whole `batch` (the NLL term's
    denominator, taken before the micro-batch split so that accumulation stays exact)."""
    if "shared_loss_sides" in batch:
        counts = jnp.sum(batch["shared_loss_sides"] == 1, axis=-1, dtype=jnp.float32)
    else:
        chosen = {"tokens": batch["chosen_tokens"], "loss_mask": batch["chosen_loss_mask"]}
        counts = jnp.sum(predicted_mask(chosen), axis=-1, dtype=jnp.float32)
    pair_mask = batch.get("pair_mask", jnp.ones(counts.shape, bool)).astype(bool)
    return jnp.sum(jnp.where(pair_mask, counts, 0)) / jnp.maximum(jnp.sum(pair_mask, dtype=jnp.float32), 1.0)


def preference_loss_sum(config: DecoderConfig, loss, params, batch, tokens_per_pair=None):
    """(Σ pair losses, (pair count, `Weighted` metrics)) for one micro-batch.

    loss: the stage's loss config (`config.PreferenceLoss`); batch: `PAIR_KEYS`, and `REFERENCE_KEYS` when the
    loss needs a reference; tokens_per_pair: :func:`chosen_tokens_per_pair` of the global batch (default:
    this batch's own).
    """
    policy = pair_logprobs(config, params, batch)
    reference = None
    if needs_reference(loss):  # the reference scored the same tokens: its counts are the policy's
        reference = PairLogps(SequenceLogps(batch["reference_chosen_logps"], policy.chosen.count),
                              SequenceLogps(batch["reference_rejected_logps"], policy.rejected.count))
    pair_mask = batch.get("pair_mask", jnp.ones(policy.chosen.total.shape, bool))
    per_pair, metrics = preference_per_pair(str(loss.type), policy, reference, pair_mask=pair_mask,
                                            nll_coef=loss.nll_coef, chosen_tokens_per_pair=tokens_per_pair,
                                            **loss_keywords(loss))
    loss_sum, count = aggregate(per_pair, pair_mask)
    return loss_sum, (count, metrics)


def preference_train_step(config: DecoderConfig, loss, num_microbatches: int, state: TrainState, batch, *,
                          base=None, lora: LoRASettings | None = None):
    """One optimizer step over `batch` split into `num_microbatches`. Returns (state, metrics).
    With `lora` (rank > 0) `state.params` is the adapters and `base` the frozen weights (`trainers.lora`).

    batch: the preference arrays (`PAIR_KEYS`) and, when the loss needs them, the reference's
    `REFERENCE_KEYS` [B] (from :func:`reference_logprobs`). The loss is the mean over the global batch's
    pairs and every metric its own mean (exact under micro-batching).
    """
    tokens_per_pair = chosen_tokens_per_pair(batch)

    def loss_sum(params, microbatch):
        return preference_loss_sum(config, loss, params, microbatch, tokens_per_pair)

    value, grads, metrics = accumulate_gradients(adapter_loss_sum(loss_sum, lora, base), state.params, batch,
                                                 num_microbatches, per_layer=llama.layers_unrolled(config))
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
    state = state.apply_gradients(grads)
    return state, {"dpo/loss": value, **metrics, "optim/grad_norm": grad_norm}


def preference_eval_step(config: DecoderConfig, params, batch):
    """Held-out policy sequence log-prob records (`PairLogps`); the loss and accuracy are the caller's."""
    return pair_logprobs(config, params, batch)
