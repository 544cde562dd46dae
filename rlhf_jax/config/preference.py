"""Preference optimisation (DPO and its family): the loss config and the stage, beside their checks."""

import dataclasses
from typing import TYPE_CHECKING, ClassVar

from rlhf_jax.config.engine import _FINITE, _NON_NEGATIVE, _POSITIVE, _check_range, _require, _suggest
from rlhf_jax.config.names import StageKind
from rlhf_jax.config.shared import LoRAConfig, _check_lora, _config, _source
from rlhf_jax.config.stage import _TrainingStage
from rlhf_jax.config.supervised import _check_supervised

if TYPE_CHECKING:
    from rlhf_jax.config.experiment import ExperimentConfig


@_config
class PreferenceLoss:
    """The loss of a preference-optimisation stage, handed to the train step as it is.

    ``type`` names an entry of `rlhf_jax.losses.preference.PREFERENCE_LOSSES` (sigmoid, hinge, ipo, simpo, cpo,
    orpo, and any entry added there); its per-pair function reads the fields that are its keywords, and every
    other field must keep its default. The table itself is the only list of types: a loss added to it is
    selectable here with nothing else to change.
    """

    type: str = "sigmoid"  # sigmoid (DPO, cDPO), hinge (SLiC), ipo, simpo, cpo, orpo: the loss table's names
    beta: float = 0.1  # scale of the implicit reward (DPO 0.1; SimPO's paper uses 2.0-2.5)
    label_smoothing: float = 0.0  # flipped-label rate ε of cDPO; sigmoid, simpo, cpo; in [0, 0.5)
    length_normalised: bool = False  # per-token log-ratio margin (TRL's ipo, sigmoid_norm); sigmoid, hinge, ipo
    gamma: float = 0.5  # SimPO's target reward margin γ
    nll_coef: float | None = None  # weight of the chosen side's token-mean NLL (RPO's α); None: 1 for cpo, orpo


def preference_loss_table() -> dict[str, tuple[tuple[str, ...], bool]]:
    """``{type: (fields its function reads, needs a frozen reference)}`` from the loss table itself.

    Imported when a preference stage is checked, not when the config package is: the rest of the config reads
    no jax.
    """
    from rlhf_jax.losses.preference import PREFERENCE_LOSSES, preference_hyperparameters

    return {name: (preference_hyperparameters(name), kind.needs_reference)
            for name, kind in PREFERENCE_LOSSES.items()}


def _check_preference_loss(loss: PreferenceLoss, prefix: str) -> None:
    table = preference_loss_table()
    _require(loss.type in table, prefix + "type", loss.type,
             f"one of {', '.join(table)}{_suggest(str(loss.type), list(table))}")
    _check_range(loss, prefix, {
        "beta": _POSITIVE, "label_smoothing": (lambda v: 0 <= v < 0.5, "a number in [0, 0.5)"), "gamma": _FINITE,
        "nll_coef": _NON_NEGATIVE,
    })
    reads = table[loss.type][0]
    for field in dataclasses.fields(loss):
        if field.name in ("type", "nll_coef") or field.name in reads:
            continue
        value = getattr(loss, field.name)
        readers = [name for name, (names, _) in table.items() if field.name in names]
        _require(value == field.default, prefix + field.name, value,
                 f"{field.default!r} with type={loss.type} (only {', '.join(readers) or 'no type'} read it)")


@_config
class DPOStage(_TrainingStage):
    """Preference optimisation on (chosen, rejected) pairs: DPO and its family (``loss.type``); a frozen
    reference is loaded only for the losses that need one."""

    kind: ClassVar[StageKind] = StageKind.DPO
    model: str | None = _source("language_model", default=None)  # None: model.source
    reference: str | None = _source("language_model", default=None)  # None: the same as `model`
    batch_size: int | None = None  # pairs per step; None: data.batch_size
    loss: PreferenceLoss = PreferenceLoss()
    lora: LoRAConfig = LoRAConfig()  # lora.rank > 0: train adapters only; the reference is the base itself
    # the reference's log-probs of every training pair in one pass before the first step, then looked up
    # (TRL's precompute_ref_log_probs): each step skips the reference forward; False: computed per batch
    precompute_reference: bool = False
    # each pair in one row, the prompt both sides begin with computed once (`data.batching.share_prefixes`):
    # the same log-probs and gradients from fewer tokens (62% of the two sequences' on HH pairs); the held-out
    # evaluation and precompute_reference's pass score the pairs this way too
    shared_prefix: bool = False


def _check_dpo(stage: DPOStage, prefix: str, config: "ExperimentConfig") -> None:
    _check_supervised(stage, prefix, config)
    _check_lora(stage.lora, prefix + "lora.")
    _check_preference_loss(stage.loss, prefix + "loss.")
    if not preference_loss_table()[stage.loss.type][1]:
        _require(stage.reference is None, prefix + "reference", stage.reference,
                 f"None with loss.type={stage.loss.type} (a reference-free loss)")
        _require(not stage.precompute_reference, prefix + "precompute_reference", stage.precompute_reference,
                 f"false with loss.type={stage.loss.type} (a reference-free loss)")


@_config
class KTOLoss:
    """KTO's loss (Ethayarajh et al. 2024; `rlhf_jax.losses.kto`), handed to the train step as it is: its fields
    are the keywords of `losses.kto_per_example` (tests/test_config_tables.py checks that they agree)."""

    beta: float = 0.1  # scale of the implicit reward β (log π − log π_ref), as TRL's KTOConfig
    desirable_weight: float = 1.0  # λ_D; the paper advises λ_D n_D / (λ_U n_U) in [1, 4/3]
    undesirable_weight: float = 1.0  # λ_U


def _check_kto_loss(loss: KTOLoss, prefix: str) -> None:
    _check_range(loss, prefix, {"beta": _POSITIVE, "desirable_weight": _NON_NEGATIVE,
                                "undesirable_weight": _NON_NEGATIVE})
    _require(loss.desirable_weight > 0 or loss.undesirable_weight > 0, prefix + "desirable_weight",
             loss.desirable_weight, f"a number > 0 when {prefix}undesirable_weight is 0 (one side must count)")


@_config
class KTOStage(_TrainingStage):
    """KTO on unpaired binary feedback: (prompt, response, label) examples, or preference pairs read as two
    examples each (chosen desirable, rejected undesirable); a frozen reference, the policy's starting weights
    unless named (under LoRA, the base itself)."""

    kind: ClassVar[StageKind] = StageKind.KTO
    model: str | None = _source("language_model", default=None)  # None: model.source
    reference: str | None = _source("language_model", default=None)  # None: the same as `model`
    batch_size: int | None = None  # examples per step, at least 2; None: data.batch_size
    loss: KTOLoss = KTOLoss()
    lora: LoRAConfig = LoRAConfig()  # lora.rank > 0: train adapters only; the reference is the base itself


def _check_kto(stage: KTOStage, prefix: str, config: "ExperimentConfig") -> None:
    _check_supervised(stage, prefix, config)
    _check_lora(stage.lora, prefix + "lora.")
    _check_kto_loss(stage.loss, prefix + "loss.")
    key, batch = ((prefix + "batch_size", stage.batch_size) if stage.batch_size is not None
                  else ("data.batch_size", config.data.batch_size))
    # z is the batch mean of mismatched log-ratios: of one example, its own log-ratio (TRL refuses it too)
    _require(batch >= 2, key, batch, f"at least 2 examples per step for KTO stage {stage.name!r} (its reference "
                                     "point is a mean over the batch)")
