"""Reward-model stage runner: Bradley-Terry on preference pairs from an LM checkpoint with a fresh head.

At the end it evaluates pairwise accuracy on the held-out split and records the mean/std of rewards on a
reference set (the held-out split, else the training data) in the artifact, so PPO can normalise scores.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import llama
from rlhf_jax.models.lora import merged_params
from rlhf_jax.stages.common import (StagePrograms, adapted_training, bind_base, build_optimizer, call_options,
                                    compile_train_step, device_batch, dry_run_source, fit, length_order, load_role,
                                    load_stage_dataset, pair_outputs_over, per_layer_state, require_tokenizer,
                                    shared_pair_shapes, shared_pairs, stage_iterator, token_batch,
                                    with_length_bucket, write_summary)
from rlhf_jax.sharding import (make_mesh, param_shardings, place_batch, place_for_training, place_state,
                               validate_mesh_for_model)
from rlhf_jax.trainers.reward import reward_eval_step, reward_train_step
from rlhf_jax.training.artifacts import save_artifact
from rlhf_jax.training.state import TrainState

PAIR_KEYS = ("chosen_tokens", "chosen_attention_mask", "rejected_tokens", "rejected_attention_mask")


def pair_batch(stage):
    """`host batch -> the arrays the train step reads`: the padded pairs, or with ``shared_prefix`` each pair in
    one row with its common prefix once (`stages.common.shared_pairs`)."""
    if not stage.shared_prefix:
        return lambda batch: device_batch(batch, PAIR_KEYS)
    return shared_pairs


def pair_rewards(config, model, dataset, batch_size: int, mesh=None,
                 shared_prefix: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Rewards (chosen [N], rejected [N]) of every pair of `dataset`, in order; with ``shared_prefix`` from rows
    that hold each pair's common prefix once (the same rewards from fewer tokens).

    mesh: where `model` lives; every process then scores the whole set (see `whole_set_evaluator`).
    """
    return pair_outputs_over(functools.partial(reward_eval_step, config), model, dataset, batch_size, PAIR_KEYS,
                             mesh, shared_prefix)


def evaluation_metrics(chosen: np.ndarray, rejected: np.ndarray, prefix: str = "eval") -> dict[str, float]:
    """Pairwise accuracy (ties count as wrong), margin and reward statistics."""
    both = np.concatenate([chosen, rejected])
    return {
        f"{prefix}/accuracy": float(np.mean(chosen > rejected)),
        f"{prefix}/margin": float(np.mean(chosen - rejected)),
        f"{prefix}/chosen_reward_mean": float(np.mean(chosen)),
        f"{prefix}/rejected_reward_mean": float(np.mean(rejected)),
        f"{prefix}/reward_mean": float(np.mean(both)),
        f"{prefix}/reward_std": float(np.std(both)),
        f"{prefix}/pairs": float(len(chosen)),
    }


def _head_only(params):
    """What a frozen-backbone reward model trains: the head (no optimizer state for the backbone)."""
    return {"backbone": jax.tree.map(lambda _: False, params["backbone"]),
            "head": jax.tree.map(lambda _: True, params["head"])}


def programs(experiment, stage, config) -> StagePrograms:
    """The reward stage's train step and pair batch; the head is kept whole under LoRA and, with
    ``freeze_backbone``, is all the optimizer updates (`stages.common.StagePrograms`)."""
    step = bind_base(functools.partial(reward_train_step, config, stage.center_rewards_coef,
                                       experiment.optimizer.micro_batches, freeze_backbone=stage.freeze_backbone),
                     stage.lora)
    return StagePrograms("reward", step,
                         with_length_bucket(experiment, stage, functools.partial(_batch_shapes, stage.shared_prefix)),
                         keep=("head",),
                         trainable=_head_only if stage.freeze_backbone else None)


def _batch_shapes(shared_prefix: bool, rows: int, length: int) -> dict:
    """The step's batch for ``rows`` pairs of ``length`` tokens a side."""
    if not shared_prefix:
        return token_batch(rows, length, ("chosen_", "rejected_"), ("tokens", "attention_mask"))
    return shared_pair_shapes(rows, length)


