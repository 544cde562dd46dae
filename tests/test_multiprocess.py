"""Multi-process runs on one machine: `jax.distributed` on localhost with gloo CPU collectives.

Two processes (one CPU device each) take a data-parallel SFT step on their halves of a global batch and
must end with identical params, equal to one process stepping on the whole batch; the checkpoint they
write together restores in both. Also: the SLURM / flag resolution of `rlhf_jax.distributed` and the
launcher's flags, and (slow) `launch/local.py` running the real command line in two processes.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import re
import subprocess
import signal
import sys
import time

import numpy as np
import pytest

from rlhf_jax import distributed
from rlhf_jax.distributed import DistributedConfig
from rlhf_jax.errors import ConfigError, UserError
from rlhf_jax.training.preemption import EXIT_PREEMPTED

REPO = pathlib.Path(__file__).resolve().parents[1]
HELPER = REPO / "tests" / "multiprocess_sft_step.py"
TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_env() -> dict[str, str]:
    """One CPU device per process (no forced host device count), no accelerator."""
    return {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def run_all(commands: list[list[str]], cwd=REPO) -> list[subprocess.CompletedProcess]:
    """Start every command at once (they meet at the coordinator), wait for all; kill all on timeout."""
    children = [subprocess.Popen(command, cwd=cwd, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for command in commands]
    results = []
    try:
        for command, child in zip(commands, children):
            stdout, stderr = child.communicate(timeout=TIMEOUT)
            results.append(subprocess.CompletedProcess(command, child.returncode, stdout, stderr))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    for result in results:
        assert result.returncode == 0, f"{' '.join(result.args)} exited {result.returncode}:\n{result.stderr[-4000:]}"
    return results


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    port = free_port()
    helper = [sys.executable, str(HELPER), str(tmp_path)]
    run_all([helper + ["--reference"]] + [
        helper + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]
        for i in range(2)])
    initial, reference = np.load(tmp_path / "params_initial.npz"), np.load(tmp_path / "params_reference.npz")
    first, second = np.load(tmp_path / "params_0.npz"), np.load(tmp_path / "params_1.npz")
    assert set(first) == set(second) == set(reference)
    assert max(np.abs(reference[k] - initial[k]).max() for k in reference) > 1e-3  # the steps moved the params
    for name in reference:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
        np.testing.assert_allclose(first[name], reference[name], rtol=1e-5, atol=1e-7, err_msg=name)
    for process in range(2):  # the checkpoint written by both processes restores in both
        restored = np.load(tmp_path / f"restored_{process}.npz")
        for name in reference:
            np.testing.assert_array_equal(restored[name], first[name], err_msg=name)


# ---------------------------------------------------------------------------------------------
# Resolution of flags and SLURM variables (no JAX involved).

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
         "SLURM_STEP_NODELIST": "gpu[07-10],cpu1", "SLURM_JOB_NODELIST": "gpu[07-10],cpu1"}


@pytest.mark.parametrize("nodelist, host", [
    ("node01", "node01"), ("node01,node02", "node01"), ("node[01-04],gpu7", "node01"),
    ("node[001,007-015],host2", "node001"), ("a-b[3-4]", "a-b3"), ("node[7]", "node7"),
])
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert distributed.first_host(nodelist) == host


def test_slurm_variables_give_coordinator_count_and_id():
    config = distributed.resolve(use_cluster=True, env=SLURM)
    # the port jax itself derives from the job id, so a plain `jax.distributed.initialize()` would agree
    assert config == DistributedConfig("gpu07:" + str(65535 - 4096 + 1 + 4242 % 4096), 4, 3)
    config = distributed.resolve(use_cluster=True, env={**SLURM, distributed.PORT_ENV: "1234"})
    assert config.coordinator_address == "gpu07:1234"
    # an srun step of several tasks joins without --distributed; explicit flags win over the variables
    assert distributed.resolve(env=SLURM).num_processes == 4
    assert distributed.resolve(DistributedConfig(coordinator_address="head:99"), env=SLURM) == \
        DistributedConfig("head:99", 4, 3)
    # a single task (sbatch's batch step, or -n 1) is a plain one-process run
    assert not distributed.resolve(env={**SLURM, "SLURM_NTASKS": "1"}).is_multi_process


def test_outside_slurm_distributed_is_a_clear_error():
    with pytest.raises(UserError, match="not inside a SLURM job step .*SLURM_NTASKS"):
        distributed.resolve(use_cluster=True, env={})
    with pytest.raises(UserError, match="SLURM_PROCID='x': expected an integer"):
        distributed.resolve(use_cluster=True, env={**SLURM, "SLURM_PROCID": "x"})


@pytest.mark.parametrize("config, message", [
    (DistributedConfig("127.0.0.1:5000", 2, 2), r"--process-id 2: must be in \[0, 2\) for --num-processes 2"),
    (DistributedConfig("127.0.0.1:5000", 2, -1), r"--process-id -1: must be in \[0, 2\)"),
    (DistributedConfig("127.0.0.1:5000", 2, None), "--process-id: needed with --num-processes 2"),
    (DistributedConfig(None, 2, 0), "--coordinator HOST:PORT: needed with --num-processes 2"),
    (DistributedConfig("127.0.0.1", 2, 0), "--coordinator 127.0.0.1: expected HOST:PORT"),
    (DistributedConfig("127.0.0.1:5000", None, 0), "--num-processes: needed"),
    (DistributedConfig("127.0.0.1:5000", 0, 0), "--num-processes 0: expected at least 1"),
    (DistributedConfig(None, 1, 1), "--process-id 1: must be 0 with --num-processes 1"),
])
def test_inconsistent_flags_are_config_errors(config, message):
    with pytest.raises(ConfigError, match=message):
        distributed.resolve(config, env={})


def test_one_process_is_a_no_op():
    assert distributed.initialize(DistributedConfig(None, 1, 0), env={}) == DistributedConfig(None, 1, 0)
    assert not distributed.initialize(env={}).is_multi_process


# ---------------------------------------------------------------------------------------------
# Through the real command line.


@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
     "error: --process-id 2: must be in [0, 2) for --num-processes 2"),
    (["--num-processes", "2", "--process-id", "0"], "error: --coordinator HOST:PORT: needed with --num-processes 2"),
    (["--local-device-ids", "0,x"], "error: --local-device-ids 0,x: expected comma-separated integers, e.g. 0,1"),
])
def test_launcher_refuses_inconsistent_process_flags_in_one_line(tmp_path, flags, message):
    result = subprocess.run([sys.executable, "-m", "rlhf_jax.launch", "experiment=tiny_sft",
                             f"run_dir={tmp_path / 'run'}", *flags], cwd=REPO, env=cpu_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [message]
    assert not (tmp_path / "run").exists()


def test_local_launcher_prefixes_output_and_returns_the_failure_status():
    result = subprocess.run([sys.executable, "launch/local.py", "-n", "2", "--", "experiment=tiny_sf"], cwd=REPO,
                            env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    # Both children fail the same way, but the first to fail makes the launcher stop the other (SIGTERM), which
    # may happen before that one prints: every child that did report prints the prefixed error line. A stopped
    # child dies of the signal (-15), or exits EXIT_PREEMPTED (75) when its handler was already installed.
    lines = sorted(result.stderr.splitlines())
    *errors, status = lines
    match = re.fullmatch(r"launch/local\.py: a process failed \(p0=(-?\d+), p1=(-?\d+)\)", status)
    assert match, status
    codes = {f"p{i}": int(code) for i, code in enumerate(match.groups())}
    assert 2 in codes.values() and set(codes.values()) <= {2, -15, EXIT_PREEMPTED}
    message = "error: experiment=tiny_sf: unknown experiment (did you mean 'tiny_sft'?); run with --list to see them all"
    # A child stopped after its handler was installed says so before it exits EXIT_PREEMPTED.
    stopped = "SIGTERM received outside a training loop: nothing to save, stopping now. Resume with the same command."
    allowed = {f"[{name}] {message}" for name in codes}
    allowed |= {f"[{name}] {stopped}" for name, code in codes.items() if code == EXIT_PREEMPTED}
    assert set(errors) <= allowed
    for name, code in codes.items():
        if code == 2:  # it exited by itself, after printing its error
            assert f"[{name}] {message}" in errors


# tiny_sft with a checkpoint every 2 steps and 13 of its 64 examples held out (a short last eval batch). SGD with momentum instead of tiny_sft's AdamW: the update is linear
# in the gradient, so the different float reduction order of two processes moves the params by ~1e-7, where
# Adam's g / sqrt(v) turns the rounding of near-zero gradients into full-size differences.
TINY_SFT = ["experiment=tiny_sft", "checkpoint.every_steps=2", "data.eval_fraction=0.2", "optimizer.name=sgd",
            "optimizer.b1=0.9"]


def _launch_two(run_dir, *overrides: str) -> subprocess.CompletedProcess:
    """`launch/local.py -n 2` of tiny_sft in `run_dir`; must exit 0."""
    command = [sys.executable, "launch/local.py", "-n", "2", "--", *TINY_SFT, f"run_dir={run_dir}", *overrides]
    result = subprocess.run(command, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, f"exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def _trained_params(run_dir) -> dict[str, np.ndarray]:
    import jax

    from rlhf_jax.training.artifacts import load_artifact

    params = load_artifact(run_dir / "sft" / "model", with_tokenizer=False).params
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.slow
def test_two_process_sft_through_the_launcher_resumes_and_matches_one_process(tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    result = subprocess.run([sys.executable, "-m", "rlhf_jax.launch", *TINY_SFT, f"run_dir={single}",
                             "stages.sft.max_steps=4"], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-5000:]

    # two processes stop after step 2 (a checkpoint, a model, DONE); without DONE - as after a kill - a relaunch
    # to step 4 restores the step-2 checkpoint in both processes (global arrays, the same data position)
    _launch_two(double, "stages.sft.max_steps=2")
    assert (double / "sft" / "DONE").is_file() and (double / "sft" / "model").is_dir()
    (double / "sft" / "DONE").unlink()
    _launch_two(double, "stages.sft.max_steps=4", "--allow-config-change")
    assert (double / "sft" / "DONE").is_file()
    assert not list((double / "sft").glob(".model.*"))  # no staging directory left behind
    steps = [record["step"] for record in
             map(json.loads, (double / "sft" / "metrics.jsonl").read_text().splitlines())]
    assert steps == [1, 2, 3, 4]  # process 0 alone logs, and the relaunch went on from step 2

    one, two = _trained_params(single), _trained_params(double)
    assert set(one) == set(two)
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # evaluation: every process went through the whole held-out set with the params on the mesh
    one, two = (json.loads((run_dir / "sft" / "summary.json").read_text()) for run_dir in (single, double))
    assert one["eval/tokens"] == two["eval/tokens"] > 0
    np.testing.assert_allclose(two["eval/loss"], one["eval/loss"], rtol=1e-5)

    again = _launch_two(double, "stages.sft.max_steps=4")
    assert "[p0] stage sft (sft): already done" in again.stdout


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_saved_step_and_the_relaunch_finishes(tmp_path):
    """Only process 1 gets SIGTERM (as when a scheduler signals one task first): the stop flag is shared at
    every step, so both processes save the same step together and exit 75; the relaunch logs each step once."""
    run_dir = tmp_path / "run"
    overrides = [*TINY_SFT, f"run_dir={run_dir}", "stages.sft.epochs=2", "stages.sft.max_steps=None",
                 "checkpoint.every_steps=100"]
    port = free_port()
    processes = [subprocess.Popen([sys.executable, "-m", "rlhf_jax.launch", *overrides, "--coordinator",
                                   f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(index)],
                                  cwd=REPO, env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True) for index in (0, 1)]
    metrics = run_dir / "sft" / "metrics.jsonl"
    try:
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert all(process.poll() is None for process in processes), processes[0].communicate()[1][-3000:]
            time.sleep(0.05)
        processes[1].send_signal(signal.SIGTERM)
        errors = [process.communicate(timeout=TIMEOUT)[1] for process in processes]
    finally:
        for process in processes:
            process.kill()
    assert [process.returncode for process in processes] == [75, 75], errors
    lines = [error.strip().splitlines()[-1] for error in errors]
    steps = {int(re.search(r"after step (\d+)", line).group(1)) for line in lines}
    assert len(steps) == 1, lines  # the same step in both
    assert all("stopped by" in line and "resume with" in line for line in lines), lines
    (step,) = steps
    assert step >= 3 and sorted(int(p.name) for p in (run_dir / "sft" / "checkpoints").iterdir()
                                if p.name.isdigit())[-1] == step  # saved although no checkpoint was due
    _launch_two(run_dir, *overrides[len(TINY_SFT) + 1:])  # the same command again: resumes and finishes
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert logged == list(range(1, len(logged) + 1)) and len(logged) > step


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rm", "dpo"])
def test_two_process_pair_stage_with_shared_prefixes_logs_the_one_process_padded_losses(tmp_path, kind):
    # each process lays out its pairs of the global batch in rows of one agreed length (twice the batch's), and
    # DPO's loss entries in as many columns
    import dataclasses

    from experiments.tiny import tiny_dpo, tiny_sft
    from rlhf_jax import launch
    from rlhf_jax.config import DPOStage, OptimizerName, PreferenceLoss, RewardStage

    losses = {}
    for name, shared, processes in (("padded", False, 1), ("shared", True, 2)):
        base = tiny_sft() if kind == "rm" else tiny_dpo()
        stage = (RewardStage(name=kind, max_steps=2, shared_prefix=shared) if kind == "rm" else
                 DPOStage(name=kind, max_steps=2, shared_prefix=shared, loss=PreferenceLoss(beta=0.1)))
        config = dataclasses.replace(base, name=kind, run_dir=str(tmp_path / name),
                                     optimizer=dataclasses.replace(base.optimizer, name=OptimizerName.SGD),
                                     stages=(stage,))
        config_file = launch.prepare_run_dir(config) / launch.CONFIG_FILE
        command = ["launch/local.py", "-n", str(processes), "--"] if processes > 1 else ["-m", "rlhf_jax.launch"]
        result = subprocess.run([sys.executable, *command, "--config", str(config_file)], cwd=REPO, env=cpu_env(),
                                capture_output=True, text=True, timeout=TIMEOUT)
        assert result.returncode == 0, f"{name}: {result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        records = map(json.loads, (tmp_path / name / kind / "metrics.jsonl").read_text().splitlines())
        losses[name] = [record[f"{kind}/loss"] for record in records if f"{kind}/loss" in record]
    assert len(losses["shared"]) == len(losses["padded"]) == 2
    np.testing.assert_allclose(losses["shared"], losses["padded"], rtol=1e-5)
