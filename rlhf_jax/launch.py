"""The command line: build an experiment's config, override it, check it, and run its stages.

    python -m rlhf_jax.launch --list
    python -m rlhf_jax.launch experiment=tiny_pipeline stages.ppo.kl_coef=0.1 seed=3 --print-config
    python -m rlhf_jax.launch experiment=tiny_pipeline run_dir=runs/try1 --dry-run
    python -m rlhf_jax.launch experiment=tiny_pipeline run_dir=runs/try1
    python -m rlhf_jax.launch @runs/try1/config.overrides          # the same run again (resumes)
    python -m rlhf_jax.launch --config runs/try1/config.json       # likewise
    python -m rlhf_jax.launch experiment=NAME --coordinator HOST:PORT --num-processes 2 --process-id 0
    srun python -m rlhf_jax.launch experiment=NAME --distributed   # under SLURM (see launch/README.md)

A run writes its config to ``<run_dir>/config.json`` and ``<run_dir>/config.overrides`` (one
``key=value`` per line, the form ``--print-config`` prints), then runs each stage in
``<run_dir>/<stage name>``; a stage whose ``DONE`` marker exists is skipped on a relaunch. A user
error (unknown experiment or key, bad value, missing file) prints one line on stderr and exits 2; so
does a launch on a run directory another live launcher holds (``<run_dir>/.lock``). SIGTERM or
SIGINT stops a training stage after its current step, checkpointed, and exits 75 (`EXIT_PREEMPTED`);
relaunching resumes it (see `rlhf_jax.training.preemption`). With ``RLHF_JAX_HUGE_PAGES=on`` (Linux, glibc) the
command first re-executes itself once with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (huge pages for the blocks
XLA maps at every step; see `rlhf_jax.host_memory`).
With several processes (`rlhf_jax.distributed`) every process runs the stages; process 0 alone prints
and writes the run's files.
"""

import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import shutil
import sys
from typing import Sequence

from rlhf_jax import distributed, registry, stages
from rlhf_jax.config import (
    ExperimentConfig,
    apply_overrides,
    load_config,
    save_config,
    to_overrides,
    validate,
)
from rlhf_jax.errors import ArgumentParser, ConfigError, UserError
from rlhf_jax.run_lock import RunLock
from rlhf_jax.training.preemption import EXIT_PREEMPTED, Preempted, StopSignals

__all__ = ["main", "build_config", "prepare_run_dir", "dry_run", "run", "load_config"]

EXIT_USER_ERROR = 2
CONFIG_FILE = "config.json"
OVERRIDES_FILE = "config.overrides"
PREVIOUS_CONFIG_FILE = "config.previous.json"
DONE_FILE = "DONE"
# Source fields for which None means the shared model.source (reference and critic default to other roles).
_INHERITS_MODEL_SOURCE = ("model", "policy", "judge")


