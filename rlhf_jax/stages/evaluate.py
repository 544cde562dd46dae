"""Evaluate stage runner: a policy's reward, KL to a reference and lengths on held-out prompts.

The same computation as ``python -m rlhf_jax.evaluate policy`` (`rlhf_jax.evaluate.evaluate_policy`), run as a
pipeline stage so an experiment can measure its policy before and after RL. Writes ``evaluation.json`` (the
full result, samples included) and ``summary.json``; with ``baseline`` the summary table shows before -> after.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlhf_jax.config import model_for
from rlhf_jax.rewards import is_reward_function_spec
from rlhf_jax.stages.common import write_summary

COMPARED = ("reward_mean", "raw_reward_mean", "kl_k1_mean", "kl_k3_mean", "response_length_mean", "eos_fraction")


def evaluation_args(experiment, stage, resolve) -> argparse.Namespace:
    """The `evaluate policy` arguments this stage stands for (models resolved to loadable paths)."""
    reward = stage.reward_model if is_reward_function_spec(stage.reward_model) else resolve(stage.reward_model)
    return argparse.Namespace(
        command="policy",
        model=resolve(model_for(experiment, stage.model).source),
        prompts=stage.prompts,
        format=str(stage.prompts_format),
        reward=reward,
        reference=None if stage.reference is None else resolve(stage.reference),
        max_new_tokens=stage.max_new_tokens,
        temperature=stage.temperature,
        greedy=stage.greedy,
        num_prompts=stage.num_prompts,
        seed=experiment.seed,
        samples=stage.samples,
        max_prompt_length=stage.max_prompt_length,
        batch_size=stage.batch_size,
        dtype=None,
        json=False,
    )


def compare(before: dict, after: dict) -> dict[str, float]:
    """`name/before`, `name/after` and `name/change` for each metric both results hold."""
    out: dict[str, float] = {}
    for name in COMPARED:
        if before.get(name) is not None and after.get(name) is not None:
            out[f"{name}/before"] = float(before[name])
            out[f"{name}/after"] = float(after[name])
            out[f"{name}/change"] = float(after[name]) - float(before[name])
    return out


def run(experiment, stage, stage_dir: Path, resolve) -> None:
    from rlhf_jax.evaluate import evaluate_policy, print_tables

    result = evaluate_policy(evaluation_args(experiment, stage, resolve))
    print_tables(result)
    from rlhf_jax.distributed import is_main_process

    if is_main_process():  # with several processes each one evaluated the same prompts on its own devices
        (stage_dir / "evaluation.json").write_text(json.dumps(result, ensure_ascii=False, indent=1))
    values = {name: value for name, value in result.items()
              if isinstance(value, (int, float)) and not isinstance(value, bool)}
    if stage.baseline is not None:
        baseline_file = Path(resolve(f"stage:{stage.baseline}")) / "evaluation.json"
        values.update(compare(json.loads(baseline_file.read_text()), result))
    write_summary(stage_dir, f"Evaluation '{stage.name}'", values)
