"""`rlhf_jax.rewards` (numpy references) and `python -m rlhf_jax.evaluate` on tiny:smollm2 models and HH dev rows."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import evaluate, rewards
from rlhf_jax.errors import UserError

REPO = Path(__file__).resolve().parents[1]
HH_DEV = str(REPO.parent / "shared" / "data" / "hh-rlhf-harmless" / "dev.jsonl.gz")
REWARD_MEAN, REWARD_STD = 0.25, 2.0
# every policy evaluation here samples alike, so the process compiles the sampler once
SAMPLING = ("--prompts", HH_DEV, "--format", "hh", "--num-prompts", "3", "--batch-size", "2", "--max-new-tokens",
            "6", "--seed", "1")


# ---- reward functions ------------------------------------------------------------------------------------


def random_rollout(seed: int, batch: int = 6, prompt: int = 5, response: int = 9, vocab: int = 7):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, response + 1, batch)
    lengths[0] = 0  # an empty response
    response_mask = np.arange(response)[None] < lengths[:, None]
    return (rng.integers(0, vocab, (batch, prompt)), rng.random((batch, prompt)) < 0.8,
            rng.integers(0, vocab, (batch, response)), response_mask)


def target_fraction_reference(response_tokens, response_mask, token_id):
    out = np.zeros(len(response_tokens), np.float64)
    for row, (tokens, mask) in enumerate(zip(response_tokens, response_mask)):
        kept = tokens[mask.astype(bool)]
        out[row] = np.mean(kept == token_id) if len(kept) else 0.0
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_target_token_fraction_matches_numpy(seed):
    rollout = random_rollout(seed)
    fn = rewards.get_reward_function("fn:target_token_fraction:3")
    want = target_fraction_reference(rollout[2], rollout[3], 3)
    for got in (fn(*map(jnp.asarray, rollout)), jax.jit(fn)(*map(jnp.asarray, rollout))):
        assert got.dtype == jnp.float32 and got.shape == (6,)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    # {0, 1} masks give the same scores as bool masks
    as_int = (rollout[0], rollout[1].astype(np.int32), rollout[2], rollout[3].astype(np.int32))
    np.testing.assert_allclose(np.asarray(fn(*map(jnp.asarray, as_int))), want, rtol=1e-6)


def test_target_token_fraction_hand_case():
    tokens = jnp.array([[5, 5, 1, 5], [5, 5, 5, 5], [1, 1, 1, 1]])
    mask = jnp.array([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]], bool)
    prompt = jnp.zeros((3, 2), jnp.int32)
    got = rewards.target_token_fraction(5)(prompt, prompt > -1, tokens, mask)
    np.testing.assert_allclose(np.asarray(got), [2 / 3, 0.0, 0.0])


@pytest.mark.parametrize("spec,scale", [("fn:length", 1.0), ("fn:length:0.5", 0.5), ("length:2", 2.0)])
def test_length_matches_numpy(spec, scale):
    rollout = random_rollout(3)
    got = jax.jit(rewards.get_reward_function(spec))(*map(jnp.asarray, rollout))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), scale * rollout[3].sum(axis=1).astype(np.float64), rtol=1e-6)


@pytest.mark.parametrize("spec,message", [
    ("fn:no_such_reward",
     "unknown reward function 'no_such_reward' in 'fn:no_such_reward'; expected one of length, target_token_fraction"),
    ("fn:target_token_fraction", "expected fn:target_token_fraction:TOKEN_ID"),
    ("fn:target_token_fraction:1.5", "non-negative integer"),
    ("fn:length:1:2", "expected fn:length[:SCALE]"),
    ("fn:length:abc", "argument 'abc' is not a number"),
    ("fn:", "expected fn:NAME"),
])
def test_bad_reward_specs_are_user_errors(spec, message):
    with pytest.raises(UserError, match=re.escape(message)):
        rewards.get_reward_function(spec)


def test_registry_lists_every_function_with_its_usage():
    lines = rewards.describe_reward_functions().splitlines()
    assert [line.split()[0] for line in lines] == ["fn:length[:SCALE]", "fn:target_token_fraction:TOKEN_ID",
                                                  "fn:token_id_below:THRESHOLD"]
    assert rewards.is_reward_function_spec("fn:length") and not rewards.is_reward_function_spec("runs/x")


# ---- models on disk -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A run directory with an LM stage `sft` and a reward stage `reward` (tiny:smollm2 weights), and a reward
    model whose tokenizer has one extra token."""
    from transformers import AutoTokenizer

    from rlhf_jax.models import llama, load
    from rlhf_jax.training.artifacts import save_artifact

    config, params, tokenizer = load("tiny:smollm2")
    root = tmp_path_factory.mktemp("evaluate")
    run = root / "run"
    save_artifact(run / "sft" / "model", config, params, tokenizer, "lm", {"stage": "sft"})
    reward_model = llama.init_scalar_model(config, params, jax.random.key(1))
    save_artifact(run / "reward" / "model", config, reward_model, tokenizer, "scalar",
                  {"stage": "reward", "reward_mean": REWARD_MEAN, "reward_std": REWARD_STD})
    (run / "config.json").write_text(json.dumps({"stages": [{"name": "sft"}, {"name": "reward"}]}))
    other_tokenizer = AutoTokenizer.from_pretrained(str(run / "sft" / "model"))
    other_tokenizer.add_tokens(["<an-extra-token>"])
    other_rm = save_artifact(root / "other_rm", config, reward_model, other_tokenizer, "scalar", {})
    return SimpleNamespace(root=root, run=run, sft=run / "sft", reward=run / "reward", other_rm=other_rm,
                           config=config, reward_params=reward_model, tokenizer=tokenizer)


