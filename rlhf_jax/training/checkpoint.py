"""Atomic, resumable checkpoints with orbax.

Each checkpoint holds the train-state pytree (params, optimizer state, step, PRNG key, and any other
array state such as the KL controller) and a JSON blob of host-side state (data-iterator position,
stage progress). orbax writes into a temporary directory and renames it when complete, so a crash
mid-save leaves the previous checkpoint as the latest usable one.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Save every `every_steps` steps and at the end; keep the last `keep_last`."""

    def __init__(self, directory: str | pathlib.Path, every_steps: int = 100, keep_last: int = 2):
        self.directory = pathlib.Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(every_steps, 1),
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
                state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host_state or {})
            ),
            force=force,
        )
        self._manager.wait_until_finished()
        return bool(saved)

    def restore(self, state_like: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore (state, host_state) at `step` (default: latest) into the structure/shardings of
        `state_like` (concrete arrays or `jax.ShapeDtypeStruct`s)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore())
        )
        return restored["state"], dict(restored["host"] or {})

    def close(self) -> None:
        self._manager.close()


def _assert_same_in_every_process(value: dict, what: str) -> None:
    """Compare a JSON-able value across processes (by its SHA-256, one small collective)."""
    import hashlib
    import json

    import numpy as np
    from jax.experimental import multihost_utils

    digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest()
    multihost_utils.assert_equal(np.frombuffer(digest, np.uint8), f"{what} differs between processes")
