"""The command line: build an experiment's config, override it, check it, and run its stages.

    python -m rlhf_jax.launch --list
    python -m rlhf_jax.launch experiment=tiny_pipeline stages.ppo.kl_coef=0.1 seed=3 --print-config
    python -m rlhf_jax.launch experiment=tiny_pipeline run_dir=runs/try1 --dry-run
    python -m rlhf_jax.launch experiment=tiny_pipeline run_dir=runs/try1
    python -m rlhf_jax.launch @runs/try1/config.overrides          # the same run again (resumes)
    python -m rlhf_jax.launch --config runs/try1/config.json       # likewise

A run writes its config to ``<run_dir>/config.json`` and ``<run_dir>/config.overrides`` (one
``key=value`` per line, the form ``--print-config`` prints), then runs each stage in
``<run_dir>/<stage name>``; a stage whose ``DONE`` marker exists is skipped on a relaunch. A user
error (unknown experiment or key, bad value, missing file) prints one line on stderr and exits 2.
"""

import argparse
import dataclasses
import datetime
import json
import pathlib
import shutil
import sys
from typing import Sequence

from rlhf_jax import registry, stages
from rlhf_jax.config import (
    ExperimentConfig,
    apply_overrides,
    load_config,
    save_config,
    to_overrides,
    validate,
)
from rlhf_jax.errors import ConfigError, UserError

__all__ = ["main", "build_config", "prepare_run_dir", "dry_run", "run", "load_config"]

EXIT_USER_ERROR = 2
CONFIG_FILE = "config.json"
OVERRIDES_FILE = "config.overrides"
PREVIOUS_CONFIG_FILE = "config.previous.json"
DONE_FILE = "DONE"
# Source fields for which None means the shared model.source (reference and critic default to other roles).
_INHERITS_MODEL_SOURCE = ("model", "policy")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2 via main, not argparse's usage dump
        raise ConfigError(message)

    def convert_arg_line_to_args(self, arg_line: str) -> list[str]:
        # @FILE: one override per line (values may contain spaces); blank lines and # comments skipped.
        line = arg_line.rstrip("\r")
        return [] if not line.strip() or line.lstrip().startswith("#") else [line]


def _parser() -> _Parser:
    parser = _Parser(
        prog="python -m rlhf_jax.launch",
        description="Run an RLHF experiment: experiment=NAME, then dotted key=value overrides "
                    "(stages by name: stages.sft.learning_rate=1e-5). @FILE reads overrides, one per line.",
        fromfile_prefix_chars="@",
        allow_abbrev=False,
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="list the registered experiments and exit")
    mode.add_argument("--print-config", action="store_true",
                      help="print the resolved config as key=value overrides (they reproduce it) and exit")
    mode.add_argument("--dry-run", action="store_true",
                      help="check everything and write the run's config without training")
    parser.add_argument("--config", metavar="PATH", help="start from a config.json written by an earlier run")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="continue a run_dir whose config.json differs (the old one is kept as "
                             f"{PREVIOUS_CONFIG_FILE}); finished stages stay finished")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="experiment=NAME and overrides")
    return parser


def build_config(overrides: Sequence[str], config_path: str | pathlib.Path | None = None) -> ExperimentConfig:
    """The registered experiment named by ``experiment=NAME`` (or ``config_path``'s config) with the
    other overrides applied, validated (without checking that input files exist)."""
    names, rest = [], []
    for override in overrides:
        key, equals, value = override.partition("=")
        if equals and key.strip() == "experiment":
            names.append(value.strip())
        else:
            rest.append(override)
    if config_path is not None:
        if names:
            raise ConfigError(f"experiment={names[0]}: pass either experiment=NAME or --config, not both")
        config = load_config(config_path)
    else:
        if not names:
            raise ConfigError("no experiment given: pass experiment=NAME (see --list) or --config PATH")
        if len(set(names)) > 1:
            raise ConfigError(f"experiment: given twice with different names ({', '.join(dict.fromkeys(names))})")
        config = registry.get_experiment(names[0])
    config = apply_overrides(config, rest)
    validate(config)
    return config


def _run_dir(config: ExperimentConfig) -> pathlib.Path:
    return pathlib.Path(config.run_dir).expanduser().resolve()


def _differences(old: ExperimentConfig, new: ExperimentConfig, limit: int = 3) -> str:
    old_lines = dict(line.partition("=")[::2] for line in to_overrides(old))
    new_lines = dict(line.partition("=")[::2] for line in to_overrides(new))
    changed = [
        f"{key}: {old_lines.get(key, '(absent)')} -> {new_lines.get(key, '(absent)')}"
        for key in dict.fromkeys([*old_lines, *new_lines])
        if old_lines.get(key) != new_lines.get(key)
    ]
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return "; ".join(changed[:limit]) + more