def _setup(experiment, stage, resolve, source):
    """Everything a run (or a dry run) needs before the first step: a fresh head on an LM, or a reward model."""
    role = load_role(experiment, source, resolve)
    tokenizer = require_tokenizer(role, f"stages.{stage.name}.model")
    if role.kind == "scalar":
        model = role.params  # continue from a reward model
    else:
        key = jax.random.fold_in(jax.random.key(experiment.seed), 1)
        model = llama.init_scalar_model(role.config, role.params, key)
        if stage.freeze_backbone:
            # A linear probe starts at zero: with the backbone frozen, a random head is a fixed random function
            # of the features that a few hundred pairs cannot train away (docs/training.md).
            model["head"] = jax.tree.map(jnp.zeros_like, model["head"])
    dataset, eval_dataset, data = load_stage_dataset(experiment, stage, "preference", tokenizer, resolve)
    iterator, total_steps = stage_iterator(experiment, stage, dataset, data)
    built = programs(experiment, stage, role.config)
    # LoRA: the state is the backbone's adapters and the whole head; the scalar model is the frozen base
    model, frozen = adapted_training(stage, model, role.config.dtype,
                                     jax.random.fold_in(jax.random.key(experiment.seed), 2), keep=built.keep)
    state = TrainState.create(model, build_optimizer(experiment, stage, total_steps, built.trainable),
                              jax.random.key(experiment.seed),
                              per_layer=per_layer_state(stage, role.config, built.trainable))
    return role, tokenizer, dataset, eval_dataset, data, iterator, total_steps, state, built.step, frozen


def dry_run(experiment, stage, stage_dir: Path, resolve) -> None:
    """Load the model and pairs, build the first batch and compile the train step; nothing is trained."""
    source = dry_run_source(experiment, stage.model, resolve)
    role, _, dataset, _, _, iterator, total_steps, state, step, frozen = _setup(experiment, stage, resolve, source)
    batch = pair_batch(stage)(length_order(experiment, stage)(next(iterator)))
    shape = (f"{tuple(batch['shared_tokens'].shape)}, a pair per row" if stage.shared_prefix
             else f"{tuple(batch['chosen_tokens'].shape)} per side")
    print(f"  model {source or experiment.model.source}: {len(dataset)} pairs, up to {total_steps} steps, first "
          f"batch {shape}")
    mesh = make_mesh(experiment.mesh)
    validate_mesh_for_model(role.config, mesh)
    compile_train_step(experiment, "reward train step", step, state, batch, mesh, frozen)


def run(experiment, stage, stage_dir: Path, resolve) -> None:
    mesh = make_mesh(experiment.mesh)  # a bad mesh fails before the model loads
    role, tokenizer, dataset, eval_dataset, data, iterator, total_steps, state, step, frozen = _setup(
        experiment, stage, resolve, stage.model)
    validate_mesh_for_model(role.config, mesh)
    frozen = place_state(frozen, tuple(param_shardings(params, mesh) for params in frozen))
    base = frozen[0] if frozen else {}
    (state,), step_fn = place_for_training(step, (state,), mesh, frozen,
                                           **call_options(experiment))
    state, records = fit(
        experiment=experiment, stage=stage, stage_dir=stage_dir, state=state, step_fn=step_fn, batches=iterator,
        total_steps=total_steps, host_state=lambda: {"data": iterator.get_state()},
        restore_host_state=lambda saved: iterator.set_state(saved["data"]),
        prepare=lambda batch, arrays=pair_batch(stage), order=length_order(experiment, stage): place_batch(
            arrays(order(batch)), mesh),
    )
    summary = {"steps": int(state.step)}
    if records:
        summary.update({k: v for k, v in records[-1].items() if k.startswith("rm/")})
    model = merged_params(base, state.params, stage.lora)
    reference = eval_dataset if eval_dataset is not None else dataset
    chosen, rejected = pair_rewards(role.config, model, reference, data.batch_size, mesh, stage.shared_prefix)
    prefix = "eval" if eval_dataset is not None else "train_set"
    metrics = evaluation_metrics(chosen, rejected, prefix)
    summary.update(metrics)
    normalisation = {"reward_mean": metrics[f"{prefix}/reward_mean"], "reward_std": metrics[f"{prefix}/reward_std"]}
    save_artifact(stage_dir / "model", role.config, model, tokenizer, "scalar",
                  {"stage": stage.name, **normalisation, **summary})
    write_summary(stage_dir, f"Reward-model stage '{stage.name}'", summary)
