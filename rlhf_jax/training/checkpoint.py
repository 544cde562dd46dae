"""Atomic, resumable checkpoints with orbax, verified on restore.

Each checkpoint holds the train-state pytree (params, optimizer state, step, PRNG key, and any other
array state such as the KL controller; the layers' weights and moments stacked, `models.layout`) and a JSON
blob of host-side state (data-iterator position, stage progress). orbax writes into a temporary directory
and renames it when complete, so a crash mid-save leaves the previous checkpoint as the latest usable one.

Damage after the fact (a truncated or deleted file: a full disk, a half-copied directory) is caught on
restore: each step directory gets a manifest of its files (size, and CRC-32 for files up to 16 MiB) once
written; restore checks the newest step against it and restores it, and when either fails it prints one
warning line, moves that step aside to `<stage>/damaged_checkpoints/` (nothing is deleted) and falls back
to the next newest. When no step is intact it raises `UserError` naming the directory and what to do.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import zlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from rlhf_jax.errors import UserError
from rlhf_jax.models.layout import stack_abstract, stack_layers, unstack_like

MANIFEST = "rlhf_jax_manifest.json"
_CRC_LIMIT = 16 * 2**20  # content checksums for small files only: big shards are checked by size (and orbax)


class Checkpointer:
    """Save every `every_steps` steps and at the end; keep the last `keep_last`."""

    def __init__(self, directory: str | pathlib.Path, every_steps: int = 100, keep_last: int = 2):
        self.directory = pathlib.Path(directory).resolve()
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            # orbax's default policy also saves the first step of a fresh run: a whole train state written
            # that nobody asked for (4 s for SmolLM2 with AdamW on a CPU); `force` saves the last step
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(max(every_steps, 1)), policies.PreemptionCheckpointingPolicy()]),
            max_to_keep=keep_last,
            create=True,
            enable_async_checkpointing=False,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "host"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, host_state: dict | None = None, force: bool = False) -> bool:
        """Save if `step` is due (or `force`). Returns whether a checkpoint was written.

        Collective with several processes: every process calls it at the same steps. orbax writes the host
        state from process 0 alone, so it must be the same in every process (checked: an assertion).
        """
        if jax.process_count() > 1 and (force or self._manager.should_save(step)):
            _assert_same_in_every_process(host_state or {}, f"checkpoint step {step}: host state")
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(stack_layers(state)), host=ocp.args.JsonSave(host_state or {})
            ),
            force=force,
        )
        self._manager.wait_until_finished()
        if saved:
            from rlhf_jax.distributed import barrier, is_main_process

            if is_main_process():
                _write_manifest(self.directory / str(step))
            barrier(f"rlhf_jax.checkpoint.manifest.{step}")
        return bool(saved)

    def restore(self, state_like: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore (state, host_state) at `step` (default: the newest intact step) into the structure and
        shardings of `state_like` (concrete arrays or `jax.ShapeDtypeStruct`s), and its layout of the layers'
        weights (`models.layout`: a checkpoint holds them stacked, whatever the state's layout)."""
        state, host = self._restore_stacked(stack_abstract(jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)),
                                            step)
        return unstack_like(state, state_like), host

    def _restore_stacked(self, abstract: Any, step: int | None) -> tuple[Any, dict]:
        if step is not None:
            return self._restore(step, abstract)
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        damaged: list[tuple[int, str]] = []
        for candidate in steps:
            problem = check_step(self.directory / str(candidate))
            if problem is None:
                try:
                    restored = self._restore(candidate, abstract)
                except Exception as error:  # orbax/tensorstore raise many types for unreadable data
                    problem = f"cannot be read: {type(error).__name__}: {' '.join(str(error).split())[:200]}"
            if problem is None:
                self._set_aside([s for s, _ in damaged])
                return restored
            damaged.append((candidate, problem))
            if candidate != steps[-1]:
                print(f"warning: checkpoint {self.directory / str(candidate)} is damaged ({problem}); "
                      "falling back to the previous one", file=sys.stderr, flush=True)
        newest, problem = damaged[0]
        raise UserError(f"{self.directory}: no intact checkpoint (newest, step {newest}: {problem}); delete or move "
                        f"that directory to restart the stage from its beginning")

    def _restore(self, step: int, abstract) -> tuple[Any, dict]:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore())
        )
        return restored["state"], dict(restored["host"] or {})

    def _set_aside(self, steps: list[int]) -> None:
        """Move damaged steps out of the way (to `<parent>/damaged_checkpoints/<step>`) so that the resumed
        run can save those steps again; nothing is deleted."""
        if not steps:
            return
        from rlhf_jax.distributed import barrier, is_main_process

        if is_main_process():
            aside = self.directory.parent / "damaged_checkpoints"
            aside.mkdir(exist_ok=True)
            for step in steps:
                target = aside / str(step)
                suffix = 1
                while target.exists():
                    target, suffix = aside / f"{step}.{suffix}", suffix + 1
                (self.directory / str(step)).rename(target)
        barrier("rlhf_jax.checkpoint.set_aside")
        self._manager.reload()

    def close(self) -> None:
        self._manager.close()


def _files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def _crc32(path: pathlib.Path) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(2**20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _write_manifest(step_dir: pathlib.Path) -> None:
    entries = {}
    for path in _files(step_dir):
        size = path.stat().st_size
        entries[str(path.relative_to(step_dir))] = {"size": size, **({"crc32": _crc32(path)} if size <= _CRC_LIMIT
                                                                    else {})}
    staging = step_dir / f".{MANIFEST}.tmp"
    staging.write_text(json.dumps({"format": 1, "files": entries}, indent=0))
    os.replace(staging, step_dir / MANIFEST)


def check_step(step_dir: pathlib.Path) -> str | None:
    """What is wrong with a checkpoint step directory against its manifest (None: nothing found). A step
    without a manifest (written by an older version, or killed between orbax's commit and the manifest)
    is checked by restoring it alone."""
    manifest = step_dir / MANIFEST
    if not manifest.is_file():
        return None
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        return f"{MANIFEST} is unreadable ({error})"
    for name, expected in entries.items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, expected {expected['size']}"
        if "crc32" in expected and _crc32(path) != expected["crc32"]:
            return f"{name} does not match its checksum"
    return None


def _assert_same_in_every_process(value: dict, what: str) -> None:
    """Compare a JSON-able value across processes (by its SHA-256, one small collective)."""
    import hashlib

    import numpy as np
    from jax.experimental import multihost_utils

    digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest()
    multihost_utils.assert_equal(np.frombuffer(digest, np.uint8), f"{what} differs between processes")
