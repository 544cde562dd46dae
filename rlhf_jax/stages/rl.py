"""The RL stage runner (PPO, GRPO): rollouts, experience and the scanned update, driven by the shared `fit` loop.

Roles: policy (from `policy`, trained), reference (frozen: `reference`, default the policy's starting
weights), reward (a reward model or a programmatic `fn:` reward) and, for PPO, a critic (`critic`, default
the reward model's weights; trained). Frozen roles hold params only: no optimizer state is ever allocated
for them. With `lora.rank > 0` the policy (and critic) train adapters (and the critic its head) on frozen
bases, the reference is the policy's base with the adapters off, and checkpoints hold adapters only. The
policy, reward sources, prompts, sampler, evaluation and export are `stages.rollouts`, shared with RAFT and
ReST. PPO, GRPO, RLOO and REINFORCE are presets of one `rlhf_jax.config.RLAlgorithm`, the stage's
`algorithm` field, which reaches the trainer's functions as it is.

Per iteration (one `fit` step): sample `group_size` responses per prompt (time/generate) -> experience
(time/score) -> `rl_update`, all epochs × mini-batches in one program (time/train) -> KL controller update.
Checkpoints (`fit`'s layout) hold the train states, the KL coefficient, the PRNG key and the prompt iterator
position, so a killed run resumes exactly.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from rlhf_jax.errors import UserError
from rlhf_jax.losses import KLControllerState, adaptive_kl_controller, fixed_kl_controller
from rlhf_jax.models import llama
from rlhf_jax.models.lora import full_params, trainable_params
from rlhf_jax.sharding import (move_to_memory, param_shardings, place_state, replicated, shard_train_step,
                               state_shardings, use_mesh, validate_mesh_for_model)
from rlhf_jax.stages.common import (build_optimizer, fit, frozen_params, load_role, per_layer_state,
                                    training_iterator, write_summary)
from rlhf_jax.stages.rollouts import Rollouts, decoded_samples, load_rollouts
from rlhf_jax.trainers import rl
from rlhf_jax.training.state import TrainState


class RLState(flax.struct.PyTreeNode):
    """What an RL stage checkpoints: `step` iterations done; `states` the policy's (and critic's) train
    states; the KL coefficient; the PRNG key of the rollouts."""

    step: jax.Array
    states: tuple
    kl_coef: jax.Array
    rng: jax.Array


class RLPrograms(NamedTuple):
    """What an RL stage compiles, built once by `programs` and read by `run` (on real arrays) and by ``--plan``
    (`rlhf_jax.plan`, on abstract ones), un-jitted:

    - ``experience(policy, policy_base, reference, critic, critic_base, scores, prompt_tokens, prompt_mask,
      response_tokens, response_mask, ended_with_eos, kl_coef) -> (Experience, metrics)``: log-probs of the
      policy and the reference, values, rewards and advantages of one batch of rollouts (`rl.make_experience`);
      ``policy``/``critic`` are the trained params (adapters under LoRA), the bases their frozen weights or {};
    - ``update(prompt_length) -> update(key, kl_coef, bases, *states, experience) -> (*states, metrics)``: every
      epoch and mini-batch of an iteration (`rl.rl_update`).
    """

    experience: Callable
    update: Callable[[int], Callable]


def programs(experiment, stage, policy_config, critic_config) -> RLPrograms:
    """The RL stage's experience pass and update, bound to the model configs, the algorithm, the micro-batch
    count, LoRA and `shared_prefix` (`RLPrograms`); ``critic_config`` is None without a critic."""
    algorithm, lora, shared = stage.algorithm, stage.lora, stage.shared_prefix

    def experience(policy, policy_base, reference, critic, critic_base, *rest):
        return rl.make_experience(policy_config, critic_config, algorithm, full_params(policy_base, policy, lora),
                                  reference, full_params(critic_base, critic, lora) if algorithm.has_critic else {},
                                  *rest, shared_prompts=shared)

    def update_program(prompt_length: int):
        def update(key, kl_coef, bases, *states_and_experience):
            new_states, metrics = rl.rl_update(policy_config, critic_config, algorithm, prompt_length, key, kl_coef,
                                               states_and_experience[:-1], states_and_experience[-1],
                                               num_microbatches=experiment.optimizer.micro_batches, bases=bases,
                                               lora=lora, shared_prompts=shared)
            return (*new_states, metrics)

        update.__name__ = "rl_update"
        return update

    return RLPrograms(experience, update_program)


def _scalar_model(role, key):
    return role.params if role.kind == "scalar" else llama.init_scalar_model(role.config, role.params, key)


def _critic(experiment, stage, rollouts: Rollouts, resolve, key):
    """(config, trainable, frozen base or {}) of PPO's critic: `stage.critic`, or the first reward model's
    weights. Under LoRA it trains adapters and its head; its base is then the reward model's own frozen
    arrays when it starts from them (no second backbone)."""
    if stage.critic is None and rollouts.reward_role is None:
        raise UserError(f"stages.{stage.name}.critic: a programmatic reward has no weights to start the critic "
                        "from; name a model (e.g. the policy's source)")
    role = rollouts.reward_role if stage.critic is None else load_role(experiment, stage.critic, resolve, False)
    validate_mesh_for_model(role.config, rollouts.mesh)
    model = _scalar_model(role, jax.random.fold_in(key, 7))
    if stage.lora.rank == 0:
        return role.config, jax.tree.map(jnp.copy, model), {}
    trainable = trainable_params(model, stage.lora, jax.random.fold_in(key, 8), keep=("head",))
    base = model if role is rollouts.reward_role else frozen_params(model, role.config.dtype)
    return role.config, trainable, place_state(base, param_shardings(base, rollouts.mesh))


def _reference(experiment, stage, rollouts: Rollouts, resolve):
    """The frozen reference's params: none without a KL; under LoRA (and no `reference`) the policy's base
    itself; else a frozen copy of the policy's start or of `stage.reference`."""
    policy_config = rollouts.config
    if not stage.algorithm.use_reference:
        return {}  # never read: no KL
    if stage.reference is None:
        if stage.lora.rank > 0:
            return rollouts.base  # the same arrays: the reference costs nothing
        return place_state(frozen_params(rollouts.policy_role.params, policy_config.dtype),
                           param_shardings(rollouts.policy_role.params, rollouts.mesh))
    role = load_role(experiment, stage.reference, resolve, with_tokenizer=False)
    if role.config.vocab_size != policy_config.vocab_size:
        raise UserError(f"stages.{stage.name}.reference: vocabulary differs from the policy's")
    if role.config != policy_config:
        raise UserError(f"stages.{stage.name}.reference: architecture differs from the policy's")
    reference = frozen_params(role.params, role.config.dtype)
    return place_state(reference, param_shardings(reference, rollouts.mesh))


