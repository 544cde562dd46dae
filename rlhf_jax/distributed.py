"""Joining a multi-process JAX run: `jax.distributed.initialize` from explicit values or from SLURM.

    python -m rlhf_jax.launch experiment=NAME --coordinator 10.0.0.1:61234 --num-processes 2 --process-id 0
    srun python -m rlhf_jax.launch experiment=NAME --distributed      # process ids and coordinator from SLURM

Every process runs the same program on its own devices; `jax.devices()` then lists the devices of all
processes and a jitted step over a mesh of them is one collective computation. `initialize` must run
before anything touches a JAX backend. One process (the default) needs no coordinator: `initialize` is a
no-op. Process 0 is the main process: it alone prints progress and writes run files (config, metrics,
DONE markers, an artifact's header); checkpoints and artifact params are written collectively by every process.

SLURM: the coordinator is the first host of ``SLURM_STEP_NODELIST`` (or ``SLURM_JOB_NODELIST``) at port
``$RLHF_JAX_COORDINATOR_PORT``, else a port derived from ``SLURM_JOB_ID`` (so two jobs sharing a node differ);
the process count and id are ``SLURM_NTASKS`` and ``SLURM_PROCID``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping

from rlhf_jax.errors import ConfigError, UserError

__all__ = ["DistributedConfig", "PORT_ENV", "first_host", "from_slurm", "in_slurm_step", "resolve", "initialize",
           "is_main_process", "barrier", "parse_device_ids"]

PORT_ENV = "RLHF_JAX_COORDINATOR_PORT"
# jax's own SLURM scheme: a port in the top 4096 of the ephemeral range, chosen by the job id
_PORT_BASE, _PORT_SPAN = 65535 - 2**12 + 1, 2**12


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins the run. ``coordinator_address``: "host:port" of process 0's coordinator
    service; ``local_device_ids``: the accelerators this process drives (None: all it sees)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    initialization_timeout: int = 300  # seconds to wait for every process to join

    @property
    def is_multi_process(self) -> bool:
        return (self.num_processes or 1) > 1


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "node[01-04,07],gpu7" -> "node01", "a1,b2" -> "a1"."""
    match = re.match(r"\s*([^,\[\s]+)(?:\[([^\]]*)\])?", nodelist)
    if match is None or not match.group(1):
        raise UserError(f"SLURM node list {nodelist!r}: cannot read its first host")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    first = re.split(r"[,-]", ranges, maxsplit=1)[0].strip()
    if not first:
        raise UserError(f"SLURM node list {nodelist!r}: cannot read its first host")
    return prefix + first


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise UserError(f"{name}={env[name]!r}: expected an integer") from None


def in_slurm_step(env: Mapping[str, str] | None = None) -> bool:
    """Inside an ``srun`` step of several tasks (where each task must join the same run)."""
    env = os.environ if env is None else env
    return "SLURM_STEP_NODELIST" in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1


def from_slurm(env: Mapping[str, str] | None = None) -> DistributedConfig:
    """The `DistributedConfig` of this SLURM task (``srun`` sets the variables); `UserError` outside SLURM."""
    env = os.environ if env is None else env
    missing = [name for name in ("SLURM_NTASKS", "SLURM_PROCID") if name not in env]
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if missing or not nodelist:
        missing += [] if nodelist else ["SLURM_STEP_NODELIST or SLURM_JOB_NODELIST"]
        raise UserError(f"--distributed: not inside a SLURM job step ({', '.join(missing)} unset); run it under "
                        "srun, or pass --coordinator HOST:PORT --num-processes N --process-id I")
    if env.get(PORT_ENV):
        port = _int_env(env, PORT_ENV)
    elif env.get("SLURM_JOB_ID"):
        port = _PORT_BASE + _int_env(env, "SLURM_JOB_ID") % _PORT_SPAN
    else:
        raise UserError(f"--distributed: no coordinator port; set {PORT_ENV} (SLURM_JOB_ID is unset too)")
    return DistributedConfig(coordinator_address=f"{first_host(nodelist)}:{port}",
                             num_processes=_int_env(env, "SLURM_NTASKS"), process_id=_int_env(env, "SLURM_PROCID"))


