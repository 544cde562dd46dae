"""SFT stage runner: next-token loss on response tokens, held-out loss/perplexity, resumable."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Callable


from rlhf_jax.data import DataIterator
from rlhf_jax.models.lora import adapter_paths, merged_params, num_params
from rlhf_jax.stages.common import (PolicyTraining, StagePrograms, bind_base, call_options, compile_train_step,
                                    dry_run_source, fit, length_order, loss_batch, policy_training, token_batch,
                                    whole_set_evaluator, with_length_bucket, write_summary)
from rlhf_jax.sharding import (batch_shards, make_mesh, param_shardings, place_batch, place_for_training,
                               place_state, validate_mesh_for_model)
from rlhf_jax.trainers.sft import sft_eval_step, sft_train_step
from rlhf_jax.training.artifacts import save_artifact

SFT_KEYS = ("tokens", "attention_mask", "loss_mask", "segment_ids", "positions")


def evaluate(config, params, dataset, batch_size: int, mesh=None) -> dict[str, float]:
    """Token-mean NLL and perplexity over a whole held-out dataset (the state is untouched).

    mesh: where `params` live; every process then evaluates the whole set (see `whole_set_evaluator`).
    """
    iterator = DataIterator(dataset, batch_size=min(batch_size, len(dataset)), shuffle=False,
                            drop_remainder=False)
    eval_fn, place = whole_set_evaluator(functools.partial(sft_eval_step, config), mesh)
    total, count = 0.0, 0.0
    for batch in iterator:
        loss_sum, tokens = eval_fn(params, place(loss_batch(batch, SFT_KEYS, whole=True)))
        total, count = total + float(loss_sum), count + float(tokens)
    loss = total / max(count, 1.0)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/tokens": count}


def programs(experiment, stage, config) -> StagePrograms:
    """The SFT stage's train step and batch (`stages.common.StagePrograms`)."""
    step = bind_base(functools.partial(sft_train_step, config, experiment.optimizer.micro_batches), stage.lora)
    return StagePrograms("sft", step, with_length_bucket(experiment, stage, token_batch))


def step_input(experiment, stage, mesh) -> Callable[[dict], dict]:
    """A host SFT batch (``tokens``, ``attention_mask``, ``loss_mask``, ...) -> the SFT step's input on `mesh`: its
    rows ordered for per-micro-batch lengths (`stages.common.length_order`, with ``optimizer.length_buckets``) and
    the index of the positions that carry a loss (`stages.common.loss_batch`: the LM head runs there only). The
    SFT stage's batches and RAFT/ReST's rows of kept samples (`stages.filtered`) go through it."""
    order = length_order(experiment, stage)
    return lambda batch: place_batch(loss_batch(order(batch), SFT_KEYS, experiment.optimizer.micro_batches), mesh)


def padding_free_rows(micro_batches: int, mesh) -> int:
    """What a padding-free batch's row count is a multiple of: its rows split into the step's micro-batches,
    each over the data-parallel devices of `mesh`."""
    return micro_batches * batch_shards(mesh)


def _setup(experiment, stage, resolve, source) -> PolicyTraining:
    """Everything a run (or a dry run) needs before the first step."""
    rows = padding_free_rows(experiment.optimizer.micro_batches, make_mesh(experiment.mesh))
    lookahead = {} if stage.pack_lookahead is None else {"pack_lookahead": stage.pack_lookahead}
    return policy_training(experiment, stage, resolve, source, "sft", programs, pack=stage.packing,
                           padding_free=stage.padding_free, row_multiple=rows, **lookahead,
                           loss_on_prompt=not stage.completion_only_loss)


def _trained_params(stage, base, state):
    """The model the stage writes: its params, or with LoRA the base with the adapters merged in."""
    return merged_params(base, state.params, stage.lora)


def dry_run(experiment, stage, stage_dir: Path, resolve) -> None:
    """Load the model and data, build the first batch and compile the train step; nothing is trained."""
    source = dry_run_source(experiment, stage.model, resolve)
    role, _, _, _, _, iterator, total_steps, state, built, frozen = _setup(experiment, stage, resolve, source)
    step = built.step
    batch = loss_batch(length_order(experiment, stage)(next(iterator)), SFT_KEYS, experiment.optimizer.micro_batches)
    print(f"  model {source or experiment.model.source}: {role.config.num_params():,} params; "
          f"{len(iterator.dataset)} examples, {total_steps} steps, first batch tokens {tuple(batch['tokens'].shape)}")
    if stage.lora.rank > 0:
        print(f"  lora rank {stage.lora.rank} on {len(adapter_paths(role.params, stage.lora))} projections: "
              f"{num_params(state.params):,} trained params")
    mesh = make_mesh(experiment.mesh)
    validate_mesh_for_model(role.config, mesh)
    compile_train_step(experiment, "sft train step", step, state, batch, mesh, frozen)


def run(experiment, stage, stage_dir: Path, resolve) -> None:
    mesh = make_mesh(experiment.mesh)  # a bad mesh fails before the model loads
    role, tokenizer, _, eval_dataset, data, iterator, total_steps, state, built, frozen = _setup(
        experiment, stage, resolve, stage.model)
    step = built.step
    validate_mesh_for_model(role.config, mesh)
    if frozen:  # LoRA: the base on the mesh, for the step and for the final merge (multi-process safe)
        frozen = place_state(frozen, tuple(param_shardings(params, mesh) for params in frozen))
    base = frozen[0] if frozen else {}
    (state,), step_fn = place_for_training(step, (state,), mesh, frozen,
                                           **call_options(experiment))
    state, records = fit(
        experiment=experiment, stage=stage, stage_dir=stage_dir, state=state, step_fn=step_fn, batches=iterator,
        total_steps=total_steps, host_state=lambda: {"data": iterator.get_state()},
        restore_host_state=lambda saved: iterator.set_state(saved["data"]),
        prepare=step_input(experiment, stage, mesh),
    )
    summary = {"steps": int(state.step)}
    if records:
        summary["train/loss"] = records[-1]["sft/loss"]
    params = _trained_params(stage, base, state)
    if eval_dataset is not None:
        summary.update(evaluate(role.config, params, eval_dataset, data.batch_size, mesh))
    save_artifact(stage_dir / "model", role.config, params, tokenizer, "lm", {"stage": stage.name, **summary})
    write_summary(stage_dir, f"SFT stage '{stage.name}'", summary)
