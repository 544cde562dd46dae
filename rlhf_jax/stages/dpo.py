"""Preference-optimisation stage runner (DPO and its family: `stages.<name>.loss.type`): preference pairs, a
trained policy and, for the losses that need one, a frozen reference (the policy's starting weights unless
`reference` names another language model with the same tokenizer), resumable. SimPO, CPO and ORPO load no
reference.

Each batch's reference log-probs come from their own jitted function before the train step (see
`rlhf_jax.trainers.dpo`). At the end the implicit-reward accuracy (for reference-free losses, the accuracy of
their log-prob rewards), margin and loss are measured on the held-out split (or, without one, on the training
pairs) and the policy is written as the stage's model.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np

from rlhf_jax.errors import UserError
from rlhf_jax.losses import PairLogps, SequenceLogps, preference_loss
from rlhf_jax.sharding import (make_mesh, param_shardings, place_batch, place_for_training, place_state,
                               validate_mesh_for_model)
from rlhf_jax.models.lora import merged_params
from rlhf_jax.stages.common import (StagePrograms, bind_base, call_options, compile_train_step, dry_run_source, fit,
                                    frozen_reference, length_order, loss_batch, pair_outputs_over, policy_training,
                                    shared_pair_shapes, shared_pairs, token_batch, with_length_bucket,
                                    with_reference_logps, write_summary)
from rlhf_jax.trainers.dpo import (PAIR_KEYS, reference_logprobs, loss_keywords, needs_reference, preference_eval_step,
                                   preference_train_step)
from rlhf_jax.training.artifacts import save_artifact
from rlhf_jax.training.logs import read_metrics


def sequence_logprobs_over(config, params, dataset, batch_size: int, mesh=None,
                           shared_prefix: bool = False) -> PairLogps:
    """Policy (or reference) sequence log-prob records (`PairLogps` of [N]) of every pair of `dataset` (or of a
    list of its loader batches), in order; with ``shared_prefix`` from rows that hold each pair's common prefix
    once (the same records from fewer tokens).

    mesh: where `params` live; every process then goes through the whole set (see `whole_set_evaluator`).
    """
    return pair_outputs_over(functools.partial(preference_eval_step, config), params, dataset, batch_size, PAIR_KEYS,
                             mesh, shared_prefix)


def evaluation_metrics(policy: PairLogps, reference: PairLogps | None, loss, prefix: str = "eval") -> dict:
    """The stage's loss (`config.PreferenceLoss`) and its reward statistics over whole sets of pairs (TRL's
    names under `prefix/`); `reference`: None for reference-free losses."""
    if reference is not None:  # the reference scored the same tokens
        reference = PairLogps(*(SequenceLogps(ref.total, own.count) for ref, own in zip(reference, policy)))
    _, metrics = preference_loss(str(loss.type), policy, reference, nll_coef=loss.nll_coef, **loss_keywords(loss))
    out = {f"{prefix}/{'dpo/loss' if name == 'loss' else name}": float(value)
           for name, value in jax.device_get(metrics).items()}
    # the policy's own preference, whatever the loss: mean log-prob per token of chosen over rejected
    out[f"{prefix}/logps/accuracies"] = float(np.mean(np.asarray(policy.chosen.mean())
                                                      > np.asarray(policy.rejected.mean())))
    out[f"{prefix}/pairs"] = float(len(policy.chosen.total))
    return out


def programs(experiment, stage, config) -> StagePrograms:
    """The preference stage's train step, pair batch and, for the losses that need one, the frozen reference's
    log-prob pass, in the step's micro-batches (`stages.common.StagePrograms`)."""
    micro = experiment.optimizer.micro_batches
    step = bind_base(functools.partial(preference_train_step, config, stage.loss, micro), stage.lora)
    reference_pass = (functools.partial(reference_logprobs, num_microbatches=micro) if needs_reference(stage.loss)
                      else None)
    shapes = (functools.partial(shared_pair_shapes, loss_entries=True) if stage.shared_prefix
              else lambda rows, length: token_batch(rows, length, ("chosen_", "rejected_")))
    return StagePrograms("dpo", step, with_length_bucket(experiment, stage, shapes), reference_pass)


def pair_batch(stage, num_microbatches: int):
    """`host batch -> the arrays the train step reads`: the padded pairs with their loss index, laid out for
    `num_microbatches`, or with ``shared_prefix`` each pair in one row with its common prefix once and its
    loss entries (`stages.common.shared_pairs`)."""
    if stage.shared_prefix:
        return functools.partial(shared_pairs, loss_entries=True)
    return lambda batch: loss_batch(batch, PAIR_KEYS, num_microbatches)


def _setup(experiment, stage, resolve, source, reference_source):
    """Everything a run (or a dry run) needs before the first step: (`PolicyTraining`, (the frozen reference's
    config, its params), both None for a reference-free loss)."""
    try:
        loss_keywords(stage.loss)
    except ValueError as error:
        raise UserError(f"stages.{stage.name}.{error}") from None
    training = policy_training(experiment, stage, resolve, source, "preference", programs)
    if not needs_reference(stage.loss):
        return training, (None, None)
    return training, frozen_reference(experiment, stage, resolve, training.role, training.tokenizer, training.frozen,
                                      reference_source)


