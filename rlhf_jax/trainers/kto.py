"""KTO (Ethayarajh et al. 2024) on unpaired feedback: the policy's summed response log-probs, a frozen reference's,
and the reference point z from mismatched rows (`rlhf_jax.losses.kto`), as TRL 1.16's ``KTOTrainer``.

The batch is an unpaired one (`data.batching.collate_sft`: right-padded ``tokens``, ``attention_mask``,
``loss_mask`` on the response, ``labels`` [B] bool). On the host, :func:`with_kl_rows` adds the mismatched rows
``kl_tokens`` / ``kl_attention_mask`` / ``kl_loss_mask``: row b is prompt b followed by row b−1's response (row 0
takes the last row's: TRL's collator cycles completions by one within the batch), cut to the batch's row
length T (TRL cuts at ``max_length``; T is the batch's length bucket, at least its longest row).

The reference's log-probs of both kinds of rows do not depend on the policy: :func:`reference_logprobs` computes
them from the frozen params before the step and they travel in the batch as ``reference_logps`` and
``reference_kl_logps`` [B], as DPO's do (`trainers.dpo`).

z is a statistic of the whole batch, so the step computes it first, in a forward-only pass of the policy over
every mismatched row (in the step's micro-batches, no gradient: TRL's ``torch.no_grad()``), and then runs the
micro-batched backward pass over the matched rows with z as a constant: the update is the same for any
``num_microbatches``. The loss is the mean over the global batch's examples, every metric its own mean.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.losses import aggregate, kto_per_example, kto_reference_point, with_reward_margins
from rlhf_jax.models import llama
from rlhf_jax.models.config import DecoderConfig
from rlhf_jax.models.lora import LoRASettings, full_params
from rlhf_jax.trainers.common import with_loss_index
from rlhf_jax.trainers.dpo import sequence_logprobs
from rlhf_jax.trainers.lora import adapter_loss_sum
from rlhf_jax.training.accumulate import accumulate_gradients, map_microbatches
from rlhf_jax.training.state import TrainState

UNPAIRED_KEYS = ("tokens", "attention_mask", "loss_mask", "labels")
KL_KEYS = ("kl_tokens", "kl_attention_mask", "kl_loss_mask")
REFERENCE_KEYS = ("reference_logps", "reference_kl_logps")
MATCHED, MISMATCHED = "", "kl_"  # the key prefixes of the two kinds of rows


def kl_rows(tokens, attention_mask, loss_mask, pad_id: int) -> dict:
    """The mismatched rows of an unpaired batch (host numpy): row b is prompt b, then row b−1's response (row 0
    takes row B−1's), cut to the row length T.

    tokens, attention_mask, loss_mask: [B, T], right-padded, the loss mask on each row's response (its last
    tokens). Lengths come from the masks: sequence n_b = Σ attention, response r_b = Σ loss, prompt
    p_b = n_b − r_b. Returns ``kl_tokens`` [B, T] int32 (``pad_id`` past the end), ``kl_attention_mask`` and
    ``kl_loss_mask`` [B, T] bool: positions below ``min(p_b + r_{b−1}, T)``, and those of them from p_b on.
    """
    tokens, attention, response = np.asarray(tokens), np.asarray(attention_mask, bool), np.asarray(loss_mask, bool)
    rows, length = tokens.shape
    positions = np.arange(length)[None]
    lengths, response_lengths = attention.sum(axis=1), response.sum(axis=1)
    prompt_lengths = (lengths - response_lengths)[:, None]
    assert (attention == (positions < lengths[:, None])).all(), "an unpaired batch is right-padded"
    assert (response == (attention & (positions >= prompt_lengths))).all(), "the loss mask is each row's response"
    donor = np.roll(np.arange(rows), 1)  # row b takes row b − 1's response
    in_prompt = positions < prompt_lengths
    # past its prompt, position t of row b holds the donor's response token t − p_b: the donor's p_{b−1} + t − p_b
    source_rows = np.where(in_prompt, np.arange(rows)[:, None], donor[:, None])
    source_positions = np.where(in_prompt, positions, positions - prompt_lengths + prompt_lengths[donor])
    kl_attention = positions < np.minimum(prompt_lengths + response_lengths[donor][:, None], length)
    kl_tokens = tokens[source_rows, np.clip(source_positions, 0, length - 1)]
    return {"kl_tokens": np.where(kl_attention, kl_tokens, pad_id).astype(np.int32),
            "kl_attention_mask": kl_attention, "kl_loss_mask": kl_attention & ~in_prompt}


def with_kl_rows(batch: dict, pad_id: int, num_microbatches: int = 1) -> dict:
    """``batch`` plus its mismatched rows (:func:`kl_rows`); when the batch carries the positions of its loss
    (``loss_index``, `trainers.common.with_loss_index`), the mismatched rows get theirs too (``kl_loss_index``)."""
    rows = kl_rows(batch["tokens"], batch["attention_mask"], batch["loss_mask"], pad_id)
    if "loss_index" in batch:
        rows["kl_loss_index"] = with_loss_index({"tokens": rows["kl_tokens"], "loss_mask": rows["kl_loss_mask"]},
                                                num_microbatches)["loss_index"]
    return {**batch, **rows}


def row_logprobs(config: DecoderConfig, params, batch, prefix: str = MATCHED):
    """Summed response log-probs of the matched (``prefix=""``) or mismatched (``"kl_"``) rows of ``batch``: a
    `losses.SequenceLogps` of [B] (`trainers.dpo.sequence_logprobs`, the LM head at the loss index if any)."""
    return sequence_logprobs(config, params, batch[f"{prefix}tokens"], batch[f"{prefix}attention_mask"],
                             batch[f"{prefix}loss_mask"], batch.get(f"{prefix}loss_index"))


def _forward_totals(config: DecoderConfig, params, batch, prefixes: tuple[str, ...], num_microbatches: int):
    """Summed log-probs [B] of each kind of rows in ``prefixes``, forward only, micro-batch by micro-batch."""
    return map_microbatches(lambda params, rows: tuple(row_logprobs(config, params, rows, prefix).total
                                                       for prefix in prefixes),
                            params, batch, num_microbatches, per_layer=llama.layers_unrolled(config))


def reference_logprobs(config: DecoderConfig, reference_params, batch, num_microbatches: int = 1) -> dict:
    """The frozen reference's summed log-probs of the matched and mismatched rows: ``{REFERENCE_KEYS: [B]}``.

    Jit it on its own (the stage's `StagePrograms.reference_pass`) and merge the result into the batch; it goes through the batch
    in the train step's ``num_microbatches`` (the same activation memory, and loss indices laid out for them).
    """
    keys = UNPAIRED_KEYS + KL_KEYS + ("loss_index", "kl_loss_index")
    matched, mismatched = _forward_totals(config, reference_params, {k: v for k, v in batch.items() if k in keys},
                                          (MATCHED, MISMATCHED), num_microbatches)
    return {"reference_logps": matched, "reference_kl_logps": mismatched}


def loss_keywords(loss) -> dict:
    """The loss config's fields (`config.KTOLoss`), by name: the keywords of `losses.kto_per_example`."""
    return {field.name: getattr(loss, field.name) for field in dataclasses.fields(loss)}


def kto_loss_sum(config: DecoderConfig, loss, params, batch, reference_point):
    """(Σ per-example losses, (example count, `Weighted` metrics)) of one micro-batch, with the global batch's
    reference point z. batch: ``UNPAIRED_KEYS`` and ``reference_logps``; loss: `config.KTOLoss`."""
    policy = row_logprobs(config, params, batch)
    per_example, metrics = kto_per_example(policy.total, batch["reference_logps"], batch["labels"], reference_point,
                                           **loss_keywords(loss))
    loss_sum, count = aggregate(per_example, jnp.ones(per_example.shape, bool))
    return loss_sum, (count, metrics)


def kto_train_step(config: DecoderConfig, loss, num_microbatches: int, state: TrainState, batch, *, base=None,
                   lora: LoRASettings | None = None):
    """One optimizer step over ``batch`` split into ``num_microbatches``. Returns (state, metrics).
    With ``lora`` (rank > 0) ``state.params`` is the adapters and ``base`` the frozen weights (`trainers.lora`).

    batch: ``UNPAIRED_KEYS``, ``KL_KEYS`` (:func:`with_kl_rows`) and ``REFERENCE_KEYS`` (:func:`reference_logprobs`).
    First the policy's log-probs of every mismatched row, forward only,
    give z over the whole batch (`losses.kto_reference_point`); then the gradient of the mean loss over the
    matched rows, accumulated over the micro-batches with z fixed, exactly the single-batch gradient.
    Metrics: ``kto/loss``, ``kl`` (z), TRL's ``rewards/*`` and ``logps/*``, ``rewards/accuracies`` and
    ``optim/grad_norm``.
    """
    policy = state.params if lora is None else full_params(base, state.params, lora)
    (policy_kl,) = _forward_totals(config, policy, {k: v for k, v in batch.items() if k.startswith(MISMATCHED)},
                                   (MISMATCHED,), num_microbatches)
    reference_point = kto_reference_point(policy_kl, batch["reference_kl_logps"])

    def loss_sum(params, microbatch):
        return kto_loss_sum(config, loss, params, microbatch, reference_point)

    matched = {k: v for k, v in batch.items() if not k.startswith(MISMATCHED) and k != "reference_kl_logps"}
    value, grads, metrics = accumulate_gradients(adapter_loss_sum(loss_sum, lora, base), state.params, matched,
                                                 num_microbatches, per_layer=llama.layers_unrolled(config))
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
    state = state.apply_gradients(grads)
    return state, {"kto/loss": value, "kl": reference_point, **with_reward_margins(metrics),
                   "optim/grad_norm": grad_norm}


def kto_eval_step(config: DecoderConfig, params, batch):
    """Held-out policy log-probs: (matched rows' totals [B], mismatched rows' totals [B]); the loss is the caller's
    (over a whole set, `losses.kto_loss`)."""
    return row_logprobs(config, params, batch).total, row_logprobs(config, params, batch, MISMATCHED).total
