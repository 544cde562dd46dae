"""The supervised stages, each beside its checks: SFT on demonstrations, a reward model on preference pairs."""

from typing import TYPE_CHECKING, Any, ClassVar

from rlhf_jax.config.engine import _AT_LEAST_ONE, _NON_NEGATIVE, _check_range, _require
from rlhf_jax.config.names import StageKind
from rlhf_jax.config.shared import LoRAConfig, _check_lora, _config, _source
from rlhf_jax.config.stage import _check_batch, _check_training, _TrainingStage

if TYPE_CHECKING:
    from rlhf_jax.config.experiment import ExperimentConfig


@_config
class SFTStage(_TrainingStage):
    """Supervised fine-tuning on demonstrations (for HH data, the ``chosen`` side)."""

    kind: ClassVar[StageKind] = StageKind.SFT
    model: str | None = _source("language_model", default=None)  # None: model.source
    batch_size: int | None = None  # None: data.batch_size
    completion_only_loss: bool = True  # loss on response tokens only, not the prompt
    packing: bool = False  # pack several sequences per row (segment-aware attention)
    # packing: each packed batch chooses from the next `pack_lookahead` sequences not yet placed, in the shuffled
    # order (`data.batching.plan_packed_batches`); None: the data iterator's default, 256. Fewer keeps the
    # shuffled order closer and fills the rows less: on HH in 8 rows of 256, 32 fill 91% of the slots, 256 94%
    pack_lookahead: int | None = None
    # each batch's examples packed into the fewest rows that hold them (`data.batching.pack_whole`): the same
    # examples per step and the same loss as padded rows, without computing the padding (TRL's padding_free)
    padding_free: bool = False
    lora: LoRAConfig = LoRAConfig()  # lora.rank > 0: train adapters only, write the merged model


@_config
class RewardStage(_TrainingStage):
    """A Bradley-Terry reward model trained on preference pairs (a scalar head on an LM)."""

    kind: ClassVar[StageKind] = StageKind.REWARD
    model: str | None = _source("any_model", default=None)  # initial weights; None: model.source
    batch_size: int | None = None  # pairs per step; None: data.batch_size
    center_rewards_coef: float = 0.0  # penalty on (r_c + r_r)^2, scores near 0; at 0 the head bias is fixed
    freeze_backbone: bool = False  # train the reward head only: a linear probe on frozen features (cheap on CPU)
    # each pair in one row, the prompt both sides begin with computed once (`data.batching.share_prefixes`):
    # the same rewards and gradients, 62% of the tokens on HH pairs; the final evaluation scores the pairs so too
    shared_prefix: bool = False
    lora: LoRAConfig = LoRAConfig()  # lora.rank > 0: train adapters and the head only, write the merged model


def _check_supervised(stage: Any, prefix: str, config: "ExperimentConfig") -> None:
    """A training stage with its own optional `batch_size` (SFT, reward, DPO)."""
    _check_training(stage, prefix, config)
    _check_range(stage, prefix, {"batch_size": _AT_LEAST_ONE})
    if stage.batch_size is None:  # the batch it runs with: `stage_data(config, stage).batch_size`
        _check_batch(config.data.batch_size, "data.batch_size", config)
    else:
        _check_batch(stage.batch_size, prefix + "batch_size", config)


def _check_sft(stage: SFTStage, prefix: str, config: "ExperimentConfig") -> None:
    _check_supervised(stage, prefix, config)
    _require(not (stage.padding_free and stage.packing), prefix + "padding_free", stage.padding_free,
             "false with packing=true (packing already fills every row from the whole dataset)")
    if stage.pack_lookahead is not None:
        _require(stage.packing, prefix + "pack_lookahead", stage.pack_lookahead,
                 "unset without packing=true (it only orders packed batches)")
        rows = stage.batch_size or config.data.batch_size
        _require(stage.pack_lookahead >= rows, prefix + "pack_lookahead", stage.pack_lookahead,
                 f"at least the batch's {rows} rows (a packed batch holds only sequences from the next pack_lookahead)")
    _check_lora(stage.lora, prefix + "lora.")


def _check_reward(stage: RewardStage, prefix: str, config: "ExperimentConfig") -> None:
    _check_supervised(stage, prefix, config)
    _check_range(stage, prefix, {"center_rewards_coef": _NON_NEGATIVE})
    _check_lora(stage.lora, prefix + "lora.")
    _require(not (stage.freeze_backbone and stage.lora.rank > 0), prefix + "lora.rank", stage.lora.rank,
             "0 with freeze_backbone=true (a frozen backbone takes no adapters)")
