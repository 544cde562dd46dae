"""KTO stage runner (Ethayarajh et al. 2024; `rlhf_jax.trainers.kto`): unpaired feedback, a trained policy and a
frozen reference (the policy's starting weights unless `reference` names another language model with the same
tokenizer; under LoRA the base itself), resumable.

The data are read as the `"unpaired"` kind: (prompt, response, label) rows, or preference pairs, each giving a
desirable (chosen) and an undesirable (rejected) example, so HH pair files work as they are. Each batch gets its
mismatched rows on the host and the reference's log-probs of both kinds of rows from their own jitted function
before the train step.

Before the first step and after the last, the held-out split (or, without one, the training set) is measured as
a whole (`eval/…`; `eval_start/…` in the summary): the KTO loss with z over the whole set's mismatched rows
(each built within its evaluation batch), TRL's reward and log-prob means, ``rewards/accuracies`` (the fraction
of examples whose log-ratio is on its label's side of z, `losses.kto_per_example`) and, when the examples come
from preference pairs, ``rewards/paired_accuracies``: the fraction of those pairs whose chosen response has the
higher implicit reward (DPO's ``rewards/accuracies``). The policy is then written as the stage's model.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.errors import UserError
from rlhf_jax.losses import kto_loss
from rlhf_jax.models.lora import merged_params
from rlhf_jax.sharding import make_mesh, param_shardings, place_for_training, place_state, validate_mesh_for_model
from rlhf_jax.stages.common import (StagePrograms, bind_base, call_options, compile_train_step, dry_run_source, fit,
                                    frozen_reference, loss_batch, outputs_over, policy_training, token_batch,
                                    with_reference_logps, write_summary)
from rlhf_jax.trainers.kto import (MATCHED, MISMATCHED, UNPAIRED_KEYS, kto_eval_step, kto_train_step, loss_keywords,
                                   reference_logprobs, with_kl_rows)
from rlhf_jax.training.artifacts import save_artifact
from rlhf_jax.training.logs import read_metrics

SUMMARY_GROUPS = ("kto", "kl", "rewards", "logps")  # the last training record's metrics kept in the summary


def balance_note(labels: np.ndarray, loss) -> str | None:
    """A note when λ_D n_D / (λ_U n_U) leaves [1, 4/3], the range the KTO paper (and TRL's warning) advises."""
    desirable, undesirable = int(np.sum(labels)), int(np.sum(~labels))
    if not desirable or not undesirable:
        return (f"the training set has {desirable} desirable and {undesirable} undesirable examples: one side of the "
                "KTO loss never trains")
    ratio = loss.desirable_weight * desirable / max(loss.undesirable_weight * undesirable, 1e-12)
    if 1.0 <= ratio <= 4 / 3 + 1e-9:
        return None
    return (f"desirable_weight·{desirable} / (undesirable_weight·{undesirable}) = {ratio:.3g}; the KTO paper advises "
            "a value in [1, 4/3] (set loss.desirable_weight or loss.undesirable_weight)")


def _labels(dataset) -> np.ndarray:
    return np.asarray([example.label for example in dataset.examples], bool)


def programs(experiment, stage, config) -> StagePrograms:
    """The KTO stage's train step, its batch (the matched and the mismatched rows, the labels) and the frozen
    reference's log-prob pass over both kinds of rows, in the step's micro-batches (`stages.common.StagePrograms`)."""
    micro = experiment.optimizer.micro_batches
    step = bind_base(functools.partial(kto_train_step, config, stage.loss, micro), stage.lora)

    def batch(rows: int, length: int) -> dict:
        return token_batch(rows, length, (MATCHED, MISMATCHED)) | {"labels": ((rows,), jnp.bool_)}

    return StagePrograms("kto", step, batch, functools.partial(reference_logprobs, num_microbatches=micro))


def _setup(experiment, stage, resolve, source, reference_source):
    """Everything a run (or a dry run) needs before the first step: (`PolicyTraining`, (the frozen reference's
    config, its params))."""
    training = policy_training(experiment, stage, resolve, source, "unpaired", programs)
    if training.data.batch_size // jax.process_count() < 2:  # each process cycles the responses of its own rows
        raise UserError(f"stages.{stage.name}: {training.data.batch_size} examples per step over "
                        f"{jax.process_count()} processes leave fewer than 2 per process; KTO's mismatched rows "
                        "need at least 2")
    note = balance_note(_labels(training.dataset), stage.loss)
    if note is not None:
        print(f"  note: stages.{stage.name}: {note}")
    return training, frozen_reference(experiment, stage, resolve, training.role, training.tokenizer, training.frozen,
                                      reference_source)


def host_batch(batch: dict, pad_id: int, num_microbatches: int = 1, whole: bool = False) -> dict:
    """A loader batch as the step reads it (host numpy): the unpaired rows with their loss index
    (`stages.common.loss_batch`) and their mismatched rows (`trainers.kto.with_kl_rows`)."""
    return with_kl_rows(loss_batch(batch, UNPAIRED_KEYS, num_microbatches, whole), pad_id, num_microbatches)


def _reference_preparer(built: StagePrograms, reference_config, reference, mesh, num_microbatches: int, pad_id: int):
    """(the reference on the mesh, host batch -> the step's batch on the mesh with the reference's log-probs,
    `built.reference_pass` jitted)."""
    validate_mesh_for_model(reference_config, mesh)
    reference = place_state(reference, param_shardings(reference, mesh))
    reference_fn = jax.jit(functools.partial(built.reference_pass, reference_config))
    return reference, with_reference_logps(reference_fn, reference, mesh,
                                           lambda batch: host_batch(batch, pad_id, num_microbatches))


def row_logprobs_over(config, params, dataset, batch_size: int, mesh=None) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs of every example of ``dataset``, in order, and of its mismatched row (built
    within each batch of ``batch_size``): ([N], [N]). A whole-set pass (`stages.common.outputs_over`)."""
    return outputs_over(functools.partial(kto_eval_step, config), params, dataset, batch_size,
                        lambda batch: host_batch(batch, dataset.pad_id, whole=True), mesh)


def feedback_pairs(dataset) -> np.ndarray:
    """Indices i such that examples i (desirable) and i + 1 (undesirable) came from the same preference-pair row
    (the unpaired reader gives a pair row's two examples in that order, with the row's origin): [P] int."""
    examples = dataset.examples
    return np.asarray([i for i in range(len(examples) - 1)
                       if examples[i].origin and examples[i].origin == examples[i + 1].origin
                       and examples[i].label and not examples[i + 1].label], np.int64)


def evaluation_metrics(policy, reference, labels: np.ndarray, pairs: np.ndarray, loss, prefix: str = "eval") -> dict:
    """The KTO loss (`config.KTOLoss`) and its statistics over a whole set (`losses.kto_loss`, TRL's names under
    ``prefix/``), and the paired implicit-reward accuracy over ``pairs`` (:func:`feedback_pairs`) when there are any.

    policy, reference: (matched [N], mismatched [N]) summed log-probs (:func:`row_logprobs_over`); labels: [N].
    """
    (policy_logps, policy_kl), (reference_logps, reference_kl) = policy, reference
    _, metrics = kto_loss(policy_logps, reference_logps, labels, policy_kl, reference_kl, **loss_keywords(loss))
    out = {f"{prefix}/{'kto/loss' if name == 'loss' else name}": float(value)
           for name, value in jax.device_get(metrics).items()}
    out[f"{prefix}/examples"] = float(len(labels))
    if len(pairs):
        logratios = np.asarray(policy_logps, np.float64) - np.asarray(reference_logps, np.float64)
        out[f"{prefix}/rewards/paired_accuracies"] = float(np.mean(logratios[pairs] > logratios[pairs + 1]))
        out[f"{prefix}/pairs"] = float(len(pairs))
    return out


def dry_run(experiment, stage, stage_dir: Path, resolve) -> None:
    """Load the models and examples, build the first batch and compile the train step; nothing is trained."""
    source = dry_run_source(experiment, stage.model, resolve)
    reference_source = dry_run_source(experiment, stage.reference, resolve)
    mesh = make_mesh(experiment.mesh)
    setup, (reference_config, reference) = _setup(experiment, stage, resolve, source, reference_source)
    validate_mesh_for_model(setup.role.config, mesh)
    _, prepare = _reference_preparer(setup.programs, reference_config, reference, mesh,
                                     experiment.optimizer.micro_batches, setup.dataset.pad_id)
    batch = prepare(next(setup.iterator))
    desirable = int(_labels(setup.dataset).sum())
    print(f"  model {source or experiment.model.source}: {setup.role.config.num_params():,} params; "
          f"{len(setup.dataset)} examples ({desirable} desirable), up to {setup.total_steps} steps, first batch "
          f"{tuple(batch['tokens'].shape)} matched rows and as many mismatched")
    compile_train_step(experiment, "kto train step", setup.programs.step, setup.state, batch, mesh, setup.frozen)


def stage_summary(stage_dir: Path, records: list[dict], steps: int, prefix: str, groups: tuple[str, ...],
                  evaluate) -> dict:
    """The summary of a training stage evaluated before and after: the last training record's metrics of
    ``groups`` (``train/…``), the first evaluation's (``{prefix}_start/…``, when it is the starting policy's) and
    the last one's (``{prefix}/…``; measured now when the run has none at its last step, e.g. one resumed after
    its last step but before its model was written). Evaluation records are those with ``{prefix}/examples``."""
    summary = {"steps": steps}
    trained = [record for record in records if record["step"] > 0]
    if trained:
        summary.update({f"train/{k}": v for k, v in trained[-1].items() if k.split("/")[0] in groups})
    evaluations = [record for record in read_metrics(stage_dir) if f"{prefix}/examples" in record]
    if evaluations and evaluations[0]["step"] == 0:
        summary.update({f"{prefix}_start/{name[len(prefix) + 1:]}": value
                        for name, value in evaluations[0].items() if name.startswith(prefix + "/")})
    if evaluations and evaluations[-1]["step"] == steps:
        summary.update({name: value for name, value in evaluations[-1].items() if name.startswith(prefix + "/")})
    else:
        summary.update(evaluate())
    return summary


def run(experiment, stage, stage_dir: Path, resolve) -> None:
    mesh = make_mesh(experiment.mesh)  # a bad mesh fails before the models load
    setup, (reference_config, reference) = _setup(experiment, stage, resolve, stage.model, stage.reference)
    role, dataset, data = setup.role, setup.dataset, setup.data
    validate_mesh_for_model(role.config, mesh)
    reference_is_base = bool(setup.frozen) and stage.reference is None
    reference, prepare = _reference_preparer(setup.programs, reference_config, reference, mesh,
                                             experiment.optimizer.micro_batches, dataset.pad_id)
    frozen = (reference,) if reference_is_base else place_state(
        setup.frozen, tuple(param_shardings(params, mesh) for params in setup.frozen))  # one copy of the base
    base = frozen[0] if frozen else {}
    (state,), step_fn = place_for_training(setup.programs.step, (setup.state,), mesh, frozen,
                                           **call_options(experiment))
    examples = setup.eval_dataset if setup.eval_dataset is not None else dataset
    prefix = "eval" if setup.eval_dataset is not None else "train_set"
    labels, pairs = _labels(examples), feedback_pairs(examples)
    # the reference is frozen: its log-probs of the evaluation rows are computed once
    reference_logps = row_logprobs_over(reference_config, reference, examples, data.batch_size, mesh)

    def evaluate(state):
        policy_logps = row_logprobs_over(role.config, merged_params(base, state.params, stage.lora), examples,
                                         data.batch_size, mesh)
        return evaluation_metrics(policy_logps, reference_logps, labels, pairs, stage.loss, prefix)

    iterator = setup.iterator
    state, records = fit(
        experiment=experiment, stage=stage, stage_dir=stage_dir, state=state, step_fn=step_fn, batches=iterator,
        total_steps=setup.total_steps, host_state=lambda: {"data": iterator.get_state()},
        restore_host_state=lambda saved: iterator.set_state(saved["data"]), prepare=prepare, evaluate=evaluate,
    )
    summary = stage_summary(stage_dir, records, int(state.step), prefix, SUMMARY_GROUPS, lambda: evaluate(state))
    policy = merged_params(base, state.params, stage.lora)
    save_artifact(stage_dir / "model", role.config, policy, setup.tokenizer, "lm", {"stage": stage.name, **summary})
    write_summary(stage_dir, f"KTO stage '{stage.name}'", summary)
