"""Fault injection: kill real training runs at random points, relaunch, and demand the uninterrupted result.

    python tests/fault_injection.py --scenario sft --kills 200 --workdir /tmp/faults     # the long run
    python tests/fault_injection.py --scenario ppo --kills 100 --seed 3

For a scenario (tiny SFT, tiny PPO; a checkpoint every step, so kills land in steps and in saves alike) it
runs the experiment once uninterrupted, then again in chains: launch, wait a random time (mostly while
training, sometimes while starting), send SIGKILL or SIGTERM, check the exit status (-9, or 75 for
SIGTERM's graceful stop), relaunch the same command, and so on until the run completes. Every completed
chain must end with params bit-identical to the uninterrupted run's and each step logged exactly once,
with the same metrics. `tests/test_fault_injection.py` runs it with 20+ kill points in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXIT_PREEMPTED = 75
TIMING = ("time/", "throughput/")
# scenario -> (launcher overrides, stage name, steps)
SCENARIOS = {
    "sft": (["experiment=tiny_sft", "stages.sft.epochs=2", "stages.sft.max_steps=24"], "sft", 24),
    "ppo": (["experiment=tiny_ppo", "stages.ppo.max_steps=8"], "ppo", 8),
}
COMMON = ["checkpoint.every_steps=1", "checkpoint.keep_last=2", "logging.every_steps=1"]


def _command(scenario: str, run_dir: Path) -> list[str]:
    overrides, _, _ = SCENARIOS[scenario]
    return [sys.executable, "-m", "rlhf_jax.launch", *overrides, *COMMON, f"run_dir={run_dir}"]


def _environment(cache: Path) -> dict:
    # a persistent compilation cache makes each relaunch start in seconds; it does not change results
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _records(stage_dir: Path) -> list[dict]:
    path = stage_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith(TIMING)} for r in records]


def _params(stage_dir: Path) -> list:
    import jax
    import numpy as np

    from rlhf_jax.training.artifacts import load_artifact

    return [np.asarray(leaf) for leaf in jax.tree.leaves(load_artifact(stage_dir / "model").params)]


def _modified_after(path: Path, moment: float) -> bool:
    try:
        return path.stat().st_mtime > moment
    except FileNotFoundError:
        return False


def inject(scenario: str, workdir: Path, kills: int, seed: int = 0, log=print, timeout: float = 900) -> dict:
    """Run `scenario` with `kills` kill points (see the module docstring); raise AssertionError on any
    failed or inexact resume. Returns counts for the report."""
    import numpy as np

    _, stage, steps = SCENARIOS[scenario]
    rng = random.Random(seed)
    env = _environment(workdir / "compilation_cache")
    reference = workdir / "reference"
    started = time.monotonic()
    done = subprocess.run(_command(scenario, reference), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    expected_records = _without_timings(_records(reference / stage))
    assert [r["step"] for r in expected_records] == list(range(1, steps + 1))
    times = [r["time"] for r in _records(reference / stage)]
    training_span = max(times[-1] - times[0], 1.0) * steps / max(steps - 1, 1)
    expected_params = _params(reference / stage)
    log(f"{scenario}: uninterrupted run in {time.monotonic() - started:.0f} s (training {training_span:.1f} s)")

    counts = {"kills": 0, "SIGKILL": 0, "SIGTERM": 0, "launches": 0, "chains": 0}
    chain = 0
    while counts["kills"] < kills:
        run_dir = workdir / f"chain{chain}"
        while True:
            launched = time.time()
            process = subprocess.Popen(_command(scenario, run_dir), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True)
            counts["launches"] += 1
            if counts["kills"] >= kills:
                _, stderr = process.communicate(timeout=timeout)
                assert process.returncode == 0, stderr[-3000:]
                break
            if rng.random() < 0.9:  # most kills while training (steps and saves), some while starting
                deadline = time.monotonic() + timeout
                while (not _modified_after(run_dir / stage / "metrics.jsonl", launched) and process.poll() is None
                       and time.monotonic() < deadline):
                    time.sleep(0.02)
                time.sleep(rng.uniform(0.0, training_span))
            else:
                time.sleep(rng.uniform(0.0, 5.0))
            sent = rng.choice([signal.SIGKILL, signal.SIGTERM])
            if process.poll() is None:
                process.send_signal(sent)
            _, stderr = process.communicate(timeout=timeout)
            if process.returncode == 0:  # the run finished before the signal
                break
            expected_status = {-signal.SIGKILL} if sent == signal.SIGKILL else {EXIT_PREEMPTED}
            if sent == signal.SIGTERM and (not _modified_after(run_dir / stage / "metrics.jsonl", launched)
                                           or (run_dir / stage / "DONE").exists()):
                # before Python has installed the launcher's handler, or after the run is done and saved (the
                # interpreter shutting down): the default action, and nothing to lose
                expected_status.add(-signal.SIGTERM)
            assert process.returncode in expected_status, (
                f"{sent.name} at launch {counts['launches']}: exit status {process.returncode}, expected "
                f"{expected_status}: {stderr[-3000:]}")
            if process.returncode == EXIT_PREEMPTED:
                assert "resume with" in stderr.splitlines()[-1].lower(), stderr[-2000:]  # says how to resume
            counts["kills"] += 1
            counts[sent.name] += 1
            logged = _records(run_dir / stage) if (run_dir / stage / "metrics.jsonl").is_file() else []
            last = logged[-1]["step"] if logged else 0
            log(f"{scenario}: kill {counts['kills']}/{kills}: {sent.name} at logged step {last} -> "
                f"exit {process.returncode}")
        records = _records(run_dir / stage)
        assert [r["step"] for r in records] == list(range(1, steps + 1)), f"{run_dir}: steps logged " \
            f"{[r['step'] for r in records]}"
        assert _without_timings(records) == expected_records, f"{run_dir}: metrics differ from the uninterrupted run"
        for index, (got, want) in enumerate(zip(_params(run_dir / stage), expected_params)):
            np.testing.assert_array_equal(got, want, err_msg=f"{run_dir}: param leaf {index}")
        counts["chains"] += 1
        log(f"{scenario}: chain {chain} complete and exact")
        chain += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="sft")
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary directory")
    args = parser.parse_args(argv)
    import tempfile

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"faults_{args.scenario}_"))
    workdir.mkdir(parents=True, exist_ok=True)
    counts = inject(args.scenario, workdir, args.kills, args.seed, log=lambda m: print(m, flush=True))
    print(f"{args.scenario}: {counts['kills']} kills ({counts['SIGKILL']} SIGKILL, {counts['SIGTERM']} SIGTERM) over "
          f"{counts['launches']} launches and {counts['chains']} runs: every resume exact")
    return 0


if __name__ == "__main__":
    sys.exit(main())
