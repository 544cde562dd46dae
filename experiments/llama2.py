"""Llama-2 7B/13B/70B shapes (random init) on HH-RLHF: pipelines for planning memory and meshes.

``llama2:<size>`` builds the architecture without weights; point ``model.source`` at a checkpoint
directory to train for real.

Defaults sized to the RLHF overview's table (docs/scale.md): PPO 7B on 4 A100-80GB, 13B on 8, 70B on 32; SFT
and RM 7B on 1, 13B on 2, 70B on 8. Every stage but DPO trains LoRA adapters (`LORA`: rank 16 on every
projection of the decoder layers) on a bf16 frozen base, so the reference is the policy's base and PPO's
critic is adapters + head on the reward model's own weights; the RL stages sample 64 sequences at a time
(`generation_batch_size`); remat on, 8 micro-batches (70B: 16, and the 70B reward model takes 32 pairs a
step), so on 1 / 2 / 8 devices SFT runs micro-batches of 8 sequences (70B: 4), the reward model of 8 pairs
(70B: 2).
`stages.<name>.lora.rank=0` trains fully.
"""

from dataclasses import replace

from experiments.paths import HH_HARMLESS_DEV, HH_HARMLESS_TRAIN, run_dir
from rlhf_jax.config import (
    DataConfig,
    DPOStage,
    PreferenceLoss,
    ExperimentConfig,
    GRPO_ALGORITHM,
    GRPOStage,
    LoRAConfig,
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


def _llama2(name: str, size: str, stages: tuple[Stage, ...], *, tensor: int = 1, micro_batches: int = 8):
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


# Adapters on the attention and MLP projections of every layer (QLoRA's choice; Dettmers et al. 2023).
LORA = LoRAConfig(rank=16, alpha=32.0, targets=("self_attn", "mlp"))
# Sequences the RL samplers generate at once: the KV cache holds 64 rows, not the whole rollout.
GENERATION_BATCH = 64


def _sft_and_rm(rm_batch_size: int | None = None) -> tuple[Stage, ...]:
    return (
        SFTStage(name="sft", learning_rate=2e-4, lora=LORA),
        RewardStage(name="rm", model="stage:sft", learning_rate=1e-4, lora=LORA, batch_size=rm_batch_size),
    )


def _ppo_stages(rm_batch_size: int | None = None) -> tuple[Stage, ...]:
    return (
        *_sft_and_rm(rm_batch_size),
        PPOStage(
            name="ppo", policy="stage:sft", reward_model="stage:rm", learning_rate=1e-5,
            rollout_batch_size=512, generation_batch_size=GENERATION_BATCH, max_new_tokens=256, lora=LORA,
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
    return _llama2("ppo_70b", "70b", _ppo_stages(rm_batch_size=32), tensor=8, micro_batches=16)


@register_experiment("dpo_7b", "SFT -> DPO with Llama-2-7B shapes on HH-RLHF (planning)")
def dpo_7b() -> ExperimentConfig:
    return _llama2("dpo_7b", "7b", (
        _sft_and_rm()[0],
        DPOStage(name="dpo", model="stage:sft", reference="stage:sft", learning_rate=5e-7, loss=PreferenceLoss(beta=0.1)),
    ))


@register_experiment("grpo_7b", "SFT -> reward model -> GRPO with Llama-2-7B shapes on HH-RLHF (planning)")
def grpo_7b() -> ExperimentConfig:
    return _llama2("grpo_7b", "7b", (
        *_sft_and_rm(),
        GRPOStage(
            name="grpo", policy="stage:sft", reward_model="stage:rm", learning_rate=1e-5,
            rollout_batch_size=64, generation_batch_size=GENERATION_BATCH, max_new_tokens=256, lora=LORA,
            algorithm=replace(GRPO_ALGORITHM, group_size=8),
        ),
    ))
