"""A run killed with SIGKILL resumes exactly; the same seed gives the same metrics; bad stage inputs stop cleanly."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from rlhf_jax import stages as stage_registry
from rlhf_jax.config import DataFormat
from rlhf_jax.errors import UserError
from rlhf_jax.models import llama, load
from rlhf_jax.registry import get_experiment
from rlhf_jax.training.artifacts import load_artifact, save_artifact
from rlhf_jax.training.logs import read_metrics

REPO = Path(__file__).resolve().parents[1]
TIMING = ("time/", "throughput/")


def _launch(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "rlhf_jax.launch", "experiment=tiny_sft", f"run_dir={run_dir}",
            "stages.sft.epochs=3", "stages.sft.max_steps=None",
            "checkpoint.every_steps=4", *overrides]


def _metric_lines(stage_dir: Path) -> int:
    path = stage_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _run_stage(experiment, name, run_dir):
    stage = experiment.stage(name)
    stage_dir = Path(run_dir) / name
    stage_dir.mkdir(parents=True, exist_ok=True)
    runner = stage_registry.load_runner(stage.kind)
    runner(experiment, stage, stage_dir, stage_registry.make_resolver(experiment, Path(run_dir)))
    return stage_dir


def _without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith(TIMING)} for r in records]


@pytest.mark.slow
def test_sft_sigkilled_mid_run_resumes_to_the_uninterrupted_result(tmp_path):
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    full = subprocess.run(_launch(full_dir), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert full.returncode == 0, full.stderr[-3000:]

    # kill -9 once a few steps past the first checkpoint, in the middle of the run
    process = subprocess.Popen(_launch(killed_dir), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 600
    while _metric_lines(killed_dir / "sft") < 10 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read()[-3000:]}"
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed_dir / "sft" / "DONE").exists() and not (killed_dir / "sft" / "model").exists()
    killed_at = _metric_lines(killed_dir / "sft")
    assert 10 <= killed_at < 48

    resumed = subprocess.run(_launch(killed_dir), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (killed_dir / "sft" / "DONE").is_file()
    full_params = load_artifact(full_dir / "sft" / "model").params
    resumed_params = load_artifact(killed_dir / "sft" / "model").params
    for a, b in zip(jax.tree.leaves(full_params), jax.tree.leaves(resumed_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the resumed run re-logs from its last checkpoint; every step's metrics equal the uninterrupted run's
    by_step = {r["step"]: r for r in _without_timings(read_metrics(killed_dir / "sft"))}
    uninterrupted = _without_timings(read_metrics(full_dir / "sft"))
    assert [r["step"] for r in uninterrupted] == list(range(1, 49))  # 3 epochs of 16 steps
    assert uninterrupted == [by_step[step] for step in range(1, 49)]
    summary_full = json.loads((full_dir / "sft" / "summary.json").read_text())
    summary_resumed = json.loads((killed_dir / "sft" / "summary.json").read_text())
    assert summary_full == summary_resumed


@pytest.mark.slow
def test_the_same_experiment_and_seed_twice_give_identical_metrics(tmp_path):
    experiment = get_experiment("tiny_pipeline")
    for name in ("first", "second"):
        for stage in ("sft", "rm", "ppo"):
            _run_stage(experiment, stage, tmp_path / name)
    for stage in ("sft", "rm", "ppo"):
        first = _without_timings(read_metrics(tmp_path / "first" / stage))
        second = _without_timings(read_metrics(tmp_path / "second" / stage))
        assert first and first == second, stage
    first_params = load_artifact(tmp_path / "first" / "ppo" / "model").params
    second_params = load_artifact(tmp_path / "second" / "ppo" / "model").params
    for a, b in zip(jax.tree.leaves(first_params), jax.tree.leaves(second_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return str(path)


@pytest.mark.parametrize("stage_name, rows, message", [
    ("rm", [{"prompt": f"hi {i}", "completion": "yo"} for i in range(8)],
     r"sft\.jsonl: no valid preference records in 8 rows; first problem: .*sft\.jsonl:1: missing field 'chosen'"),
    ("sft", [{"prompt": f"hi {i}"} for i in range(8)],
     r"prompts\.jsonl: no valid sft records in 8 rows; first problem: .*prompts\.jsonl:1: missing field 'response'"),
    ("ppo", [{"text": f"hi {i}"} for i in range(8)],
     r"text\.jsonl: no valid prompt records in 8 rows; first problem: .*text\.jsonl:1: missing field 'prompt' \(or 'messages'\)"),
])
def test_a_dataset_of_the_wrong_record_type_stops_the_stage_naming_the_file_and_field(tmp_path, stage_name, rows,
                                                                                      message):
    experiment = get_experiment("tiny_pipeline")
    file_name = {"rm": "sft.jsonl", "sft": "prompts.jsonl", "ppo": "text.jsonl"}[stage_name]
    path = _write_jsonl(tmp_path / file_name, rows)
    data = dataclasses.replace(experiment.data, path=path, format=DataFormat.JSONL)
    experiment = dataclasses.replace(experiment, data=data)
    if stage_name == "ppo":  # PPO needs its upstream models: give it the tiny model and a fresh reward model
        config, params, tokenizer = load("tiny:smollm2")
        save_artifact(tmp_path / "rm_model", config, llama.init_scalar_model(config, params, jax.random.key(0)),
                      tokenizer, "scalar")
        stage = dataclasses.replace(experiment.stage("ppo"), policy="tiny:smollm2",
                                    reward_model=str(tmp_path / "rm_model"))
    else:
        stage = dataclasses.replace(experiment.stage(stage_name), **({"model": "tiny:smollm2"} if stage_name == "rm"
                                                                      else {}))
    runner = stage_registry.load_runner(stage.kind)
    with pytest.raises(UserError, match=message):
        runner(experiment, stage, tmp_path / stage_name, stage_registry.make_resolver(experiment, tmp_path))
    assert not (tmp_path / stage_name / "model").exists()


def test_sft_refuses_a_reward_model_checkpoint(tmp_path):
    config, params, tokenizer = load("tiny:smollm2")
    rm_dir = save_artifact(tmp_path / "rm", config, llama.init_scalar_model(config, params, jax.random.key(1)),
                           tokenizer, "scalar")
    experiment = get_experiment("tiny_sft")
    stage = dataclasses.replace(experiment.stage("sft"), model=str(rm_dir))
    runner = stage_registry.load_runner("sft")
    with pytest.raises(UserError, match=r"stages\.sft\.model: expected a language model, got a scalar"):
        runner(experiment, stage, tmp_path / "sft", stage_registry.make_resolver(experiment, tmp_path))
    assert not (tmp_path / "sft" / "model").exists()


def test_ppo_refuses_roles_with_a_different_vocabulary(tmp_path):
    config, params, tokenizer = load("tiny:smollm2")
    experiment = get_experiment("tiny_pipeline")
    runner = stage_registry.load_runner("ppo")
    resolve = stage_registry.make_resolver(experiment, tmp_path)

    # a reward model whose tokenizer has one extra token
    other_tokenizer = load("tiny:smollm2")[2]
    other_tokenizer.add_tokens(["<extra_token>"])
    rm_dir = save_artifact(tmp_path / "rm", config, llama.init_scalar_model(config, params, jax.random.key(1)),
                           other_tokenizer, "scalar")
    stage = dataclasses.replace(experiment.stage("ppo"), policy="tiny:smollm2", reward_model=str(rm_dir))
    with pytest.raises(UserError, match=r"stages\.ppo\.reward_model: its tokenizer differs from the policy's"):
        runner(experiment, stage, tmp_path / "ppo", resolve)

    # a reference whose embedding table has another size
    small = dataclasses.replace(config, vocab_size=config.vocab_size - 64)
    ref_dir = save_artifact(tmp_path / "ref", small, llama.init_params(small, jax.random.key(2)), tokenizer, "lm")
    good_rm = save_artifact(tmp_path / "rm_ok", config, llama.init_scalar_model(config, params, jax.random.key(1)),
                            tokenizer, "scalar")
    stage = dataclasses.replace(experiment.stage("ppo"), policy="tiny:smollm2", reward_model=str(good_rm),
                                reference=str(ref_dir))
    with pytest.raises(UserError, match=r"stages\.ppo\.reference: vocabulary differs from the policy's"):
        runner(experiment, stage, tmp_path / "ppo", resolve)
    assert not (tmp_path / "ppo" / "model").exists()


@pytest.mark.slow
def test_ppo_with_frozen_roles_offloaded_to_host_memory_gives_the_same_run(tmp_path):
    experiment = get_experiment("tiny_pipeline")
    base = tmp_path / "base"
    _run_stage(experiment, "sft", base)
    _run_stage(experiment, "rm", base)
    runs = {}
    for offload in (False, True):
        run_dir = tmp_path / f"offload_{offload}"
        run_dir.mkdir()
        for stage in ("sft", "rm"):
            (run_dir / stage).symlink_to(base / stage)
        ppo = dataclasses.replace(experiment.stage("ppo"), offload_frozen=offload)
        variant = dataclasses.replace(experiment, stages=tuple(ppo if s.name == "ppo" else s
                                                               for s in experiment.stages))
        runs[offload] = _run_stage(variant, "ppo", run_dir)
    assert _without_timings(read_metrics(runs[False])) == _without_timings(read_metrics(runs[True]))
    for a, b in zip(jax.tree.leaves(load_artifact(runs[False] / "model").params),
                    jax.tree.leaves(load_artifact(runs[True] / "model").params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
