"""benchmarks/suite.py end to end on a tiny model: every workload runs on both sides, and the two agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "suite.py"


def run_suite(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUITE), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_unknown_workload_is_refused_in_one_line():
    done = run_suite("--workloads", "sft,ppo", timeout=120)
    assert done.returncode == 2
    assert "unknown workload(s) ppo" in done.stderr


@pytest.mark.slow  # one to two minutes on 2 cores: two worker processes, eleven workloads
def test_tiny_suite_measures_both_sides_and_their_losses_agree(tmp_path):
    out = tmp_path / "tiny"
    done = run_suite("--tiny", "--out", str(out))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    results = report["results"]
    samplers = sorted(name for name in results if name.startswith("sampler_"))
    assert len(samplers) == 2
    assert set(results) == {"sft", "sft_padding_free", "sft_packed", "rm", "rm_shared", "dpo", "dpo_shared", "grpo",
                            "relaunch", *samplers}
    for name, result in results.items():
        assert "error" not in result, (name, result.get("error"))
        assert len(result["load_average"]["before"]) == 3
        if name == "grpo":
            assert all(result["median_s"][phase] > 0 for phase in ("generate", "score", "train"))
            continue
        if name == "relaunch":  # two processes, one cache directory that starts empty
            first, again = result["launches"]["first launch"], result["launches"]["relaunch"]
            assert first["cache_hits"] == 0 and again["cache_hits"] >= 1, result  # the train step at least
            assert again["compile_seconds"] < first["compile_seconds"], result
            assert len(first["steps_s"]) == len(again["steps_s"]) == 2 and min(again["steps_s"]) > 0
            assert again["first_over_warm"] == again["first_step_s"] / again["warm_step_s"]
            continue
        for side in ("ours", "theirs"):
            numbers = result[side]
            assert numbers["tokens_per_s_real"] > 0 and numbers["tokens_per_s_padded"] >= numbers["tokens_per_s_real"]
            assert 0 < numbers["mfu"] < 1 and numbers["first_call_s"] > 0
            assert len(numbers["matmul_gflops"]) == 2 and min(numbers["matmul_gflops"]) > 0
        assert result["ratio"] > 0
        if name in samplers:
            assert result["token_check"]["passed"], result["token_check"]
        else:
            check = result["loss_check"]
            assert check["passed"] and check["rel_diff"] <= 1e-3, check
            assert check["ours"] > 0 and check["theirs"] > 0
    for name in ("dpo", "dpo_shared"):
        assert results[name]["loss_check"]["extra"]["logps/chosen"]["rel_diff"] <= 1e-3
    # every workload ran in processes of its own: none inherits what an earlier workload's allocator grew
    pids = [result["setup"][side]["pid"] for result in results.values() if "setup" in result
            for side in ("ours", "theirs")]
    assert len(pids) == 2 * (len(results) - 2) and len(set(pids)) == len(pids), pids
    table = out.with_suffix(".md").read_text()
    assert "| sft |" in table and "| relaunch |" in table and "FAILED" not in table


@pytest.mark.slow  # about a minute on 2 cores
def test_tiny_suite_in_micro_batches_accumulates_on_both_sides_and_their_losses_agree(tmp_path):
    out = tmp_path / "tiny_micro"
    # one batch, revisited: the timed step runs the program the warm-up compiled; sft_packed's loss check
    # evaluates its packed batches, which the steps split into micro-batches
    done = run_suite("--tiny", "--workloads", "sft,sft_padding_free,sft_packed,rm,rm_shared,dpo,dpo_shared",
                     "--micro-batches", "2", "--batches", "1", "--out", str(out))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["settings"]["optimizer"]["micro_batches"] == 2 and report["settings"]["batches"] == 1
    assert all(result["ours"]["timed_steps_that_compiled"] == 0 for result in report["results"].values())
    # TRL's micro-batches keep pairs together
    for name in ("sft", "sft_padding_free", "sft_packed", "rm", "rm_shared", "dpo", "dpo_shared"):
        result = report["results"][name]
        assert result["shape"].endswith("both sides in 2 micro-batches"), result["shape"]
        check = result["loss_check"]
        assert check["passed"] and check["rel_diff"] <= 1e-3, (name, check)
    assert run_suite("--tiny", "--micro-batches", "0", timeout=120).returncode == 2
    assert run_suite("--tiny", "--batches", "0", timeout=120).returncode == 2


@pytest.mark.slow  # about a minute on 2 cores
def test_tiny_suite_with_length_buckets_counts_the_positions_ours_computes(tmp_path):
    out = tmp_path / "tiny_buckets"
    done = run_suite("--tiny", "--workloads", "sft,rm,rm_shared,dpo,dpo_shared", "--micro-batches", "2",
                     "--length-buckets", "4", "--batches", "1", "--out", str(out))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["settings"]["optimizer"]["length_buckets"] == 4
    for name in ("sft", "rm", "rm_shared", "dpo", "dpo_shared"):
        result = report["results"][name]
        assert "shortest of 4 lengths" in result["shape"], result["shape"]
        check = result["loss_check"]
        assert check["passed"] and check["rel_diff"] <= 1e-3, (name, check)
        # per step: positions over real tokens, ours (each micro-batch at its length) at most TRL's (padded rows)
        ours, theirs = (result[side]["tokens_per_s_padded"] / result[side]["tokens_per_s_real"]
                        for side in ("ours", "theirs"))
        assert 1 <= ours <= theirs + 1e-9, (name, ours, theirs)
    assert run_suite("--tiny", "--length-buckets", "0", timeout=120).returncode == 2


def test_bucketed_positions_are_each_microbatch_rows_at_its_length():
    sys.path.insert(0, str(SUITE.parent))
    import suite

    mask = np.zeros((4, 64), bool)
    for row, length in enumerate((10, 64, 20, 30)):
        mask[row, :length] = True
    batch = {"tokens": np.ones((4, 64), np.int32), "attention_mask": mask, "loss_mask": mask}
    suite.OPTIMIZER.update(micro_batches=2, length_buckets=4)
    try:
        # rows of 10 and 20 tokens in one micro-batch, at 32 (the shortest of 16, 32, 48, 64 holding 20); rows
        # of 30 and 64 in the other, at 64
        assert suite.bucketed_positions(batch) == 2 * 32 + 2 * 64
        pairs = {"chosen_tokens": batch["tokens"], "chosen_attention_mask": mask,
                 "rejected_tokens": batch["tokens"], "rejected_attention_mask": mask[::-1]}
        # each pair's longer side: 64, 64, 30, 30 -> blocks (30, 30) at 32 and (64, 64) at 64, both sides
        assert suite.bucketed_positions(pairs) == 2 * (2 * 32 + 2 * 64)
    finally:
        suite.OPTIMIZER.update(micro_batches=1, length_buckets=1)


@pytest.mark.parametrize("compare, step", [("lengths", "rm"), ("lengths", "dpo"), ("per-layer", "sft"),
                                           ("per-layer", "dpo")])
def test_step_ab_runs_both_programs_on_the_same_rows(compare, step):
    sys.path.insert(0, str(SUITE.parent))
    import step_ab

    result = step_ab.main(["--tiny", "--compare", compare, "--step", step, "--micro-batches", "2",
                           "--length-buckets", "4", "--steps", "2"])
    assert len(result["seconds"]) == 2
    assert all(len(times) == 2 and min(times) > 0 for times in result["seconds"].values())
    first, second = result["losses"].values()
    np.testing.assert_allclose(first, second, rtol=1e-5)  # the same rows, the same first loss
