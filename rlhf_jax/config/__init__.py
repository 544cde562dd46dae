"""Frozen experiment configs, their validation, and ``key=value`` overrides.

An experiment is one :class:`ExperimentConfig`: shared settings (model, data, optimizer, mesh,
checkpointing, logging) and a tuple of stages (:class:`SFTStage`, :class:`RewardStage`,
:class:`PPOStage`, :class:`DPOStage`, :class:`GRPOStage`, :class:`GenerateStage`, ...) that run in order
inside ``run_dir``. A later stage names an earlier stage's output by reference, ``"stage:<name>"``,
which the pipeline resolves to ``<run_dir>/<name>``.

Stage fields that default to ``None`` inherit the shared value (``SFTStage.learning_rate=None`` uses
``optimizer.learning_rate``; ``SFTStage.model=None`` uses ``model.source``); :func:`stage_optimizer`,
:func:`stage_data` and :func:`model_for` compute the values a stage runs with.

Everything is checked in one place, :func:`validate`, which the launcher calls before anything runs
(never ``__post_init__``: a subclass that defines its own skips it). Every problem is reported as
one :class:`~rlhf_jax.errors.ConfigError` line naming the dotted key, the bad value and what was
expected. The package imports only the standard library (and the data layer's standard-library list of
formats, ``rlhf_jax.data.formats``) so the launcher starts fast.

Where things are (import them from here, ``rlhf_jax.config``):

- ``names``: the string enums a field takes one of (``StageKind``, ``AdvantageEstimator``, ...) and the small
  tables of allowed values (``DTYPES``, ``TINY_ARCHITECTURES``, ...);
- ``shared``: the settings every stage shares (``ModelSpec``, ``DataConfig``, ``OptimizerConfig``,
  ``MeshConfig``, ``CheckpointConfig``, ``LoggingConfig``, ``LoRAConfig``), each beside its checks;
- ``stage``: ``Stage``, the base of every stage, and what every training stage shares;
- ``supervised`` (``SFTStage``, ``RewardStage``), ``preference`` (``DPOStage``, ``KTOStage``), ``rl``
  (``RLAlgorithm`` and its presets, the PPO/GRPO/RLOO/REINFORCE stages, RAFT, ReST, best-of-n), ``inference``
  (``GenerateStage``, ``EvaluateStage``) and ``feedback`` (``LabelStage``, ``CAIStage``, AI feedback): the
  stages, each dataclass beside its ``_check_*`` function;
- ``experiment``: ``ExperimentConfig``, the table of stage classes and their checks, :func:`validate` and the
  checks that span stages (references, input paths), model sources, what a stage runs with;
- ``engine``: the schema-agnostic machinery: parsing and printing values, ``key=value`` overrides, JSON, type
  and range checks, did-you-mean.
"""

from rlhf_jax.config.engine import (
    apply_overrides,
    format_value,
    from_dict,
    parse_value,
    save_config,
    to_dict,
)
from rlhf_jax.config.experiment import (
    STAGE_TYPES,
    ExperimentConfig,
    ModelSource,
    data_reference,
    gguf_package_file,
    load_config,
    model_for,
    parse_source,
    stage_data,
    stage_optimizer,
    to_overrides,
    validate,
)
from rlhf_jax.config.feedback import (CRITIQUE_REQUESTS, HARMLESSNESS_PRINCIPLES, REVISION_REQUESTS, CAIStage,
                                     LabelStage)
from rlhf_jax.config.inference import EvaluateStage, GenerateStage
from rlhf_jax.config.names import (
    DATA_WRITING_KINDS,
    DTYPES,
    LANGUAGE_MODEL_KINDS,
    LLAMA2_SIZES,
    MAX_SEED,
    REWARD_MODEL_KINDS,
    TINY_ARCHITECTURES,
    AdvantageEstimator,
    DataFormat,
    KLEstimator,
    KLPlacement,
    LossAggregation,
    OptimizerName,
    RematPolicy,
    Schedule,
    SourceKind,
    StageKind,
)
from rlhf_jax.config.preference import DPOStage, KTOLoss, KTOStage, PreferenceLoss
from rlhf_jax.config.rl import (
    GRPO_ALGORITHM,
    PPO_ALGORITHM,
    REINFORCE_ALGORITHM,
    RLOO_ALGORITHM,
    BestOfNStage,
    GRPOStage,
    PPOStage,
    RAFTStage,
    ReinforceStage,
    ReSTStage,
    RLAlgorithm,
    RLOOStage,
)
from rlhf_jax.config.shared import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    LoRAConfig,
    MeshConfig,
    ModelSpec,
    OptimizerConfig,
)
from rlhf_jax.config.stage import Stage
from rlhf_jax.config.supervised import RewardStage, SFTStage
from rlhf_jax.data.formats import FORMATS
from rlhf_jax.errors import ConfigError, UserError

__all__ = [
    "DATA_WRITING_KINDS",
    "DTYPES",
    "FORMATS",
    "GRPO_ALGORITHM",
    "HARMLESSNESS_PRINCIPLES",
    "LANGUAGE_MODEL_KINDS",
    "LLAMA2_SIZES",
    "MAX_SEED",
    "PPO_ALGORITHM",
    "REINFORCE_ALGORITHM",
    "REWARD_MODEL_KINDS",
    "RLOO_ALGORITHM",
    "STAGE_TYPES",
    "TINY_ARCHITECTURES",
    "AdvantageEstimator",
    "BestOfNStage",
    "CheckpointConfig",
    "ConfigError",
    "DPOStage",
    "DataConfig",
    "DataFormat",
    "EvaluateStage",
    "ExperimentConfig",
    "GRPOStage",
    "GenerateStage",
    "KLEstimator",
    "KLPlacement",
    "KTOLoss",
    "KTOStage",
    "LabelStage",
    "CAIStage",
    "CRITIQUE_REQUESTS",
    "REVISION_REQUESTS",
    "LoRAConfig",
    "LoggingConfig",
    "LossAggregation",
    "MeshConfig",
    "ModelSource",
    "ModelSpec",
    "OptimizerConfig",
    "OptimizerName",
    "PreferenceLoss",
    "PPOStage",
    "RAFTStage",
    "RLAlgorithm",
    "RLOOStage",
    "ReSTStage",
    "ReinforceStage",
    "RematPolicy",
    "RewardStage",
    "SFTStage",
    "Schedule",
    "SourceKind",
    "Stage",
    "StageKind",
    "UserError",
    "apply_overrides",
    "format_value",
    "data_reference",
    "from_dict",
    "gguf_package_file",
    "load_config",
    "model_for",
    "parse_source",
    "parse_value",
    "save_config",
    "stage_data",
    "stage_optimizer",
    "to_dict",
    "to_overrides",
    "validate",
]
