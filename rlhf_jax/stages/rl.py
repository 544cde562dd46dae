"""The RL stage runner (PPO, GRPO): rollouts, experience and the scanned update, driven by the shared `fit` loop.

Roles: policy (from `policy`, trained), reference (frozen: `reference`, default the policy's starting
weights), reward (a reward model or a programmatic `fn:` reward) and, for PPO, a critic (`critic`, default
the reward model's weights; trained). Frozen roles hold params only: no optimizer state is ever allocated
for them. PPO, GRPO, RLOO and REINFORCE are presets of one `rlhf_jax.config.RLAlgorithm`, the stage's
`algorithm` field, which reaches the trainer's functions as it is.

Per iteration (one `fit` step): sample `group_size` responses per prompt (time/generate) -> experience
(time/score) -> `rl_update`, all epochs × mini-batches in one program (time/train) -> KL controller update.
Checkpoints (`fit`'s layout) hold the train states, the KL coefficient, the PRNG key and the prompt iterator
position, so a killed run resumes exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax.errors import UserError
from rlhf_jax.losses import KLControllerState, adaptive_kl_controller, fixed_kl_controller
from rlhf_jax.models import llama
from rlhf_jax.rewards import ModelReward, ScoringBatch, build_reward_sources, combine
from rlhf_jax.sampling.sampler import Sampler, SamplingSettings
from rlhf_jax.sharding import (make_mesh, move_to_memory, param_shardings, place_batch, place_state, replicated,
                               shard_train_step, state_shardings, use_mesh, validate_mesh_for_model)
from rlhf_jax.stages.common import (build_optimizer, fit, load_role, load_stage_dataset, require_tokenizer,
                                    training_iterator, write_summary)
from rlhf_jax.trainers import rl
from rlhf_jax.training.artifacts import save_artifact
from rlhf_jax.training.state import TrainState


class RLState(flax.struct.PyTreeNode):
    """What an RL stage checkpoints: `step` iterations done; `states` the policy's (and critic's) train
    states; the KL coefficient; the PRNG key of the rollouts."""

    step: jax.Array
    states: tuple
    kl_coef: jax.Array
    rng: jax.Array


def check_same_tokenizer(policy_tokenizer, other_tokenizer, what: str) -> None:
    """Refuse a silent tokenizer mismatch between roles (scores of re-tokenized text are not supported)."""
    if other_tokenizer is None:
        return
    if policy_tokenizer.get_vocab() != other_tokenizer.get_vocab():
        raise UserError(f"{what}: its tokenizer differs from the policy's; the RL stages need roles that share one")


def _scalar_model(role, key):
    return role.params if role.kind == "scalar" else llama.init_scalar_model(role.config, role.params, key)


def run(experiment, stage, stage_dir: Path, resolve) -> None:
    mesh = make_mesh(experiment.mesh)  # a bad mesh fails before the models load
    key = jax.random.key(experiment.seed)
    policy_role = load_role(experiment, stage.policy, resolve)
    tokenizer = require_tokenizer(policy_role, f"stages.{stage.name}.policy")
    if policy_role.kind != "lm":
        raise UserError(f"stages.{stage.name}.policy: expected a language model, got a reward/value model")
    critic_source = getattr(stage, "critic", None)
    algorithm = stage.algorithm
    has_critic = algorithm.has_critic
    reward_role = None  # the first reward model among the sources: the critic's default start

    def load_reward_model(spec: str):
        nonlocal reward_role
        role = load_role(experiment, spec, resolve)
        if role.kind == "scalar":
            check_same_tokenizer(tokenizer, role.tokenizer, f"stages.{stage.name}.reward_model")
            role = dataclasses.replace(role, params=frozen_params(role.params, role.config.dtype))
            reward_role = reward_role or role
        return role.config, role.params, role.kind, role.metadata

    try:
        reward_sources = build_reward_sources([stage.reward_model, *stage.extra_rewards], load_reward_model,
                                              tokenizer)
    except UserError as error:
        raise UserError(f"stages.{stage.name}.reward_model: {error}") from None
    reward_weights = stage.reward_weights or (1.0,) * len(reward_sources)
    reward_models = [source for source in reward_sources if isinstance(source, ModelReward)]
    if has_critic and critic_source is None and reward_role is None:
        raise UserError(f"stages.{stage.name}.critic: a programmatic reward has no weights to start the critic "
                        "from; name a model (e.g. the policy's source)")
    if not algorithm.use_reference:
        reference_config, reference = policy_role.config, {}  # never read: no KL
    elif stage.reference is None:
        reference_config, reference = policy_role.config, policy_role.params  # copied by frozen_params below
    else:
        reference_role = load_role(experiment, stage.reference, resolve, with_tokenizer=False)
        reference_config, reference = reference_role.config, reference_role.params
    if reference_config.vocab_size != policy_role.config.vocab_size:
        raise UserError(f"stages.{stage.name}.reference: vocabulary differs from the policy's")
    policy_config = policy_role.config
    if reference_config != policy_config:
        raise UserError(f"stages.{stage.name}.reference: architecture differs from the policy's")

    prompts, eval_prompts, data = load_stage_dataset(experiment, stage, "prompt", tokenizer)
    group_size = algorithm.group_size
    iterator = training_iterator(prompts, batch_size=stage.rollout_batch_size,
                                 seed=data.shuffle_seed or experiment.seed, num_epochs=None)
    per_epoch = max(len(prompts) // stage.rollout_batch_size, 1)
    iterations = stage.max_steps if stage.max_steps is not None else per_epoch * stage.epochs
    updates = iterations * algorithm.update_epochs * (stage.rollout_batch_size * group_size
                                                      // algorithm.mini_batch_size)
    states = [TrainState.create(policy_role.params, build_optimizer(experiment, stage, updates),
                                jax.random.fold_in(key, 1))]
    critic_config = None
    if has_critic:
        critic_role = reward_role if critic_source is None else load_role(experiment, critic_source, resolve, False)
        critic = jax.tree.map(jnp.copy, _scalar_model(critic_role, jax.random.fold_in(key, 7)))
        critic_config = critic_role.config
        states.append(TrainState.create(critic, build_optimizer(experiment, stage, updates), jax.random.fold_in(key, 2)))
    for config in [policy_config, critic_config] + [source.config for source in reward_models]:
        if config is not None:
            validate_mesh_for_model(config, mesh)
    state_sharding = tuple(state_shardings(state, mesh) for state in states)
    states = place_state(tuple(states), state_sharding)
    reference = frozen_params(reference, reference_config.dtype)  # frozen roles in the compute dtype
    reference = place_state(reference, param_shardings(reference, mesh))
    for source in reward_models:
        source.params = place_state(source.params, param_shardings(source.params, mesh))
    if algorithm.kl_target is None:
        controller = fixed_kl_controller(algorithm.kl_coef)
    else:
        controller = adaptive_kl_controller(algorithm.kl_coef, algorithm.kl_target, algorithm.kl_horizon)
    settings = SamplingSettings(max_new_tokens=stage.max_new_tokens, temperature=algorithm.temperature,
                                top_p=None if stage.top_p >= 1.0 else stage.top_p, top_k=stage.top_k or 0)
    sampler = Sampler(policy_config, mesh=mesh)
    # replicated over the mesh: checkpoints of several processes hold global arrays only
    state = RLState(step=jnp.zeros((), jnp.int32), states=states,
                    kl_coef=place_state(controller.init().kl_coef, replicated(mesh)),
                    rng=place_state(jax.random.fold_in(key, 3), replicated(mesh)))

    experience_fn = jax.jit(functools.partial(rl.make_experience, policy_config, critic_config, algorithm))
    update_fns: dict[int, object] = {}
    rollouts: dict[str, object] = {}

    def move_frozen(memory: str) -> None:  # the frozen roles visit the devices for the scoring pass only
        nonlocal reference
        reference, parked = move_to_memory((reference, [source.params for source in reward_models]), memory)
        for source, params in zip(reward_models, parked):
            source.params = params

    def update_program(prompt_length: int):
        if prompt_length not in update_fns:
            def update(key, kl_coef, *states_and_experience):
                new_states, metrics = rl.rl_update(policy_config, critic_config, algorithm, prompt_length, key,
                                                   kl_coef, states_and_experience[:-1], states_and_experience[-1],
                                                   num_microbatches=experiment.optimizer.micro_batches)
                return (*new_states, metrics)

            update.__name__ = "rl_update"
            update_fns[prompt_length] = shard_train_step(update, state_sharding, mesh,
                                                         frozen_shardings=(replicated(mesh), replicated(mesh)))
        return update_fns[prompt_length]

    def iteration(state: RLState, batch: dict) -> tuple[RLState, dict]:
        rng, sample_key, shuffle_key = jax.random.split(state.rng, 3)
        prompt_tokens, prompt_mask = batch["prompt_tokens"], batch["prompt_mask"]
        if group_size > 1:  # the k samples of a prompt are contiguous rows
            prompt_tokens, prompt_mask = (jnp.repeat(x, group_size, axis=0) for x in (prompt_tokens, prompt_mask))
            batch = {**batch, "references": tuple(r for r in batch["references"] for _ in range(group_size))}
        start = time.perf_counter()
        policy_params = state.states[0].params
        sample = jax.block_until_ready(sampler(policy_params, prompt_tokens, prompt_mask, sample_key, settings,
                                               chunk_rows=stage.generation_batch_size))
        generated = time.perf_counter()
        if stage.offload_frozen:
            move_frozen("device")
        scoring = ScoringBatch(prompt_tokens, prompt_mask, sample.response_tokens, sample.response_mask,
                               batch["references"])
        raw_scores, source_metrics = combine(reward_sources, reward_weights, scoring)
        critic_params = state.states[1].params if has_critic else {}
        with use_mesh(mesh):
            experience, metrics = experience_fn(policy_params, reference, critic_params, raw_scores, prompt_tokens,
                                                prompt_mask, sample.response_tokens, sample.response_mask,
                                                sample.ended_with_eos, state.kl_coef)
        if stage.offload_frozen:
            move_frozen("pinned_host")
        metrics.update(source_metrics)
        metrics = jax.device_get(metrics)
        scored = time.perf_counter()
        *states, update_metrics = update_program(prompt_tokens.shape[1])(shuffle_key, state.kl_coef, *state.states,
                                                                         experience)
        update_metrics = jax.device_get(update_metrics)
        trained = time.perf_counter()
        kl_coef = state.kl_coef if not algorithm.use_reference else controller.update(
            KLControllerState(state.kl_coef), metrics["kl/mean"], prompt_tokens.shape[0]).kl_coef
        new_tokens = float(jnp.sum(sample.response_lengths))  # a global array across processes
        metrics.update(update_metrics)
        metrics.update({
            "time/generate": generated - start, "time/score": scored - generated, "time/train": trained - scored,
            "throughput/generate_tokens_per_s": new_tokens / max(generated - start, 1e-9),
            "throughput/tokens_per_s": new_tokens / max(trained - start, 1e-9),
        })
        rollouts["last"] = (prompt_tokens, prompt_mask, sample.response_tokens, sample.response_lengths,
                            experience.scores)
        return RLState(step=state.step + 1, states=tuple(states), kl_coef=kl_coef, rng=rng), metrics

    evaluate = None
    if eval_prompts is not None:
        greedy = dataclasses.replace(settings, greedy=True, temperature=1.0, top_p=None, top_k=0)
        rows = stage.generation_batch_size or stage.rollout_batch_size * group_size

        def evaluate(state: RLState) -> dict:
            return greedy_evaluation(sampler, state.states[0].params, eval_prompts, reward_sources, reward_weights,
                                     greedy, rows, mesh)

    def log_samples(step: int, logger) -> None:
        sample_every = experiment.logging.sample_every
        if sample_every and (step % sample_every == 0 or step == 1):
            rows = multihost_utils.process_allgather(rollouts["last"], tiled=True)  # collective, for process 0
            logger.log_samples(step, _samples(tokenizer, *rows, 4))

    state, records = fit(
        experiment=experiment, stage=stage, stage_dir=stage_dir, state=state, step_fn=iteration, batches=iterator,
        total_steps=iterations, host_state=lambda: {"data": iterator.get_state()},
        restore_host_state=lambda saved: iterator.set_state(saved["data"]),
        prepare=lambda batch: {
            **dict(zip(("prompt_tokens", "prompt_mask"),
                       place_batch((batch["prompt_tokens"], batch["prompt_mask"]), mesh))),
            "references": tuple(prompts.examples[i].reference for i in np.asarray(batch["index"]))},
        after_step=log_samples, evaluate=evaluate, eval_every=stage.eval_every,
    )
    policy_state = state.states[0]
    last_metrics = {k: v for k, v in records[-1].items() if k != "step"} if records else {}
    save_artifact(stage_dir / "model", policy_config, policy_state.params, tokenizer, "lm",
                  {"stage": stage.name, "iterations": int(state.step)})
    from rlhf_jax.distributed import barrier, is_main_process
    from rlhf_jax.models.hf_io import save_hf

    host_params = multihost_utils.process_allgather(policy_state.params, tiled=True)  # collective
    if is_main_process():  # one writer: save_hf is a plain file write, not a collective one
        save_hf(stage_dir / "hf", policy_config, host_params, tokenizer)
    barrier(f"rlhf_jax.{stage.kind}.save_hf")
    write_summary(stage_dir, f"{str(stage.kind).upper()} stage '{stage.name}'", {"iterations": int(state.step), **last_metrics})


def greedy_evaluation(sampler: Sampler, params, dataset, reward_sources, reward_weights,
                      settings: SamplingSettings, rows: int, mesh) -> dict[str, float]:
    """Greedy responses to every prompt of a held-out prompt `dataset`, scored by the stage's reward sources.

    Returns `eval/reward_mean` (their weighted sum, as in training; for an exact-answer reward such as
    `text:arith_exact` alone: the greedy exact-match accuracy), `eval/response_length_mean` (tokens, EOS
    included) and `eval/eos_fraction`. Batches of `rows` prompts in dataset order; a short last batch
    repeats its last prompt (one shape) and the repeats are not counted.
    """
    from rlhf_jax.data import DataIterator

    batches = DataIterator(dataset, batch_size=min(rows, len(dataset)), shuffle=False, drop_remainder=False)
    scores, lengths, ended = [], [], []
    for batch in batches:
        count = len(batch["index"])
        fill = np.minimum(np.arange(batches.batch_size), count - 1)
        prompt_tokens, prompt_mask = place_batch((batch["prompt_tokens"][fill], batch["prompt_mask"][fill]), mesh)
        sample = sampler(params, prompt_tokens, prompt_mask, jax.random.key(0), settings)
        references = tuple(dataset.examples[int(batch["index"][row])].reference for row in fill)
        scoring = ScoringBatch(prompt_tokens, prompt_mask, sample.response_tokens, sample.response_mask, references)
        raw, _ = combine(reward_sources, reward_weights, scoring)
        scores.append(np.asarray(multihost_utils.process_allgather(raw, tiled=True))[:count])
        lengths.append(np.asarray(multihost_utils.process_allgather(sample.response_lengths, tiled=True))[:count])
        ended.append(np.asarray(multihost_utils.process_allgather(sample.ended_with_eos, tiled=True))[:count])
    return {"eval/reward_mean": float(np.mean(np.concatenate(scores))),
            "eval/response_length_mean": float(np.mean(np.concatenate(lengths))),
            "eval/eos_fraction": float(np.mean(np.concatenate(ended)))}


def _samples(tokenizer, prompt_tokens, prompt_mask, response_tokens, response_lengths, scores,
             count: int) -> list[dict]:
    """(prompt, response, reward) of the first `count` rollouts, decoded for people to read (host arrays)."""
    out = []
    tokens, mask = np.asarray(prompt_tokens), np.asarray(prompt_mask)
    responses, lengths = np.asarray(response_tokens), np.asarray(response_lengths)
    for row in range(min(count, len(tokens))):
        out.append({
            "prompt": tokenizer.decode(tokens[row][mask[row]]),
            "response": tokenizer.decode(responses[row, : lengths[row]]),
            "reward": float(np.asarray(scores)[row]),
        })
    return out
