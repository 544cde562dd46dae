"""The label stage (AI feedback, RLAIF): a judge model labels preference pairs, each judged in both orders.

Reads the pairs of the stage's data (the ``preference`` kind: HH files work as they are; ``data.max_examples``
keeps the first N), judges each with `rlhf_jax.judge` with response 1 (the input's ``chosen``) in slot A and
again in slot B, and writes ``<stage_dir>/preferences.jsonl``: one row a pair, the judge's choice as ``chosen``

    {"prompt": <text or messages>, "chosen": ..., "rejected": ..., "judge_probability": p(chosen ≻ rejected),
     "logit_input_order": logit_AB, "logit_swapped_order": logit_BA, "swapped": <the judge reversed the input>,
     "origin": "<input file>:<line>"}

which the ``preference``, ``unpaired`` (chosen desirable, rejected not), ``sft`` and ``prompt`` kinds all read; a
later stage takes it with ``data_path=stage:<name>``. A tie (p = ½) keeps the input's order. The file is written
under a temporary name and renamed, so a ``preferences.jsonl`` that exists is complete.

The summary (``summary.json``, and a printed table): agreement with the input's labels (when ``human_labels``) for
each order alone and combined, the position-consistency rate (both orders pick the same response), the fraction of
verdicts for the first slot, counts and timing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_jax.config import DataConfig, ExperimentConfig, LabelStage, StageKind
from rlhf_jax.config.names import STAGE_DATA_FILES
from rlhf_jax.data.records import Preference
from rlhf_jax.data.validation import Report
from rlhf_jax.errors import UserError
from rlhf_jax.stages.common import (Role, load_role, require_language_model, require_tokenizer, stage_data_source,
                                    write_summary)

PREFERENCES_FILE = STAGE_DATA_FILES[StageKind.LABEL]


def agreement_metrics(logit_ab: np.ndarray, logit_ba: np.ndarray, human_labels: bool = True) -> dict[str, float]:
    """What the judge's verdicts say, for pairs whose response 1 is the input's chosen.

    logit_ab: [N] log p(A) − log p(B) with response 1 in slot A; logit_ba: [N] with response 1 in slot B. A verdict
    is for slot A when its logit is > 0; the combined preference p = ½[σ(logit_AB) + σ(−logit_BA)] is > ½ exactly
    when logit_AB > logit_BA (σ is increasing), which is how it is compared. Ties (a logit of 0, p = ½) count as
    disagreeing, as a reward model's ties count as wrong. Returns

    - ``agreement/input_order``, ``agreement/swapped_order``: fraction of pairs where that order's verdict picks
      response 1, and ``agreement/combined``: where p > ½, with its binomial standard error (``human_labels`` only);
    - ``position/consistency``: fraction of pairs whose two verdicts pick the same response;
    - ``position/first_slot_fraction``: fraction of the 2N verdicts that are A;
    - ``judge/swapped_fraction``: fraction of pairs whose response 2 the judge prefers (p < ½: written reversed);
      ``judge/confidence``: mean |2p − 1|.
    """
    from rlhf_jax.judge import combined_preference

    logit_ab, logit_ba = np.asarray(logit_ab, np.float64), np.asarray(logit_ba, np.float64)
    pairs = len(logit_ab)
    probability = np.asarray(combined_preference(logit_ab, logit_ba), np.float64)
    metrics = {"pairs": pairs}
    if human_labels:
        combined = float(np.mean(logit_ab > logit_ba))
        metrics.update({
            "agreement/input_order": float(np.mean(logit_ab > 0)),
            "agreement/swapped_order": float(np.mean(logit_ba < 0)),
            "agreement/combined": combined,
            "agreement/combined_stderr": math.sqrt(combined * (1 - combined) / pairs),
        })
    return {
        **metrics,
        # a tie is no verdict for either response: consistent only when both orders tie
        "position/consistency": float(np.mean(np.sign(logit_ab) == -np.sign(logit_ba))),
        "position/first_slot_fraction": float((np.sum(logit_ab > 0) + np.sum(logit_ba > 0)) / (2 * pairs)),
        "judge/swapped_fraction": float(np.mean(logit_ab < logit_ba)),
        "judge/confidence": float(np.mean(np.abs(2 * probability - 1))),
    }


def labelled_row(pair: Preference, logit_ab: float, logit_ba: float, probability: float) -> dict:
    """The output row of one pair: the judge's choice as ``chosen`` (response 2 when logit_AB < logit_BA, i.e.
    p < ½), with its probability p(chosen ≻ rejected) and both logits; `probability`: p(response 1 ≻ response 2)."""
    swapped = bool(logit_ab < logit_ba)
    prompt = pair.prompt if isinstance(pair.prompt, str) else [dataclasses.asdict(m) for m in pair.prompt]
    return {
        "prompt": prompt,
        "chosen": pair.rejected if swapped else pair.chosen,
        "rejected": pair.chosen if swapped else pair.rejected,
        "judge_probability": float(1 - probability if swapped else probability),
        "logit_input_order": float(logit_ab),
        "logit_swapped_order": float(logit_ba),
        "swapped": swapped,
        "origin": pair.origin,
    }


def write_rows(path: Path, rows: list[dict]) -> None:
    """JSON lines written under a temporary name, then renamed: `path` exists only complete."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as out:
        out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(partial, path)