class _Parser(ArgumentParser):
    error_type = ConfigError

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
    mode.add_argument("--plan", action="store_true",
                      help="compile every stage ahead of time on abstract arrays for the mesh and print its "
                           "per-device memory against the accelerator (no weights, no run directory)")
    planning = parser.add_argument_group("memory plans (--plan; see docs/scale.md)")
    planning.add_argument("--devices", type=int, default=8, metavar="N",
                          help="devices to plan for (default 8; faked on a CPU)")
    planning.add_argument("--accelerator", default="a100-80gb", metavar="NAME",
                          help="a100-40gb, a100-80gb (default), h100-80gb, h200-141gb")
    planning.add_argument("--stage", action="append", metavar="NAME",
                          help="plan only this stage (repeatable; default: every stage)")
    parser.add_argument("--config", metavar="PATH", help="start from a config.json written by an earlier run")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="continue a run_dir whose config.json differs (the old one is kept as "
                             f"{PREVIOUS_CONFIG_FILE}); finished stages stay finished")
    cluster = parser.add_argument_group("multi-process (jax.distributed; see launch/README.md)")
    cluster.add_argument("--distributed", action="store_true",
                         help="join a multi-process run described by SLURM variables (automatic inside a "
                              "multi-task srun step)")
    cluster.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address, the same for every process")
    cluster.add_argument("--num-processes", type=int, metavar="N", help="how many processes take part")
    cluster.add_argument("--process-id", type=int, metavar="I", help="this process's id, 0 to N-1")
    cluster.add_argument("--local-device-ids", type=distributed.parse_device_ids, metavar="IDS",
                         help="accelerators this process drives, e.g. 0,1 (default: all it sees)")
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
    """Create ``run_dir`` and write the config there; refuse to resume a run of a different config.

    A run directory where no stage has made progress yet (no checkpoint, model or DONE marker: the run
    failed before its first step) takes the new config: fixing the command is all a retry needs.
    """
    run_dir = _run_dir(config)
    config_file = run_dir / CONFIG_FILE
    if config_file.exists():
        previous = load_config(config_file)  # every process checks, before process 0 rewrites the file
        # The same directory spelled differently (runs/x vs ./runs/x) is the same run.
        if dataclasses.replace(previous, run_dir=config.run_dir) != config:
            started = stages_with_progress(run_dir)
            if started and not allow_config_change:
                raise ConfigError(
                    f"run_dir={config.run_dir}: holds a run of a different config ({_differences(previous, config)}); "
                    f"use another run_dir, or pass --allow-config-change to continue it with this config"
                )
            if started and distributed.is_main_process():
                shutil.copyfile(config_file, run_dir / PREVIOUS_CONFIG_FILE)
    else:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"run_dir={config.run_dir}: cannot create it ({error.strerror})") from None
    distributed.barrier("rlhf_jax.launch.prepare_run_dir")
    if distributed.is_main_process():
        save_config(config, config_file)
        (run_dir / OVERRIDES_FILE).write_text("\n".join(to_overrides(config)) + "\n")
    return run_dir


def stages_with_progress(run_dir: pathlib.Path) -> list[str]:
    """Names of the stage directories under ``run_dir`` holding a checkpoint step, a model or a DONE marker."""
    started = []
    for stage_dir in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        checkpoints = stage_dir / "checkpoints"
        steps = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
        if steps or _is_done(stage_dir) or (stage_dir / "model").exists():
            started.append(stage_dir.name)
    return started


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
            if isinstance(value, tuple):  # several sources (extra_rewards)
                if value:
                    print(f"  {field.name}: {', '.join(resolve(item) for item in value)}")
            elif value is not None:
                print(f"  {field.name}: {resolve(value)}")
            elif field.name in _INHERITS_MODEL_SOURCE:
                print(f"  {field.name}: {config.model.source} (model.source)")
        checked = stage
        if getattr(stage, "data_path", None) is not None:
            from rlhf_jax.stages.common import dry_run_data_path

            data_path = dry_run_data_path(config, stage, resolve)
            unwritten = "" if data_path == stage.data_path else f" (not written yet: checked with {data_path})"
            print(f"  data_path: {stage.data_path}{unwritten}")
            checked = dataclasses.replace(stage, data_path=data_path)
        try:
            check = stages.load_dry_run(stage.kind)
        except stages.RunnerUnavailable as error:
            print(f"  note: {error}")
            continue
        if check is not None:
            stage_dir.mkdir(exist_ok=True)
            check(config, checked, stage_dir, resolve)
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
        if distributed.is_main_process():
            (stage_dir / DONE_FILE).write_text(json.dumps({"stage": stage.name, "finished": finished}) + "\n")
        print(f"stage {stage.name} ({stage.kind}): done", flush=True)
        _write_report(run_dir)
    print(f"experiment {config.name}: all stages done in {run_dir}")


