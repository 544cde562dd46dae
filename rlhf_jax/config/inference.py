"""The stages that train nothing, each beside its checks: sample responses, evaluate a policy."""

from typing import TYPE_CHECKING, ClassVar

from rlhf_jax.config.engine import (
    _AT_LEAST_ONE,
    _NON_NEGATIVE,
    _POSITIVE,
    _PROBABILITY_MASS,
    _check_range,
    _require,
)
from rlhf_jax.config.names import DataFormat, StageKind
from rlhf_jax.config.shared import _config, _path, _source
from rlhf_jax.config.stage import Stage

if TYPE_CHECKING:
    from rlhf_jax.config.experiment import ExperimentConfig


@_config
class GenerateStage(Stage):
    """Sample responses for prompts; writes ``<run_dir>/<name>/generations.jsonl``."""

    kind: ClassVar[StageKind] = StageKind.GENERATE
    model: str | None = _source("language_model", default=None)  # None: model.source
    prompts: str = _path()  # a file of prompts
    prompts_format: DataFormat = DataFormat.HH
    num_prompts: int | None = None  # the first N prompts; None: all
    batch_size: int | None = None  # prompts per sampler call; None: data.batch_size
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int | None = None  # None: off
    greedy: bool = False  # argmax decoding; ignores temperature/top_p/top_k
    num_samples: int = 1  # responses per prompt
    stop: tuple[str, ...] = ()  # stop strings, e.g. "\n\nHuman:"


def _check_generate(stage: GenerateStage, prefix: str, config: "ExperimentConfig") -> None:
    _require(bool(stage.prompts.strip()), prefix + "prompts", stage.prompts, "a prompts file path")
    _check_range(stage, prefix, {
        "num_prompts": _AT_LEAST_ONE, "batch_size": _AT_LEAST_ONE, "max_new_tokens": _AT_LEAST_ONE,
        "temperature": _POSITIVE, "top_p": _PROBABILITY_MASS, "top_k": _AT_LEAST_ONE,
        "num_samples": _AT_LEAST_ONE,
    })
    if stage.greedy:
        _require(stage.num_samples == 1, prefix + "num_samples", stage.num_samples,
                 "1 when greedy=true (greedy samples are all the same)")
    for stop in stage.stop:
        _require(bool(stop), prefix + "stop", stage.stop, "non-empty stop strings")


@_config
class EvaluateStage(Stage):
    """Score a policy on held-out prompts: reward, KL to a reference, length, samples (``evaluation.json``).

    ``baseline`` names an earlier evaluate stage; the summary then shows before -> after for each metric.
    """

    kind: ClassVar[StageKind] = StageKind.EVALUATE
    model: str | None = _source("language_model", default=None)  # None: model.source
    reward_model: str = _source("reward_model")  # a reward stage / model, fn:NAME[:ARG...] or text:NAME[:ARG...]
    reference: str | None = _source("language_model", default=None)  # None: no KL column
    prompts: str = _path()  # a file of prompts (HH pairs give their prompts)
    prompts_format: DataFormat = DataFormat.HH
    num_prompts: int = 64  # the first N prompts
    batch_size: int = 8
    max_prompt_length: int = 512  # prompt tokens kept (the latest turns)
    max_new_tokens: int = 128
    temperature: float = 1.0
    greedy: bool = False
    samples: int = 3  # example generations kept in the report
    baseline: str | None = None  # an earlier evaluate stage to compare with


def _check_evaluate(stage: EvaluateStage, prefix: str, config: "ExperimentConfig") -> None:
    _require(bool(stage.prompts.strip()), prefix + "prompts", stage.prompts, "a prompts file path")
    _check_range(stage, prefix, {
        "num_prompts": _AT_LEAST_ONE, "batch_size": _AT_LEAST_ONE, "max_prompt_length": _AT_LEAST_ONE,
        "max_new_tokens": _AT_LEAST_ONE, "temperature": _POSITIVE, "samples": _NON_NEGATIVE,
    })
    if stage.baseline is not None:
        names = config.stage_names()
        earlier = names[: names.index(stage.name)]
        _require(stage.baseline in earlier and config.stage(stage.baseline).kind is StageKind.EVALUATE,
                 prefix + "baseline", stage.baseline, "the name of an earlier evaluate stage")