def resolve(explicit: DistributedConfig = DistributedConfig(), use_cluster: bool = False,
            env: Mapping[str, str] | None = None) -> DistributedConfig:
    """``explicit`` values, with the unset ones taken from SLURM when ``use_cluster`` (or inside a multi-task
    ``srun`` step), checked. A single-process config (num_processes 1 or unset everywhere) is returned as is.

    Raises `ConfigError` for inconsistent values (a process id outside [0, num_processes), several processes
    and no coordinator, a coordinator without a port).
    """
    env = os.environ if env is None else env
    config = explicit
    if use_cluster or in_slurm_step(env):
        cluster = from_slurm(env)
        config = dataclasses.replace(
            cluster, **{field.name: getattr(explicit, field.name) for field in dataclasses.fields(explicit)
                        if getattr(explicit, field.name) is not None and field.name != "initialization_timeout"},
            initialization_timeout=explicit.initialization_timeout)
    if config.num_processes is None:
        if config.coordinator_address is not None or config.process_id is not None:
            raise ConfigError("--num-processes: needed with --coordinator / --process-id")
        return config
    if config.num_processes < 1:
        raise ConfigError(f"--num-processes {config.num_processes}: expected at least 1")
    if config.num_processes == 1:
        if config.process_id not in (None, 0):
            raise ConfigError(f"--process-id {config.process_id}: must be 0 with --num-processes 1")
        return config
    if config.process_id is None:
        raise ConfigError(f"--process-id: needed with --num-processes {config.num_processes}")
    if not 0 <= config.process_id < config.num_processes:
        raise ConfigError(f"--process-id {config.process_id}: must be in [0, {config.num_processes}) for "
                          f"--num-processes {config.num_processes}")
    if config.coordinator_address is None:
        raise ConfigError(f"--coordinator HOST:PORT: needed with --num-processes {config.num_processes}")
    host, colon, port = config.coordinator_address.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--coordinator {config.coordinator_address}: expected HOST:PORT (e.g. 10.0.0.1:61234)")
    return config


def parse_device_ids(text: str) -> tuple[int, ...]:
    """"0,1,3" -> (0, 1, 3); `ConfigError` otherwise."""
    try:
        ids = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--local-device-ids {text}: expected comma-separated integers, e.g. 0,1") from None
    if any(i < 0 for i in ids):
        raise ConfigError(f"--local-device-ids {text}: ids must be >= 0")
    return ids


def initialize(explicit: DistributedConfig = DistributedConfig(), use_cluster: bool = False,
               env: Mapping[str, str] | None = None) -> DistributedConfig:
    """Join the multi-process run described by ``explicit`` / SLURM (see `resolve`); a no-op for one process.

    Must be called before any JAX computation. CPU collectives use gloo, so a CPU-only run of several
    processes (tests, a laptop) works like a GPU one. Returns the resolved config.
    """
    config = resolve(explicit, use_cluster, env)
    if not config.is_multi_process:
        return config
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=config.coordinator_address, num_processes=config.num_processes,
            process_id=config.process_id,
            local_device_ids=list(config.local_device_ids) if config.local_device_ids is not None else None,
            initialization_timeout=config.initialization_timeout)
    except (RuntimeError, ValueError) as error:  # XlaRuntimeError is a RuntimeError
        detail = " ".join(str(error).split())[:300]
        raise UserError(f"process {config.process_id} of {config.num_processes}: cannot join the coordinator at "
                        f"{config.coordinator_address} ({detail}); start every process with the same "
                        "--coordinator and --num-processes, each with its own --process-id") from None
    return config


def is_main_process() -> bool:
    """Process 0: the one that prints and writes the run's files."""
    import jax

    return not jax.distributed.is_initialized() or jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier called ``name`` (a no-op for one process)."""
    import jax

    if jax.distributed.is_initialized() and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)

