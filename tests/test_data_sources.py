"""Sources and validation: every format, every bad-record reason from a real malformed file, file errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_jax.data import (
    Demonstration,
    Feedback,
    Message,
    Preference,
    PromptRecord,
    iter_rows,
    read_records,
)
from rlhf_jax.data.sources import detect_format
from rlhf_jax.errors import UserError

HH = "\n\nHuman: {q}\n\nAssistant: {a}"
GOOD_PAIR = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}


def write_jsonl(path: Path, lines: list) -> Path:
    """Lines are dicts (written as JSON) or raw strings/bytes (written as they are)."""
    data = b"".join((json.dumps(line).encode() if isinstance(line, dict) else
                     line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def only_problem(path: Path, kind: str = "preference") -> str:
    """The one problem reported for ``path`` (which also holds one good row), with its location checked."""
    records, report = read_records(path, kind, check=False)
    assert len(report.problems) == 1, report.problems
    return str(report.problems[0])


# ---------------------------------------------------------------- records of each kind

def test_preference_with_prompt_and_conversational_forms(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        GOOD_PAIR,
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "assistant", "content": "go away"}]},
        {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]},
        {"chosen": HH.format(q="hi", a="hello"), "rejected": HH.format(q="hi", a="no")},
    ])
    records, report = read_records(path, "preference")
    chat = (Message("user", "hi"),)
    assert records == [
        Preference("What is 2+2?", "4", "5", f"{path}:1"),
        Preference(chat, "hello", "go away", f"{path}:2"),
        Preference(chat, "hello", "no", f"{path}:3"),
        Preference(chat, "hello", "no", f"{path}:4"),
    ]
    assert (report.rows, report.valid, report.problems) == (4, 4, [])


def test_hh_dialogue_turns_become_messages(tmp_path):
    chosen = "\n\nHuman: a?\n\nAssistant: b.\n\nHuman: c?\n\nAssistant: d!"
    rejected = "\n\nHuman: a?\n\nAssistant: b.\n\nHuman: c?\n\nAssistant: e"
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": chosen, "rejected": rejected}])
    [record], _ = read_records(path, "preference", format="hh")
    assert record.prompt == (Message("user", "a?"), Message("assistant", "b."), Message("user", "c?"))
    assert (record.chosen, record.rejected) == ("d!", "e")
    # the same row serves every stage: SFT on the chosen side, prompts, and unpaired feedback
    assert read_records(path, "sft")[0] == [Demonstration(record.prompt, "d!", f"{path}:1")]
    assert read_records(path, "prompt")[0] == [PromptRecord(record.prompt, None, f"{path}:1")]
    assert read_records(path, "unpaired")[0] == [Feedback(record.prompt, "d!", True, f"{path}:1"),
                                                 Feedback(record.prompt, "e", False, f"{path}:1")]


def test_sft_unpaired_and_prompt_rows(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [
        {"prompt": "p", "response": "r"},
        {"prompt": "p", "completion": "c"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}]},
    ])
    records, _ = read_records(path, "sft")
    assert [(r.prompt, r.response) for r in records] == [
        ("p", "r"), ("p", "c"), ((Message("system", "s"), Message("user", "u")), "a")]
    # a pair row with an explicit prompt (what the label and Constitutional-AI stages write) serves SFT too: its
    # chosen side, text or a one-message assistant list
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": [{"role": "user", "content": "u"}], "chosen": "good", "rejected": "bad"},
        {"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
    ])
    assert [(r.prompt, r.response) for r in read_records(path, "sft")[0]] == [
        ((Message("user", "u"),), "good"), ("p", "a")]
    path = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "p", "response": "r", "label": False}])
    assert read_records(path, "unpaired")[0] == [Feedback("p", "r", False, f"{path}:1")]
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "2+2?", "reference": "4"}, {"prompt": "hi"}])
    assert [(r.prompt, r.reference) for r in read_records(path, "prompt")[0]] == [("2+2?", "4"), ("hi", None)]


# ---------------------------------------------------------------- every bad-record reason, from real files

@pytest.mark.parametrize("line, reason", [
    ('{"prompt": "p", "chosen": "a", ', "malformed JSON"),
    (b'{"prompt": "p\xff", "chosen": "a", "rejected": "b"}', "not UTF-8 text"),
    ('["p", "a", "b"]', "expected an object with named fields, got list"),
    ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ({"chosen": "a", "rejected": "b", "prompt": None}, "no assistant turn in chosen and rejected"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "empty response (chosen)"),
    ({"prompt": " ", "chosen": "a", "rejected": "b"}, "empty prompt"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen and rejected are identical"),
    ({"chosen": HH.format(q="x", a="a"), "rejected": HH.format(q="y", a="b")},
     "chosen and rejected prompts differ"),
    ({"chosen": HH.format(q="x", a=""), "rejected": HH.format(q="x", a="b")}, "empty response (chosen)"),
    ({"chosen": HH.format(q="x", a="a"), "rejected": HH.format(q="x", a="a")}, "chosen and rejected are identical"),
    ({"chosen": "\n\nHuman: x", "rejected": HH.format(q="x", a="a")}, "no assistant turn in chosen"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]},
     "chosen and rejected prompts differ"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}, "prompt[0] has role 'robot'"),
    ({"chosen": "preamble" + HH.format(q="x", a="a"), "rejected": "preamble" + HH.format(q="x", a="b")},
     "dialogue does not start with a '\\n\\nHuman:' turn"),
])
def test_each_bad_preference_row_is_reported_with_its_line(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD_PAIR, line])
    problem = only_problem(path)
    assert problem.startswith(f"{path}:2: {reason}"), problem


@pytest.mark.parametrize("kind, row, reason", [
    ("sft", {"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ("sft", {"prompt": "p"}, "missing field 'response' (or 'completion')"),
    ("sft", {"prompt": "p", "response": ""}, "empty response"),
    ("sft", {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}, "empty response"),
    ("unpaired", {"prompt": "p", "response": "r"}, "missing field 'label'"),
    ("unpaired", {"prompt": "p", "response": "r", "label": "yes"}, "field 'label' must be true or false"),
    ("prompt", {"text": "p"}, "missing field 'prompt' (or 'messages')"),
    ("prompt", {"prompt": "p", "reference": 4}, "field 'reference' must be text"),
])
def test_bad_rows_of_other_kinds(tmp_path, kind, row, reason):
    good = {"sft": {"prompt": "p", "response": "r"}, "unpaired": {"prompt": "p", "response": "r", "label": True},
            "prompt": {"prompt": "p"}}[kind]
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    assert only_problem(path, kind).startswith(f"{path}:2: {reason}")


def test_blank_lines_are_not_records_and_line_numbers_count_them(tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", [GOOD_PAIR, "", "{oops", "   "])
    records, report = read_records(path, "preference")
    assert (len(records), report.rows) == (1, 2)
    assert str(report.problems[0]).startswith(f"{path}:3: malformed JSON")


def test_strict_fails_and_default_skips_with_summary(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [GOOD_PAIR, {"prompt": "p", "chosen": "a", "rejected": "a"}])
    records, report = read_records(path, "preference")
    assert len(records) == 1
    assert report.summary() == (f"{path}: 1 valid preference records from 2 rows; "
                                "1 skipped (1 chosen and rejected are identical)")
    with pytest.raises(UserError, match=r"1 bad records in .*s\.jsonl \(strict\): .*s\.jsonl:2: chosen and rejected"):
        read_records(path, "preference", strict=True)


def test_nothing_valid_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "none.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "a"}])
    with pytest.raises(UserError, match=r"no valid preference records in 1 rows; first problem: .*:1: chosen and"):
        read_records(path, "preference")
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(UserError, match="no valid preference records in 0 rows"):
        read_records(empty, "preference")


def test_missing_file_corrupt_gzip_and_unknown_format(tmp_path):
    with pytest.raises(UserError, match=r"nope\.jsonl: no such file or directory"):
        read_records(tmp_path / "nope.jsonl", "sft")
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(json.dumps(GOOD_PAIR).encode() * 50)[:-20])
    with pytest.raises(UserError, match=r"cut\.jsonl\.gz: corrupt or truncated gzip data"):
        read_records(truncated, "preference")
    garbage = tmp_path / "garbage.jsonl.gz"
    garbage.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(UserError, match="corrupt or truncated gzip data"):
        read_records(garbage, "preference")
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_text(json.dumps(GOOD_PAIR))
    with pytest.raises(UserError, match="not a gzip file"):
        read_records(plain, "preference")
    with pytest.raises(UserError, match="cannot tell the format"):
        read_records(write_jsonl(tmp_path / "data.txt", [GOOD_PAIR]), "preference")
    with pytest.raises(UserError, match="unknown record type 'dpo'"):
        read_records(write_jsonl(tmp_path / "ok.jsonl", [GOOD_PAIR]), "dpo")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        read_records(write_jsonl(tmp_path / "fake.parquet", [GOOD_PAIR]), "preference")


# ---------------------------------------------------------------- formats

ROWS = [GOOD_PAIR, {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "x", "rejected": "x"}]


def expected_records(location):
    return [Preference("What is 2+2?", "4", "5", location(0)),
            Preference((Message("user", "hi"),), "a", "b", location(1))]


def check_rows(path, location, **kwargs):
    records, report = read_records(path, "preference", **kwargs)
    assert records == expected_records(location)
    assert [str(p) for p in report.problems] == [f"{location(2)}: chosen and rejected are identical"]


def test_jsonl_gzip_and_plain_read_the_same(tmp_path):
    for name in ("d.jsonl", "d.jsonl.gz"):
        path = write_jsonl(tmp_path / name, ROWS)
        assert detect_format(path) == "jsonl"
        check_rows(path, lambda i, path=path: f"{path}:{i + 1}")


def test_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS))
    check_rows(path, lambda i: f"{path}#{i}")


def test_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["What is 2+2?", "hi", "q"], "chosen": ["4", "a", "x"],
                             "rejected": ["5", "b", "x"]}), path, row_group_size=2)
    records, report = read_records(path, "preference")
    assert [(r.prompt, r.chosen, r.rejected, r.origin) for r in records] == [
        ("What is 2+2?", "4", "5", f"{path}#0"), ("hi", "a", "b", f"{path}#1")]
    assert [str(p) for p in report.problems] == [f"{path}#2: chosen and rejected are identical"]


def save_to_disk_layout(directory: Path, table: pa.Table, batch_rows: int = 2) -> None:
    """What `datasets.Dataset.save_to_disk` writes (checked against datasets 5.2): Arrow *stream* files listed
    in state.json."""
    directory.mkdir(parents=True)
    with pa.ipc.new_stream(directory / "data-00000-of-00001.arrow", table.schema) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)
    (directory / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "0", "_format_columns": None,
        "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}))
    (directory / "dataset_info.json").write_text("{}")


def test_datasets_directory_and_dataset_dict(tmp_path):
    table = pa.table({"messages": [[{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
                                   [{"role": "user", "content": "v"}]]})
    save_to_disk_layout(tmp_path / "single", table)
    records, report = read_records(tmp_path / "single", "sft")
    assert records == [Demonstration((Message("user", "u"),), "a", f"{tmp_path / 'single'}#0")]
    assert str(report.problems[0]).startswith(f"{tmp_path / 'single'}#1: no assistant turn")

    root = tmp_path / "dict"
    save_to_disk_layout(root / "train", pa.table({"prompt": ["p1", "p2", "p3"], "reference": ["1", None, "3"]}))
    save_to_disk_layout(root / "test", pa.table({"prompt": ["t"], "reference": ["9"]}))
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert detect_format(root) == "arrow"
    train, _ = read_records(root, "prompt")
    assert [(r.prompt, r.reference) for r in train] == [("p1", "1"), ("p2", None), ("p3", "3")]
    test, _ = read_records(root, "prompt", split="test")
    assert [(r.prompt, r.reference, r.origin) for r in test] == [("t", "9", f"{root / 'test'}#0")]
    with pytest.raises(UserError, match="choose a split"):
        read_records(root, "prompt", split="validation")


def test_tfds_builder_round_trip_without_tensorflow(tmp_path):
    import importlib.util

    from rlhf_jax.data.tfds_builder import build_tfds
    from rlhf_jax.data.sources import open_tfds_source
    import tensorflow_datasets as tfds

    assert importlib.util.find_spec("tensorflow") is None
    source = write_jsonl(tmp_path / "prefs.jsonl", ROWS + [{"chosen": HH.format(q="a", a="b"),
                                                             "rejected": HH.format(q="a", a="c")}])
    dev = write_jsonl(tmp_path / "dev.jsonl", [GOOD_PAIR])
    version_dir = build_tfds({"train": source, "validation": dev}, tmp_path / "tfds")
    assert sorted(p.name.split("-")[1] for p in version_dir.glob("*.array_record*")) == ["train.array_record",
                                                                                            "validation.array_record"]
    expected, _ = read_records(source, "preference")
    # read back through the standard TFDS entry point
    data_source = tfds.data_source("local_preferences", split="train", data_dir=str(tmp_path / "tfds"))
    assert len(data_source) == 3
    assert data_source[0]["origin"] == f"{source}:1".encode()
    for path in (tmp_path / "tfds", version_dir):  # a data_dir, or the prepared version directory
        records, report = read_records(path, "preference", format="tfds")
        assert [(r.prompt, r.chosen, r.rejected) for r in records] == [
            (r.prompt, r.chosen, r.rejected) for r in expected]
        assert report.problems == []
    validation, _ = read_records(tmp_path / "tfds", "preference", format="tfds", split="validation")
    assert [(r.prompt, r.chosen) for r in validation] == [("What is 2+2?", "4")]
    assert len(open_tfds_source(version_dir, "validation")) == 1
    with pytest.raises(UserError, match="cannot open split 'test'"):
        read_records(tmp_path / "tfds", "preference", format="tfds", split="test")


def test_iter_rows_yields_locations(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [GOOD_PAIR, "{"])
    rows = list(iter_rows(path))
    assert rows[0] == (f"{path}:1", GOOD_PAIR)
    assert rows[1][0] == f"{path}:2" and "malformed JSON" in str(rows[1][1])
    assert len(rows) == 2
