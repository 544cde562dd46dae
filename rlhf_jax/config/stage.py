"""The base of every stage, and the fields and checks that every training stage shares."""

from typing import TYPE_CHECKING, ClassVar

from rlhf_jax.config.engine import (
    _AT_LEAST_ONE,
    _POSITIVE,
    _check_range,
    _require,
    fixed,
)
from rlhf_jax.config.names import StageKind
from rlhf_jax.config.shared import _config, _data_path

if TYPE_CHECKING:
    from rlhf_jax.config.experiment import ExperimentConfig


@_config
class Stage:
    """A step of a pipeline; its outputs go to ``<run_dir>/<name>``."""

    kind: ClassVar[StageKind]
    # addresses the stage in overrides (stages.<name>.KEY=VALUE) and in references (stage:<name>)
    name: str = fixed("a stage's name is fixed by the experiment")


@_config
class _TrainingStage(Stage):
    """Fields every training stage has; ``None`` inherits the shared setting."""

    data_path: str | None = _data_path(default=None)  # None: data.path; stage:<name>: the data that stage wrote
    learning_rate: float | None = None  # None: optimizer.learning_rate
    epochs: int = 1  # passes over the data
    max_steps: int | None = None  # stop after this many optimizer steps (None: after `epochs`)


def _check_training(stage: _TrainingStage, prefix: str, config: "ExperimentConfig") -> None:
    _check_range(stage, prefix, {"learning_rate": _POSITIVE, "epochs": _AT_LEAST_ONE, "max_steps": _AT_LEAST_ONE})
    _check_data_path(stage, prefix, config)


def _check_data_path(stage: Stage, prefix: str, config: "ExperimentConfig") -> None:
    """The data a stage reads is named: its own `data_path` or the shared `data.path` (a `stage:` reference is
    checked with the other references, by ``experiment.validate``)."""
    if stage.data_path is None:
        _require(bool(config.data.path.strip()), "data.path", config.data.path,
                 f"a dataset path (stage {stage.name!r} reads the shared data)")
    else:
        _require(bool(stage.data_path.strip()), prefix + "data_path", stage.data_path,
                 "a file path, stage:<name>, or None")


def _check_batch(batch: int, key: str, config: "ExperimentConfig", what: str = "batch") -> None:
    """A batch splits into micro-batches, and each micro-batch across the data-parallel devices."""
    micro = config.optimizer.micro_batches
    _require(batch % micro == 0, key, batch, f"a multiple of optimizer.micro_batches ({micro})")
    mesh = config.mesh
    if mesh.data != -1 and mesh.fsdp != -1:  # otherwise the device count decides, at run time
        shards = mesh.data * mesh.fsdp
        _require((batch // micro) % shards == 0, key, batch,
                 f"a {what} whose micro-batches ({batch // micro}) divide over mesh.data*mesh.fsdp ({shards})")
