"""The evaluate stage: the `evaluate policy` numbers as a pipeline stage, and before -> after comparisons."""

import dataclasses
import json
from pathlib import Path

import pytest

from experiments.paths import HH_HARMLESS_DEV
from rlhf_jax import stages as stage_registry
from rlhf_jax.config import ConfigError, EvaluateStage, validate
from rlhf_jax.evaluate import main as evaluate_main
from rlhf_jax.registry import get_experiment
from rlhf_jax.stages.evaluate import compare


def _experiment(*stages):
    return dataclasses.replace(get_experiment("tiny_sft"), stages=stages)


def test_compare_reports_before_after_and_change():
    before = {"reward_mean": 1.0, "kl_k1_mean": None, "response_length_mean": 10.0}
    after = {"reward_mean": 1.5, "kl_k1_mean": 0.2, "response_length_mean": 8.0}
    assert compare(before, after) == {
        "reward_mean/before": 1.0, "reward_mean/after": 1.5, "reward_mean/change": 0.5,
        "response_length_mean/before": 10.0, "response_length_mean/after": 8.0, "response_length_mean/change": -2.0,
    }


def test_baseline_must_name_an_earlier_evaluate_stage():
    common = dict(model="tiny:smollm2", reward_model="fn:length", prompts=HH_HARMLESS_DEV)
    with pytest.raises(ConfigError, match=r"stages\.after\.baseline: got 'later'.*an earlier evaluate stage"):
        validate(_experiment(EvaluateStage(name="after", baseline="later", **common),
                             EvaluateStage(name="later", **common)))
    validate(_experiment(EvaluateStage(name="before", **common), EvaluateStage(name="after", baseline="before",
                                                                               **common)))


def test_evaluate_stage_equals_the_evaluate_command_and_compares_with_its_baseline(tmp_path, capsys):
    common = dict(reward_model="fn:length", reference="tiny:smollm2", prompts=HH_HARMLESS_DEV, num_prompts=4,
                  batch_size=4, max_prompt_length=32, max_new_tokens=8, samples=2)
    experiment = _experiment(EvaluateStage(name="before", model="tiny:smollm2", **common),
                             EvaluateStage(name="after", model="tiny:smollm2", baseline="before", **common))
    validate(experiment)
    resolve = stage_registry.make_resolver(experiment, tmp_path)
    runner = stage_registry.load_runner("evaluate")
    for stage in experiment.stages:
        (tmp_path / stage.name).mkdir()
        runner(experiment, stage, tmp_path / stage.name, resolve)
    capsys.readouterr()
    result = json.loads((tmp_path / "before" / "evaluation.json").read_text())
    argv = ["policy", "tiny:smollm2", "--prompts", HH_HARMLESS_DEV, "--reward", "fn:length", "--reference",
            "tiny:smollm2", "--num-prompts", "4", "--batch-size", "4", "--max-prompt-length", "32",
            "--max-new-tokens", "8", "--samples", "2", "--seed", str(experiment.seed), "--format", "hh", "--json"]
    assert evaluate_main(argv) == 0
    command = json.loads(capsys.readouterr().out)
    for name in ("reward_mean", "kl_k1_mean", "response_length_mean", "eos_fraction", "prompts"):
        assert result[name] == command[name], name
    assert result["kl_k1_mean"] == 0.0  # the policy is its own reference
    assert result["reward_mean"] == result["response_length_mean"]  # fn:length scores the length
    summary = json.loads(Path(tmp_path / "after" / "summary.json").read_text())
    assert summary["reward_mean/before"] == result["reward_mean"]
    assert summary["reward_mean/change"] == 0.0  # same model, same seed
