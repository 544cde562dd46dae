"""RAFT, ReST and best-of-n (`rlhf_jax.stages.filtered`): selection, the SFT rows, and the stages end to end
on a tiny random Llama with real HH prompts (metrics, exact resume, the written dataset)."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config import RAFTStage, ReSTStage
from rlhf_jax.models import load
from rlhf_jax.registry import get_experiment
from rlhf_jax.stages.filtered import _batches, best_in_group, improve_selections, sft_rows
from rlhf_jax.trainers.common import continuation_logprobs
from rlhf_jax.trainers.sft import sft_loss_sum
from rlhf_jax.training.logs import read_metrics
from tests.test_stages import _full_then_killed_and_resumed, _run_stage


def test_best_in_group_keeps_the_first_highest_sample_of_each_prompt():
    scores = np.array([0.1, 0.9, 0.9, 0.2, 1.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(best_in_group(scores, 4), [0, 1, 0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(best_in_group(scores, 1), np.ones(8, bool))


def test_raft_keeps_each_prompts_best_above_min_reward_and_rest_one_selection_per_threshold():
    scores = np.array([0.1, 0.4, 0.3, 0.2, 0.9, 0.6])
    raft = RAFTStage(name="raft", reward_model="fn:length", num_samples=3, min_reward=0.5)
    [(threshold, keep)] = improve_selections(raft, scores)
    assert threshold == 0.5
    np.testing.assert_array_equal(keep, [0, 0, 0, 0, 1, 0])  # prompt 1's best (0.4) is below 0.5
    rest = ReSTStage(name="rest", reward_model="fn:length", num_samples=3, thresholds=(0.2, 0.5))
    selections = improve_selections(rest, scores)
    assert [t for t, _ in selections] == [0.2, 0.5]
    np.testing.assert_array_equal(selections[0][1], scores >= 0.2)
    np.testing.assert_array_equal(selections[1][1], scores >= 0.5)


def test_batches_visit_every_kept_row_once_per_epoch_and_fill_with_minus_one():
    rows = np.array([3, 5, 8, 9, 12])
    batches = list(_batches(rows, 2, jax.random.key(0), epochs=2))
    assert len(batches) == 6 and all(len(b) == 2 for b in batches)
    for epoch in (batches[:3], batches[3:]):
        seen = np.concatenate(epoch)
        assert sorted(seen[seen >= 0].tolist()) == rows.tolist() and (seen < 0).sum() == 1
    assert list(_batches(np.array([], np.int64), 4, jax.random.key(0), epochs=1)) == []


def test_sft_rows_put_the_loss_on_the_response_tokens_only():
    """The SFT loss on [left-padded prompt | right-padded response] rows equals the mean NLL of the response
    tokens computed by `continuation_logprobs` (the RL stages' log-probs), an independent path."""
    config, params, _ = load("tiny:smollm2")
    rng = np.random.default_rng(0)
    prompt = rng.integers(5, 500, (3, 6)).astype(np.int32)
    prompt_mask = np.array([[0, 0, 1, 1, 1, 1], [1] * 6, [0, 0, 0, 0, 1, 1]], bool)
    response = rng.integers(5, 500, (3, 5)).astype(np.int32)
    response_mask = np.array([[1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0]], bool)
    batch = sft_rows(prompt, prompt_mask, response, response_mask)
    assert batch["tokens"].shape == (3, 11) and batch["loss_mask"][:, :6].sum() == 0
    loss_sum, (count, _) = sft_loss_sum(config, params, {k: jnp.asarray(v) for k, v in batch.items()})
    logprobs = continuation_logprobs(config, params, jnp.asarray(batch["tokens"]), jnp.asarray(batch["attention_mask"]),
                                     6)
    want = -np.sum(np.where(response_mask, np.asarray(logprobs, np.float64), 0.0))
    assert float(count) == response_mask.sum()
    np.testing.assert_allclose(float(loss_sum), want, rtol=2e-5)


def test_raft_stage_logs_its_filter_and_trains_on_the_winners(tmp_path):
    experiment = get_experiment("tiny_raft")
    stage = dataclasses.replace(experiment.stages[0], max_steps=2, min_reward=0.55)
    experiment = dataclasses.replace(experiment, stages=(stage,))
    stage_dir = _run_stage(experiment, "raft", tmp_path)
    records = read_metrics(stage_dir)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        kept = record["filter/kept_1"]
        assert 0 <= kept <= stage.rollout_batch_size  # at most one per prompt
        assert record["filter/kept_fraction"] == pytest.approx(kept / (stage.rollout_batch_size * stage.num_samples))
        assert record["sft/steps_1"] == math.ceil(kept / stage.sft_batch_size) * stage.sft_epochs
        assert record["reward/max"] >= record["reward/mean"] and record["filter/threshold_1"] == 0.55
    assert (stage_dir / "hf" / "config.json").is_file()


def test_raft_trains_on_the_sft_stages_input_and_logs_the_plain_rows_loss(tmp_path, monkeypatch):
    """RAFT's SFT steps take the SFT stage's input (`stages.sft.step_input`: the loss positions' index, and with
    length buckets each micro-batch at its rows' length) and log the loss of the plain rows, computed at every
    position on the whole row (the step's input placed as it is)."""
    from rlhf_jax.sharding import place_batch
    from rlhf_jax.stages import filtered
    from rlhf_jax.training.accumulate import LENGTH_BUCKET

    experiment = get_experiment("tiny_raft")
    stage = dataclasses.replace(experiment.stages[0], max_steps=1, min_reward=0.0)
    optimizer = dataclasses.replace(experiment.optimizer, micro_batches=2, length_buckets=4)
    experiment = dataclasses.replace(experiment, stages=(stage,), optimizer=optimizer)
    seen = []

    def recording(make):
        def step_input(experiment, stage, mesh):
            prepare = make(experiment, stage, mesh)
            return lambda batch: seen.append(sorted(prepared := prepare(batch))) or prepared
        return step_input

    monkeypatch.setattr(filtered, "step_input", recording(filtered.step_input))
    [prepared] = read_metrics(_run_stage(experiment, "raft", tmp_path / "prepared"))
    assert seen and all("loss_index" in keys and LENGTH_BUCKET in keys for keys in seen)
    seen.clear()
    monkeypatch.setattr(filtered, "step_input", recording(lambda experiment, stage, mesh: (
        lambda batch: place_batch(batch, mesh))))
    [plain] = read_metrics(_run_stage(experiment, "raft", tmp_path / "plain"))
    assert seen and not any("loss_index" in keys or LENGTH_BUCKET in keys for keys in seen)
    assert prepared["filter/kept_1"] == plain["filter/kept_1"] == stage.rollout_batch_size
    assert prepared["sft/steps_1"] == plain["sft/steps_1"] == stage.sft_epochs
    # float32 sums over the positions in another order: equal to rounding (the second epoch's step starts from
    # the first's params, which differ by as much)
    np.testing.assert_allclose(prepared["sft/loss_1"], plain["sft/loss_1"], rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny_raft", "tiny_rest"])
def test_raft_and_rest_killed_mid_run_resume_exactly(tmp_path, monkeypatch, name):
    experiment = get_experiment(name)
    experiment = dataclasses.replace(experiment, checkpoint=dataclasses.replace(experiment.checkpoint, every_steps=1))
    stage = experiment.stages[0]
    full, resumed = _full_then_killed_and_resumed(experiment, stage.name, tmp_path, monkeypatch, kill_after=2)
    strip = lambda records: [{k: v for k, v in r.items() if k != "time" and not k.startswith(("time/", "throughput/"))}  # noqa: E731
                             for r in records]
    assert [r["step"] for r in read_metrics(resumed)] == list(range(1, stage.max_steps + 1))
    assert strip(read_metrics(resumed)) == strip(read_metrics(full))
    if name == "tiny_rest":
        last = read_metrics(full)[-1]
        kept = [last[f"filter/kept_{i}"] for i in (1, 2, 3)]
        assert kept == sorted(kept, reverse=True)  # rising thresholds keep fewer samples
        assert [last[f"filter/threshold_{i}"] for i in (1, 2, 3)] == list(stage.thresholds)


def test_best_of_n_writes_each_prompts_best_and_beats_single_samples(tmp_path):
    from rlhf_jax.data import load_dataset

    experiment = get_experiment("tiny_best_of_n")
    stage = experiment.stages[0]
    stage_dir = _run_stage(experiment, stage.name, tmp_path)
    summary = json.loads((stage_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (stage_dir / "best_of_n.jsonl").read_text().splitlines()]
    assert len(rows) == summary["prompts"] == stage.num_prompts
    assert summary["best_of_n/reward_mean"] == pytest.approx(np.mean([r["reward"] for r in rows]))
    assert summary["single/reward_mean"] == pytest.approx(np.mean([r["mean_reward"] for r in rows]))
    assert all(r["reward"] >= r["mean_reward"] for r in rows)
    assert summary["best_of_n/reward_mean"] > summary["single/reward_mean"]
    _, _, tokenizer = load("tiny:smollm2")
    dataset = load_dataset(stage_dir / "best_of_n.jsonl", "sft", tokenizer)  # an SFT stage reads it
    assert len(dataset) == len(rows)
