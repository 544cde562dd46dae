"""Run one experiment's stage through the launcher in a directory of its own and read what it logged."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


def logged_records(config, run_dir: Path) -> list[dict]:
    """Validate `config`, run it through the launcher in `run_dir`, and return its only stage's
    metrics.jsonl records."""
    from rlhf_jax import launch
    from rlhf_jax.config import validate

    config = dataclasses.replace(config, run_dir=str(run_dir))
    validate(config, check_paths=True)
    launch.run(config, launch.prepare_run_dir(config))
    (stage,) = config.stages
    return [json.loads(line) for line in (run_dir / stage.name / "metrics.jsonl").read_text().splitlines()]
