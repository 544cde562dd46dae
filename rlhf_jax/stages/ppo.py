"""PPO stage runner: the InstructGPT RL loop over four roles, resumable and observable.

Roles: policy (from `policy`, trained), reference (frozen: `reference`, default the policy's starting
weights), critic (`critic`, default the reward model's weights; trained), reward model (frozen). Frozen
roles hold params only: no optimizer state is ever allocated for them.

Per iteration: sample (time/generate) -> experience (time/score) -> `ppo_epochs` over shuffled mini-batches
(time/train), with optional early stop when the mini-batch approx-KL exceeds `target_approx_kl` -> KL
controller update. Checkpoints hold both train states, the KL coefficient, the PRNG key and the prompt
iterator position, so a killed run resumes exactly.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax.errors import UserError
from rlhf_jax.losses import adaptive_kl_controller, fixed_kl_controller
from rlhf_jax.models import llama
from rlhf_jax.rewards import get_reward_function, is_reward_function_spec
from rlhf_jax.sampling.sampler import Sampler, SamplingSettings
from rlhf_jax.sharding import (make_mesh, move_to_memory, param_shardings, place_batch, place_state, shard_train_step,
                               replicated, state_shardings, use_mesh, validate_mesh_for_model)
from rlhf_jax.stages.common import (build_optimizer, check_finite_losses, load_role, load_stage_dataset,
                                    require_tokenizer, training_iterator, write_summary)
from rlhf_jax.trainers import ppo
from rlhf_jax.training.artifacts import save_artifact
from rlhf_jax.training.checkpoint import Checkpointer
from rlhf_jax.training.logs import MetricsLogger
from rlhf_jax.training.preemption import should_stop, stopped, training_loop
from rlhf_jax.training.state import TrainState


def hyperparameters(stage, reward_metadata: dict, micro_batches: int) -> ppo.PPOHyperparameters:
    return ppo.PPOHyperparameters(
        clip_eps=stage.clip_eps, value_clip_eps=stage.value_clip_eps, vf_coef=stage.vf_coef,
        entropy_coef=stage.entropy_coef, gamma=stage.gamma, lam=stage.lam, kl_estimator=str(stage.kl_estimator),
        temperature=stage.temperature, whiten_rewards=stage.whiten_rewards,
        whiten_advantages=stage.whiten_advantages, missing_eos_penalty=stage.eos_penalty,
        length_penalty=stage.length_penalty, ngram_size=stage.ngram_size, ngram_penalty=stage.ngram_penalty,
        reward_clip=stage.reward_clip, reward_mean=float(reward_metadata.get("reward_mean", 0.0)),
        reward_std=float(reward_metadata.get("reward_std", 1.0)) or 1.0, num_microbatches=micro_batches,
    )


def check_same_tokenizer(policy_tokenizer, other_tokenizer, what: str) -> None:
    """Refuse a silent tokenizer mismatch between roles (scores of re-tokenized text are not supported)."""
    if other_tokenizer is None:
        return
    if policy_tokenizer.get_vocab() != other_tokenizer.get_vocab():
        raise UserError(f"{what}: its tokenizer differs from the policy's; PPO here needs roles that share one")


def frozen_params(params, dtype):
    """A frozen role's own copy of `params` in the compute dtype: the forward casts weights to it anyway, so
    the outputs are unchanged while bf16 runs hold half the bytes (and never alias the donated policy)."""
    return jax.tree.map(lambda x: jnp.array(x, dtype=jnp.dtype(dtype), copy=True), params)


def _scalar_model(role, key):
    return role.params if role.kind == "scalar" else llama.init_scalar_model(role.config, role.params, key)


def run(experiment, stage, stage_dir: Path, resolve) -> None:
    mesh = make_mesh(experiment.mesh)  # a bad mesh fails before the models load
    key = jax.random.key(experiment.seed)
    policy_role = load_role(experiment, stage.policy, resolve)
    tokenizer = require_tokenizer(policy_role, f"stages.{stage.name}.policy")
    if policy_role.kind != "lm":
        raise UserError(f"stages.{stage.name}.policy: expected a language model, got a reward/value model")
    if is_reward_function_spec(stage.reward_model):
        reward_function = get_reward_function(stage.reward_model)
        if stage.critic is None:
            raise UserError(f"stages.{stage.name}.critic: a programmatic reward has no weights to start the critic "
                            "from; name a model (e.g. the policy's source)")
        reward_role = None
    else:
        reward_role = load_role(experiment, stage.reward_model, resolve)
        if reward_role.kind != "scalar":
            raise UserError(f"stages.{stage.name}.reward_model: expected a reward model (a reward stage's output), "
                            "got a language model")
        check_same_tokenizer(tokenizer, reward_role.tokenizer, f"stages.{stage.name}.reward_model")
    if stage.reference is None:
        reference_config, reference = policy_role.config, policy_role.params  # copied by frozen_params below
    else:
        reference_role = load_role(experiment, stage.reference, resolve, with_tokenizer=False)
        reference_config, reference = reference_role.config, reference_role.params
    if reference_config.vocab_size != policy_role.config.vocab_size:
        raise UserError(f"stages.{stage.name}.reference: vocabulary differs from the policy's")
    critic_role = reward_role if stage.critic is None else load_role(experiment, stage.critic, resolve, False)
    critic = jax.tree.map(jnp.copy, _scalar_model(critic_role, jax.random.fold_in(key, 7)))
    policy_config, critic_config = policy_role.config, critic_role.config
    reward = reward_function if reward_role is None else reward_role.config
    reward_params = {} if reward_role is None else frozen_params(reward_role.params, reward.dtype)
    reward_metadata = {} if reward_role is None else reward_role.metadata
    if reference_config != policy_config:
        raise UserError(f"stages.{stage.name}.reference: architecture differs from the policy's")

    prompts, _, data = load_stage_dataset(experiment, stage, "prompt", tokenizer)
    if stage.rollout_batch_size % stage.mini_batch_size:
        raise UserError(f"stages.{stage.name}.rollout_batch_size={stage.rollout_batch_size} must be a multiple of "
                        f"mini_batch_size={stage.mini_batch_size}")
    iterator = training_iterator(prompts, batch_size=stage.rollout_batch_size,
                                 seed=data.shuffle_seed or experiment.seed, num_epochs=None)
    per_epoch = max(len(prompts) // stage.rollout_batch_size, 1)
    iterations = stage.max_steps if stage.max_steps is not None else per_epoch * stage.epochs
    updates = iterations * stage.ppo_epochs * (stage.rollout_batch_size // stage.mini_batch_size)
    hyper = hyperparameters(stage, reward_metadata, experiment.optimizer.micro_batches)
    policy_state = TrainState.create(policy_role.params, build_optimizer(experiment, stage, updates),
                                     jax.random.fold_in(key, 1))
    critic_state = TrainState.create(critic, build_optimizer(experiment, stage, updates), jax.random.fold_in(key, 2))
    for config in [policy_config, critic_config] + ([reward] if reward_role is not None else []):
        validate_mesh_for_model(config, mesh)
    state_sharding = (state_shardings(policy_state, mesh), state_shardings(critic_state, mesh))
    policy_state, critic_state = place_state((policy_state, critic_state), state_sharding)
    reference = frozen_params(reference, reference_config.dtype)  # frozen roles in the compute dtype
    reference = place_state(reference, param_shardings(reference, mesh))
    reward_params = place_state(reward_params, param_shardings(reward_params, mesh))
    if stage.kl_target is None:
        controller = fixed_kl_controller(stage.kl_coef)
    else:
        controller = adaptive_kl_controller(stage.kl_coef, stage.kl_target, stage.kl_horizon)
    kl_state = controller.init()
    settings = SamplingSettings(max_new_tokens=stage.max_new_tokens, temperature=stage.temperature,
                                top_p=None if stage.top_p >= 1.0 else stage.top_p, top_k=stage.top_k or 0)
    sampler = Sampler(policy_config, mesh=mesh)

    checkpointer = Checkpointer(stage_dir / "checkpoints", experiment.checkpoint.every_steps,
                                experiment.checkpoint.keep_last)
    iteration, rng = 0, jax.random.fold_in(key, 3)
    # replicated over the mesh: checkpoints of several processes hold global arrays only
    rng = place_state(rng, replicated(mesh))
    kl_state = kl_state._replace(kl_coef=place_state(kl_state.kl_coef, replicated(mesh)))
    if checkpointer.latest_step() is not None:
        like = {"policy": policy_state, "critic": critic_state, "kl_coef": kl_state.kl_coef, "rng": rng}
        saved, host = checkpointer.restore(like)
        policy_state, critic_state, rng = saved["policy"], saved["critic"], saved["rng"]
        kl_state = kl_state._replace(kl_coef=saved["kl_coef"])
        iterator.set_state(host["data"])
        iteration = int(host["iteration"])

    experience_fn = jax.jit(functools.partial(ppo.make_experience, policy_config, critic_config, reward, hyper))
    update_fns: dict[int, object] = {}
    logger = MetricsLogger(stage_dir, tensorboard=experiment.logging.tensorboard, resume_step=iteration)
    last_metrics: dict[str, float] = {}
    with training_loop():
        while iteration < iterations:
            batch = next(iterator)
            rng, sample_key, shuffle_key = jax.random.split(rng, 3)
            prompt_tokens, prompt_mask = place_batch((batch["prompt_tokens"], batch["prompt_mask"]), mesh)
            start = time.perf_counter()
            sample = jax.block_until_ready(
                sampler(policy_state.params, prompt_tokens, prompt_mask, sample_key, settings))
            generated = time.perf_counter()
            if stage.offload_frozen:  # the frozen roles come back to the devices for the scoring pass only
                reference, reward_params = move_to_memory((reference, reward_params), "device")
            with use_mesh(mesh):
                experience, metrics = experience_fn(policy_state.params, reference, critic_state.params, reward_params,
                                                    prompt_tokens, prompt_mask, sample.response_tokens,
                                                    sample.response_mask, sample.ended_with_eos, kl_state.kl_coef)
            if stage.offload_frozen:
                reference, reward_params = move_to_memory((reference, reward_params), "pinned_host")
            metrics = jax.device_get(metrics)
            scored = time.perf_counter()
            prompt_length = prompt_tokens.shape[1]
            if prompt_length not in update_fns:
                update_fns[prompt_length] = shard_train_step(functools.partial(
                    ppo.ppo_update_step, policy_config, critic_config, hyper, prompt_length), state_sharding, mesh)
            update_fn = update_fns[prompt_length]
            epochs_done, update_metrics = 0, []
            for epoch_key in jax.random.split(shuffle_key, stage.ppo_epochs):
                for minibatch in ppo.minibatches(experience, epoch_key, stage.mini_batch_size):
                    policy_state, critic_state, step_metrics = update_fn(policy_state, critic_state,
                                                                         place_batch(minibatch, mesh))
                    update_metrics.append(jax.device_get(step_metrics))
                epochs_done += 1
                approx_kl = update_metrics[-1]["policy/approx_kl"]
                if stage.target_approx_kl is not None and approx_kl > stage.target_approx_kl:
                    break
            trained = time.perf_counter()
            kl_state = controller.update(kl_state, metrics["kl/mean"], stage.rollout_batch_size)
            iteration += 1
            new_tokens = float(jnp.sum(sample.response_lengths))  # a global array across processes
            metrics.update({name: float(np.mean([m[name] for m in update_metrics])) for name in update_metrics[0]})
            metrics.update({
                "policy/ratio_mean": float(np.mean([m["policy/ratio_mean"] for m in update_metrics])),
                "ppo/epochs": float(epochs_done),
                "time/generate": generated - start, "time/score": scored - generated, "time/train": trained - scored,
                "throughput/generate_tokens_per_s": new_tokens / max(generated - start, 1e-9),
                "throughput/tokens_per_s": new_tokens / max(trained - start, 1e-9),
            })
            check_finite_losses(metrics, iteration, stage.name)
            if iteration % max(experiment.logging.every_steps, 1) == 0 or iteration == iterations:
                last_metrics = logger.log(iteration, metrics)
                shown = ", ".join(f"{k}={last_metrics[k]:.4g}" for k in ("reward/mean", "kl/mean", "policy/clipfrac"))
                print(f"[{stage.name}] iteration {iteration}/{iterations}: {shown}", flush=True)
            sample_every = experiment.logging.sample_every
            if sample_every and (iteration % sample_every == 0 or iteration == 1):
                rows = multihost_utils.process_allgather(  # collective: every process's rows, for process 0 to write
                    (prompt_tokens, prompt_mask, sample.response_tokens, sample.response_lengths, experience.scores),
                    tiled=True)
                logger.log_samples(iteration, _samples(tokenizer, *rows, 4))
            state = {"policy": policy_state, "critic": critic_state, "kl_coef": kl_state.kl_coef, "rng": rng}
            host = {"data": iterator.get_state(), "iteration": iteration}
            if should_stop():
                checkpointer.save(iteration, state, host, force=checkpointer.latest_step() != iteration)
                checkpointer.close()
                logger.close()
                raise stopped(stage.name, iteration)
            checkpointer.save(iteration, state, host)
    state = {"policy": policy_state, "critic": critic_state, "kl_coef": kl_state.kl_coef, "rng": rng}
    if checkpointer.latest_step() != iteration:
        checkpointer.save(iteration, state, {"data": iterator.get_state(), "iteration": iteration}, force=True)
    checkpointer.close()
    logger.close()
    save_artifact(stage_dir / "model", policy_config, policy_state.params, tokenizer, "lm",
                  {"stage": stage.name, "iterations": iteration})
    from rlhf_jax.distributed import barrier, is_main_process
    from rlhf_jax.models.hf_io import save_hf

    host_params = multihost_utils.process_allgather(policy_state.params, tiled=True)  # collective
    if is_main_process():  # one writer: save_hf is a plain file write, not a collective one
        save_hf(stage_dir / "hf", policy_config, host_params, tokenizer)
    barrier("rlhf_jax.ppo.save_hf")
    write_summary(stage_dir, f"PPO stage '{stage.name}'", {"iterations": iteration, **last_metrics})


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
