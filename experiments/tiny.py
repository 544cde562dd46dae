"""Tiny random-init models on real HH data: smoke tests of the whole pipeline in seconds on a CPU."""

import dataclasses
from dataclasses import replace

from experiments.paths import HH_HARMLESS_DEV, HH_HARMLESS_TRAIN, HH_STOP, run_dir
from rlhf_jax.config import (
    BestOfNStage,
    CheckpointConfig,
    DataConfig,
    DPOStage,
    PreferenceLoss,
    ExperimentConfig,
    GenerateStage,
    GRPO_ALGORITHM,
    GRPOStage,
    ReinforceStage,
    RLOO_ALGORITHM,
    RLOOStage,
    LoggingConfig,
    ModelSpec,
    OptimizerConfig,
    PPO_ALGORITHM,
    PPOStage,
    RAFTStage,
    REINFORCE_ALGORITHM,
    ReSTStage,
    RewardStage,
    Schedule,
    SFTStage,
)
from rlhf_jax.registry import register_experiment

_TINY_DATA = DataConfig(path=HH_HARMLESS_TRAIN, max_prompt_length=48, max_length=96, batch_size=4, max_examples=64)
_TINY_OPTIMIZER = OptimizerConfig(learning_rate=1e-3, schedule=Schedule.CONSTANT)
_TINY_CHECKPOINT = CheckpointConfig(every_steps=4, keep_last=1)
_TINY_LOGGING = LoggingConfig(every_steps=1, sample_every=None)


def _tiny(name: str, stages: tuple, data: DataConfig = _TINY_DATA) -> ExperimentConfig:
    """A tiny random Llama with SmolLM2's tokenizer on the real HH data, logging every step."""
    return ExperimentConfig(name=name, run_dir=run_dir(name), model=ModelSpec(source="tiny:smollm2"), data=data,
                            optimizer=_TINY_OPTIMIZER, checkpoint=_TINY_CHECKPOINT, logging=_TINY_LOGGING,
                            stages=stages)


@register_experiment("tiny_sft", "SFT of a tiny random Llama on HH-RLHF for 8 steps (smoke test)")
def tiny_sft() -> ExperimentConfig:
    return _tiny("tiny_sft", (SFTStage(name="sft", max_steps=8),))


@register_experiment("tiny_dpo", "DPO of a tiny random Llama on HH-RLHF pairs for 8 steps, 16 held out (smoke test)")
def tiny_dpo() -> ExperimentConfig:
    return _tiny("tiny_dpo", (DPOStage(name="dpo", max_steps=8, loss=PreferenceLoss(beta=0.1)),),
                 data=dataclasses.replace(_TINY_DATA, max_examples=80, eval_fraction=0.2))


@register_experiment("tiny_pipeline", "SFT -> reward model -> PPO on a tiny random Llama (smoke test)")
def tiny_pipeline() -> ExperimentConfig:
    return _tiny("tiny_pipeline", (
        SFTStage(name="sft", max_steps=8),
        RewardStage(name="rm", model="stage:sft", max_steps=8),
        PPOStage(
            name="ppo", policy="stage:sft", reward_model="stage:rm", learning_rate=1e-4, max_steps=2,
            rollout_batch_size=8, max_new_tokens=16,
            algorithm=replace(PPO_ALGORITHM, mini_batch_size=4, update_epochs=2),
        ),
        GenerateStage(
            name="samples", model="stage:ppo", prompts=HH_HARMLESS_DEV, num_prompts=4, max_new_tokens=16,
            stop=HH_STOP,
        ),
    ))


@register_experiment("tiny_ppo", "PPO alone on a tiny random Llama with a programmatic reward, 6 iterations (smoke "
                                 "and fault-injection test)")
def tiny_ppo() -> ExperimentConfig:
    return _tiny("tiny_ppo", (
        PPOStage(
            name="ppo", reward_model="fn:length:0.1", critic="tiny:smollm2", learning_rate=1e-4, max_steps=6,
            rollout_batch_size=8, max_new_tokens=16,
            algorithm=replace(PPO_ALGORITHM, mini_batch_size=4, update_epochs=2),
        ),
    ))


@register_experiment("tiny_grpo", "GRPO on a tiny random Llama, 4 samples per prompt, a programmatic reward, 8 "
                                  "iterations (smoke and exact-resume test)")
def tiny_grpo() -> ExperimentConfig:
    return _tiny("tiny_grpo", (
        GRPOStage(
            name="grpo", reward_model="fn:token_id_below:24576", learning_rate=3e-3, max_steps=8,
            rollout_batch_size=4, max_new_tokens=16,
            algorithm=replace(GRPO_ALGORITHM, group_size=4, mini_batch_size=8, update_epochs=2),
        ),
    ))


@register_experiment("tiny_rloo", "RLOO on a tiny random Llama, 4 samples per prompt, a programmatic reward (smoke test)")
def tiny_rloo() -> ExperimentConfig:
    return _tiny("tiny_rloo", (
        RLOOStage(name="rloo", reward_model="fn:token_id_below:24576", learning_rate=3e-3, max_steps=4,
                  rollout_batch_size=4, max_new_tokens=16,
                  algorithm=replace(RLOO_ALGORITHM, group_size=4, mini_batch_size=8, update_epochs=2)),
    ))


@register_experiment("tiny_reinforce", "REINFORCE (batch-mean baseline) on a tiny random Llama, a programmatic "
                                       "reward (smoke test)")
def tiny_reinforce() -> ExperimentConfig:
    return _tiny("tiny_reinforce", (
        ReinforceStage(name="reinforce", reward_model="fn:token_id_below:24576", learning_rate=3e-3, max_steps=4,
                       rollout_batch_size=8, max_new_tokens=16,
                       algorithm=replace(REINFORCE_ALGORITHM, mini_batch_size=8)),
    ))


@register_experiment("tiny_raft", "RAFT on a tiny random Llama: best of 4 samples per prompt, then SFT on the winners, "
                                  "4 iterations (smoke and exact-resume test)")
def tiny_raft() -> ExperimentConfig:
    return _tiny("tiny_raft", (
        RAFTStage(name="raft", reward_model="fn:token_id_below:24576", learning_rate=3e-3, max_steps=4,
                  rollout_batch_size=4, num_samples=4, max_new_tokens=16, sft_batch_size=4, sft_epochs=2),
    ))


@register_experiment("tiny_rest", "ReST on a tiny random Llama: Grow 4 x 4 samples, Improve at rising thresholds, "
                                  "3 iterations (smoke and exact-resume test)")
def tiny_rest() -> ExperimentConfig:
    return _tiny("tiny_rest", (
        ReSTStage(name="rest", reward_model="fn:token_id_below:24576", learning_rate=3e-3, max_steps=3,
                  rollout_batch_size=4, num_samples=4, max_new_tokens=16, sft_batch_size=4,
                  thresholds=(0.3, 0.5, 0.6)),
    ))


@register_experiment("tiny_best_of_n", "Best-of-4 on 8 held-out HH prompts with a tiny random Llama (smoke test)")
def tiny_best_of_n() -> ExperimentConfig:
    return _tiny("tiny_best_of_n", (
        BestOfNStage(name="best_of_n", reward_model="fn:token_id_below:24576", num_prompts=8, num_samples=4,
                     rollout_batch_size=4, max_new_tokens=16),
    ), data=replace(_TINY_DATA, eval_fraction=0.25))
