"""Metrics as JSONL and TensorBoard event files in the run directory, plus a rich progress bar."""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Mapping

import numpy as np


def _to_float(value) -> float:
    return float(np.asarray(value))


class MetricsLogger:
    """Append `{"step": s, "time": t, **metrics}` lines to `<dir>/metrics.jsonl` and write scalars to
    TensorBoard (`<dir>/tensorboard`) when enabled. In a multi-process run only process 0 writes (the metrics
    are global: every process computes the same values).

    `resume_step`: the step the run restarts from (0 for a fresh start). Records past it (logged by a run
    that died before checkpointing them) are cut from `metrics.jsonl` and `samples.jsonl`, and TensorBoard
    purges its events past it, so a resumed run logs every step exactly once.
    """

    def __init__(self, directory: str | pathlib.Path, tensorboard: bool = True, resume_step: int = 0):
        from rlhf_jax.distributed import is_main_process

        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._writes = is_main_process()
        self._jsonl = None
        self._tb = None
        if not self._writes:
            return
        for name in ("metrics.jsonl", "samples.jsonl"):
            _cut_after(self.directory / name, resume_step)
        self._jsonl = open(self.directory / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.directory / "tensorboard"), purge_step=resume_step + 1)

    def log(self, step: int, metrics: Mapping[str, object]) -> dict[str, float]:
        values = {name: _to_float(value) for name, value in metrics.items()}
        record = {"step": int(step), "time": time.time(), **{k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, int(step))
        return values

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """Sample generations (prompt, response, reward...) to `<dir>/samples.jsonl`."""
        if not self._writes:
            return
        with open(self.directory / "samples.jsonl", "a", encoding="utf-8") as handle:
            for sample in samples:
                handle.write(json.dumps({"step": int(step), **sample}) + "\n")

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _cut_after(path: pathlib.Path, step: int) -> None:
    """Keep the records of a JSONL log up to `step` (rewritten atomically; a torn last line is dropped)."""
    if not path.is_file():
        return
    kept, changed = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            changed = True
            continue
        if int(record.get("step", 0)) <= step:
            kept.append(line)
        else:
            changed = True
    if changed:
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(staging, path)


def read_metrics(directory: str | pathlib.Path) -> list[dict]:
    path = pathlib.Path(directory) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
