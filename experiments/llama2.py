"""Llama-2 7B/13B/70B shapes (random init) on HH-RLHF: pipelines for planning memory and meshes.

``llama2:<size>`` builds the architecture without weights; point ``model.source`` at a checkpoint
directory to train for real.
"""

from dataclasses import replace

from experiments.paths import HH_HARMLESS_DEV, HH_HARMLESS_TRAIN, run_dir
from rlhf_jax.config import (
    DataConfig,
    DPOStage,
    ExperimentConfig,
    GRPO_ALGORITHM,
    GRPOStage,
    MeshConfig,
    ModelSpec,
    OptimizerConfig,
    PPO_ALGORITHM,
    PPOStage,
    RewardStage,
    Schedule,
    SFTStage,
    Stage,
)
from rlhf_jax.registry import register_experiment


def _llama2(name: str, size: str, stages: tuple[Stage, ...], *, tensor: int = 1, micro_batches: int = 4):
    return ExperimentConfig(
        name=name,
        run_dir=run_dir(name),
        model=ModelSpec(source=f"llama2:{size}", dtype="bfloat16", param_dtype="float32", remat=True),
        data=DataConfig(path=HH_HARMLESS_TRAIN, eval_path=HH_HARMLESS_DEV, max_prompt_length=512, max_length=1024,
                        batch_size=64),
        optimizer=OptimizerConfig(learning_rate=1e-5, schedule=Schedule.COSINE, warmup_steps=20,
                                  micro_batches=micro_batches),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=tensor),
        stages=stages,
    )


def _ppo_stages() -> tuple[Stage, ...]:
    return (
        SFTStage(name="sft", learning_rate=2e-5),
        RewardStage(name="rm", model="stage:sft", learning_rate=9e-6),
        PPOStage(
            name="ppo", policy="stage:sft", reward_model="stage:rm", learning_rate=1e-6,
            rollout_batch_size=512, max_new_tokens=256,
            algorithm=replace(PPO_ALGORITHM, mini_batch_size=64, kl_target=6.0),
        ),
    )


@register_experiment("ppo_7b", "SFT -> reward model -> PPO with Llama-2-7B shapes on HH-RLHF (planning)")
def ppo_7b() -> ExperimentConfig:
    return _llama2("ppo_7b", "7b", _ppo_stages())


@register_experiment("ppo_13b", "SFT -> reward model -> PPO with Llama-2-13B shapes on HH-RLHF (planning)")
def ppo_13b() -> ExperimentConfig:
    return _llama2("ppo_13b", "13b", _ppo_stages())


@register_experiment("ppo_70b", "SFT -> reward model -> PPO with Llama-2-70B shapes, 8-way tensor parallel (planning)")
def ppo_70b() -> ExperimentConfig:
    return _llama2("ppo_70b", "70b", _ppo_stages(), tensor=8, micro_batches=8)


@register_experiment("dpo_7b", "SFT -> DPO with Llama-2-7B shapes on HH-RLHF (planning)")
def dpo_7b() -> ExperimentConfig:
    return _llama2("dpo_7b", "7b", (
        SFTStage(name="sft", learning_rate=2e-5),
        DPOStage(name="dpo", model="stage:sft", reference="stage:sft", learning_rate=5e-7, beta=0.1),
    ))


@register_experiment("grpo_7b", "SFT -> reward model -> GRPO with Llama-2-7B shapes on HH-RLHF (planning)")
def grpo_7b() -> ExperimentConfig:
    return _llama2("grpo_7b", "7b", (
        SFTStage(name="sft", learning_rate=2e-5),
        RewardStage(name="rm", model="stage:sft", learning_rate=9e-6),
        GRPOStage(
            name="grpo", policy="stage:sft", reward_model="stage:rm", learning_rate=1e-6,
            rollout_batch_size=64, max_new_tokens=256, algorithm=replace(GRPO_ALGORITHM, group_size=8),
        ),
    ))
