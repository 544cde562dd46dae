"""Addition questions with an exact, verifiable answer: generators, the reward, and greedy accuracy.

    questions = generate_questions("test", 200, seed=0)      # [{"prompt", "answer", "reference", "operands"}]
    exact_answer_reward("17 + 25 = 42.", 42)                  # 1.0
    evaluate_accuracy(config, params, tokenizer, questions)   # {"accuracy", "response_length_mean", ...}

    python -m rlhf_jax.tasks.arithmetic write --split test --n 200 --seed 0 test.jsonl

Operands are integers in [1, 60]. The split is a fixed partition of the *unordered* operand pairs (a hash
of "min+max", about 20% held out), so a test question never shares its pair with a training question,
in either order, whatever the seeds. A question is a `prompt` record of the data layer (`reference` is
the answer as text, what `PromptRecord.reference` holds); `answer` is the same number as an int.

The answer of a response is its last stated result ("= 42", "is 42"), else its last number (see
`parse_answer`); the reward is 1.0 when it equals the question's answer, else 0.0.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rlhf_jax.errors import ArgumentParser, UserError

OPERAND_MIN, OPERAND_MAX = 1, 60
SPLITS = ("train", "test")
TEST_BUCKETS = 5  # one hash bucket in TEST_BUCKETS is held out: about 20% of the pairs
PHRASINGS = (
    "What is {a} + {b}?",
    "Compute {a} plus {b}.",
    "Add {a} and {b}.",
    "{a} + {b} = ?",
    "What is the sum of {a} and {b}?",
    "Calculate {a} + {b}.",
    "How much is {a} plus {b}?",
    "Find the sum of {a} and {b}.",
)
EXIT_USER_ERROR = 2


# ---- questions -----------------------------------------------------------------------------------------


def split_of(a: int, b: int) -> str:
    """"test" or "train" for the operand pair, the same for (a, b) and (b, a); fixed, independent of seeds."""
    low, high = sorted((int(a), int(b)))
    digest = hashlib.sha256(f"{low}+{high}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % TEST_BUCKETS == 0 else "train"


def operand_pairs(split: str) -> list[tuple[int, int]]:
    """Every ordered pair (a, b) of operands in [OPERAND_MIN, OPERAND_MAX] that belongs to `split`."""
    _check_split(split)
    span = range(OPERAND_MIN, OPERAND_MAX + 1)
    return [(a, b) for a in span for b in span if split_of(a, b) == split]


def question(a: int, b: int, phrasing: int = 0) -> dict[str, Any]:
    """The record of "a + b" asked in `PHRASINGS[phrasing]`."""
    return {"prompt": PHRASINGS[phrasing].format(a=a, b=b), "answer": a + b, "reference": str(a + b),
            "operands": [a, b]}


def generate_questions(split: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` questions of `split`, a function of (split, n, seed) only.

    Operand pairs are drawn without replacement (a fresh permutation of the split's pairs each time they
    run out, so repeats only beyond ~720 test / ~2880 train questions); each gets a random phrasing.
    """
    _check_split(split)
    if n < 1:
        raise UserError(f"the number of questions must be at least 1, got {n}")
    if not 0 <= seed < 2**32:
        raise UserError(f"the seed must be in [0, 2**32), got {seed}")
    pairs = operand_pairs(split)
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    order = np.concatenate([rng.permutation(len(pairs)) for _ in range(-(-n // len(pairs)))])[:n]
    phrasings = rng.integers(len(PHRASINGS), size=n)
    return [question(*pairs[index], int(phrasing)) for index, phrasing in zip(order, phrasings)]


def write_questions(path: str | Path, split: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Write `generate_questions(split, n, seed)` to `path` as JSON lines (a prompt file); return them."""
    questions = generate_questions(split, n, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for record in questions:
            out.write(json.dumps(record) + "\n")
    return questions


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


# ---- the reward --------------------------------------------------------------------------------------------


# A number: an optional minus sign (not after a digit or letter: "17-5" is 17 and 5), digits with optional
# thousands commas ("1,000"), an optional decimal part. Not inside a word ("SmolLM2", "x2").
_NUMBER = re.compile(r"(?<![\w.])(-?)(\d{1,3}(?:,\d{3})+(?!\d|,\d)|\d+)(\.\d+)?")
# what makes the number that follows a stated result: "= 42", "is 42", "equals 42", "answer: **42**", "= \boxed{42}"
_RESULT_MARKER = re.compile(r"(?:=|\b(?:is|equals|equal to|answer)\b)[\s:*$({\[]*(?:\\boxed\{)?\Z", re.IGNORECASE)
# a number followed by an operator and a number starts an expression ("is 17 + 25 = 42"), not a result
_OPERATOR_AFTER = re.compile(r"\s*[-+*/×÷^]\s*\d")
_MARKER_WINDOW = 24  # characters before a number searched for its marker


def _value(match: re.Match) -> Fraction:
    sign, digits, decimals = match.groups()
    return Fraction(sign + digits.replace(",", "") + (decimals or ""))


def numbers(text: str) -> list[Fraction]:
    """Every number written in digits in `text`, in order, as exact fractions ("1,000" -> 1000, "-3.5")."""
    return [_value(match) for match in _NUMBER.finditer(text)]


def parse_answer(response_text: str) -> Fraction | None:
    """The answer a response gives: its last *stated result*, else its last number; None without numbers.

    A stated result is a number right after "=", "is", "equals", "equal to" or "answer" (with spaces, ":",
    "*", "$", "(" or "\\boxed{" between), unless an operator and another number follow it (then it starts
    an expression: "is 17 + 25 = 42" states 42). So "17 + 25 = 42", "The answer is 42." and "The sum of 17
    and 25 is 42, which is the sum of 17 and 25." all give 42: restated operands and trailing chatter do
    not displace the result. A response with no stated result gives its last number ("17 and 25 make 42").
    Commas group thousands ("1,000"); a decimal counts by its value ("42.0" is 42); a minus sign at the
    start or after a space or "=" is a sign ("-42"), after a digit it is subtraction ("17-5" is 17 and 5).
    Numbers in words ("forty-two") are not read.
    """
    found = list(_NUMBER.finditer(response_text))
    if not found:
        return None
    results = [match for match in found
               if _RESULT_MARKER.search(response_text[max(0, match.start() - _MARKER_WINDOW):match.start()])
               and not _OPERATOR_AFTER.match(response_text, match.end())]
    return _value((results or found)[-1])


def exact_answer_reward(response_text: str, answer: int) -> float:
    """1.0 when `parse_answer(response_text)` equals `answer`, else 0.0 (also for a response with no number)."""
    parsed = parse_answer(response_text)
    return 1.0 if parsed is not None and parsed == answer else 0.0


def exact_answer_rewards(texts: Sequence[str], answers: Sequence[int]) -> np.ndarray:
    """`exact_answer_reward` of each (text, answer): float32 [B]."""
    if len(texts) != len(answers):
        raise ValueError(f"{len(texts)} texts but {len(answers)} answers")
    return np.asarray([exact_answer_reward(text, answer) for text, answer in zip(texts, answers)], np.float32)


# ---- greedy accuracy -----------------------------------------------------------------------------------------


def evaluate_accuracy(config, params, tokenizer, questions: Sequence[dict], max_new_tokens: int = 32,
                      batch_size: int = 32, samples: int = 10) -> dict[str, Any]:
    """Greedy exact-match accuracy of a model on `questions` (records with "prompt" and "answer").

    Each prompt is one user turn under the tokenizer's chat template, with the generation prompt, decoded
    greedily by the KV-cache sampler (`rlhf_jax.sampling.text.generate_text`) for at most `max_new_tokens`
    tokens. Returns: questions, correct, accuracy, response_length_mean (tokens, EOS included),
    eos_fraction, no_number_fraction, and the first `samples` as {prompt, answer, response, parsed, reward}.
    """
    import jax

    from rlhf_jax.sampling import SamplingSettings
    from rlhf_jax.sampling.text import generate_text

    if not questions:
        raise UserError("no questions to evaluate")
    settings = SamplingSettings(greedy=True, max_new_tokens=max_new_tokens)
    records = generate_text(config, params, tokenizer, [q["prompt"] for q in questions], jax.random.key(0),
                            settings, batch_size=batch_size, chat_template=True)
    texts = [record["completion"] for record in records]
    answers = [int(q["answer"]) for q in questions]
    rewards = exact_answer_rewards(texts, answers)
    parsed = [parse_answer(text) for text in texts]
    return {
        "questions": len(questions),
        "correct": int(rewards.sum()),
        "accuracy": int(rewards.sum()) / len(questions),
        "response_length_mean": float(np.mean([len(r["completion_token_ids"]) for r in records])),
        "eos_fraction": float(np.mean([r["finish_reason"] == "eos" for r in records])),
        "no_number_fraction": float(np.mean([p is None for p in parsed])),
        "samples": [{"prompt": q["prompt"], "answer": int(q["answer"]), "response": text,
                     "parsed": None if p is None else _plain(p), "reward": float(reward)}
                    for q, text, p, reward in list(zip(questions, texts, parsed, rewards))[:samples]],
    }


def _plain(value: Fraction) -> int | float:
    return int(value) if value.denominator == 1 else float(value)


# ---- command line --------------------------------------------------------------------------------------



def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m rlhf_jax.tasks.arithmetic", description="Addition questions.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{write}")
    write = commands.add_parser("write", help="write questions as a JSON-lines prompt file")
    write.add_argument("out", metavar="OUT.jsonl")
    write.add_argument("--split", choices=SPLITS, default="train")
    write.add_argument("--n", type=int, default=1000, metavar="N", help="number of questions")
    write.add_argument("--seed", type=int, default=0, metavar="S")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        write_questions(args.out, args.split, args.n, args.seed)
    except UserError as error:
        print(f"error: {error}".replace("\n", " "), file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"{args.out}: {args.n} {args.split} questions (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