def run(experiment, stage, stage_dir: Path, resolve) -> None:
    key = jax.random.key(experiment.seed)
    rollouts = load_rollouts(experiment, stage, resolve, key)
    stage = rollouts.stage  # `shared_prefix` decided for the mesh
    mesh, tokenizer, policy_config = rollouts.mesh, rollouts.tokenizer, rollouts.config
    algorithm = stage.algorithm
    has_critic = algorithm.has_critic
    reward_models = rollouts.reward_models
    reference = _reference(experiment, stage, rollouts, resolve)
    prompts = rollouts.prompts
    group_size = algorithm.group_size
    iterator = training_iterator(prompts, batch_size=stage.rollout_batch_size,
                                 seed=rollouts.data.shuffle_seed or experiment.seed, num_epochs=None)
    per_epoch = max(len(prompts) // stage.rollout_batch_size, 1)
    iterations = stage.max_steps if stage.max_steps is not None else per_epoch * stage.epochs
    updates = iterations * algorithm.update_epochs * (stage.rollout_batch_size * group_size
                                                      // algorithm.mini_batch_size)
    states = [TrainState.create(rollouts.trainable, build_optimizer(experiment, stage, updates),
                                jax.random.fold_in(key, 1), per_layer=per_layer_state(stage, rollouts.config))]
    bases = [rollouts.base]
    critic_config = None
    if has_critic:
        critic_config, critic, critic_base = _critic(experiment, stage, rollouts, resolve, key)
        states.append(TrainState.create(critic, build_optimizer(experiment, stage, updates), jax.random.fold_in(key, 2),
                                        per_layer=per_layer_state(stage, critic_config)))
        bases.append(critic_base)
    bases = tuple(bases)
    state_sharding = tuple(state_shardings(state, mesh) for state in states)
    states = place_state(tuple(states), state_sharding)
    if algorithm.kl_target is None:
        controller = fixed_kl_controller(algorithm.kl_coef)
    else:
        controller = adaptive_kl_controller(algorithm.kl_coef, algorithm.kl_target, algorithm.kl_horizon)
    # replicated over the mesh: checkpoints of several processes hold global arrays only
    state = RLState(step=jnp.zeros((), jnp.int32), states=states,
                    kl_coef=place_state(controller.init().kl_coef, replicated(mesh)),
                    rng=place_state(jax.random.fold_in(key, 3), replicated(mesh)))

    built = programs(experiment, stage, policy_config, critic_config)
    experience_fn = jax.jit(built.experience)
    update_fns: dict[int, object] = {}
    rollout_rows: dict[str, object] = {}
    # Roles that visit the devices for the scoring pass only; never a LoRA base that sampling and updates use.
    shared = {id(leaf) for leaf in jax.tree.leaves(bases)}
    parked = [source for source in reward_models if not shared & {id(x) for x in jax.tree.leaves(source.params)}]
    park_reference = not shared & {id(x) for x in jax.tree.leaves(reference)}

    def move_frozen(memory: str) -> None:
        nonlocal reference
        moved_reference, moved = move_to_memory((reference if park_reference else {},
                                                 [source.params for source in parked]), memory)
        reference = moved_reference if park_reference else reference
        for source, params in zip(parked, moved):
            source.params = params

    def update_program(prompt_length: int):
        if prompt_length not in update_fns:
            frozen = (replicated(mesh), replicated(mesh), tuple(param_shardings(base, mesh) for base in bases))
            update_fns[prompt_length] = shard_train_step(built.update(prompt_length), state_sharding, mesh,
                                                         frozen_shardings=frozen)
        return update_fns[prompt_length]

    def iteration(state: RLState, batch: dict) -> tuple[RLState, dict]:
        rng, sample_key, shuffle_key = jax.random.split(state.rng, 3)
        prompt_tokens, prompt_mask, references = rollouts.group_rows(batch["prompt_tokens"], batch["prompt_mask"],
                                                                     batch["references"])
        start = time.perf_counter()
        policy = state.states[0].params
        sample = jax.block_until_ready(rollouts.generate(policy, prompt_tokens, prompt_mask, sample_key))
        generated = time.perf_counter()
        if stage.offload_frozen:
            move_frozen("device")
        raw_scores, source_metrics = rollouts.score(prompt_tokens, prompt_mask, sample, references)
        critic = state.states[1].params if has_critic else {}
        with use_mesh(mesh):
            experience, metrics = experience_fn(policy, bases[0], reference, critic, bases[-1] if has_critic else {},
                                                raw_scores, prompt_tokens, prompt_mask, sample.response_tokens,
                                                sample.response_mask, sample.ended_with_eos, state.kl_coef)
        if stage.offload_frozen:
            move_frozen("pinned_host")
        metrics.update(source_metrics)
        metrics = jax.device_get(metrics)
        scored = time.perf_counter()
        *states, update_metrics = update_program(prompt_tokens.shape[1])(shuffle_key, state.kl_coef, bases,
                                                                         *state.states, experience)
        update_metrics = jax.device_get(update_metrics)
        trained = time.perf_counter()
        metrics.update(update_metrics)  # `kl/mean` comes from the update when it took the old log-probs itself
        kl_coef = state.kl_coef if not algorithm.use_reference else controller.update(
            KLControllerState(state.kl_coef), metrics["kl/mean"], prompt_tokens.shape[0]).kl_coef
        new_tokens = float(jnp.sum(sample.response_lengths))  # a global array across processes
        metrics.update({
            "time/generate": generated - start, "time/score": scored - generated, "time/train": trained - scored,
            "throughput/generate_tokens_per_s": new_tokens / max(generated - start, 1e-9),
            "throughput/tokens_per_s": new_tokens / max(trained - start, 1e-9),
        })
        rollout_rows["last"] = (prompt_tokens, prompt_mask, sample.response_tokens, sample.response_lengths,
                                experience.scores)
        return RLState(step=state.step + 1, states=tuple(states), kl_coef=kl_coef, rng=rng), metrics

    evaluate = rollouts.evaluator(stage.generation_batch_size or stage.rollout_batch_size * group_size)

    def log_samples(step: int, logger) -> None:
        sample_every = experiment.logging.sample_every
        if sample_every and (step % sample_every == 0 or step == 1):
            rows = multihost_utils.process_allgather(rollout_rows["last"], tiled=True)  # collective, for process 0
            logger.log_samples(step, decoded_samples(tokenizer, *rows, 4))

    state, records = fit(
        experiment=experiment, stage=stage, stage_dir=stage_dir, state=state, step_fn=iteration, batches=iterator,
        total_steps=iterations, host_state=lambda: {"data": iterator.get_state()},
        restore_host_state=lambda saved: iterator.set_state(saved["data"]), prepare=rollouts.prepare,
        after_step=log_samples, evaluate=evaluate and (lambda state: evaluate(state.states[0].params)),
        eval_every=stage.eval_every,
    )
    last_metrics = {k: v for k, v in records[-1].items() if k != "step"} if records else {}
    rollouts.export(stage_dir, state.states[0].params, {"stage": stage.name, "iterations": int(state.step)})
    write_summary(stage_dir, f"{str(stage.kind).upper()} stage '{stage.name}'",
                  {"iterations": int(state.step), **last_metrics})
