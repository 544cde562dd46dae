"""Runs that survive what happens to long jobs, each triggered for real through the command line: SIGTERM and
SIGINT (graceful stop, exit 75, resume), a second signal (abort), damaged checkpoints (fallback or one error
line), two launches on one run directory (lock), a stale lock, logs cut back on resume, and a run that failed
before its first step (reusable)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from rlhf_jax.run_lock import LOCK_FILE, RunLock, RunLocked
from rlhf_jax.training.artifacts import load_artifact
from rlhf_jax.training.checkpoint import Checkpointer, check_step
from rlhf_jax.training.logs import MetricsLogger, read_metrics
from rlhf_jax.training.preemption import EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _launch(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "rlhf_jax.launch", "experiment=tiny_sft", f"run_dir={run_dir}",
            "stages.sft.epochs=3", "stages.sft.max_steps=None", "checkpoint.every_steps=4", "checkpoint.keep_last=2", *overrides]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)


def _start_and_wait_for_step(command: list[str], stage_dir: Path, step: int) -> subprocess.Popen:
    process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 600
    path = stage_dir / "metrics.jsonl"
    while process.poll() is None and time.monotonic() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= step:
            return process
        time.sleep(0.02)
    raise AssertionError(f"the run did not reach step {step}: {process.communicate()[1][-3000:]}")


def _steps(stage_dir: Path) -> list[int]:
    return [record["step"] for record in read_metrics(stage_dir)]


def _same_params(a: Path, b: Path) -> None:
    for x, y in zip(jax.tree.leaves(load_artifact(a).params), jax.tree.leaves(load_artifact(b).params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_step_saves_it_and_exits_75_then_the_relaunch_finishes(tmp_path, sent):
    run_dir = tmp_path / "run"
    process = _start_and_wait_for_step(_launch(run_dir), run_dir / "sft", 6)
    process.send_signal(sent)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == EXIT_PREEMPTED, stderr[-3000:]
    last_line = stderr.strip().splitlines()[-1]
    assert f"stopped by {sent.name} after step" in last_line
    assert f"resume with: python -m rlhf_jax.launch --config {run_dir / 'config.json'}" in last_line
    stopped_at = int(last_line.split("after step ")[1].split()[0])
    assert stopped_at >= 6 and stopped_at < 48
    checkpoints = Checkpointer(run_dir / "sft" / "checkpoints")
    assert checkpoints.latest_step() == stopped_at  # the step in progress was saved, not only the last due one
    checkpoints.close()
    assert _steps(run_dir / "sft") == list(range(1, stopped_at + 1))
    assert not (run_dir / "sft" / "DONE").exists()

    resumed = _run([sys.executable, "-m", "rlhf_jax.launch", "--config", str(run_dir / "config.json")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _steps(run_dir / "sft") == list(range(1, 49))


def test_a_second_signal_aborts_at_once_without_saving(tmp_path):
    run_dir = tmp_path / "run"
    # bigger batches: a step long enough for the second signal to arrive while it runs
    process = _start_and_wait_for_step(_launch(run_dir, "data.batch_size=32"), run_dir / "sft", 1)
    process.send_signal(signal.SIGTERM)
    lines = []
    while not lines or not lines[-1].startswith("SIGTERM received"):  # the first one was handled: send another
        lines.append(process.stderr.readline())
        assert lines[-1], "".join(lines)
    process.send_signal(signal.SIGTERM)
    stderr = "".join(lines) + process.communicate(timeout=300)[1]
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "second SIGTERM: aborting now without saving"


def test_damaged_newest_checkpoint_falls_back_to_an_intact_one_and_none_intact_is_one_error_line(tmp_path):
    full = tmp_path / "full"
    assert _run(_launch(full, "stages.sft.epochs=1")).returncode == 0  # 16 steps; checkpoints 12 and 16 kept
    for damage in ("truncate", "delete"):
        run_dir = tmp_path / damage
        shutil.copytree(full, run_dir)
        shutil.rmtree(run_dir / "sft" / "model")
        (run_dir / "sft" / "DONE").unlink()
        newest = run_dir / "sft" / "checkpoints" / "16"
        victim = max((p for p in newest.rglob("*") if p.is_file() and p.parent.name == "d"),
                     key=lambda p: p.stat().st_size)
        if damage == "truncate":
            victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        else:
            victim.unlink()
        assert check_step(newest) is not None
        resumed = _run(_launch(run_dir, "stages.sft.epochs=1"))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        warnings = [line for line in resumed.stderr.splitlines() if line.startswith("warning: checkpoint")]
        assert len(warnings) == 1 and f"{newest} is damaged" in warnings[0], resumed.stderr[-3000:]
        assert (run_dir / "sft" / "damaged_checkpoints" / "16").is_dir()  # set aside, not deleted
        _same_params(full / "sft" / "model", run_dir / "sft" / "model")
        assert _steps(run_dir / "sft") == list(range(1, 17))

    broken = tmp_path / "broken"
    shutil.copytree(full, broken)
    shutil.rmtree(broken / "sft" / "model")
    (broken / "sft" / "DONE").unlink()
    for step_dir in (broken / "sft" / "checkpoints").iterdir():
        if step_dir.name.isdigit():
            (step_dir / "state" / "_METADATA").unlink()
    result = _run(_launch(broken, "stages.sft.epochs=1"))
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {broken / 'sft' / 'checkpoints'}: no intact checkpoint (newest, step 16: "
                            "state/_METADATA is missing)"), result.stderr[-3000:]
    assert "delete or move that directory to restart the stage" in error


def test_a_second_launch_on_a_held_run_dir_exits_2_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    first = _start_and_wait_for_step(_launch(run_dir), run_dir / "sft", 2)
    second = _run(_launch(run_dir))
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"error: run_dir {run_dir}: in use by process {first.pid} on host {socket.gethostname()}, since "
        f"{json.loads((run_dir / LOCK_FILE).read_text())['started']}; wait for it to finish or stop it (a run "
        "directory has one writer at a time)"]
    first.send_signal(signal.SIGKILL)  # dies holding the lock
    first.communicate(timeout=60)
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == first.pid
    third = _run(_launch(run_dir))
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"note: took over the lock of process {first.pid}" in third.stderr
    assert _steps(run_dir / "sft") == list(range(1, 49))  # resumed from step 0 or a checkpoint, each step once
    assert (run_dir / LOCK_FILE).read_text() == ""  # released


def test_run_lock_in_process(tmp_path):
    with RunLock(tmp_path) as held:
        assert held.stale is None
        with pytest.raises(RunLocked, match=f"in use by process {os.getpid()}"):
            RunLock(tmp_path).acquire()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 999999, "started": "then"}))
    with RunLock(tmp_path) as held:
        assert held.stale == {"host": "elsewhere", "pid": 999999, "started": "then"}


def test_resume_cuts_the_logs_back_to_the_restored_step(tmp_path):
    lines = [json.dumps({"step": step, "loss/x": float(step)}) for step in range(1, 7)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 7, "lo')  # torn by a kill
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps({"step": s, "prompt": "p"}) + "\n" for s in (2, 4, 6)))
    logger = MetricsLogger(tmp_path, tensorboard=False, resume_step=4)
    logger.log(5, {"loss/x": 50.0})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    assert read_metrics(tmp_path)[-1]["loss/x"] == 50.0
    samples = [json.loads(line)["step"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples == [2, 4]


def test_a_run_that_failed_before_its_first_step_takes_the_corrected_command(tmp_path):
    run_dir = tmp_path / "run"
    failed = _run(_launch(run_dir, "mesh.data=2", "stages.sft.epochs=1"))  # one CPU device: no such mesh
    assert failed.returncode == 2 and (run_dir / "config.json").is_file(), failed.stderr[-2000:]
    fixed = _run(_launch(run_dir, "stages.sft.epochs=1"))
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "mesh.data=-1" in (run_dir / "config.overrides").read_text()
    # once a stage has made progress, a different config is refused as before
    refused = _run(_launch(run_dir, "stages.sft.epochs=2"))
    assert refused.returncode == 2 and "holds a run of a different config" in refused.stderr
