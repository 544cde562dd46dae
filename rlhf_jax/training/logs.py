"""Metrics as JSONL and TensorBoard event files in the run directory, plus a rich progress bar."""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Mapping

import numpy as np


def _to_float(value) -> float:
    return float(np.asarray(value))


class MetricsLogger:
    """Append `{"step": s, "time": t, **metrics}` lines to `<dir>/metrics.jsonl` and write scalars to
    TensorBoard (`<dir>/tensorboard`) when enabled. Safe to reopen on resume (appends). In a multi-process
    run only process 0 writes (the metrics are global: every process computes the same values)."""

    def __init__(self, directory: str | pathlib.Path, tensorboard: bool = True):
        from rlhf_jax.distributed import is_main_process

        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._writes = is_main_process()
        self._jsonl = open(self.directory / "metrics.jsonl", "a", encoding="utf-8") if self._writes else None
        self._tb = None
        if tensorboard and self._writes:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.directory / "tensorboard"))

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


def read_metrics(directory: str | pathlib.Path) -> list[dict]:
    path = pathlib.Path(directory) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