def load_judge(experiment: ExperimentConfig, source: str | None, resolve: Callable[[str], str], what: str,
               principles: str, data: DataConfig) -> tuple[Role, Any]:
    """(role, tokenizer) of a judge: a language model whose tokenizer has a chat template, and room in
    ``data.max_length`` for its prompts (`judge.check_budget`); `UserError` naming ``what`` otherwise."""
    from rlhf_jax.judge import check_budget

    role = load_role(experiment, source, resolve)
    require_language_model(role, what)
    tokenizer = require_tokenizer(role, what)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{what}: its tokenizer has no chat template to write the judge prompt in")
    check_budget(tokenizer, principles, data.max_length, data.max_prompt_length)
    return role, tokenizer


@dataclasses.dataclass
class _Setup:
    """What a run (or a dry run) needs: the judge, and the pairs to label with where they come from."""

    judge: Role
    tokenizer: Any
    pairs: list[Preference]
    report: Report  # what the source held (the whole file, before data.max_examples)
    data: DataConfig
    source: str  # the file the pairs are read from


def _setup(experiment: ExperimentConfig, stage: LabelStage, resolve: Callable[[str], str],
           judge_source: str | None) -> _Setup:
    """The judge (a language model whose tokenizer has a chat template) and the pairs to label."""
    from rlhf_jax.data.sources import read_records

    data, path, format = stage_data_source(experiment, stage, resolve)
    role, tokenizer = load_judge(experiment, judge_source if judge_source is not None else stage.judge, resolve,
                                 f"stages.{stage.name}.judge", stage.principles, data)
    pairs, report = read_records(path, "preference", format=format)
    if data.max_examples is not None:
        pairs = pairs[: data.max_examples]
    return _Setup(role, tokenizer, pairs, report, data, path)


def all_judge_prompts(tokenizer, principles: str, pairs: list[Preference], data: DataConfig) -> list:
    """Every pair's `judge.JudgePrompts`, at most ``data.max_length`` tokens each."""
    from rlhf_jax.judge import judge_prompts

    return [judge_prompts(tokenizer, principles, pair, data.max_length, data.max_prompt_length) for pair in pairs]


def dry_run(experiment: ExperimentConfig, stage: LabelStage, stage_dir: Path, resolve: Callable[[str], str]) -> None:
    """Load the judge and the pairs and render every judge prompt; nothing is judged."""
    from rlhf_jax.stages.common import dry_run_source

    setup = _setup(experiment, stage, resolve, dry_run_source(experiment, stage.judge, resolve))
    prompts = all_judge_prompts(setup.tokenizer, stage.principles, setup.pairs, setup.data)
    lengths = [len(ids) for p in prompts for ids in (p.input_order, p.swapped_order)]
    print(f"  {setup.report.summary()}; {len(setup.pairs)} pairs to label: {len(lengths)} judge prompts of "
          f"{min(lengths)}-{max(lengths)} tokens (mean {np.mean(lengths):.0f}), {sum(p.truncated for p in prompts)} "
          f"pairs cut to data.max_length={setup.data.max_length}")


