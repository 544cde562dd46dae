"""`python -m rlhf_jax.generate` and the generate stage, on the tiny random model (UTF-8 byte tokens)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_jax.generate import main
from rlhf_jax.sampling.text import ByteTokenizer, cut_at_stop

REPO = Path(__file__).resolve().parents[1]
RECORD_KEYS = {"prompt", "prompt_text", "prompt_token_ids", "completion", "completion_token_ids", "sum_logprob",
               "finish_reason"}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_jax.generate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_cli_prints_json_lines_for_tiny_model():
    result = run_cli("tiny:llama", "--prompt", "hello", "--prompt", "a longer prompt here", "--max-new-tokens", "5",
                     "--temperature", "0.8", "--top-k", "50", "--json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 2 and all(set(record) >= RECORD_KEYS for record in records)
    assert records[0]["prompt"] == "hello" and records[0]["prompt_text"] == "\n\nHuman: hello\n\nAssistant:"
    assert records[0]["prompt_token_ids"] == list(records[0]["prompt_text"].encode())
    for record in records:
        assert 1 <= len(record["completion_token_ids"]) <= 5 and record["sum_logprob"] < 0
        assert record["finish_reason"] in ("eos", "length")


def test_cli_bad_model_path_exits_2_with_one_line(tmp_path):
    result = run_cli(str(tmp_path / "missing-model"), "--prompt", "hi")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing-model" in lines[0], result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("argv,message", [
    (["tiny:llama"], "no prompts"),
    (["tiny:llama", "--prompt", "x", "--top-p", "1.5"], "--top-p"),
    (["tiny:llama", "--prompt", "x", "--temperature", "0"], "temperature"),
    (["tiny:llama", "--prompt", "x", "--max-new-tokens", "zero"], "--max-new-tokens"),
    (["tiny:nope", "--prompt", "x"], "nope"),
    (["tiny:llama", "--prompts-file", "/no/such/prompts.jsonl"], "prompts.jsonl"),
])
def test_cli_user_errors_are_one_line_exit_2(capsys, argv, message):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and message in captured.err


def test_cli_prompts_file_messages_raw_text_and_readable_output(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "plain text"}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                   {"role": "user", "content": "more"}]}) + "\n"
    )
    args = ["tiny:llama", "--prompts-file", str(prompts), "--max-new-tokens", "4", "--greedy"]
    assert main([*args, "--json", "--no-chat-template"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt_text"] for r in records] == [
        "plain text", "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: more\n\nAssistant:"]
    assert records[1]["prompt"][0] == {"role": "user", "content": "hi"}
    assert main(args) == 0
    readable = capsys.readouterr().out
    assert "=== 0: prompt" in readable and "--- completion (" in readable and "Human: plain text" in readable


def test_cut_at_stop_keeps_the_shortest_prefix_containing_the_stop_string():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("Sure thing.\n\nHuman: again")
    kept, text, stopped = cut_at_stop(tokenizer, ids, ["\n\nHuman:"])
    assert stopped and text == "Sure thing." and tokenizer.decode(ids[:kept]) == "Sure thing.\n\nHuman:"
    assert cut_at_stop(tokenizer, ids, ["nowhere"]) == (len(ids), "Sure thing.\n\nHuman: again", False)


def words(text: str) -> str:
    """`text` as its words: what survives rich's rendering (tabs expanded, BEL/BS/VT/FF/CR dropped)."""
    return " ".join(text.translate({0x07: None, 0x08: None}).split())


def assert_samples_printed(stdout: str, records: list[dict]) -> None:
    """Each record's response, under the end of its prompt, in `stdout` (the generate stage's sample printout)."""
    printed = words(stdout)
    for record in records:
        tail = words(record["prompt_text"])[-50:]
        response = words(record["completion"]) or "(empty)"
        assert f"{tail} response: {response}" in printed, (tail, response)


def test_generate_stage_writes_generations_then_done(tmp_path, capsys):
    from rlhf_jax.config import DataFormat, ExperimentConfig, GenerateStage, ModelSpec
    from rlhf_jax.stages import load_runner

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}?"}) + "\n" for i in range(3)))
    stage = GenerateStage(name="gen", prompts=str(prompts), prompts_format=DataFormat.JSONL, num_prompts=2, batch_size=4,
                          max_new_tokens=5, temperature=0.9, top_p=0.9, num_samples=2, stop=("zz",))
    experiment = ExperimentConfig(name="t", run_dir=str(tmp_path / "run"), model=ModelSpec(source="tiny:llama"),
                                  stages=(stage,))
    stage_dir = tmp_path / "run" / "gen"
    stage_dir.mkdir(parents=True)
    load_runner("generate")(experiment, stage, stage_dir, lambda source: source)
    lines = (stage_dir / "generations.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["index"], r["sample"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert records[2]["prompt"] == "question 1?"
    for record in records:
        assert set(record) >= RECORD_KEYS and isinstance(record["sum_logprob"], float)
        assert 1 <= len(record["completion_token_ids"]) <= 5
    assert json.loads((stage_dir / "DONE").read_text())["generations"] == 4
    assert not list(stage_dir.glob("*.partial"))
    # The two samples of a prompt differ (their rows use different keys).
    assert records[0]["completion_token_ids"] != records[1]["completion_token_ids"]
    # Each response is printed under the end of its prompt, then where they all are.
    stdout = capsys.readouterr().out
    assert_samples_printed(stdout, records)
    assert "prompt 1, sample 1 · " in stdout and "Human: question 1?" in stdout
    assert stdout.rstrip().endswith(f"-> {stage_dir / 'generations.jsonl'}")


def test_print_samples_shows_the_prompts_tail_and_at_most_shown_samples():
    import io

    from rlhf_jax.stages.generate import PROMPT_TAIL_CHARS, SHOWN_SAMPLES, print_samples

    prompt_text = "\n\nHuman: " + "word " * 100 + "last [bold]question?\n\nAssistant:"
    records = [{"prompt_text": prompt_text, "completion": f" answer {n} [red]", "completion_token_ids": [1, 2],
                "finish_reason": "stop"} for n in range(SHOWN_SAMPLES + 2)]
    out = io.StringIO()
    print_samples(records, num_samples=2, out=out)
    text = out.getvalue()
    assert "prompt 7, sample 1 · 2 tokens, stop" in text and "prompt 8," not in text
    assert f"response: answer {SHOWN_SAMPLES - 1} [red]\n" in text and f"answer {SHOWN_SAMPLES} " not in text
    assert text.rstrip().endswith("… and 2 more")
    (tail,) = {line for line in text.splitlines() if line.startswith("…word")}
    assert len(tail) <= PROMPT_TAIL_CHARS and tail.endswith("last [bold]question?")
    assert "Human:" not in text  # cut: only the end of the prompt is shown
