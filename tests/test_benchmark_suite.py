"""benchmarks/suite.py end to end on a tiny model: every workload runs on both sides, and the two agree."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
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


@pytest.mark.slow  # one to two minutes on 2 cores: two worker processes, twelve workloads
def test_tiny_suite_measures_both_sides_and_their_losses_agree(tmp_path):
    out = tmp_path / "tiny"
    done = run_suite("--tiny", "--out", str(out))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    results = report["results"]
    samplers = sorted(name for name in results if name.startswith("sampler_"))
    assert len(samplers) == 2
    assert set(results) == {"sft", "sft_padding_free", "sft_packed", "rm", "rm_shared", "dpo", "dpo_shared", "grpo",
                            "grpo_shared", "relaunch", *samplers}
    for name, result in results.items():
        assert "error" not in result, (name, result.get("error"))
        assert len(result["load_average"]["before"]) == 3
        if name in ("grpo", "grpo_shared"):
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
    # both sides' workers ran with the environment as it is (`--huge-pages off`, the default, as the launcher)
    tunables = os.environ.get("GLIBC_TUNABLES")
    assert report["settings"]["worker_glibc_tunables"] == tunables
    assert {result["setup"][side]["glibc_tunables"] for result in results.values() if "setup" in result
            for side in ("ours", "theirs")} == {tunables}
    # every workload ran in processes of its own: none inherits what an earlier workload's allocator grew
    pids = [result["setup"][side]["pid"] for result in results.values() if "setup" in result
            for side in ("ours", "theirs")]
    ours_only = {"grpo", "grpo_shared", "relaunch"}  # no setup of two sides
    assert len(pids) == 2 * len(set(results) - ours_only) and len(set(pids)) == len(pids), pids
    table = out.with_suffix(".md").read_text()
    assert "| sft |" in table and "| relaunch |" in table and "FAILED" not in table


@pytest.mark.slow  # about a minute on 2 cores
def test_tiny_suite_in_micro_batches_accumulates_on_both_sides_and_their_losses_agree(tmp_path):
    out = tmp_path / "tiny_micro"
    # one batch, revisited: the timed step runs the program the warm-up compiled; sft_packed's loss check
    # evaluates its packed batches, which the steps split into micro-batches
    # (in turns of 2 steps a side: the warm-up step, then the timed one right after it)
    done = run_suite("--tiny", "--workloads", "sft,sft_padding_free,sft_packed,rm,rm_shared,dpo,dpo_shared",
                     "--micro-batches", "2", "--batches", "1", "--block", "2", "--out", str(out))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["settings"]["optimizer"]["micro_batches"] == 2 and report["settings"]["batches"] == 1
    assert report["settings"]["block"] == 2 and "2 steps a turn" in out.with_suffix(".md").read_text()
    assert all(len(result[side]["steps_s"]) == 1 for result in report["results"].values() for side in ("ours", "theirs"))
    assert all(result["ours"]["timed_steps_that_compiled"] == 0 for result in report["results"].values())
    # TRL's micro-batches keep pairs together
    for name in ("sft", "sft_padding_free", "sft_packed", "rm", "rm_shared", "dpo", "dpo_shared"):
        result = report["results"][name]
        assert result["shape"].endswith("both sides in 2 micro-batches"), result["shape"]
        check = result["loss_check"]
        assert check["passed"] and check["rel_diff"] <= 1e-3, (name, check)
    assert run_suite("--tiny", "--micro-batches", "0", timeout=120).returncode == 2
    assert run_suite("--tiny", "--batches", "0", timeout=120).returncode == 2


def test_tiny_suite_with_two_steps_a_call_runs_ours_in_calls_and_their_losses_agree(tmp_path):
    out = tmp_path / "tiny_calls"
    # one batch, revisited: the warm-up step and the timed one run as one call of 2 (a turn of 2 steps a side)
    done = run_suite("--tiny", "--workloads", "sft,sft_packed,rm,dpo_shared", "--steps-per-call", "2", "--batches",
                     "1", "--out", str(out))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["settings"]["optimizer"]["steps_per_call"] == 2 and report["settings"]["block"] == 2
    assert "ours 2 steps a call" in out.with_suffix(".md").read_text()
    for name in ("sft", "sft_packed", "rm", "dpo_shared"):  # sft_packed: each step a pass, in calls of 2
        result = report["results"][name]
        assert len(result["ours"]["steps_s"]) == len(result["theirs"]["steps_s"]) == 1
        assert result["loss_check"]["passed"], (name, result["loss_check"])
    done = run_suite("--tiny", "--workloads", "sampler", "--steps-per-call", "2", timeout=120)
    assert done.returncode == 2 and "reward and DPO workloads only, not sampler" in done.stderr


def test_turns_of_k_steps_and_the_steps_the_medians_count(monkeypatch):
    sys.path.insert(0, str(SUITE.parent))
    import suite

    assert [list(turn) for turn in suite.turns(7, 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [list(turn) for turn in suite.turns(3, 1)] == [[0], [1], [2]]
    records = [{"seconds": i, "after_other": i == turn[0]} for turn in suite.turns(7, 3) for i in turn]
    monkeypatch.setitem(suite.SCHEDULE, "block", 3)  # the warm-up (2 steps), then those after a step of the same side
    assert [i for i, _ in suite.timed_records(records, 2)] == [2, 4, 5]
    assert suite.steady(records, 2) == ([2, 4, 5], 0)
    monkeypatch.setitem(suite.SCHEDULE, "block", 1)  # alternating step by step: every step after the warm-up
    assert [i for i, _ in suite.timed_records(records, 2)] == [2, 3, 4, 5, 6]
    assert [i for i, _ in suite.timed_records(records, 2, block=3)] == [2, 4, 5]  # a block given, as huge_pages_ab
    for bad in (["--block", "0"], ["--block", "2", "--warmup", "2", "--steps", "1"]):  # no step would be timed
        done = run_suite(*bad, timeout=120)
        assert done.returncode == 2 and "--block" in done.stderr, done.stderr


def test_a_side_whose_matmul_rate_moved_during_a_workload_is_flagged_with_its_mfu_at_the_higher_rate():
    sys.path.insert(0, str(SUITE.parent))
    import suite

    records = [{"seconds": 2.0}, {"seconds": 1.0}, {"seconds": 1.0}]
    tokens, flops = [{"padded": 10, "real": 8}], [150e9]
    moved = suite.side_summary(records, 1, [100.0, 200.0], tokens, flops, None)
    assert moved["mfu"] == pytest.approx(1.0) and moved["mfu_at_higher_rate"] == pytest.approx(0.75)
    steady = suite.side_summary(records, 1, [190.0, 200.0], tokens, flops, None)
    warnings = suite.unsteady_rates({"sft": {"ours": moved, "theirs": steady}, "rm": {"ours": steady}})
    assert warnings == ["sft: ours matmul rate 100 GFLOP/s before and 200 after; MFU 100.0% against their mean, "
                        "75.0% against the higher"]


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


@pytest.mark.slow  # about a minute on 2 cores
def test_tiny_suite_with_a_precomputed_reference_reads_each_pairs_own_log_probs(tmp_path):
    # in micro-batches of one pair, rows ordered by length: a reference log-prob read for the wrong pair on
    # either side would move the first loss away from log 2 (the policy is the reference at step 1)
    out = tmp_path / "tiny_precomputed"
    done = run_suite("--tiny", "--workloads", "dpo,dpo_shared", "--precompute-reference", "--micro-batches", "2",
                     "--length-buckets", "2", "--batches", "2", "--out", str(out))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["settings"]["precompute_reference"] is True
    for name in ("dpo", "dpo_shared"):
        result = report["results"][name]
        assert "precompute_reference=true" in result["shape"] and "precompute_ref_log_probs=True" in result["shape"]
        assert all(seconds > 0 for seconds in result["reference_pass_s"].values()), result["reference_pass_s"]
        check = result["loss_check"]
        assert check["passed"], (name, check)
        assert abs(check["ours"] - np.log(2)) < 1e-6 and abs(check["theirs"] - np.log(2)) < 1e-6, check


def test_a_precomputed_reference_leaves_its_forward_out_of_the_step_flops():
    sys.path.insert(0, str(SUITE.parent))
    import suite

    model, tokens = {"body_params": 100, "head_params": 10}, {"real": 7, "loss": 3}
    per_pass = 100 * 7 + 10 * 3
    assert suite.training_flops("dpo", model, tokens) == 8 * per_pass  # training pass + reference forward
    assert suite.training_flops("dpo", model, tokens, reference_forward=False) == 6 * per_pass
    assert suite.training_flops("sft", model, tokens) == 6 * per_pass


def test_rollout_ab_samples_the_same_rows_with_and_without_shared_prompt_prefills():
    sys.path.insert(0, str(SUITE.parent))
    import rollout_ab

    result = rollout_ab.main(["--tiny", "--prompts", "2", "--group", "3", "--new-tokens", "4", "--calls", "3",
                              "--max-prompt-length", "48"])
    assert result["rows"] == 6 and result["rows_identical"] == 6, result
    assert all(len(times) == 3 and min(times) > 0 for times in result["seconds"].values())


def test_rollout_ab_update_times_both_heads_on_the_same_rollout_and_gets_the_same_loss():
    sys.path.insert(0, str(SUITE.parent))
    import rollout_ab

    result = rollout_ab.main(["--tiny", "--prompts", "2", "--group", "3", "--new-tokens", "6", "--calls", "2",
                              "--max-prompt-length", "48", "--update", "--micro-batches", "2"])
    assert all(len(times) == 2 and min(times) > 0 for times in result["seconds"].values())
    assert 0 < result["kept_fraction"] <= 1
    whole, kept = result["losses"].values()
    np.testing.assert_allclose(kept, whole, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("segment_blocks", [False, True])
def test_shared_rows_ab_computes_the_same_value_in_every_layout(segment_blocks):
    sys.path.insert(0, str(SUITE.parent))
    import shared_rows_ab
    from rlhf_jax.models import llama

    threshold = llama._CAUSAL_MIN_LENGTH
    # responses of 320 tokens: the default splits each into causal blocks, --segment-blocks' other side does not
    result = shared_rows_ab.main(["--tiny", "--prompts", "2", "--group", "2", "--new-tokens", "320", "--calls", "2",
                                  "--max-prompt-length", "16"] + ["--segment-blocks"] * segment_blocks)
    assert llama._CAUSAL_MIN_LENGTH == threshold  # the comparison's patch is undone
    assert result["agree"] and len(result["medians"]) == 3, result


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
                                           ("per-layer", "dpo"), ("per-layer-state", "rm"),
                                           ("per-layer-state", "sft --packed"), ("loss-index", "sft --sampled 12,8"),
                                           ("loss-index", "dpo")])
def test_step_ab_runs_both_programs_on_the_same_rows(compare, step):
    sys.path.insert(0, str(SUITE.parent))
    import step_ab

    result = step_ab.main(["--tiny", "--compare", compare, "--step", *step.split(), "--micro-batches", "2",
                           "--length-buckets", "4", "--steps", "2"])
    assert len(result["seconds"]) == 2
    assert all(len(times) == 2 and min(times) > 0 for times in result["seconds"].values())
    first, second = result["losses"].values()
    np.testing.assert_allclose(first, second, rtol=1e-5)  # the same rows, the same first loss


@pytest.mark.parametrize("step", ["sft", "dpo"])
def test_step_ab_profile_names_the_operations_of_a_step(step):
    sys.path.insert(0, str(SUITE.parent))
    import step_ab

    result = step_ab.main(["--tiny", "--step", step, "--micro-batches", "2", "--length-buckets", "4", "--steps", "1",
                           "--profile", "400"])
    rows = result["profile"]
    assert rows and all(seconds > 0 and count > 0 for _, _, seconds, count in rows)
    names = [op_name for _, op_name, _, _ in rows]
    # the layers' operations, under every branch of `by_length` and every layer, are one row each
    assert any("layers/mlp/up_proj" in name for name in names)
    assert not any(re.search(r"layers_\d|branch_\d", name) for name in names)


@pytest.mark.slow  # about a minute and a half on 2 cores
def test_tiny_suite_in_bfloat16_computes_bf16_on_both_sides_and_their_losses_agree(tmp_path):
    # what the suite runs on a GPU (`--precision auto` picks bfloat16 there), here on the CPU: TRL's bf16
    # autocast against our bf16 compute, both on float32 master weights; the sampler with bf16 weights
    single = tmp_path / "tiny_f32_rm"
    assert run_suite("--tiny", "--workloads", "rm", "--out", str(single)).returncode == 0
    float32 = json.loads(single.with_suffix(".json").read_text())
    out = tmp_path / "tiny_bf16"
    # the report is written after every workload: the first one seen holds the first workload alone
    process = subprocess.Popen([sys.executable, str(SUITE), "--tiny", "--precision", "bfloat16", "--workloads",
                                "sft,rm,dpo,sampler", "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    first = None
    while first is None and process.poll() is None:
        try:
            first = json.loads(out.with_suffix(".json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being written
            time.sleep(0.05)
    output = process.communicate(timeout=900)[0]
    assert process.returncode == 0, output[-8000:]
    assert first is not None and list(first["results"]) == ["sft"], first and list(first["results"])
    report = json.loads(out.with_suffix(".json").read_text())
    assert float32["settings"]["precision"] == "float32" and float32["settings"]["tolerance"] == 1e-3
    assert report["settings"]["precision"] == "bfloat16" and report["settings"]["device"] == "cpu"
    assert report["settings"]["tolerance"] == 1e-2
    results = report["results"]
    for name in ("sft", "rm", "dpo"):
        check = results[name]["loss_check"]
        assert check["passed"] and check["rel_diff"] <= 1e-2, (name, check)
    for name in ("sampler_b4", "sampler_b8"):
        assert results[name]["token_check"]["passed"], results[name]["token_check"]
    # both sides really computed in bf16: the reward model's first loss moved away from its float32 value
    # (the same batch and weights) on each side, by more than float32 rounding and less than the tolerance
    for side in ("ours", "theirs"):
        moved = abs(results["rm"]["loss_check"][side] / float32["results"]["rm"]["loss_check"][side] - 1)
        assert 1e-5 < moved < 1e-2, (side, moved)
    assert "bfloat16" in out.with_suffix(".md").read_text().splitlines()[2]


def test_the_run_is_float32_on_a_cpu_unless_asked_otherwise():
    sys.path.insert(0, str(SUITE.parent))
    import suite

    assert suite.numerics("auto") == {"precision": "float32", "device": "cpu"}
    assert suite.numerics("bfloat16") == {"precision": "bfloat16", "device": "cpu"}
    assert suite.numerics("float32") == {"precision": "float32", "device": "cpu"}


def test_first_tokens_may_differ_in_bfloat16_only_at_a_near_tie_in_trls_logits():
    import jax.numpy as jnp

    sys.path.insert(0, str(SUITE.parent))
    import suite

    for value in (1.0, 3.0, 40.0, -40.0, 0.3):  # the spacing of bf16 numbers at value, from jax's bfloat16
        x = jnp.bfloat16(abs(value))
        assert suite.bf16_ulp(value) == float(jnp.nextafter(x, jnp.bfloat16(np.inf))) - float(x), value
    top = {"ids": [[5, 7, 9], [5, 7, 9], [5, 7, 9], [5, 7, 9]],
           "logits": [[40.0, 40.0, 39.0], [40.0, 39.5, 38.0], [40.0, 39.0, 38.0], [40.0, 39.0, 38.0]]}
    ours, theirs = np.array([7, 7, 9, 5]), np.array([5, 5, 5, 5])
    ties = suite.near_ties(ours, theirs, top, ulps=2)
    # row 3 agrees; row 0 is an exact tie, row 1 two steps of 0.25 apart, row 2 eight
    assert [(t["row"], t["gap_bf16_ulps"], t["within_ulps"]) for t in ties] == [(0, 0, True), (1, 2, True),
                                                                                  (2, 8, False)]
    assert not any(t["within_ulps"] for t in suite.near_ties(ours, theirs, top, ulps=0))  # float32: none
    outside = suite.near_ties(np.array([11]), np.array([5]), {"ids": [[5, 7]], "logits": [[40.0, 40.0]]}, ulps=2)
    assert outside[0]["gap"] == float("inf") and not outside[0]["within_ulps"]  # not among TRL's top logits


def test_preference_losses_are_checked_on_what_they_are_computed_from():
    sys.path.insert(0, str(SUITE.parent))
    import suite

    # TRL logs the mean reward over both sides and the margin; ours the mean chosen and rejected rewards
    ours = {"rm/chosen_reward": 1.1, "rm/rejected_reward": 0.5}
    theirs = {"mean_reward": 0.8, "margin": 0.6, "min_reward": -1.5, "max_reward": 2.5}
    checked = suite.loss_inputs("rm", ours, theirs)
    assert checked["chosen_reward"]["theirs"] == pytest.approx(1.1)
    assert checked["rejected_reward"]["theirs"] == pytest.approx(0.5)
    assert max(v["rel_diff"] for v in checked.values()) < 1e-12
    shifted = suite.loss_inputs("rm", {**ours, "rm/chosen_reward": 1.14}, theirs)
    assert shifted["chosen_reward"]["rel_diff"] == pytest.approx(0.04 / 4.0)  # relative to TRL's spread
    dpo = suite.loss_inputs("dpo", {"logps/chosen": -100.0, "logps/rejected": -120.0},
                            {"logps/chosen": -101.0, "logps/rejected": -120.0})
    assert dpo["logps/chosen"]["rel_diff"] == pytest.approx(1 / 101) and dpo["logps/rejected"]["rel_diff"] == 0
    assert suite.loss_inputs("sft", {}, {}) == {}


def test_float32_on_a_gpu_asks_xla_for_full_precision_matmuls():
    sys.path.insert(0, str(SUITE.parent))
    import suite

    saved = dict(suite.NUMERICS)
    try:
        suite.NUMERICS.update(precision="float32", device="gpu")
        assert suite.numerics_env("jax") == {"JAX_DEFAULT_MATMUL_PRECISION": "highest"}
        assert suite.numerics_env("torch") == {}
        suite.NUMERICS.update(precision="bfloat16")
        assert suite.numerics_env("jax") == {}
        suite.NUMERICS.update(precision="float32", device="cpu")
        assert suite.numerics_env("jax") == {}
    finally:
        suite.NUMERICS.update(saved)


def test_gguf_read_ab_times_both_readers_and_they_agree():
    sys.path.insert(0, str(SUITE.parent))
    import gguf_read_ab

    result = gguf_read_ab.main(["--repeats", "1"])
    assert result["same"] and all(len(times) == 1 and times[0] > 0 for times in result["seconds"].values())


@pytest.mark.parametrize("block, step", [(1, "sft --packed"), (2, "sft --packed"), (2, "dpo --length-buckets 2")])
def test_huge_pages_ab_runs_the_same_step_in_two_processes(block, step):
    sys.path.insert(0, str(SUITE.parent))
    import huge_pages_ab

    result = huge_pages_ab.main(["--tiny", "--step", *step.split(), "--steps", "4", "--block", str(block)])
    sides = [result[name] for name in huge_pages_ab.SIDES]
    assert all(len(side["steps"]) == 4 and min(side["steps"]) > 0 and side["faults"] > 0 for side in sides)
    assert sides[0]["first_loss"] == sides[1]["first_loss"]  # one program, one batch: only the allocator differs
    assert result["speed_up"] == sides[0]["seconds"] / sides[1]["seconds"]


def test_huge_pages_ab_times_a_fresh_gib_on_both_sides():
    sys.path.insert(0, str(SUITE.parent))
    import huge_pages_ab

    result = huge_pages_ab.main(["--touch", "--idle", "0,0.5"])
    assert set(result) == set(huge_pages_ab.SIDES)
    assert all(side["first"] > 0 and len(side["after"]) == 2 and min(side["after"]) > 0 for side in result.values())


def test_the_suites_huge_pages_switch_gives_both_workers_the_launchers_setting(monkeypatch):
    sys.path.insert(0, str(SUITE.parent))
    import suite

    from rlhf_jax import host_memory

    monkeypatch.delenv("RLHF_JAX_HUGE_PAGES", raising=False)
    monkeypatch.setitem(suite.HOST, "huge_pages", "off")
    assert suite.host_memory_env() == {}
    monkeypatch.setitem(suite.HOST, "huge_pages", "on")
    launcher = host_memory.environment({**os.environ, "RLHF_JAX_HUGE_PAGES": "on"},
                                       host_memory.transparent_huge_pages(), host_memory.glibc_version())
    assert suite.host_memory_env() == ({} if launcher is None else {"GLIBC_TUNABLES": launcher["GLIBC_TUNABLES"]})
