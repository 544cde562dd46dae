"""Hugging Face model directories: read `config.json` + safetensors, write them back.

Reading is lazy (one tensor at a time through `safetensors.safe_open`), so peak host memory is the
converted param tree, not two copies of the checkpoint. Both layouts are read: a single
`model.safetensors` and a sharded `model.safetensors.index.json` + `model-0000k-of-0000n.safetensors`.

Writing produces a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads: config.json,
generation_config.json, safetensors weights (sharded above `max_shard_bytes`) and, when given, the tokenizer
files. Everything is written into a temporary sibling directory first and then renamed into place, so an
interrupted export never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from rlhf_jax.errors import UserError
from rlhf_jax.models.config import DecoderConfig, from_hf_dict, to_hf_dict
from rlhf_jax.models.weights import hf_tensors_from_params, params_from_hf

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def is_hf_directory(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def read_hf_config(directory: str | os.PathLike) -> DecoderConfig:
    """The `DecoderConfig` of the HF model directory `directory` (from its config.json)."""
    config_path = Path(directory) / CONFIG_NAME
    if not config_path.is_file():
        raise UserError(f"{directory}: no {CONFIG_NAME} (expected a Hugging Face model directory)")
    try:
        hf = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{config_path}: cannot read JSON ({error})") from None
    if not isinstance(hf, dict):
        raise UserError(f"{config_path}: expected a JSON object")
    return from_hf_dict(hf, source=str(config_path))


class SafetensorsCheckpoint:
    """Lazy reader of the safetensors weights of an HF directory: `get(name) -> np.ndarray`.

    bfloat16 tensors come back as `ml_dtypes.bfloat16` numpy arrays (read through the flax backend when
    the installed safetensors' numpy backend cannot); raises `KeyError` for an unknown name.
    """

    def __init__(self, directory: str | os.PathLike):
        from safetensors import safe_open

        self.directory = Path(directory)
        index_path = self.directory / WEIGHTS_INDEX_NAME
        single_path = self.directory / WEIGHTS_NAME
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
                raise UserError(f"{index_path}: not a safetensors index ({error!r})") from None
            files = sorted(set(weight_map.values()))
        elif single_path.is_file():
            weight_map, files = None, [WEIGHTS_NAME]
        else:
            others = sorted(p.name for p in self.directory.glob("*.bin")) + sorted(
                p.name for p in self.directory.glob("*.pt*")
            )
            hint = f" (found {', '.join(others)}: re-save with safetensors)" if others else ""
            raise UserError(f"{self.directory}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}{hint}")
        self._handles: dict[str, Any] = {}
        for file in files:
            path = self.directory / file
            if not path.is_file():
                raise UserError(f"{index_path}: shard {file} is missing")
            try:
                self._handles[file] = safe_open(str(path), framework="np")
            except Exception as error:  # safetensors raises its own error types for a corrupt header
                raise UserError(f"{path}: not a readable safetensors file ({error})") from None
        if weight_map is None:
            weight_map = {name: WEIGHTS_NAME for name in self._handles[WEIGHTS_NAME].keys()}
        self._weight_map: dict[str, str] = dict(weight_map)

    def names(self) -> list[str]:
        return list(self._weight_map)

    def get(self, name: str) -> np.ndarray:
        file = self._weight_map[name]  # KeyError -> "missing tensor" upstream
        handle = self._handles[file]
        try:
            return handle.get_tensor(name)
        except (TypeError, ValueError):
            # Older safetensors numpy backends cannot build bfloat16 arrays; jax can.
            from safetensors import safe_open

            with safe_open(str(self.directory / file), framework="flax") as flax_handle:
                return np.asarray(flax_handle.get_tensor(name))

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_hf(directory: str | os.PathLike) -> tuple[DecoderConfig, dict]:
    """Read an HF model directory. Returns (config, params as float32 numpy arrays)."""
    config = read_hf_config(directory)
    with SafetensorsCheckpoint(directory) as checkpoint:
        params = params_from_hf(config, checkpoint.get, source=str(directory))
    return config, params


def _numpy_dtype(dtype: str) -> np.dtype:
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"export dtype {dtype!r} is not one of {list(EXPORT_DTYPES)}")
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)


def _shards(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    return shards


def _write_weights(directory: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> None:
    from safetensors.numpy import save_file

    metadata = {"format": "pt"}  # transformers refuses safetensors files without a known format tag
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata=metadata)
        return
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata=metadata)
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    (directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def generation_config_dict(config: DecoderConfig) -> dict:
    return {
        "_from_model_config": True,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }


def _umask_permissions(directory: Path) -> None:
    """Give every file under `directory` the mode an ordinary write would (0o666 less the umask).

    safetensors writes through a private temporary file (mode 0600) that it renames into place. The
    umask is read off `directory` itself, made by `mkdir` (mode 0o777 less the umask): `os.umask` can
    only be read by setting it, which races with other threads.
    """
    file_mode = directory.stat().st_mode & 0o666
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(file_mode)


def save_hf(
    dst_dir: str | os.PathLike,
    config: DecoderConfig,
    params: Mapping,
    tokenizer=None,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    replace: bool = False,
) -> Path:
    """Write `params` as a Hugging Face model directory loadable by `transformers`.

    Writes config.json, generation_config.json, model.safetensors (or shards + index above
    `max_shard_bytes`) in `dtype` (float32 | bfloat16 | float16) and `tokenizer.save_pretrained` files,
    with the permissions the umask gives (0644 under umask 022). The files are assembled in a temporary
    sibling directory and renamed into `dst_dir`. An existing `dst_dir` is swapped out whole when
    `replace`; otherwise it keeps unrelated files, but stale weight files are removed. Returns the directory.
    """
    np_dtype = _numpy_dtype(dtype)
    dst = Path(dst_dir).absolute()
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst}: exists and is not a directory")
    if replace and dst.is_symlink():
        dst = dst.resolve()  # swap the directory the link names, not the link
    dst.parent.mkdir(parents=True, exist_ok=True)
    import jax

    if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(params)):
        raise UserError(f"{dst}: the params are abstract shapes (no weights); nothing to export")
    tensors = {
        name: np.ascontiguousarray(np.asarray(array).astype(np_dtype))
        for name, array in hf_tensors_from_params(config, params)
    }
    # mkdir (not mkdtemp, which is private 0700) so the renamed directory gets the usual permissions
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        hf = to_hf_dict(config, torch_dtype=dtype)
        hf["dtype"] = dtype  # transformers >= 5 name of `torch_dtype`
        (tmp / CONFIG_NAME).write_text(json.dumps(hf, indent=2) + "\n")
        (tmp / GENERATION_CONFIG_NAME).write_text(json.dumps(generation_config_dict(config), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _write_weights(tmp, tensors, max_shard_bytes)
        _umask_permissions(tmp)
        if not dst.exists():
            os.rename(tmp, dst)
            return dst
        if replace:
            # two renames: a crash between them leaves the old model whole beside `dst`, never a half one
            old = dst.parent / f".{dst.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
            return dst
        for stale in [dst / WEIGHTS_NAME, dst / WEIGHTS_INDEX_NAME, *dst.glob("model-*-of-*.safetensors")]:
            stale.unlink(missing_ok=True)
        for item in tmp.iterdir():
            os.replace(item, dst / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
