"""One list of data formats: what `python -m rlhf_jax.data check` reads is what the launcher accepts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_jax.config import DataFormat
from rlhf_jax.data import sources
from rlhf_jax.data.__main__ import _parser
from rlhf_jax.data.formats import FORMATS
from rlhf_jax.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_jax.launch", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_config_enum_data_check_and_reader_share_the_data_layers_list():
    assert [str(member) for member in DataFormat] == list(FORMATS)
    assert {"hh", "jsonl", "parquet", "arrow", "tfds"} <= set(FORMATS)
    assert sources.FORMATS is FORMATS
    for name in FORMATS:
        assert _parser().parse_args(["check", "data", "--format", name]).format == name
    with pytest.raises(UserError, match="invalid choice: 'bogus'"):
        _parser().parse_args(["check", "data", "--format", "bogus"])


@pytest.mark.parametrize("override", ["data.format=arrow", "data.format=tfds", "stages.samples.prompts_format=arrow"])
def test_launcher_accepts_every_format_data_check_reads(override):
    experiment = "experiment=tiny_pipeline" if override.startswith("stages.samples") else "experiment=tiny_sft"
    result = launch(experiment, override, "--print-config")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert override in result.stdout.splitlines()


def test_launcher_names_every_format_when_one_is_unknown():
    result = launch("experiment=tiny_sft", "data.format=arow", "--print-config")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == f"error: data.format: got 'arow', expected one of {', '.join(FORMATS)}"