def run_main(capsys, *argv: str) -> dict:
    assert evaluate.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.usefixtures("cli_processes")  # start the command-line cases now, to overlap the compiles below
def test_run_directory_resolves_to_the_last_stage_of_the_needed_kind(models, tmp_path):
    assert evaluate.resolve_model_path(str(models.run), "lm") == str(models.sft / "model")
    assert evaluate.resolve_model_path(str(models.run), "scalar") == str(models.reward / "model")
    assert evaluate.resolve_model_path(str(models.reward), "scalar") == str(models.reward / "model")
    assert evaluate.resolve_model_path("tiny:smollm2", "lm") == "tiny:smollm2"
    # config order, not names: of two LM stages the one listed last wins
    for name, target in (("b", models.sft), ("a", models.sft), ("r", models.reward)):
        (tmp_path / name).symlink_to(target)
    (tmp_path / "config.json").write_text(json.dumps({"stages": [{"name": "b"}, {"name": "r"}, {"name": "a"}]}))
    assert evaluate.resolve_model_path(str(tmp_path), "lm") == str(tmp_path / "a" / "model")
    (tmp_path / "r").unlink()
    with pytest.raises(UserError, match="no stage of this run produced a reward model; stages with models: b "):
        evaluate.resolve_model_path(str(tmp_path), "scalar")
    with pytest.raises(UserError, match="a language model, expected a reward model"):
        evaluate.locate_model(str(models.sft), "scalar", "MODEL")


def test_rm_metrics_equal_a_direct_computation(models, capsys):
    from rlhf_jax.data import TokenizeConfig, read_records, tokenize_dataset
    from rlhf_jax.models import llama

    result = run_main(capsys, "rm", str(models.run), "--data", HH_DEV, "--format", "hh", "--max-examples", "5",
                      "--batch-size", "5")
    records, _ = read_records(HH_DEV, "preference", format="hh")
    dataset = tokenize_dataset(records[:5], "preference", models.tokenizer,
                               TokenizeConfig(max_length=1024, max_prompt_length=512))
    # every sequence right-padded into one batch: no buckets, no DataIterator
    sequences = [np.concatenate([e.prompt, e.responses[side]]) for side in (0, 1) for e in dataset.examples]
    width = max(map(len, sequences))
    tokens = np.array([np.pad(s, (0, width - len(s))) for s in sequences])
    mask = np.arange(width)[None] < np.array([len(s) for s in sequences])[:, None]
    scores = np.asarray(llama.rewards_forward(models.config, models.reward_params, jnp.asarray(tokens),
                                              jnp.asarray(mask)), np.float64)
    chosen, rejected = scores[:5], scores[5:]
    assert result["pairs"] == 5 and result["model"] == str(models.reward / "model")
    assert result["accuracy"] == np.mean(chosen > rejected)
    assert result["ties"] == int(np.sum(chosen == rejected))
    for name, want in (("margin", np.mean(chosen - rejected)), ("chosen_reward_mean", chosen.mean()),
                       ("chosen_reward_std", chosen.std()), ("rejected_reward_mean", rejected.mean()),
                       ("rejected_reward_std", rejected.std())):
        np.testing.assert_allclose(result[name], want, atol=1e-5, err_msg=name)
    assert (result["recorded_reward_mean"], result["recorded_reward_std"]) == (REWARD_MEAN, REWARD_STD)


