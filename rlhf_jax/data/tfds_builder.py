"""A TFDS builder for local preference files, stored as array_record and read back with `tfds.data_source`.

Neither building nor reading needs TensorFlow. Register your data the standard TFDS way::

    path = build_tfds({"train": "prefs.jsonl", "validation": "dev.jsonl"}, data_dir="~/tfds")
    source = tfds.data_source("local_preferences", split="train", data_dir="~/tfds")
    # or, for training: load_dataset("~/tfds", "preference", tokenizer, format="tfds", split="train")

Rows are validated while building (bad ones are reported by file and line and left out). Each example holds
``prompt`` (text; empty when the prompt is a chat), ``prompt_messages`` (role/content pairs), ``chosen``,
``rejected`` and ``origin`` (``"file:LINE"`` of the source row). Use one ``data_dir`` per dataset: the
builder's name and version are fixed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import tensorflow_datasets as tfds
from etils import epath

from rlhf_jax.data.records import Preference
from rlhf_jax.data.sources import read_records
from rlhf_jax.errors import UserError

log = logging.getLogger(__name__)


class LocalPreferences(tfds.core.GeneratorBasedBuilder):
    """Pairwise preferences from local JSONL / Parquet / Arrow / HH-RLHF files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "prompt (text or chat messages), chosen, rejected, origin."}

    def __init__(self, *, files: Mapping[str, str | Path] | None = None, source_format: str = "auto",
                 strict: bool = False, **kwargs):
        self._files = {split: Path(path) for split, path in (files or {}).items()}
        self._source_format = source_format
        self._strict = strict
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds's own lookup for a builder defined in a package imports `importlib_resources`, an undeclared
        # dependency; the answer is this file either way
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local preference pairs: a prompt and a chosen and a rejected response.",
            features=tfds.features.FeaturesDict({
                "prompt": text,
                "prompt_messages": tfds.features.Sequence({"role": text, "content": text}),
                "chosen": text,
                "rejected": text,
                "origin": text,
            }),
            disable_shuffling=True,  # keep file order, so index i is the i-th valid row
        )

    def _split_generators(self, dl_manager):
        if not self._files:
            raise UserError("the local_preferences builder needs files={split: path} to build")
        return {split: self._generate_examples(path) for split, path in self._files.items()}

    def _generate_examples(self, path: Path):
        records, report = read_records(path, "preference", format=self._source_format, strict=self._strict)
        log.info(report.summary())
        for index, record in enumerate(records):
            yield index, _example(record)


def _example(record: Preference) -> dict:
    chat = not isinstance(record.prompt, str)
    return {
        "prompt": "" if chat else record.prompt,
        "prompt_messages": [{"role": m.role, "content": m.content} for m in record.prompt] if chat else [],
        "chosen": record.chosen,
        "rejected": record.rejected,
        "origin": record.origin,
    }


def build_tfds(files: Mapping[str, str | Path] | str | Path, data_dir: str | Path, *, source_format: str = "auto",
               strict: bool = False, overwrite: bool = False) -> Path:
    """Build ``files`` ({split: path}, or one path for ``"train"``) into ``data_dir``; returns the version directory."""
    if isinstance(files, (str, Path)):
        files = {"train": files}
    builder = LocalPreferences(data_dir=str(Path(data_dir).expanduser()), file_format="array_record", files=files,
                               source_format=source_format, strict=strict)
    modes = tfds.download.GenerateMode
    mode = modes.REUSE_CACHE_IF_EXISTS if overwrite else modes.REUSE_DATASET_IF_EXISTS
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
    return Path(builder.data_dir)