def judge_both_orders(judge: Role, tokenizer, pairs: list[Preference], principles: str, data: DataConfig,
                      name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """Judge each pair with response 1 (its ``chosen``) in slot A, then in slot B (`rlhf_jax.judge`), with a
    progress bar: (verdict log-probs [2N, 2] (input orders, then swapped), logit_AB [N], logit_BA [N], the
    `judge.JudgePrompts`). Prompts hold at most ``data.max_length`` tokens (run `judge.check_budget` first) and
    run ``data.batch_size`` at a time. The label and Constitutional-AI stages both judge through it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from rlhf_jax.judge import judge_logprobs, length_buckets, preference_logit, verdict_token_ids

    prompts = all_judge_prompts(tokenizer, principles, pairs, data)
    verdict_ids = verdict_token_ids(tokenizer, principles)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masks: from lengths
    both_orders = [p.input_order for p in prompts] + [p.swapped_order for p in prompts]
    print(f"stage {name}: judging {len(prompts)} pairs in both orders ({len(both_orders)} prompts, "
          f"{sum(map(len, both_orders))} tokens)", flush=True)
    with Progress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task(name, total=len(both_orders))
        logprobs = judge_logprobs(judge.config, judge.params, both_orders, verdict_ids, batch_size=data.batch_size,
                                  buckets=length_buckets(data.max_length), pad_id=pad_id,
                                  on_batch=lambda done: bar.update(task, completed=done))
    logits = np.asarray(preference_logit(logprobs))
    return logprobs, logits[: len(prompts)], logits[len(prompts):], prompts


def judge_statistics(logprobs: np.ndarray, prompts: list) -> dict[str, float]:
    """What the judging cost and how the judge answered, beside `agreement_metrics`."""
    lengths = [len(ids) for p in prompts for ids in (p.input_order, p.swapped_order)]
    return {
        # how much of the judge's next-token probability the two verdicts hold: near 1 when it answers as told
        "judge/verdict_mass": float(np.mean(np.exp(logprobs.astype(np.float64)).sum(axis=1))),
        "prompts/mean_tokens": float(np.mean(lengths)),
        "prompts/truncated_pairs": sum(p.truncated for p in prompts),
    }


def run(experiment: ExperimentConfig, stage: LabelStage, stage_dir: Path, resolve: Callable[[str], str]) -> None:
    from rlhf_jax.distributed import is_main_process
    from rlhf_jax.judge import combined_preference

    setup = _setup(experiment, stage, resolve, None)
    print(f"stage {stage.name}: labelling the pairs of {setup.source}", flush=True)
    start = time.perf_counter()
    logprobs, logit_ab, logit_ba, prompts = judge_both_orders(setup.judge, setup.tokenizer, setup.pairs,
                                                              stage.principles, setup.data, stage.name)
    seconds = time.perf_counter() - start
    probability = np.asarray(combined_preference(logit_ab, logit_ba), np.float64)
    rows = [labelled_row(*row) for row in zip(setup.pairs, logit_ab, logit_ba, probability)]
    if is_main_process():  # every process judged the same pairs
        write_rows(stage_dir / PREFERENCES_FILE, rows)
    summary = {
        **agreement_metrics(logit_ab, logit_ba, stage.human_labels),
        **judge_statistics(logprobs, prompts),
        "data/skipped_records": len(setup.report.problems),
        "time/judge_seconds": seconds,
        "time/seconds_per_pair": seconds / len(prompts),
    }
    write_summary(stage_dir, f"Label stage '{stage.name}': judge {stage.judge or experiment.model.source}", summary)
    print(f"stage {stage.name}: {len(rows)} labelled pairs ({sum(row['swapped'] for row in rows)} reversed) -> "
          f"{stage_dir / PREFERENCES_FILE}", flush=True)
