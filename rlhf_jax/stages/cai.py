"""The Constitutional-AI stage (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback", the
supervised phase, §3): the model answers each prompt, critiques its answer against a written principle, and
revises it; the revisions become data.

For each prompt x (with ``last_turn_only``, the conversation's last user turn: the red-team request), with one
(critique request c_k, revision request r_k) pair of the constitution drawn per prompt from the experiment's seed:

    original  y₀ ~ π(· | x)
    critique  q  ~ π(· | x, y₀, c_k)
    revision  y₁ ~ π(· | x, y₀, c_k, q, r_k)

each a chat turn in the model's own template. Written, each under a temporary name and then renamed:

- ``preferences.jsonl``: ``{"prompt", "chosen": y₁, "rejected": y₀, "origin"}`` (revision over original, the
  preference data of the paper's RL phase); ``data_path=stage:<name>`` reads it: SFT trains on the chosen side
  (the revisions), DPO, KTO and the reward model on the pairs;
- ``revisions.jsonl``: the SFT rows ``{"prompt", "response": y₁}``;
- ``transcripts.jsonl``: every step of every prompt, for reading (the dropped ones too).

A revision that is empty or equal to its original is dropped and counted. A judge (``judge``, default the
stage's model) then compares each revision with its original in both orders (`rlhf_jax.judge`, the label stage's
`judge_both_orders`); the summary reports how often it prefers the revision (``judge/revision_preferred``, both
orders combined, and each order alone) and its position bias.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rlhf_jax.config import CAIStage, ExperimentConfig, StageKind, stage_data
from rlhf_jax.config.names import STAGE_DATA_FILES
from rlhf_jax.data.records import Message, Preference
from rlhf_jax.errors import UserError
from rlhf_jax.stages.common import load_role, require_language_model, require_tokenizer, write_summary
from rlhf_jax.stages.label import agreement_metrics, judge_both_orders, judge_statistics, load_judge, write_rows

PREFERENCES_FILE = STAGE_DATA_FILES[StageKind.CAI]
REVISIONS_FILE = "revisions.jsonl"
TRANSCRIPTS_FILE = "transcripts.jsonl"


def conversation_turns(prompt, last_turn_only: bool) -> tuple[Message, ...]:
    """A prompt as chat messages: a text prompt is one user turn; a conversation keeps its turns, or with
    ``last_turn_only`` its last user turn."""
    messages = (Message("user", prompt),) if isinstance(prompt, str) else tuple(prompt)
    if last_turn_only:
        users = [message for message in messages if message.role == "user"]
        messages = tuple(users[-1:]) if users else messages
    return messages


def draw_principles(num_prompts: int, num_principles: int, seed: int) -> np.ndarray:
    """The constitution entry of each prompt: uniform, reproducible from the seed. [num_prompts] int."""
    return np.random.default_rng(seed).integers(num_principles, size=num_prompts)


def critique_conversation(prompt: tuple[Message, ...], original: str, critique_request: str) -> tuple[Message, ...]:
    """The conversation the model critiques in: the prompt, its answer, the critique request."""
    return (*prompt, Message("assistant", original), Message("user", critique_request))


def revision_conversation(critique_prompt: tuple[Message, ...], critique: str,
                          revision_request: str) -> tuple[Message, ...]:
    """The conversation the model revises in: the critique conversation, its critique, the revision request."""
    return (*critique_prompt, Message("assistant", critique), Message("user", revision_request))


def kept_revisions(originals: list[str], revisions: list[str]) -> list[int]:
    """Indices of the prompts whose revision is non-empty and differs from a non-empty original."""
    return [i for i, (original, revision) in enumerate(zip(originals, revisions))
            if original and revision and original != revision]


def revision_metrics(logit_ab: np.ndarray, logit_ba: np.ndarray) -> dict[str, float]:
    """The judge's verdicts on (revision, original) pairs, the revision in slot A first (`label.agreement_metrics`,
    with "revision better" as the label): ``judge/revision_preferred`` (both orders combined: p(revision ≻
    original) > ½) and its standard error, each order alone, and the position-bias figures."""
    names = {"agreement/combined": "judge/revision_preferred",
             "agreement/combined_stderr": "judge/revision_preferred_stderr",
             "agreement/input_order": "judge/revision_preferred_in_slot_a",
             "agreement/swapped_order": "judge/revision_preferred_in_slot_b",
             "judge/swapped_fraction": "judge/original_preferred"}
    return {names.get(name, name): value for name, value in agreement_metrics(logit_ab, logit_ba).items()}


def _prompts(stage: CAIStage) -> list[tuple[Message, ...]]:
    from rlhf_jax.data.sources import read_records

    records, _ = read_records(stage.prompts, "prompt", format=str(stage.prompts_format))
    prompts = [conversation_turns(record.prompt, stage.last_turn_only) for record in records]
    prompts = prompts[: stage.num_prompts] if stage.num_prompts is not None else prompts
    if not prompts:
        raise UserError(f"stages.{stage.name}.prompts: {stage.prompts} holds no prompts")
    return prompts


def _models(experiment: ExperimentConfig, stage: CAIStage, resolve: Callable[[str], str]):
    """(the model's role and tokenizer, the judge's role and tokenizer); the judge is the model unless named."""
    data = stage_data(experiment, stage)
    role = load_role(experiment, stage.model, resolve)
    require_language_model(role, f"stages.{stage.name}.model")
    tokenizer = require_tokenizer(role, f"stages.{stage.name}.model")
    if stage.judge is None:
        from rlhf_jax.judge import check_budget

        check_budget(tokenizer, stage.principles, data.max_length, data.max_prompt_length)
        return (role, tokenizer), (role, tokenizer)
    return (role, tokenizer), load_judge(experiment, stage.judge, resolve, f"stages.{stage.name}.judge",
                                         stage.principles, data)


def dry_run(experiment: ExperimentConfig, stage: CAIStage, stage_dir: Path, resolve: Callable[[str], str]) -> None:
    """Load the model (and judge) and the prompts, render the first critique prompt; nothing is sampled."""
    (role, tokenizer), _ = _models(experiment, stage, resolve)
    prompts = _prompts(stage)
    first = critique_conversation(prompts[0], "<answer>", stage.critique_requests[0])
    text = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in first], tokenize=False,
                                         add_generation_prompt=True)
    print(f"  model: {role.config.num_params():,} params; {len(prompts)} prompts, {len(stage.critique_requests)} "
          f"principles; a critique prompt reads:\n{text}")


def run(experiment: ExperimentConfig, stage: CAIStage, stage_dir: Path, resolve: Callable[[str], str]) -> None:
    import jax

    from rlhf_jax.distributed import is_main_process
    from rlhf_jax.sampling import validate_settings
    from rlhf_jax.sampling.text import generate_text
    from rlhf_jax.stages.generate import stage_settings

    data = stage_data(experiment, stage)
    batch_size = stage.batch_size or data.batch_size
    (role, tokenizer), (judge, judge_tokenizer) = _models(experiment, stage, resolve)
    prompts = _prompts(stage)
    settings = stage_settings(stage)
    validate_settings(settings)
    keys = jax.random.split(jax.random.key(experiment.seed), 3)
    principle = draw_principles(len(prompts), len(stage.critique_requests), experiment.seed)

    def sample(conversations, key, what):
        start = time.perf_counter()
        records = generate_text(role.config, role.params, tokenizer, conversations, key, settings,
                                batch_size=batch_size, stop=stage.stop)
        print(f"stage {stage.name}: {len(records)} {what} in {time.perf_counter() - start:.0f} s", flush=True)
        return [record["completion"].strip() for record in records]

    start = time.perf_counter()
    originals = sample(prompts, keys[0], "answers")
    critique_prompts = [critique_conversation(prompt, original, stage.critique_requests[k])
                        for prompt, original, k in zip(prompts, originals, principle)]
    critiques = sample(critique_prompts, keys[1], "critiques")
    revision_prompts = [revision_conversation(conversation, critique, stage.revision_requests[k])
                        for conversation, critique, k in zip(critique_prompts, critiques, principle)]
    revisions = sample(revision_prompts, keys[2], "revisions")
    sampling_seconds = time.perf_counter() - start

    kept = kept_revisions(originals, revisions)
    summary: dict[str, float] = {"prompts": len(prompts), "pairs": len(kept), "dropped": len(prompts) - len(kept),
                                 "time/sampling_seconds": sampling_seconds}
    pairs = [Preference(prompts[i], revisions[i], originals[i], f"{stage.name}:{i}") for i in kept]
    if pairs:
        start = time.perf_counter()
        logprobs, logit_ab, logit_ba, judged = judge_both_orders(
            judge, judge_tokenizer, pairs, stage.principles, dataclasses.replace(data, batch_size=batch_size),
            f"{stage.name} judge")
        summary.update({**revision_metrics(logit_ab, logit_ba), **judge_statistics(logprobs, judged),
                        "time/judge_seconds": time.perf_counter() - start})
    if is_main_process():  # every process sampled and judged the same
        messages = [[{"role": m.role, "content": m.content} for m in prompt] for prompt in prompts]
        kept_set = set(kept)
        write_rows(stage_dir / TRANSCRIPTS_FILE, [
            {"prompt": messages[i], "principle": int(principle[i]), "original": originals[i],
             "critique": critiques[i], "revision": revisions[i], "kept": i in kept_set} for i in range(len(prompts))])
        write_rows(stage_dir / REVISIONS_FILE, [{"prompt": messages[i], "response": revisions[i]} for i in kept])
        write_rows(stage_dir / PREFERENCES_FILE, [
            {"prompt": messages[i], "chosen": revisions[i], "rejected": originals[i], "origin": f"{stage.name}:{i}"}
            for i in kept])
    write_summary(stage_dir, f"Constitutional-AI stage '{stage.name}'", summary)
    if not kept:
        raise UserError(f"stages.{stage.name}: no prompt gave a revision that differs from its answer; nothing to "
                        f"train on (see {stage_dir / TRANSCRIPTS_FILE})")
    print(f"stage {stage.name}: {len(kept)} revisions of {len(prompts)} prompts -> {stage_dir / PREFERENCES_FILE}",
          flush=True)

