"""`rlhf_jax.tasks.arithmetic`: question generators and splits, the exact-answer reward, greedy accuracy on a
tiny model, and the `write` / `evaluate arith` commands."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax import evaluate
from rlhf_jax.errors import UserError
from rlhf_jax.tasks import arithmetic
from rlhf_jax.tasks.arithmetic import (PHRASINGS, exact_answer_reward, exact_answer_rewards, generate_questions,
                                       numbers, operand_pairs, parse_answer, split_of)

REPO = Path(__file__).resolve().parents[1]


def unordered_pairs(questions) -> set[tuple[int, int]]:
    return {tuple(sorted(q["operands"])) for q in questions}


# ---- questions -------------------------------------------------------------------------------------------


def test_questions_are_a_function_of_split_n_and_seed():
    assert generate_questions("train", 50, seed=3) == generate_questions("train", 50, seed=3)
    assert generate_questions("train", 50, seed=3) != generate_questions("train", 50, seed=4)
    assert generate_questions("test", 50, seed=3) != generate_questions("train", 50, seed=3)


def test_question_records():
    for q in generate_questions("train", 300, seed=0):
        a, b = q["operands"]
        assert 1 <= a <= 60 and 1 <= b <= 60
        assert q["answer"] == a + b and q["reference"] == str(a + b)
        assert re.findall(r"\d+", q["prompt"]) == [str(a), str(b)]  # both operands, in order, and no answer
    operands = np.array([q["operands"] for q in generate_questions("train", 3000, seed=1)])
    assert operands.min() == 1 and operands.max() == 60  # the whole range is used


def test_splits_partition_the_unordered_operand_pairs():
    train, test = operand_pairs("train"), operand_pairs("test")
    assert len(train) + len(test) == 60 * 60 and not set(train) & set(test)
    assert 0.15 < len(test) / 3600 < 0.25
    assert all(split_of(a, b) == split_of(b, a) for a in range(1, 61) for b in range(1, 61))
    # (a, b) and (b, a) are on the same side: a held-out question is not a training question reordered
    assert {(b, a) for a, b in test} == set(test)


def test_held_out_questions_never_share_a_pair_with_training_questions():
    train = unordered_pairs(generate_questions("train", 6000, seed=11))  # more than the train pairs: repeats
    test = unordered_pairs(generate_questions("test", 1000, seed=12))
    assert not train & test
    assert all(split_of(*pair) == "test" for pair in test)


def test_pairs_repeat_only_once_the_split_is_used_up():
    questions = generate_questions("test", len(operand_pairs("test")), seed=5)
    assert len({tuple(q["operands"]) for q in questions}) == len(questions)


def test_phrasings_vary():
    questions = generate_questions("test", 200, seed=0)
    used = {next(i for i, p in enumerate(PHRASINGS) if p.format(a=a, b=b) == q["prompt"])
            for q in questions for a, b in [q["operands"]]}
    assert used == set(range(len(PHRASINGS))) and len(PHRASINGS) >= 6


@pytest.mark.parametrize("split,n,seed,message", [
    ("dev", 3, 0, "unknown split 'dev'; expected one of train, test"),
    ("test", 0, 0, "the number of questions must be at least 1, got 0"),
    ("test", 3, -1, "the seed must be in [0, 2**32), got -1"),
])
def test_bad_arguments(split, n, seed, message):
    with pytest.raises(UserError, match=re.escape(message)):
        generate_questions(split, n, seed)


def test_written_questions_are_prompt_records(tmp_path):
    from rlhf_jax.data import read_records

    path = tmp_path / "test.jsonl"
    questions = arithmetic.write_questions(path, "test", 7, seed=2)
    records, report = read_records(path, "prompt")
    assert questions == generate_questions("test", 7, seed=2) and report.rows == 7
    assert [(r.prompt, r.reference) for r in records] == [(q["prompt"], str(q["answer"])) for q in questions]


# ---- the reward ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,answer,reward", [
    # correct, stated in the ways SmolLM2 states it
    ("17 + 25 = 42.", 42, 1.0),
    ("The answer is 42", 42, 1.0),
    ("The sum of 17 and 25 is 42.", 42, 1.0),
    ("42", 42, 1.0),
    ("The answer is: **42**", 42, 1.0),
    ("$17 + 25 = \\boxed{42}$", 42, 1.0),
    ("17 + 25 = 42\n\nThis is a classic example of a mathematical identity.", 42, 1.0),
    # the question restated: its operands come first, the result last
    ("What is 17 + 25? 17 + 25 = 42", 42, 1.0),
    ("The sum of 17 and 25 is 17 + 25 = 42.", 42, 1.0),
    ("The answer is 2 + 19 = 21.", 21, 1.0),
    ("17 + 25 = 42", 25, 0.0),
    # a stated result is not displaced by chatter after it (a SmolLM2 response)
    ("The sum of 24 and 11 is 35, which is the product of 24 and 11.", 35, 1.0),
    ("The answer is 42 (17 + 25).", 42, 1.0),
    # wrong
    ("17 + 25 = 32.", 42, 0.0),
    ("The answer is 43.", 42, 0.0),
    ("1 + 57 = 1 + 58 = 22", 58, 0.0),  # the last result counts, not any 58 in passing
    ("To compute 17 + 25, we can use the formula", 42, 0.0),  # cut before an answer: operands only
    # no number
    ("", 42, 0.0),
    ("I don't know.", 42, 0.0),
    ("forty-two", 42, 0.0),  # numbers in words are not read
    # several numbers without a stated result: the last one
    ("17 and 25 make 42", 42, 1.0),
    ("42, or maybe 43", 42, 0.0),
    # negatives
    ("The answer is -42.", 42, 0.0),
    ("x = -42", -42, 1.0),
    ("x=-42", -42, 1.0),
    # commas group thousands; decimals count by value
    ("The sum is 1,042.", 1042, 1.0),
    ("The answer is 1,000, as expected", 1000, 1.0),
    ("The answer is 1,000.", 1, 0.0),
    ("= 42.0", 42, 1.0),
    ("= 42.5", 42, 0.0),
    ("SmolLM2 says 42", 42, 1.0),  # digits inside a word are not a number
])
def test_exact_answer_reward_hand_cases(text, answer, reward):
    assert exact_answer_reward(text, answer) == reward, parse_answer(text)


def test_numbers():
    assert numbers("17-5") == [17, 5]  # subtraction, not -5
    assert numbers("17,25 and 1,000 and -3.5") == [17, 25, 1000, -3.5]
    assert numbers("no digits") == [] and parse_answer("no digits") is None


def test_batched_rewards_equal_the_per_item_rewards():
    rng = np.random.default_rng(0)
    questions = generate_questions("test", 64, seed=0)
    texts = [f"{q['prompt']} The answer is {q['answer'] + int(rng.integers(-1, 2))}." for q in questions]
    answers = [q["answer"] for q in questions]
    got = exact_answer_rewards(texts, answers)
    assert got.dtype == np.float32 and got.shape == (64,)
    np.testing.assert_array_equal(got, [exact_answer_reward(t, a) for t, a in zip(texts, answers)])
    assert 0 < got.mean() < 1
    with pytest.raises(ValueError):
        exact_answer_rewards(texts, answers[:-1])


# ---- greedy accuracy on a tiny model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_smollm2():
    from rlhf_jax.models import load

    return load("tiny:smollm2")  # random weights, SmolLM2's tokenizer and chat template


def test_evaluate_accuracy_on_a_tiny_model(tiny_smollm2):
    questions = generate_questions("test", 5, seed=0)
    result = arithmetic.evaluate_accuracy(*tiny_smollm2, questions, max_new_tokens=6, batch_size=4, samples=5)
    assert set(result) == {"questions", "correct", "accuracy", "response_length_mean", "eos_fraction",
                           "no_number_fraction", "samples"}
    assert result["questions"] == 5 and 0 <= result["accuracy"] <= 1 and 1 <= result["response_length_mean"] <= 6
    samples = result["samples"]
    assert [s["prompt"] for s in samples] == [q["prompt"] for q in questions]
    assert [s["answer"] for s in samples] == [q["answer"] for q in questions]
    rewards = [exact_answer_reward(s["response"], s["answer"]) for s in samples]
    assert [s["reward"] for s in samples] == rewards
    assert result["accuracy"] == np.mean(rewards) and result["correct"] == sum(rewards)
    # greedy: the same responses again
    again = arithmetic.evaluate_accuracy(*tiny_smollm2, questions, max_new_tokens=6, batch_size=4, samples=2)
    assert again["samples"] == samples[:2]


# ---- commands ------------------------------------------------------------------------------------------------


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def test_write_command(tmp_path):
    out = tmp_path / "test.jsonl"
    result = run_module("rlhf_jax.tasks.arithmetic", "write", "--split", "test", "--n", "4", "--seed", "1", str(out))
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in out.read_text().splitlines()] == generate_questions("test", 4, seed=1)
    bad = run_module("rlhf_jax.tasks.arithmetic", "write", "--split", "dev", str(out))
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1 and "invalid choice: 'dev'" in bad.stderr


def test_evaluate_arith_command_on_a_tiny_model():
    result = run_module("rlhf_jax.evaluate", "arith", "tiny:smollm2", "--num-questions", "3", "--seed", "1",
                        "--max-new-tokens", "4", "--batch-size", "4", "--samples", "3", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["command"] == "arith" and report["split"] == "test" and report["questions"] == 3
    assert 0 <= report["accuracy"] <= 1
    assert [s["prompt"] for s in report["samples"]] == [q["prompt"] for q in generate_questions("test", 3, seed=1)]
    assert report["accuracy"] == np.mean([exact_answer_reward(s["response"], s["answer"]) for s in report["samples"]])


@pytest.mark.parametrize("argv,message", [
    (["arith", "tiny:smollm2", "--num-questions", "0"], "--num-questions must be at least 1, got 0"),
    (["arith", "tiny:smollm2", "--split", "dev"], "invalid choice: 'dev'"),
    (["arith", "tiny:smollm2", "--samples", "-1"], "--samples must be at least 0, got -1"),
])
def test_evaluate_arith_option_errors(capsys, argv, message):
    assert evaluate.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and message in captured.err
    assert captured.err.count("\n") == 1


def test_the_shipped_question_files_are_what_the_generator_writes(tmp_path):
    from experiments.paths import ARITH_TEST, ARITH_TRAIN

    for split, n, path in (("train", 2000, ARITH_TRAIN), ("test", 200, ARITH_TEST)):
        fresh = tmp_path / f"{split}.jsonl"
        arithmetic.write_questions(fresh, split, n, 0)
        assert fresh.read_text() == Path(path).read_text(), path
