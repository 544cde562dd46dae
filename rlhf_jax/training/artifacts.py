"""A stage's output model: params (orbax), architecture, tokenizer and metadata in one directory.

Layout of an artifact directory (written to a temporary sibling and renamed, so it is all or nothing):

    rlhf_jax_checkpoint.json   {"format": 1, "kind": "lm" | "scalar", "decoder_config": {...}, "metadata": {...}}
    params/                    orbax pytree: LM params, or {"backbone", "head"} for a reward/value model
    tokenizer files            tokenizer.save_pretrained(...) when there is a tokenizer

`rlhf_jax.models.load(path)` reads it, so a later stage takes `stage:<name>` and gets the model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from rlhf_jax.errors import UserError
from rlhf_jax.models.config import DecoderConfig, RopeScaling

MARKER = "rlhf_jax_checkpoint.json"
KINDS = ("lm", "scalar")


class ModelArtifact(NamedTuple):
    config: DecoderConfig
    params: Any
    tokenizer: Any | None
    kind: str
    metadata: dict


def decoder_config_to_dict(config: DecoderConfig) -> dict:
    return dataclasses.asdict(config)


def decoder_config_from_dict(values: dict) -> DecoderConfig:
    values = dict(values)
    if values.get("rope_scaling") is not None:
        values["rope_scaling"] = RopeScaling(**values["rope_scaling"])
    return DecoderConfig(**values)


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def save_artifact(directory: str | Path, config: DecoderConfig, params: Any, tokenizer=None, kind: str = "lm",
                  metadata: dict | None = None) -> Path:
    """Write the artifact atomically (replacing an existing one). Returns the directory.

    Collective in a multi-process run: every process calls it with the same arguments. orbax writes each
    process's shards of `params` into a staging directory whose name is the same in every process
    (`.<name>.tmp` beside `directory`); process 0 alone writes the header and tokenizer and renames the
    staging directory into place, and no process returns before the artifact is complete.
    """
    from rlhf_jax.distributed import barrier, is_main_process

    assert kind in KINDS, kind
    directory = Path(directory).resolve()
    staging = directory.with_name(f".{directory.name}.tmp")
    main = is_main_process()
    if main:
        directory.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left by a save that crashed
        staging.mkdir()
    barrier("rlhf_jax.save_artifact.staging")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging / "params", params)
        if main:
            if tokenizer is not None:
                tokenizer.save_pretrained(str(staging))
            header = {"format": 1, "kind": kind, "decoder_config": decoder_config_to_dict(config),
                      "metadata": metadata or {}}
            (staging / MARKER).write_text(json.dumps(header, indent=1))
            if directory.exists():
                old = directory.with_name(f".{directory.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                directory.rename(old)
                staging.rename(directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                staging.rename(directory)
    finally:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
    barrier("rlhf_jax.save_artifact.done")
    return directory


def read_header(directory: str | Path) -> dict:
    path = Path(directory) / MARKER
    try:
        header = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{directory}: not an rlhf_jax model artifact (no {MARKER})") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: corrupt artifact header ({error})") from None
    if header.get("format") != 1 or header.get("kind") not in KINDS:
        raise UserError(f"{path}: unsupported artifact format {header.get('format')!r} / kind {header.get('kind')!r}")
    return header


def load_artifact(directory: str | Path, with_tokenizer: bool = True) -> ModelArtifact:
    """Read an artifact written by `save_artifact` (params as jax arrays on this process's first device,
    whichever devices or processes wrote them; every process of a multi-process run reads the whole model)."""
    directory = Path(directory).resolve()
    header = read_header(directory)
    config = decoder_config_from_dict(header["decoder_config"])
    with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.metadata(directory / "params").item_metadata.tree
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), saved)
        params = checkpointer.restore(directory / "params", target)
    params = jax.tree.map(jax.numpy.asarray, params)
    tokenizer = None
    if with_tokenizer and (directory / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return ModelArtifact(config, params, tokenizer, header["kind"], dict(header.get("metadata") or {}))
