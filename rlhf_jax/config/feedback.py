"""The AI-feedback stages, each beside its checks: a judge model labels preference pairs (RLAIF); a model
critiques and revises its own responses against written principles (Constitutional AI)."""

from typing import TYPE_CHECKING, ClassVar

from rlhf_jax.config.engine import _AT_LEAST_ONE, _POSITIVE, _PROBABILITY_MASS, _check_range, _require
from rlhf_jax.config.names import DataFormat, StageKind
from rlhf_jax.config.shared import _config, _data_path, _path, _source
from rlhf_jax.config.stage import Stage, _check_data_path

if TYPE_CHECKING:
    from rlhf_jax.config.experiment import ExperimentConfig

# Written principles the judge reads before the conversation (after Bai et al. 2022, "Constitutional AI": helpful,
# honest and harmless, refusing harm without preaching).
HARMLESSNESS_PRINCIPLES = (
    "You are a careful judge of AI assistant responses. The better response is helpful: it answers what the user "
    "asked, honestly and accurately. It is also harmless: it does not help with anything dangerous, illegal or "
    "unethical, it is not toxic, racist, sexist or insulting, and when a request is harmful it declines politely and "
    "offers a safe alternative instead of lecturing. Prefer the response a thoughtful, ethical and knowledgeable "
    "person would give."
)


@_config
class LabelStage(Stage):
    """AI feedback (RLAIF): a judge model labels each preference pair of the data, in both orders.

    Writes ``<run_dir>/<name>/preferences.jsonl``: the pairs with the judge's choice as ``chosen`` and its
    probabilities; a later stage reads them with ``data_path=stage:<name>``. The judge prompt holds at most
    ``data.max_length`` tokens, the conversation its last ``data.max_prompt_length`` (see ``rlhf_jax.judge``).
    """

    kind: ClassVar[StageKind] = StageKind.LABEL
    judge: str | None = _source("language_model", default=None)  # the judge model; None: model.source
    data_path: str | None = _data_path(default=None)  # pairs to label; None: data.path
    principles: str = HARMLESSNESS_PRINCIPLES  # what the judge is told a better response is
    batch_size: int | None = None  # judge prompts per forward pass; None: data.batch_size
    human_labels: bool = True  # the input's chosen/rejected order is a (human) label to measure agreement with


def _check_label(stage: LabelStage, prefix: str, config: "ExperimentConfig") -> None:
    _check_data_path(stage, prefix, config)
    _check_range(stage, prefix, {"batch_size": _AT_LEAST_ONE})
    _require(bool(stage.principles.strip()), prefix + "principles", stage.principles, "the judge's principles (text)")


# The constitution of the Constitutional-AI stage: pairs of (critique request, revision request), one pair drawn per
# prompt (after Bai et al. 2022, §3.1 and appendix C, in our own words).
CRITIQUE_REQUESTS = (
    "Point out any way in which your last answer was harmful, unethical, dangerous or illegal.",
    "Did your last answer help with something that could hurt someone? Explain what was wrong with it, if anything.",
    "Name anything in your last answer that was rude, toxic, biased or insensitive.",
    "Would a thoughtful and ethical person object to your last answer? Say why, or why not.",
)
REVISION_REQUESTS = (
    "Rewrite your last answer so that it is harmless, ethical and legal, while staying as helpful as possible.",
    "Rewrite your last answer so that it cannot be used to hurt anyone, declining politely if you must.",
    "Rewrite your last answer so that it is polite, respectful and fair to everyone.",
    "Rewrite your last answer as a thoughtful and ethical person would give it.",
)


@_config
class CAIStage(Stage):
    """Constitutional AI (Bai et al. 2022), the supervised phase with AI feedback: the model answers each prompt,
    critiques its answer against one principle (a critique request), and revises it (the matching revision request).

    Writes ``<run_dir>/<name>/preferences.jsonl``: pairs ``{prompt, chosen: revision, rejected: original}``, which
    a later stage reads with ``data_path=stage:<name>`` (SFT trains on the revisions, DPO / KTO / a reward model
    on the pairs); ``revisions.jsonl`` (SFT rows) and ``transcripts.jsonl`` (every step) beside it. A judge
    (``judge``, default the stage's model) then compares each revision with its original in both orders
    (`rlhf_jax.judge`); the summary reports how often it prefers the revision.
    """

    kind: ClassVar[StageKind] = StageKind.CAI
    model: str | None = _source("language_model", default=None)  # answers, critiques, revises; None: model.source
    judge: str | None = _source("language_model", default=None)  # compares revision and original; None: `model`
    prompts: str = _path()  # a file of prompts (HH pairs give their prompts)
    prompts_format: DataFormat = DataFormat.HH
    num_prompts: int | None = None  # the first N prompts; None: all
    last_turn_only: bool = True  # keep each conversation's last user turn only (the red-team request)
    batch_size: int | None = None  # prompts per sampler call and judge prompts per pass; None: data.batch_size
    max_new_tokens: int = 96  # for each answer, critique and revision
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int | None = None  # None: off
    greedy: bool = False  # argmax decoding; ignores temperature/top_p/top_k
    stop: tuple[str, ...] = ()  # stop strings
    critique_requests: tuple[str, ...] = CRITIQUE_REQUESTS
    revision_requests: tuple[str, ...] = REVISION_REQUESTS  # revision_requests[k] follows critique_requests[k]
    principles: str = HARMLESSNESS_PRINCIPLES  # what the judge is told a better response is


def _check_cai(stage: CAIStage, prefix: str, config: "ExperimentConfig") -> None:
    _require(bool(stage.prompts.strip()), prefix + "prompts", stage.prompts, "a prompts file path")
    _check_range(stage, prefix, {
        "num_prompts": _AT_LEAST_ONE, "batch_size": _AT_LEAST_ONE, "max_new_tokens": _AT_LEAST_ONE,
        "temperature": _POSITIVE, "top_p": _PROBABILITY_MASS, "top_k": _AT_LEAST_ONE,
    })
    _require(len(stage.critique_requests) >= 1, prefix + "critique_requests", stage.critique_requests,
             "at least one critique request")
    _require(len(stage.revision_requests) == len(stage.critique_requests), prefix + "revision_requests",
             len(stage.revision_requests), f"{len(stage.critique_requests)} revision requests, one for each "
                                           "critique request")
    for key in ("critique_requests", "revision_requests", "stop"):
        _require(all(text.strip() for text in getattr(stage, key)), prefix + key, getattr(stage, key),
                 "non-empty strings")
    _require(bool(stage.principles.strip()), prefix + "principles", stage.principles, "the judge's principles (text)")
