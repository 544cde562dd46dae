"""The generate stage: sample responses to a file of prompts and write them as JSON lines.

Writes `<stage_dir>/generations.jsonl`, one `rlhf_jax.sampling.text.completion_record` per response
(prompt, prompt_text, prompt_token_ids, completion, completion_token_ids, sum_logprob, finish_reason) plus
`index` (the prompt's) and `sample` (0..num_samples-1), then `<stage_dir>/DONE` last. The file is written
to a temporary name and renamed, so a `generations.jsonl` that exists is complete. Prompts go through the
model's chat template (the HH text form for tokenizer-less tiny models) and are not truncated.

The first `SHOWN_SAMPLES` responses are also printed, each under the last `PROMPT_TAIL_CHARS` characters of
the text the model was given.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from typing import Callable, Sequence, TextIO

from rlhf_jax.config import ExperimentConfig, GenerateStage, model_for, stage_data

GENERATIONS_FILE = "generations.jsonl"
DONE_FILE = "DONE"
SHOWN_SAMPLES = 16  # printed; the file holds them all
PROMPT_TAIL_CHARS = 200


def stage_settings(stage: GenerateStage):
    """The `SamplingSettings` of a generate stage (EOS ids are filled from the tokenizer later)."""
    from rlhf_jax.sampling import SamplingSettings

    if stage.greedy:
        return SamplingSettings(greedy=True, max_new_tokens=stage.max_new_tokens)
    return SamplingSettings(
        temperature=stage.temperature, top_p=None if stage.top_p >= 1 else stage.top_p, top_k=stage.top_k or 0,
        max_new_tokens=stage.max_new_tokens,
    )


def read_prompts(stage: GenerateStage) -> list:
    """The stage's prompts (text or message tuples), the first `num_prompts` of them."""
    from rlhf_jax.data.sources import read_records

    records, _ = read_records(stage.prompts, "prompt", format=str(stage.prompts_format))
    prompts = [record.prompt for record in records]
    return prompts[: stage.num_prompts] if stage.num_prompts is not None else prompts


def run(experiment: ExperimentConfig, stage: GenerateStage, stage_dir: pathlib.Path,
        resolve: Callable[[str], str]) -> None:
    import jax

    from rlhf_jax.models import load
    from rlhf_jax.sampling import validate_settings
    from rlhf_jax.sampling.text import generate_text

    stage_dir = pathlib.Path(stage_dir)
    spec = model_for(experiment, stage.model)
    settings = stage_settings(stage)
    validate_settings(settings)
    prompts = read_prompts(stage)
    config, params, tokenizer = load(resolve(spec.source), dtype=spec.dtype, param_dtype=spec.param_dtype)
    batch_size = stage_data(experiment, stage).batch_size
    start = time.perf_counter()
    records = generate_text(
        config, params, tokenizer, prompts, jax.random.key(experiment.seed), settings, batch_size=batch_size,
        num_samples=stage.num_samples, stop=stage.stop,
    )
    seconds = time.perf_counter() - start
    new_tokens = sum(len(r["completion_token_ids"]) for r in records)
    from rlhf_jax.distributed import is_main_process

    if is_main_process():  # with several processes each one generated the same records on its own devices
        partial = stage_dir / (GENERATIONS_FILE + ".partial")
        with open(partial, "w", encoding="utf-8") as out:
            for number, record in enumerate(records):
                index, sample = divmod(number, stage.num_samples)
                out.write(json.dumps({"index": index, "sample": sample, **record}, ensure_ascii=False) + "\n")
        os.replace(partial, stage_dir / GENERATIONS_FILE)
        (stage_dir / DONE_FILE).write_text(json.dumps({
            "stage": stage.name, "generations": len(records), "new_tokens": new_tokens,
            "seconds": round(seconds, 2),
        }) + "\n")
        print_samples(records, stage.num_samples)
    print(f"stage {stage.name}: {len(records)} responses ({new_tokens} tokens, {seconds:.1f} s) -> "
          f"{stage_dir / GENERATIONS_FILE}", flush=True)


def prompt_tail(text: str, chars: int = PROMPT_TAIL_CHARS) -> str:
    """The last `chars` characters of `text`, from a word boundary when one is near, with "…" where cut."""
    text = text.strip()
    if len(text) <= chars:
        return text
    tail = text[-chars:]
    boundary = next((i for i, c in enumerate(tail[: chars // 5]) if c.isspace()), None)
    return "…" + (tail[boundary:] if boundary is not None else tail).lstrip()


def print_samples(records: Sequence[dict], num_samples: int, out: TextIO | None = None) -> None:
    """Print the first `SHOWN_SAMPLES` records: a rule naming prompt (and sample), the prompt's tail, the response.

    Lines are never wrapped by rich (`soft_wrap`), so a response reads, and greps, as it was generated.
    """
    from rich.console import Console
    from rich.text import Text

    console = Console(file=out or sys.stdout, soft_wrap=True, highlight=False)
    for number, record in enumerate(records[:SHOWN_SAMPLES]):
        index, sample = divmod(number, num_samples)
        title = f"prompt {index}" + (f", sample {sample}" if num_samples > 1 else "")
        console.rule(Text(f"{title} · {len(record['completion_token_ids'])} tokens, {record['finish_reason']}"))
        console.print(Text(prompt_tail(record["prompt_text"]), style="dim"))
        response = record["completion"].strip() or "(empty)"
        console.print(Text.assemble(("response: ", "bold cyan"), (response, "bold")))
    if len(records) > SHOWN_SAMPLES:
        console.print(f"… and {len(records) - SHOWN_SAMPLES} more", markup=False)
    console.file.flush()