def prepare_run_dir(config: ExperimentConfig, allow_config_change: bool = False) -> pathlib.Path:
    """Create ``run_dir`` and write the config there; refuse to resume a run of a different config."""
    run_dir = _run_dir(config)
    config_file = run_dir / CONFIG_FILE
    if config_file.exists():
        previous = load_config(config_file)
        # The same directory spelled differently (runs/x vs ./runs/x) is the same run.
        if dataclasses.replace(previous, run_dir=config.run_dir) != config:
            if not allow_config_change:
                raise ConfigError(
                    f"run_dir={config.run_dir}: holds a run of a different config ({_differences(previous, config)}); "
                    f"use another run_dir, or pass --allow-config-change to continue it with this config"
                )
            shutil.copyfile(config_file, run_dir / PREVIOUS_CONFIG_FILE)
    else:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"run_dir={config.run_dir}: cannot create it ({error.strerror})") from None
    save_config(config, config_file)
    (run_dir / OVERRIDES_FILE).write_text("\n".join(to_overrides(config)) + "\n")
    return run_dir


def _is_done(stage_dir: pathlib.Path) -> bool:
    return (stage_dir / DONE_FILE).exists()


def dry_run(config: ExperimentConfig, run_dir: pathlib.Path) -> None:
    """Report each stage's status and inputs; call the runner module's ``dry_run`` where it has one."""
    resolve = stages.make_resolver(config, run_dir)
    print(f"experiment {config.name}: {len(config.stages)} stage(s) in {run_dir}")
    for stage in config.stages:
        stage_dir = run_dir / stage.name
        status = "done (will be skipped)" if _is_done(stage_dir) else "to run"
        print(f"stage {stage.name} ({stage.kind}): {status}")
        for field in dataclasses.fields(stage):
            value = getattr(stage, field.name)
            if not field.metadata.get("source"):
                continue
            if value is not None:
                print(f"  {field.name}: {resolve(value)}")
            elif field.name in _INHERITS_MODEL_SOURCE:
                print(f"  {field.name}: {config.model.source} (model.source)")
        try:
            check = stages.load_dry_run(stage.kind)
        except stages.RunnerUnavailable as error:
            print(f"  note: {error}")
            continue
        if check is not None:
            stage_dir.mkdir(exist_ok=True)
            check(config, stage, stage_dir, resolve)
    print("dry run: nothing was trained")


def run(config: ExperimentConfig, run_dir: pathlib.Path) -> None:
    """Run the stages in order, skipping finished ones; every runner is found before any stage starts."""
    resolve = stages.make_resolver(config, run_dir)
    pending = []
    for stage in config.stages:
        stage_dir = run_dir / stage.name
        if _is_done(stage_dir):
            print(f"stage {stage.name} ({stage.kind}): already done ({stage_dir / DONE_FILE}), skipping")
        else:
            pending.append(stage)
    runners = {}
    for stage in pending:
        try:
            runners[stage.name] = stages.load_runner(stage.kind)
        except stages.RunnerUnavailable as error:
            raise stages.RunnerUnavailable(f"stage {stage.name!r}: {error}") from None
    for stage in pending:
        stage_dir = run_dir / stage.name
        stage_dir.mkdir(exist_ok=True)
        print(f"stage {stage.name} ({stage.kind}): running in {stage_dir}", flush=True)
        runners[stage.name](config, stage, stage_dir, resolve)
        finished = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        (stage_dir / DONE_FILE).write_text(json.dumps({"stage": stage.name, "finished": finished}) + "\n")
        print(f"stage {stage.name} ({stage.kind}): done", flush=True)
    print(f"experiment {config.name}: all stages done in {run_dir}")


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_intermixed_args(argv)
    if args.list:
        experiments = registry.list_experiments()
        width = max(len(experiment.name) for experiment in experiments)
        for experiment in experiments:
            print(f"{experiment.name:<{width}}  {experiment.description}")
        return 0
    config = build_config(args.overrides, args.config)
    if args.print_config:
        print("\n".join(to_overrides(config)))
        return 0
    validate(config, check_paths=True)
    run_dir = prepare_run_dir(config, args.allow_config_change)
    if args.dry_run:
        dry_run(config, run_dir)
    else:
        run(config, run_dir)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a user error, reported as one line on stderr)."""
    try:
        return _main(argv)
    except UserError as error:
        message = " ".join(str(error).split("\n"))
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
