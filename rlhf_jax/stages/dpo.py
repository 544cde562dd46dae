"""DPO stage runner: preference pairs, a trained policy and a frozen reference (the policy's starting weights
unless `reference` names another language model with the same tokenizer), resumable.

Each batch's reference log-probs come from their own jitted function before the train step (see
`rlhf_jax.trainers.dpo`). At the end the implicit-reward accuracy, margin and loss are measured on the
held-out split (or, without one, on the training pairs) and the policy is written as the stage's model.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.errors import UserError
from rlhf_jax.losses import dpo_loss
from rlhf_jax.sharding import (make_mesh, param_shardings, place_batch, place_for_training, place_state,
                               shard_train_step, state_shardings, use_mesh, validate_mesh_for_model)
from rlhf_jax.models.lora import merged_params
from rlhf_jax.stages.common import (adapted_training, bind_base, build_optimizer, compile_report, dry_run_source, fit, load_role, loss_batch,
                                    load_stage_dataset, require_language_model, require_tokenizer,
                                    training_iterator, pair_outputs_over, write_summary)
from rlhf_jax.trainers.dpo import PAIR_KEYS, dpo_eval_step, dpo_train_step, make_reference_fn
from rlhf_jax.training.artifacts import save_artifact
from rlhf_jax.training.state import TrainState


def _same_tokenizer(tokenizer, reference_tokenizer, vocab_size: int, reference_vocab_size: int, what: str) -> None:
    """Log-prob ratios compare the same token ids: refuse a reference with another vocabulary."""
    if reference_vocab_size != vocab_size or (
            reference_tokenizer is not None and reference_tokenizer.get_vocab() != tokenizer.get_vocab()):
        raise UserError(f"{what}: its tokenizer differs from the model's; DPO needs a reference that shares one")


def sequence_logprobs_over(config, params, dataset, batch_size: int, mesh=None):
    """Policy (or reference) sequence log-probs (chosen [N], rejected [N]) of every pair of `dataset`, in order.

    mesh: where `params` live; every process then goes through the whole set (see `whole_set_evaluator`).
    """
    return pair_outputs_over(functools.partial(dpo_eval_step, config), params, dataset, batch_size, PAIR_KEYS, mesh)


def evaluation_metrics(policy: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray],
                       beta: float, loss_type: str, label_smoothing: float, prefix: str = "eval") -> dict:
    """DPO loss and implicit-reward statistics over whole sets of pairs (TRL's names under `prefix/`)."""
    _, metrics = dpo_loss(*policy, *reference, beta, loss_type, label_smoothing)
    out = {f"{prefix}/{name}": float(value) for name, value in jax.device_get(metrics).items()}
    out[f"{prefix}/pairs"] = float(len(policy[0]))
    return out


def _setup(experiment, stage, resolve, source, reference_source):
    """Everything a run (or a dry run) needs before the first step."""
    role = load_role(experiment, source, resolve)
    require_language_model(role, f"stages.{stage.name}.model")
    tokenizer = require_tokenizer(role, f"stages.{stage.name}.model")
    key = jax.random.key(experiment.seed)
    trainable, frozen = adapted_training(stage, role.params, role.config.dtype, jax.random.fold_in(key, 1))
    if reference_source is None and frozen:  # LoRA: the reference is the base itself, adapters off
        reference_config, reference = role.config, frozen[0]
    elif reference_source is None:
        # a copy: the policy's buffers are donated to the train step
        reference_config, reference = role.config, jax.tree.map(jnp.copy, role.params)
    else:
        reference_role = load_role(experiment, reference_source, resolve)
        require_language_model(reference_role, f"stages.{stage.name}.reference")
        _same_tokenizer(tokenizer, reference_role.tokenizer, role.config.vocab_size,
                        reference_role.config.vocab_size, f"stages.{stage.name}.reference")
        reference_config, reference = reference_role.config, reference_role.params
    dataset, eval_dataset, data = load_stage_dataset(experiment, stage, "preference", tokenizer)
    iterator = training_iterator(dataset, batch_size=data.batch_size, seed=data.shuffle_seed or experiment.seed,
                                 num_epochs=stage.epochs)
    per_epoch = iterator.steps_per_epoch
    total_steps = per_epoch * stage.epochs if stage.max_steps is None else min(stage.max_steps,
                                                                               per_epoch * stage.epochs)
    state = TrainState.create(trainable, build_optimizer(experiment, stage, total_steps), key)
    step = bind_base(functools.partial(dpo_train_step, role.config, stage.beta, str(stage.loss),
                                       stage.label_smoothing, experiment.optimizer.micro_batches), stage.lora)
    return role, tokenizer, dataset, eval_dataset, data, iterator, total_steps, state, step, (
        reference_config, reference), frozen


def _reference_preparer(reference_config, reference, mesh, num_microbatches: int, precompute=None):
    """Host batch -> the step's batch on the mesh, with the frozen reference's log-probs of its pairs.

    precompute: None (the reference runs on each batch), or `(dataset, batch_size)`: the reference's
    log-probs of every pair of the training set are computed once, here, and each batch looks its rows up
    by their example `index`.
    """
    validate_mesh_for_model(reference_config, mesh)
    reference = place_state(reference, param_shardings(reference, mesh))
    if precompute is not None:
        dataset, batch_size = precompute
        table = sequence_logprobs_over(reference_config, reference, dataset, batch_size, mesh)

        def prepare(batch):
            rows = np.asarray(batch["index"])
            logps = {"reference_chosen_logps": table[0][rows], "reference_rejected_logps": table[1][rows]}
            return place_batch({**loss_batch(batch, PAIR_KEYS, num_microbatches), **logps}, mesh)

        return reference, prepare
    reference_fn = make_reference_fn(reference_config, num_microbatches)

    def prepare(batch):
        batch = place_batch(loss_batch(batch, PAIR_KEYS, num_microbatches), mesh)
        with use_mesh(mesh):
            logps = reference_fn(reference, batch)
        return place_batch({**batch, **logps}, mesh)

    return reference, prepare


def dry_run(experiment, stage, stage_dir: Path, resolve) -> None:
    """Load the models and pairs, build the first batch and compile the train step; nothing is trained."""
    source = dry_run_source(experiment, stage.model, resolve)
    reference_source = dry_run_source(experiment, stage.reference, resolve)
    mesh = make_mesh(experiment.mesh)
    role, _, dataset, _, _, iterator, total_steps, state, step, (reference_config, reference), frozen = _setup(
        experiment, stage, resolve, source, reference_source)
    validate_mesh_for_model(role.config, mesh)
    _, prepare = _reference_preparer(reference_config, reference, mesh, experiment.optimizer.micro_batches)
    batch = prepare(next(iterator))
    print(f"  model {source or experiment.model.source}: {role.config.num_params():,} params; {len(dataset)} pairs, "
          f"up to {total_steps} steps, first batch {tuple(batch['chosen_tokens'].shape)} per side")
    frozen_shardings = tuple(param_shardings(params, mesh) for params in frozen)
    compile_report("dpo train step", shard_train_step(step, state_shardings(state, mesh), mesh,
                                                      frozen_shardings=frozen_shardings), *frozen, state, batch)


def run(experiment, stage, stage_dir: Path, resolve) -> None:
    mesh = make_mesh(experiment.mesh)  # a bad mesh fails before the models load
    role, tokenizer, dataset, eval_dataset, data, iterator, total_steps, state, step, (
        reference_config, reference), frozen = _setup(experiment, stage, resolve, stage.model, stage.reference)
    validate_mesh_for_model(role.config, mesh)
    reference_is_base = bool(frozen) and stage.reference is None
    reference, prepare = _reference_preparer(
        reference_config, reference, mesh, experiment.optimizer.micro_batches,
        (dataset, data.batch_size) if stage.precompute_reference else None)
    frozen = (reference,) if reference_is_base else place_state(
        frozen, tuple(param_shardings(params, mesh) for params in frozen))  # one copy of the base on the mesh
    base = frozen[0] if frozen else {}
    (state,), step_fn = place_for_training(step, (state,), mesh, frozen)
    state, records = fit(
        experiment=experiment, stage=stage, stage_dir=stage_dir, state=state, step_fn=step_fn, batches=iterator,
        total_steps=total_steps, host_state=lambda: {"data": iterator.get_state()},
        restore_host_state=lambda saved: iterator.set_state(saved["data"]), prepare=prepare,
    )
    summary = {"steps": int(state.step)}
    if records:
        summary.update({f"train/{k}": v for k, v in records[-1].items()
                        if k.split("/")[0] in ("dpo", "rewards", "logps")})
    pairs = eval_dataset if eval_dataset is not None else dataset
    prefix = "eval" if eval_dataset is not None else "train_set"
    policy = merged_params(base, state.params, stage.lora)
    policy_logps = sequence_logprobs_over(role.config, policy, pairs, data.batch_size, mesh)
    reference_logps = sequence_logprobs_over(reference_config, reference, pairs, data.batch_size, mesh)
    summary.update(evaluation_metrics(policy_logps, reference_logps, stage.beta, str(stage.loss),
                                      stage.label_smoothing, prefix))
    save_artifact(stage_dir / "model", role.config, policy, tokenizer, "lm", {"stage": stage.name, **summary})
    write_summary(stage_dir, f"DPO stage '{stage.name}'", summary)