def test_rm_metrics_count_ties_as_wrong():
    metrics = evaluate.reward_model_metrics(np.array([1.0, 2.0, 0.5]), np.array([0.0, 2.0, 1.0]))
    assert metrics["accuracy"] == pytest.approx(1 / 3) and metrics["ties"] == 1
    assert metrics["margin"] == pytest.approx(0.5 / 3)


def test_policy_against_itself_has_zero_kl_and_normalised_rewards(models, capsys):
    from rlhf_jax.data import TokenizeConfig, read_records, tokenize_dataset
    from rlhf_jax.models import llama

    # 3 prompts in batches of 2: the short last batch is padded and trimmed
    result = run_main(capsys, "policy", str(models.run), *SAMPLING, "--reward", str(models.run), "--reference",
                      str(models.sft), "--samples", "3")
    assert result["prompts"] == 3 and len(result["samples"]) == 3
    assert result["kl_k1_mean"] == 0.0 and result["kl_k3_mean"] == 0.0
    assert result["reward_normalised"] is True
    np.testing.assert_allclose(result["reward_mean"], (result["raw_reward_mean"] - REWARD_MEAN) / REWARD_STD,
                               rtol=1e-6)
    np.testing.assert_allclose(result["reward_std"], result["raw_reward_std"] / REWARD_STD, rtol=1e-6)
    lengths = [sample["length"] for sample in result["samples"]]
    assert result["response_length_mean"] == pytest.approx(np.mean(lengths)) and 1 <= min(lengths) <= 6
    assert result["eos_fraction"] == np.mean([sample["ended_with_eos"] for sample in result["samples"]])
    # each sample's raw score equals the reward model on its unpadded [prompt | response] sequence
    records, _ = read_records(HH_DEV, "prompt", format="hh")
    prompts = tokenize_dataset(records[:3], "prompt", models.tokenizer,
                               TokenizeConfig(max_length=518, max_prompt_length=512))
    for example, sample in zip(prompts.examples, result["samples"]):
        assert sample["prompt"].startswith("Human:") and len(sample["response_token_ids"]) == sample["length"]
        tokens = jnp.asarray(np.concatenate([example.prompt, sample["response_token_ids"]])[None])
        raw = float(llama.rewards_forward(models.config, models.reward_params, tokens, tokens >= 0)[0])
        np.testing.assert_allclose(sample["raw_reward"], raw, atol=1e-4)
        np.testing.assert_allclose(sample["reward"], (raw - REWARD_MEAN) / REWARD_STD, atol=1e-4)


def test_policy_with_function_rewards(models, capsys):
    common = ("policy", str(models.sft), *SAMPLING, "--samples", "2")
    by_length = run_main(capsys, *common, "--reward", "fn:length")
    assert by_length["kl_k1_mean"] is None and by_length["reference"] is None
    assert by_length["reward_normalised"] is False
    assert by_length["reward_mean"] == by_length["raw_reward_mean"] == by_length["response_length_mean"]
    assert [s["reward"] for s in by_length["samples"]] == [s["length"] for s in by_length["samples"]]
    # the same seed gives the same responses: aim at the first response's first token
    target = by_length["samples"][0]["response_token_ids"][0]
    by_token = run_main(capsys, *common, "--reward", f"fn:target_token_fraction:{target}")
    for sample, before in zip(by_token["samples"], by_length["samples"]):
        assert sample["response_token_ids"] == before["response_token_ids"]
        assert sample["reward"] == pytest.approx(np.mean(np.array(sample["response_token_ids"]) == target))
    assert by_token["samples"][0]["reward"] > 0


