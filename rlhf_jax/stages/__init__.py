"""Stage runners: which function runs each kind of stage, imported only when a stage runs.

A runner is ``run(experiment, stage, stage_dir, resolve) -> None``:

- ``experiment``: the validated :class:`~rlhf_jax.config.ExperimentConfig`;
- ``stage``: the stage to run (one of ``experiment.stages``);
- ``stage_dir``: ``<run_dir>/<stage.name>``, created by the launcher; the runner writes its
  checkpoints, metrics and outputs there, and resumes from what it finds there;
- ``resolve``: turns a model source into something loadable: ``"stage:<name>"`` becomes the earlier
  stage's output directory ``<run_dir>/<name>``; any other source is returned unchanged. A ``data_path``
  of ``stage:<name>`` resolves the same way, to the file that stage wrote there
  (``stages.common.stage_data_source``).

The launcher writes ``<stage_dir>/DONE`` when ``run`` returns, and skips the stage on a relaunch.
A runner module may also define ``dry_run`` with the same signature: it checks and reports what
``run`` would do (shapes, memory, batches) without training.
"""

import importlib
import importlib.util
import pathlib
from typing import Callable, Protocol

from rlhf_jax.config import ExperimentConfig, SourceKind, parse_source
from rlhf_jax.errors import ConfigError, UserError


class Runner(Protocol):
    def __call__(self, experiment, stage, stage_dir: pathlib.Path, resolve: Callable[[str], str]) -> None: ...


def make_resolver(experiment: ExperimentConfig, run_dir: pathlib.Path) -> Callable[[str], str]:
    """The ``resolve`` given to runners: ``"stage:<name>"`` -> ``<run_dir>/<name>``, other sources unchanged."""
    names = set(experiment.stage_names())

    def resolve(source: str) -> str:
        parsed = parse_source(source, "source")
        if parsed.kind is not SourceKind.STAGE:
            return source
        if parsed.value not in names:
            raise ConfigError(f"source {source!r}: experiment {experiment.name} has no stage {parsed.value!r}")
        return str(run_dir / parsed.value)

    return resolve


class RunnerUnavailable(UserError):
    """This version of rlhf_jax has no runner for a stage kind."""


# stage kind -> "module:function". A kind whose module is not (yet) part of the package is reported as
# unavailable when a run needs it; adding the module is all it takes to enable it.
RUNNERS: dict[str, str] = {
    "generate": "rlhf_jax.stages.generate:run",
    "evaluate": "rlhf_jax.stages.evaluate:run",
    "sft": "rlhf_jax.stages.sft:run",
    "reward": "rlhf_jax.stages.reward:run",
    "ppo": "rlhf_jax.stages.rl:run",
    "dpo": "rlhf_jax.stages.dpo:run",
    "kto": "rlhf_jax.stages.kto:run",
    "grpo": "rlhf_jax.stages.rl:run",
    "rloo": "rlhf_jax.stages.rl:run",
    "reinforce": "rlhf_jax.stages.rl:run",
    "raft": "rlhf_jax.stages.filtered:run",
    "rest": "rlhf_jax.stages.filtered:run",
    "best_of_n": "rlhf_jax.stages.filtered:run_best_of_n",
    "label": "rlhf_jax.stages.label:run",
    "cai": "rlhf_jax.stages.cai:run",
}

DRY_RUN_FUNCTION = "dry_run"


def register_runner(kind: str, target: str) -> None:
    """Point ``kind`` at ``"module:function"`` (replacing any earlier entry)."""
    module, colon, function = target.partition(":")
    if not colon or not module or not function:
        raise ValueError(f"runner target {target!r}: expected 'module:function'")
    RUNNERS[str(kind)] = target


def _target(kind: str) -> tuple[str, str]:
    if str(kind) not in RUNNERS:
        raise RunnerUnavailable(f"no runner is registered for stage kind {str(kind)!r}")
    module, _, function = RUNNERS[str(kind)].partition(":")
    return module, function


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def is_available(kind: str) -> bool:
    """Whether this installation has the runner's module (found without importing it)."""
    try:
        module, _ = _target(kind)
    except RunnerUnavailable:
        return False
    return _module_exists(module)


def _unavailable(kind: str) -> RunnerUnavailable:
    what = "runner" if str(kind) == "generate" else "trainer"
    return RunnerUnavailable(
        f"the {kind} {what} is not available in this version of rlhf_jax "
        f"(no module {_target(kind)[0]})"
    )


def load_runner(kind: str) -> Runner:
    """Import and return the runner for ``kind``; RunnerUnavailable when its module is absent."""
    module_name, function = _target(kind)
    if not _module_exists(module_name):
        raise _unavailable(kind)
    module = importlib.import_module(module_name)
    runner = getattr(module, function, None)
    if runner is None:
        raise RunnerUnavailable(f"runner {RUNNERS[str(kind)]!r} for stage kind {str(kind)!r}: "
                                f"module has no function {function!r}")
    return runner


def load_dry_run(kind: str) -> Runner | None:
    """The runner module's optional ``dry_run``; None when it has none. Raises like :func:`load_runner`."""
    module_name, _ = _target(kind)
    if not _module_exists(module_name):
        raise _unavailable(kind)
    return getattr(importlib.import_module(module_name), DRY_RUN_FUNCTION, None)
