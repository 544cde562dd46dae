"""The AI-feedback stages, each beside its checks: a judge model labels preference pairs (RLAIF)."""

from typing import TYPE_CHECKING, ClassVar

from rlhf_jax.config.engine import _AT_LEAST_ONE, _check_range, _require
from rlhf_jax.config.names import StageKind
from rlhf_jax.config.shared import _config, _data_path, _source
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