def test_tables_are_printed_without_json(models, capsys):
    assert evaluate.main(["policy", str(models.sft), *SAMPLING, "--reward", "fn:length", "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "response_length_mean" in out and "Samples" in out and "Human:" in out


# ---- the command line in a subprocess ------------------------------------------------------------------------

# through the real entry point in a subprocess: the errors from files and models ...
ERROR_CASES = {
    "missing model": (["rm", "{root}/missing-model", "--data", HH_DEV], "missing-model: no such file or directory"),
    "missing data": (["rm", "{run}", "--data", "{root}/missing.jsonl"], "missing.jsonl: no such file or directory"),
    "lm as reward model": (["rm", "{sft}", "--data", HH_DEV], "MODEL {sft}: a language model, expected a reward model"),
    "tokenizer mismatch": (["policy", "{run}", "--prompts", HH_DEV, "--reward", "{other_rm}", "--num-prompts", "1"],
                           "its tokenizer differs from the policy's"),
}
# ... and through `main` in this process: the errors from options (the same code path, cheaper)
OPTION_ERRORS = {
    "lm as --reward": (["policy", "{run}", "--prompts", HH_DEV, "--reward", "{sft}"],
                       "--reward {sft}: a language model, expected a reward model"),
    "unknown reward function": (["policy", "{run}", "--prompts", HH_DEV, "--reward", "fn:nope"],
                                "unknown reward function 'nope'"),
    "bad option": (["policy", "{run}", "--prompts", HH_DEV, "--samples", "-1"], "--samples must be at least 0"),
    "no command": ([], "the following arguments are required"),
    "greedy and temperature": (["policy", "{run}", "--prompts", HH_DEV, "--greedy", "--temperature", "2"],
                               "not allowed with argument"),
}


def _paths(models) -> dict:
    return {"root": models.root, "run": models.run, "sft": models.sft, "other_rm": models.other_rm}


@pytest.mark.parametrize("case", sorted(OPTION_ERRORS))
def test_option_errors_print_one_line_and_return_2(models, capsys, case):
    argv, message = OPTION_ERRORS[case]
    paths = _paths(models)
    assert evaluate.main([arg.format(**paths) for arg in argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.format(**paths) in lines[0], captured.err
    assert captured.out == ""


@pytest.fixture(scope="module")
def cli_processes(models):
    """Every subprocess case, started together (and early: they run while this process compiles)."""
    paths = _paths(models)
    cases = {name: [arg.format(**paths) for arg in argv] for name, (argv, _) in ERROR_CASES.items()}
    cases["success"] = ["rm", str(models.run), "--data", HH_DEV, "--max-examples", "3", "--json"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    processes = {name: subprocess.Popen([sys.executable, "-m", "rlhf_jax.evaluate", *argv], cwd=REPO, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
                 for name, argv in cases.items()}
    yield processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.fixture(scope="module")
def cli_runs(cli_processes):
    """name -> (returncode, stdout, stderr) of each subprocess case."""
    results = {}
    for name, process in cli_processes.items():
        stdout, stderr = process.communicate(timeout=600)
        results[name] = SimpleNamespace(returncode=process.returncode, stdout=stdout, stderr=stderr)
    return results


def test_cli_success_prints_one_json_object(cli_runs):
    result = cli_runs["success"]
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["command"] == "rm" and report["pairs"] == 3 and 0 <= report["accuracy"] <= 1


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_cli_user_errors_exit_2_with_one_line(cli_runs, models, case):
    result = cli_runs[case]
    message = ERROR_CASES[case][1].format(sft=models.sft)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert result.stdout == ""