def _write_report(run_dir: pathlib.Path) -> None:
    """The run's report after each stage (process 0). A report that cannot be built costs a warning, not the
    run: the stage's results are already saved."""
    if not distributed.is_main_process():
        return
    from rlhf_jax.report import build_report

    try:
        path = build_report(run_dir)
    except Exception as error:  # noqa: BLE001 - any plotting failure; the line names it
        print(f"warning: report not written ({type(error).__name__}: {error}); "
              f"retry with: python -m rlhf_jax.report {run_dir}", file=sys.stderr, flush=True)
        return
    print(f"report: {path}", flush=True)


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
    if args.plan:
        return plan(config, args.devices, args.accelerator, argv, args.stage)
    validate(config, check_paths=True)
    enable_compilation_cache()
    joined = distributed.initialize(
        distributed.DistributedConfig(args.coordinator, args.num_processes, args.process_id, args.local_device_ids),
        use_cluster=args.distributed)
    if joined.is_multi_process and not distributed.is_main_process():
        sys.stdout = open(os.devnull, "w")  # progress and summaries: process 0 speaks for the run
    with contextlib.ExitStack() as held:
        if distributed.is_main_process():  # one writer per run directory, for the whole run
            lock = held.enter_context(RunLock(_run_dir(config)))
            if lock.stale:
                print(f"note: took over the lock of process {lock.stale.get('pid')} on {lock.stale.get('host')}, "
                      "which is gone", file=sys.stderr)
        run_dir = prepare_run_dir(config, args.allow_config_change)
        resume = f"python -m rlhf_jax.launch --config {run_dir / CONFIG_FILE}"
        if StopSignals.active() is not None:
            StopSignals.active().resume_hint = f"Resume with: {resume}"
        try:
            if args.dry_run:
                dry_run(config, run_dir)
            else:
                run(config, run_dir)
        except Preempted as stop:
            print(f"{stop}; resume with: {resume} (exit status {EXIT_PREEMPTED})", file=sys.stderr, flush=True)
            return EXIT_PREEMPTED
    return 0


COMPILATION_CACHE_ENV = "RLHF_JAX_COMPILATION_CACHE"
DEFAULT_COMPILATION_CACHE = "~/.cache/rlhf_jax/xla"
COMPILATION_CACHE_BYTES = 4 * 2**30  # least recently used programs are evicted beyond this


def enable_compilation_cache() -> pathlib.Path | None:
    """Keep compiled programs on disk (JAX's persistent compilation cache), so a relaunched or resumed run
    loads its steps instead of compiling them again.

    The directory is ``$RLHF_JAX_COMPILATION_CACHE`` (``off`` disables it), by default
    ``~/.cache/rlhf_jax/xla``; programs are keyed by their HLO, the JAX version and the devices, so runs of
    different experiments share it safely. Every program that took at least 0.5 s to compile is kept.
    """
    import jax

    setting = os.environ.get(COMPILATION_CACHE_ENV, DEFAULT_COMPILATION_CACHE).strip()
    if setting.lower() in ("", "off", "0", "none"):
        return None
    directory = pathlib.Path(setting).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{COMPILATION_CACHE_ENV}={setting}: cannot create the compilation cache directory "
                        f"({error.strerror}); set it to a writable directory or to 'off'") from error
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_BYTES)
    return directory


def plan(config: ExperimentConfig, num_devices: int, accelerator: str, argv: Sequence[str] | None,
         stage_names: Sequence[str] | None = None) -> int:
    """``--plan``: per-device memory of every stage for ``num_devices`` accelerators (see `rlhf_jax.plan`).

    On a host with fewer devices than asked (a CPU), re-runs itself with ``num_devices`` fake CPU devices
    (XLA reads the device count once, when JAX starts). Exit status 0 when every stage fits, 1 otherwise.
    """
    from rlhf_jax import plan as planning

    if accelerator not in planning.ACCELERATORS:
        raise UserError(f"--accelerator {accelerator}: unknown; expected one of {', '.join(planning.ACCELERATORS)}")
    if num_devices < 1:
        raise UserError(f"--devices must be at least 1, got {num_devices}")
    from rlhf_jax.sharding import mesh_shape

    mesh_shape(config.mesh, num_devices)  # a mesh that cannot use these devices fails here, before JAX starts
    for name in stage_names or ():
        config.stage(name)  # an unknown stage too
    flag = f"--xla_force_host_platform_device_count={num_devices}"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        import subprocess

        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip(),
               "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
        command = [sys.executable, "-m", "rlhf_jax.launch", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(command, env=env).returncode
    plans = planning.plan_experiment(config, num_devices, tuple(stage_names or ()))
    return 0 if planning.print_plans(config, plans, accelerator, num_devices) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a user error, reported as one line on stderr)."""
    try:
        # SIGTERM/SIGINT: a training stage saves its step and exits 75 (the hint names the run once it is known)
        with StopSignals("Resume with the same command."):
            return _main(argv)
    except UserError as error:
        message = " ".join(str(error).split("\n"))
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    from rlhf_jax.host_memory import reexec_with_huge_pages

    reexec_with_huge_pages()  # with RLHF_JAX_HUGE_PAGES=on: glibc reads its tunables at start
    sys.exit(main())
