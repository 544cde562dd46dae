"""Reading rows from files: JSONL (plain or gzip), JSON arrays, Parquet, `datasets` directories saved with
``save_to_disk`` (Arrow), TFDS array_record datasets, and HH-RLHF dialogue files.

Every row comes with its location: ``"file:LINE"`` (1-based) for line-based files, ``"file#INDEX"``
(0-based) otherwise. A malformed row is reported and skipped; a missing or unreadable file is one
`UserError`.
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_jax.data.formats import FORMATS
from rlhf_jax.data.records import KINDS, BadRecord, Record, parse_record
from rlhf_jax.data.validation import Report
from rlhf_jax.errors import UserError

log = logging.getLogger(__name__)

TFDS_NAME = "local_preferences"


def detect_format(path: str | Path) -> str:
    """The format of ``path`` from its name or directory contents."""
    path = Path(path)
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return "arrow"
        if (path / "dataset_info.json").exists() or (path / TFDS_NAME).is_dir():
            return "tfds"
        raise UserError(f"{path}: cannot tell the dataset format of this directory; pass --format arrow or tfds")
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".json"):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    raise UserError(f"{path}: cannot tell the format from the file name; pass a format ({', '.join(FORMATS[1:])})")


def iter_rows(path: str | Path, format: str = "auto", split: str | None = None) -> Iterator[tuple[str, Any]]:
    """``(location, row)`` pairs; ``row`` is a `BadRecord` for a row that could not be decoded."""
    path = Path(path)
    if format not in FORMATS:
        raise UserError(f"unknown data format {format!r}; expected one of {', '.join(FORMATS)}")
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if format == "auto":
        format = detect_format(path)
    if format in ("jsonl", "hh"):
        rows = _jsonl_rows(path)
        yield from (_hh_row(location, row) for location, row in rows) if format == "hh" else rows
    elif format == "json":
        yield from _json_rows(path)
    elif format == "parquet":
        yield from _parquet_rows(path)
    elif format == "arrow":
        yield from _arrow_rows(path, split)
    else:
        yield from _tfds_rows(path, split)


def read_records(path: str | Path, kind: str, *, format: str = "auto", split: str | None = None,
                 strict: bool = False, check: bool = True) -> tuple[list[Record], Report]:
    """Parse every row of ``path`` as ``kind`` records, skipping and reporting bad ones.

    Raises `UserError` when nothing survives, or under ``strict`` when any row is bad (unless ``check`` is
    False: the caller checks the report after its own validation, e.g. prompt lengths).
    """
    if kind not in KINDS:
        raise UserError(f"unknown record type {kind!r}; expected one of {', '.join(KINDS)}")
    report = Report(source=str(path), kind=kind)
    records: list[Record] = []
    for location, row in iter_rows(path, format, split):
        report.rows += 1
        try:
            if isinstance(row, BadRecord):
                raise row
            records.extend(parse_record(row, kind, location))
        except BadRecord as exc:
            report.add(location, str(exc))
    report.valid = len(records)
    if check:
        report.check(strict)
    return records, report


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as probe:
        compressed = probe.read(2) == b"\x1f\x8b"
    if path.name.endswith(".gz") and not compressed:
        raise UserError(f"{path}: not a gzip file (the name ends in .gz)")
    try:
        with (gzip.open if compressed else open)(path, "rb") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                location = f"{path}:{number}"
                try:
                    row = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    row = BadRecord(f"not UTF-8 text ({exc.reason} at byte {exc.start})")
                except json.JSONDecodeError as exc:
                    row = BadRecord(f"malformed JSON ({exc.msg} at column {exc.colno})")
                yield location, row
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path}: corrupt or truncated gzip data ({exc})") from None


def _hh_row(location: str, row: Any) -> tuple[str, Any]:
    if isinstance(row, dict) and not (isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str)):
        row = BadRecord("missing field 'chosen' or 'rejected' (HH-RLHF rows hold two whole dialogues)")
    return location, row


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        with (gzip.open if path.name.endswith(".gz") else open)(path, "rt", encoding="utf-8") as file:
            rows = json.load(file)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
    if not isinstance(rows, list):
        raise UserError(f"{path}: a JSON file must hold a list of records (use .jsonl for one record a line)")
    for index, row in enumerate(rows):
        yield f"{path}#{index}", row


def _table_rows(path: Path, batches) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa

    index = 0
    try:
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{path}#{index}", row
                index += 1
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: cannot read Arrow data ({exc})") from None


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: not a readable Parquet file ({exc})") from None
    yield from _table_rows(path, parquet.iter_batches(batch_size=1024))


def _arrow_rows(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    """A directory written by `datasets` ``save_to_disk``: ``state.json`` lists Arrow stream files.

    A `DatasetDict` directory (``dataset_dict.json``) holds one such directory per split.
    """
    if (path / "dataset_dict.json").exists():
        splits = _json_file(path / "dataset_dict.json").get("splits", [])
        split = split or ("train" if "train" in splits else None)
        if split not in splits:
            raise UserError(f"{path}: choose a split (one of {', '.join(splits)})")
        path = path / split
    state = _json_file(path / "state.json")
    files = [entry["filename"] for entry in state.get("_data_files", [])]
    if not files:
        raise UserError(f"{path}/state.json lists no data files")
    index = 0
    for name in files:
        for location, row in _table_rows(path / name, _arrow_batches(path / name)):
            yield f"{path}#{index}", row
            index += 1


def _arrow_batches(file: Path):
    import pyarrow as pa

    if not file.exists():
        raise UserError(f"{file}: no such file (listed in state.json)")
    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(file)))
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.memory_map(str(file)))  # the random-access layout
        yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
        return
    yield from reader


def _json_file(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None


def _tfds_rows(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    """A prepared TFDS dataset in array_record format, read with `tfds.data_source` (no TensorFlow).

    ``path`` is either a TFDS ``data_dir`` holding the `LocalPreferences` builder's output, or the
    version directory of any prepared dataset (the one with ``dataset_info.json``).
    """
    source = open_tfds_source(path, split or "train")
    for index in range(len(source)):
        row = {key: _plain(value) for key, value in source[index].items()}
        if "prompt_messages" in row:  # the LocalPreferences layout: messages when the prompt is a chat
            messages = row.pop("prompt_messages")
            if messages:
                row["prompt"] = messages
        yield f"{path}#{index}", row


def open_tfds_source(path: str | Path, split: str = "train"):
    """The random-access `tfds` data source of ``split`` under ``path`` (see `_tfds_rows`)."""
    import tensorflow_datasets as tfds

    from rlhf_jax.data import tfds_builder  # noqa: F401  (registers the builder by name)

    path = Path(path)
    try:
        if (path / "dataset_info.json").exists():
            return tfds.builder_from_directory(str(path)).as_data_source(split=split)
        return tfds.data_source(TFDS_NAME, split=split, data_dir=str(path), download=False)
    except Exception as exc:  # tfds raises assorted types for a missing split or an unprepared directory
        raise UserError(f"{path}: cannot open split {split!r} of a prepared TFDS dataset ({exc})") from None


def _plain(value: Any) -> Any:
    """A TFDS feature value as plain Python: bytes → str, numpy → Python, a sequence of dicts (stored as a
    dict of equal-length lists) → a list of dicts."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_plain(item) for item in value] if value.dtype == object else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        plain = {key: _plain(item) for key, item in value.items()}
        columns = list(plain.values())
        if columns and all(isinstance(c, list) for c in columns) and len({len(c) for c in columns}) == 1:
            return [dict(zip(plain, items)) for items in zip(*columns)]
        return plain
    return value
