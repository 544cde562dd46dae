"""Commands that write a model to a user-named directory: no silent overwrite, ordinary permissions.

Through the real command line (`python -m rlhf_jax.convert`), on `tiny:smollm2` (random weights, the real
SmolLM2 tokenizer), under umask 022.
"""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def convert(*args: str) -> subprocess.CompletedProcess:
    command = ["sh", "-c", 'umask 022 && exec "$0" -m rlhf_jax.convert "$@"', sys.executable, *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_smollm2():
    from rlhf_jax.models import load

    return load("tiny:smollm2")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def old_model(directory: Path) -> dict[str, bytes]:
    """A stand-in for a model someone wrote earlier: its files and their bytes."""
    directory.mkdir(parents=True)
    files = {"config.json": b'{"old": true}\n', "model.safetensors": b"old weights", "notes.txt": b"mine"}
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return files


def test_convert_refuses_a_non_empty_directory(tmp_path):
    dst = tmp_path / "model"
    files = old_model(dst)
    before = {name: (dst / name).stat().st_mtime_ns for name in files}

    result = convert("tiny:smollm2", str(dst))

    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {dst}: directory is not empty; --force replaces it"
    assert result.stdout == ""
    assert sorted(p.name for p in dst.iterdir()) == sorted(files)
    assert {name: (dst / name).read_bytes() for name in files} == files
    assert {name: (dst / name).stat().st_mtime_ns for name in files} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary sibling left behind


def test_convert_force_refuses_a_target_holding_its_source(tmp_path):
    dst = tmp_path / "model"
    old_model(dst)
    result = convert(str(dst / "model.safetensors"), str(dst), "--force")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {dst}: holds the source {dst / 'model.safetensors'}; "
                                     "--force would delete it")
    assert (dst / "model.safetensors").read_bytes() == b"old weights"


@pytest.mark.parametrize("target", ["absent", "empty", "non-empty with --force"])
def test_convert_writes_a_whole_model_with_ordinary_permissions(tmp_path, target, tiny_smollm2):
    import jax
    import numpy as np

    from rlhf_jax.models.hf_io import load_hf

    dst = tmp_path / "out" / "model"
    args = ["tiny:smollm2", str(dst)]
    if target == "empty":
        dst.mkdir(parents=True)
    elif target == "non-empty with --force":
        old_model(dst)
        args.append("--force")

    result = convert(*args)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(dst)
    names = {p.name for p in dst.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert "notes.txt" not in names  # --force replaces the directory, it does not merge into it
    assert [p.name for p in dst.parent.iterdir()] == ["model"]  # the temporary and old siblings are gone
    assert mode(dst) == 0o755
    assert {p.name: mode(p) for p in dst.iterdir()} == {name: 0o644 for name in names}
    _, params = load_hf(dst)
    _, expected, _ = tiny_smollm2
    for written, original in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(written, np.asarray(original))
