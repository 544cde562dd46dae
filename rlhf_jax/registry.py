"""Named experiments: functions that return an :class:`~rlhf_jax.config.ExperimentConfig`.

    @register_experiment("tiny_sft", "SFT of a tiny random Llama for a few steps (smoke test)")
    def tiny_sft() -> ExperimentConfig:
        return ExperimentConfig(name="tiny_sft", ...)

The built-in experiments live in the top-level ``experiments`` package, imported on the first
lookup. The registry only builds configs; :func:`rlhf_jax.config.validate` checks them.
"""

import dataclasses
import difflib
import importlib
from typing import Callable

from rlhf_jax.config import ExperimentConfig
from rlhf_jax.errors import ConfigError

BUILTIN_EXPERIMENTS_PACKAGE = "experiments"


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    description: str  # one line
    build: Callable[[], ExperimentConfig]


_EXPERIMENTS: dict[str, Experiment] = {}
_builtins_loaded = False


def register_experiment(name: str, description: str) -> Callable:
    """Decorator registering a function that returns an ExperimentConfig under ``name``."""
    if "\n" in description or not description.strip():
        raise ValueError(f"experiment {name!r}: the description must be one non-empty line")

    def decorator(build: Callable[[], ExperimentConfig]) -> Callable[[], ExperimentConfig]:
        existing = _EXPERIMENTS.get(name)
        if existing is not None and existing.build is not build:
            # Re-importing the same module re-registers equal functions; a second definition is a bug.
            if (existing.build.__module__, existing.build.__qualname__) != (build.__module__, build.__qualname__):
                raise ValueError(f"experiment {name!r} is registered twice "
                                 f"({existing.build.__module__} and {build.__module__})")
        _EXPERIMENTS[name] = Experiment(name, description, build)
        return build

    return decorator


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module(BUILTIN_EXPERIMENTS_PACKAGE)


def list_experiments() -> list[Experiment]:
    """All registered experiments, sorted by name."""
    _load_builtins()
    return [_EXPERIMENTS[name] for name in sorted(_EXPERIMENTS)]


def get_experiment(name: str) -> ExperimentConfig:
    """Build the experiment registered as ``name``; ConfigError with a did-you-mean if there is none."""
    _load_builtins()
    if name not in _EXPERIMENTS:
        close = difflib.get_close_matches(name, list(_EXPERIMENTS), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"experiment={name}: unknown experiment{hint}; run with --list to see them all")
    entry = _EXPERIMENTS[name]
    config = entry.build()
    if not isinstance(config, ExperimentConfig):
        raise TypeError(f"experiment {name!r}: {entry.build.__qualname__} returned "
                        f"{type(config).__name__}, not an ExperimentConfig")
    if config.name != name:
        raise ValueError(f"experiment {name!r}: its config is named {config.name!r}; the names must match")
    if not config.description:
        config = dataclasses.replace(config, description=entry.description)
    return config
