"""What every stage that samples its policy and scores the samples shares (the RL stages, RAFT, ReST,
best-of-n): the policy role (with LoRA: adapters trained, the base frozen), the weighted reward sources, the
prompts, the sampler, greedy held-out evaluation and the export of the trained policy.

    rollouts = load_rollouts(experiment, stage, resolve)
    sample = rollouts.generate(trainable, prompt_tokens, prompt_mask, key)        # the current policy
    scores, metrics = rollouts.score(prompt_tokens, prompt_mask, sample, references)

`group_rows` repeats each prompt `samples_per_prompt` times (the samples of a prompt are contiguous rows).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax.config.rl import with_shared_prefix
from rlhf_jax.errors import UserError
from rlhf_jax.models.lora import full_params, merged_params
from rlhf_jax.rewards import ModelReward, ScoringBatch, build_reward_sources, combine, source_scores
from rlhf_jax.sampling.sampler import Sampler, SamplingSettings
from rlhf_jax.sharding import (batch_shards, make_mesh, param_shardings, place_batch, place_state,
                               validate_mesh_for_model)
from rlhf_jax.stages.common import (Role, adapted_training, frozen_params, load_role, load_stage_dataset,
                                    require_tokenizer)
from rlhf_jax.training.artifacts import save_artifact


def check_same_tokenizer(policy_tokenizer, other_tokenizer, what: str) -> None:
    """Refuse a silent tokenizer mismatch between roles (scores of re-tokenized text are not supported)."""
    if other_tokenizer is None:
        return
    if policy_tokenizer.get_vocab() != other_tokenizer.get_vocab():
        raise UserError(f"{what}: its tokenizer differs from the policy's; the RL stages need roles that share one")


@dataclasses.dataclass
class Rollouts:
    """A sampling stage's roles and data. `trainable` is the policy's initial train params (the adapters under
    LoRA), `base` its frozen weights under LoRA (`{}` without): the policy is `full_params(base, trainable)`.
    `reward_role` is the first reward model among the sources (a PPO critic's default start), or None."""

    stage: Any
    mesh: Any
    policy_role: Role
    tokenizer: Any
    trainable: Any
    base: Any
    reward_sources: list
    reward_weights: tuple
    reward_role: Role | None
    prompts: Any
    eval_prompts: Any
    data: Any
    sampler: Sampler
    settings: SamplingSettings

    @property
    def config(self):
        return self.policy_role.config

    @property
    def reward_models(self) -> list[ModelReward]:
        return [source for source in self.reward_sources if isinstance(source, ModelReward)]

    def policy(self, trainable):
        """The params the sampler and the forward passes run (adapters applied, not merged)."""
        return full_params(self.base, trainable, self.stage.lora)

    def group_rows(self, prompt_tokens, prompt_mask, references) -> tuple:
        """Each prompt `samples_per_prompt` times, its samples contiguous rows."""
        group = self.stage.samples_per_prompt
        if group == 1:
            return prompt_tokens, prompt_mask, tuple(references)
        return (jnp.repeat(prompt_tokens, group, axis=0), jnp.repeat(prompt_mask, group, axis=0),
                tuple(reference for reference in references for _ in range(group)))

    def generate(self, trainable, prompt_tokens, prompt_mask, key, settings: SamplingSettings | None = None):
        """Sample the policy on prompt rows, `generation_batch_size` sequences at a time."""
        return self.sampler(self.policy(trainable), prompt_tokens, prompt_mask, key, settings or self.settings,
                            chunk_rows=getattr(self.stage, "generation_batch_size", None))

    def score(self, prompt_tokens, prompt_mask, sample, references) -> tuple[jax.Array, dict]:
        """(weighted raw scores [B], per-source `reward/<name>` metrics) of sampled rows."""
        shared = getattr(self.stage, "shared_prefix", False)  # the RL stages' groups, each prompt once
        batch = ScoringBatch(prompt_tokens, prompt_mask, sample.response_tokens, sample.response_mask,
                             tuple(references), self.stage.samples_per_prompt if shared else 1)
        return combine(self.reward_sources, self.reward_weights, batch)

    def prepare(self, batch: dict) -> dict:
        """A host batch of prompts on the mesh, with the reference answers of its prompts."""
        tokens, mask = place_batch((batch["prompt_tokens"], batch["prompt_mask"]), self.mesh)
        return {"prompt_tokens": tokens, "prompt_mask": mask,
                "references": tuple(self.prompts.examples[i].reference for i in np.asarray(batch["index"]))}

    def evaluator(self, rows: int):
        """`evaluate(trainable) -> eval/*` (`greedy_evaluation` on the eval prompts), or None without them."""
        if self.eval_prompts is None:
            return None
        greedy = dataclasses.replace(self.settings, greedy=True, temperature=1.0, top_p=None, top_k=0)

        def evaluate(trainable) -> dict:
            return greedy_evaluation(self.sampler, self.policy(trainable), self.eval_prompts, self.reward_sources,
                                     self.reward_weights, greedy, rows, self.mesh)

        return evaluate

    def export(self, stage_dir: Path, trainable, metadata: dict) -> None:
        """Write the trained policy (adapters merged) as the stage's model artifact and a Hugging Face folder."""
        from rlhf_jax.distributed import barrier, is_main_process
        from rlhf_jax.models.hf_io import save_hf

        params = merged_params(self.base, trainable, self.stage.lora)
        save_artifact(stage_dir / "model", self.config, params, self.tokenizer, "lm", metadata)
        host_params = multihost_utils.process_allgather(params, tiled=True)  # collective
        if is_main_process():  # one writer: save_hf is a plain file write, not a collective one
            save_hf(stage_dir / "hf", self.config, host_params, self.tokenizer)
        barrier(f"rlhf_jax.{self.stage.kind}.save_hf")


def load_rollouts(experiment, stage, resolve, key: jax.Array) -> Rollouts:
    """Load the policy (LoRA per `stage.lora`), the reward sources and the prompts of a sampling stage; the
    frozen roles (LoRA base, reward models) are placed on the stage's mesh in the compute dtype."""
    mesh = make_mesh(experiment.mesh)  # a bad mesh fails before the models load
    if getattr(stage, "shared_prefix", False) is None:  # an RL stage's default, decided for this mesh
        stage = with_shared_prefix(stage, experiment.optimizer.micro_batches, batch_shards(mesh))
    policy_role = load_role(experiment, stage.policy, resolve)
    tokenizer = require_tokenizer(policy_role, f"stages.{stage.name}.policy")
    if policy_role.kind != "lm":
        raise UserError(f"stages.{stage.name}.policy: expected a language model, got a reward/value model")
    reward_role = None

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
    for config in [policy_role.config] + [source.config for source in reward_sources
                                          if isinstance(source, ModelReward)]:
        validate_mesh_for_model(config, mesh)
    for source in reward_sources:
        if isinstance(source, ModelReward):
            source.params = place_state(source.params, param_shardings(source.params, mesh))
    trainable, frozen = adapted_training(stage, policy_role.params, policy_role.config.dtype,
                                         jax.random.fold_in(key, 5))
    base = place_state(frozen[0], param_shardings(frozen[0], mesh)) if frozen else {}
    prompts, eval_prompts, data = load_stage_dataset(experiment, stage, "prompt", tokenizer, resolve)
    settings = SamplingSettings(max_new_tokens=stage.max_new_tokens, temperature=stage.sampling_temperature,
                                top_p=None if stage.top_p >= 1.0 else stage.top_p, top_k=stage.top_k or 0)
    return Rollouts(stage=stage, mesh=mesh, policy_role=policy_role, tokenizer=tokenizer, trainable=trainable,
                    base=base, reward_sources=reward_sources, reward_weights=reward_weights,
                    reward_role=reward_role, prompts=prompts, eval_prompts=eval_prompts, data=data,
                    sampler=Sampler(policy_role.config, mesh=mesh), settings=settings)


def greedy_evaluation(sampler: Sampler, params, dataset, reward_sources, reward_weights,
                      settings: SamplingSettings, rows: int, mesh) -> dict[str, float]:
    """Greedy responses to every prompt of a held-out prompt `dataset`, scored by the stage's reward sources.

    Returns `eval/reward_mean` (their weighted sum, as in training; for an exact-answer reward such as
    `text:arith_exact` alone: the greedy exact-match accuracy), with several sources each one's mean raw
    score as `eval/reward/<name>`, `eval/response_length_mean` (tokens, EOS included) and `eval/eos_fraction`. Batches of `rows` prompts in dataset order; a short last batch
    repeats its last prompt (one shape) and the repeats are not counted.
    """
    from rlhf_jax.data import DataIterator

    batches = DataIterator(dataset, batch_size=min(rows, len(dataset)), shuffle=False, drop_remainder=False)
    scores, lengths, ended = [], [], []
    by_source: dict[str, list] = {source.name: [] for source in reward_sources}
    for batch in batches:
        count = len(batch["index"])
        fill = np.minimum(np.arange(batches.batch_size), count - 1)
        prompt_tokens, prompt_mask = place_batch((batch["prompt_tokens"][fill], batch["prompt_mask"][fill]), mesh)
        sample = sampler(params, prompt_tokens, prompt_mask, jax.random.key(0), settings)
        references = tuple(dataset.examples[int(batch["index"][row])].reference for row in fill)
        scoring = ScoringBatch(prompt_tokens, prompt_mask, sample.response_tokens, sample.response_mask, references)
        total, raw = source_scores(reward_sources, reward_weights, scoring)
        for name, values in raw.items():
            by_source[name].append(np.asarray(multihost_utils.process_allgather(values, tiled=True))[:count])
        scores.append(np.asarray(multihost_utils.process_allgather(total, tiled=True))[:count])
        lengths.append(np.asarray(multihost_utils.process_allgather(sample.response_lengths, tiled=True))[:count])
        ended.append(np.asarray(multihost_utils.process_allgather(sample.ended_with_eos, tiled=True))[:count])
    metrics = {"eval/reward_mean": float(np.mean(np.concatenate(scores))),
               "eval/response_length_mean": float(np.mean(np.concatenate(lengths))),
               "eval/eos_fraction": float(np.mean(np.concatenate(ended)))}
    if len(reward_sources) > 1:  # each objective on its own too, e.g. the accuracy beside a length penalty
        metrics.update({f"eval/reward/{name}": float(np.mean(np.concatenate(values)))
                        for name, values in by_source.items()})
    return metrics


def decoded_samples(tokenizer, prompt_tokens, prompt_mask, response_tokens, response_lengths, scores,
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