def reference_preparer(built: StagePrograms, reference_config, reference, mesh, host_batch, precompute=None,
                       shared_prefix: bool = False):
    """Host batch -> the step's batch on the mesh (`host_batch`: the stage's :func:`pair_batch`), with the frozen
    reference's log-probs of its pairs (`built.reference_pass`, jitted; none when `reference` is None: a
    reference-free loss).

    precompute: None (the reference runs on each batch), or `(dataset, batch_size)`: the reference's
    log-probs of every pair of the training set are computed once, here (each pair's common prefix once with
    ``shared_prefix``), and each batch looks its rows up by their example `index` (`dataset` may also be a list
    of loader batches whose `index` counts their rows in order, see :func:`sequence_logprobs_over`).
    """
    if reference is None:
        return None, lambda batch: place_batch(host_batch(batch), mesh)
    validate_mesh_for_model(reference_config, mesh)
    reference = place_state(reference, param_shardings(reference, mesh))
    if precompute is not None:
        dataset, batch_size = precompute
        table = sequence_logprobs_over(reference_config, reference, dataset, batch_size, mesh, shared_prefix)

        def prepare(batch):
            rows = np.asarray(batch["index"])
            logps = {"reference_chosen_logps": table.chosen.total[rows],
                     "reference_rejected_logps": table.rejected.total[rows]}
            return place_batch({**host_batch(batch), **logps}, mesh)

        return reference, prepare
    reference_fn = jax.jit(functools.partial(built.reference_pass, reference_config))
    return reference, with_reference_logps(reference_fn, reference, mesh, host_batch)


def dry_run(experiment, stage, stage_dir: Path, resolve) -> None:
    """Load the models and pairs, build the first batch and compile the train step; nothing is trained."""
    source = dry_run_source(experiment, stage.model, resolve)
    reference_source = dry_run_source(experiment, stage.reference, resolve)
    mesh = make_mesh(experiment.mesh)
    (role, _, dataset, _, _, iterator, total_steps, state, built, frozen), (reference_config, reference) = _setup(
        experiment, stage, resolve, source, reference_source)
    validate_mesh_for_model(role.config, mesh)
    _, prepare = reference_preparer(built, reference_config, reference, mesh,
                                    pair_batch(stage, experiment.optimizer.micro_batches))
    batch = prepare(length_order(experiment, stage)(next(iterator)))
    shape = (f"{tuple(batch['shared_tokens'].shape)}, a pair per row" if stage.shared_prefix
             else f"{tuple(batch['chosen_tokens'].shape)} per side")
    print(f"  model {source or experiment.model.source}: {role.config.num_params():,} params; {len(dataset)} pairs, "
          f"up to {total_steps} steps, first batch {shape}")
    compile_train_step(experiment, "dpo train step", built.step, state, batch, mesh, frozen)


def run(experiment, stage, stage_dir: Path, resolve) -> None:
    mesh = make_mesh(experiment.mesh)  # a bad mesh fails before the models load
    (role, tokenizer, dataset, eval_dataset, data, iterator, total_steps, state, built, frozen), (
        reference_config, reference) = _setup(experiment, stage, resolve, stage.model, stage.reference)
    validate_mesh_for_model(role.config, mesh)
    reference_is_base = bool(frozen) and stage.reference is None and reference is not None
    reference, prepare = reference_preparer(
        built, reference_config, reference, mesh, pair_batch(stage, experiment.optimizer.micro_batches),
        (dataset, data.batch_size) if stage.precompute_reference else None, stage.shared_prefix)
    frozen = (reference,) if reference_is_base else place_state(
        frozen, tuple(param_shardings(params, mesh) for params in frozen))  # one copy of the base on the mesh
    base = frozen[0] if frozen else {}
    (state,), step_fn = place_for_training(built.step, (state,), mesh, frozen,
                                           **call_options(experiment))
    pairs = eval_dataset if eval_dataset is not None else dataset
    prefix = "eval" if eval_dataset is not None else "train_set"
    # the reference is frozen: its log-probs of the evaluation pairs are computed once
    reference_logps = None if reference is None else sequence_logprobs_over(reference_config, reference, pairs,
                                                                            data.batch_size, mesh, stage.shared_prefix)

    def evaluate(state):
        policy_logps = sequence_logprobs_over(role.config, merged_params(base, state.params, stage.lora), pairs,
                                              data.batch_size, mesh, stage.shared_prefix)
        return evaluation_metrics(policy_logps, reference_logps, stage.loss, prefix)

    state, records = fit(
        experiment=experiment, stage=stage, stage_dir=stage_dir, state=state, step_fn=step_fn, batches=iterator,
        total_steps=total_steps, host_state=lambda: {"data": iterator.get_state()},
        restore_host_state=lambda saved: iterator.set_state(saved["data"]),
        prepare=lambda batch, order=length_order(experiment, stage): prepare(order(batch)), evaluate=evaluate,
    )
    summary = {"steps": int(state.step)}
    trained = [record for record in records if record["step"] > 0]
    if trained:
        summary.update({f"train/{k}": v for k, v in trained[-1].items()
                        if k.split("/")[0] in ("dpo", "rewards", "logps", "nll_loss", "log_odds_chosen",
                                               "log_odds_ratio")})
    logged = read_metrics(stage_dir)  # the whole run's records, a resumed one's too
    evaluations = [record for record in logged if f"{prefix}/pairs" in record]
    if evaluations and evaluations[0]["step"] == 0:  # the starting policy, before any update
        summary.update({f"{prefix}_start/{name[len(prefix) + 1:]}": value
                        for name, value in evaluations[0].items() if name.startswith(prefix + "/")})
    if evaluations and evaluations[-1]["step"] == int(state.step):
        final = {name: value for name, value in evaluations[-1].items() if name.startswith(prefix + "/")}
    else:  # e.g. a stage resumed after its last step but before its model was written
        final = evaluate(state)
    summary.update(final)
    policy = merged_params(base, state.params, stage.lora)
    save_artifact(stage_dir / "model", role.config, policy, tokenizer, "lm", {"stage": stage.name, **summary})
    write_summary(stage_dir, f"Preference stage '{stage.name}' (loss {stage.loss.type})", summary)
