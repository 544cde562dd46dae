"""Sample, score, keep the good samples, fine-tune on them: RAFT, ReST and best-of-n.

One iteration (one `fit` step) of RAFT or ReST:

1. **Grow**: sample `num_samples` responses for each of `rollout_batch_size` prompts with the current policy
   and score them with the stage's reward sources (`stages.rollouts`, as the RL stages do).
2. **Improve**, one or more steps, each a selection of the grown samples and SFT on them (the response
   tokens' NLL, `trainers.sft.sft_train_step` on the rows [prompt | response]):
   - RAFT (Dong et al. 2023): one step on the best sample of each prompt (ties: the first sampled), when its
     reward is at least `min_reward`;
   - ReST (Gulcehre et al. 2023): one step per threshold τ_1 <= τ_2 <= ...: the samples with reward >= τ_i.
   Each step runs `sft_epochs` shuffled passes over the kept rows in batches of `sft_batch_size` (the last
   batch padded with rows that carry no loss), each prepared as the SFT stage prepares its batches
   (`stages.sft.step_input`): the LM head runs only at the response tokens, and with `optimizer.length_buckets`
   each micro-batch at the length of its longest row. One compiled step per size of the loss positions' index
   (`data.batching.index_bucket`, a handful) and per micro-batch length.

Metrics per iteration: `reward/mean`, `reward/max` (mean over prompts of the best sample), each source's
`reward/<name>`, and per Improve step i (from 1) `filter/kept_i` (rows kept), `filter/kept_fraction_i`,
`filter/threshold_i` (ReST), `sft/loss_i`; `filter/kept_fraction` is the first step's. Checkpoints hold the
policy's train state (adapters only under LoRA), the PRNG key and the prompt iterator's position: a killed
run resumes exactly at an iteration boundary.

Best-of-n (`kind: best_of_n`) is the Grow step alone over a prompt set: it writes the best response of each
prompt (`best_of_n.jsonl`: prompt, response, reward, the mean reward of its n samples) and reports
`best_of_n/reward_mean` (the selected answers) beside `single/reward_mean` (every sample: the expected reward of
one sample).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax.data import DataIterator
from rlhf_jax.distributed import is_main_process
from rlhf_jax.errors import UserError
from rlhf_jax.sharding import param_shardings, place_batch, place_state, replicated, shard_train_step, state_shardings
from rlhf_jax.stages.common import (bind_base, build_optimizer, fit, per_layer_state, training_iterator,
                                    write_summary)
from rlhf_jax.stages.rollouts import decoded_samples, load_rollouts
from rlhf_jax.stages.sft import step_input
from rlhf_jax.trainers.sft import sft_train_step
from rlhf_jax.training.state import TrainState


class FilterState(flax.struct.PyTreeNode):
    """What RAFT and ReST checkpoint: iterations done, the policy's train state, the PRNG key."""

    step: jax.Array
    policy: TrainState
    rng: jax.Array


def best_in_group(scores: np.ndarray, group: int) -> np.ndarray:
    """[B·group] bool: the first highest-scoring sample of each prompt's contiguous `group` rows."""
    grouped = np.asarray(scores).reshape(-1, group)
    keep = np.zeros(grouped.shape, bool)
    keep[np.arange(len(grouped)), np.argmax(grouped, axis=1)] = True
    return keep.reshape(-1)


def improve_selections(stage, scores: np.ndarray) -> list[tuple[float | None, np.ndarray]]:
    """(threshold or None, kept rows [B] bool) of each Improve step of an iteration."""
    if str(stage.kind) == "raft":
        keep = best_in_group(scores, stage.num_samples)
        if stage.min_reward is not None:
            keep &= scores >= stage.min_reward
        return [(stage.min_reward, keep)]
    return [(threshold, scores >= threshold) for threshold in stage.thresholds]


def sft_rows(prompt_tokens, prompt_mask, response_tokens, response_mask) -> dict:
    """Sampled rows as an SFT batch: tokens [prompt | response], the loss on the response tokens only."""
    prompt_mask, response_mask = np.asarray(prompt_mask, bool), np.asarray(response_mask, bool)
    return {"tokens": np.concatenate([np.asarray(prompt_tokens), np.asarray(response_tokens)], axis=1).astype(np.int32),
            "attention_mask": np.concatenate([prompt_mask, response_mask], axis=1),
            "loss_mask": np.concatenate([np.zeros_like(prompt_mask), response_mask], axis=1)}


def _batches(rows: np.ndarray, size: int, key: jax.Array, epochs: int):
    """Index arrays of `size` rows: `epochs` shuffled passes over `rows`; a short last batch of each pass is
    filled with -1 (rows that carry no loss)."""
    for epoch in range(epochs):
        order = np.asarray(rows)[np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), len(rows)))]
        for start in range(0, len(order), size):
            chunk = order[start: start + size]
            yield np.concatenate([chunk, np.full(size - len(chunk), -1, chunk.dtype)])


def run(experiment, stage, stage_dir: Path, resolve) -> None:
    key = jax.random.key(experiment.seed)
    rollouts = load_rollouts(experiment, stage, resolve, key)
    mesh, lora = rollouts.mesh, stage.lora
    iterator = training_iterator(rollouts.prompts, batch_size=stage.rollout_batch_size,
                                 seed=rollouts.data.shuffle_seed or experiment.seed, num_epochs=None)
    per_epoch = max(len(rollouts.prompts) // stage.rollout_batch_size, 1)
    iterations = stage.max_steps if stage.max_steps is not None else per_epoch * stage.epochs
    phases = 1 if str(stage.kind) == "raft" else len(stage.thresholds)
    most_rows = stage.rollout_batch_size * (1 if str(stage.kind) == "raft" else stage.num_samples)
    schedule_steps = iterations * phases * stage.sft_epochs * -(-most_rows // stage.sft_batch_size)
    policy = TrainState.create(rollouts.trainable, build_optimizer(experiment, stage, schedule_steps),
                               jax.random.fold_in(key, 1), per_layer=per_layer_state(stage, rollouts.config))
    policy_sharding = state_shardings(policy, mesh)
    state = FilterState(step=jnp.zeros((), jnp.int32), policy=place_state(policy, policy_sharding),
                        rng=place_state(jax.random.fold_in(key, 3), replicated(mesh)))
    step = bind_base(functools.partial(sft_train_step, rollouts.config, experiment.optimizer.micro_batches), lora)
    frozen = (rollouts.base,) if lora.rank > 0 else ()
    train_step = shard_train_step(step, (policy_sharding,), mesh,
                                  frozen_shardings=tuple(param_shardings(p, mesh) for p in frozen))
    prepare = step_input(experiment, stage, mesh)  # the SFT stage's: the head at the kept responses' tokens only
    last_rows: dict[str, object] = {}

    def iteration(state: FilterState, batch: dict) -> tuple[FilterState, dict]:
        rng, sample_key, shuffle_key = jax.random.split(state.rng, 3)
        prompt_tokens, prompt_mask, references = rollouts.group_rows(batch["prompt_tokens"], batch["prompt_mask"],
                                                                     batch["references"])
        start = time.perf_counter()
        sample = jax.block_until_ready(rollouts.generate(state.policy.params, prompt_tokens, prompt_mask,
                                                         sample_key))
        generated = time.perf_counter()
        scores, metrics = rollouts.score(prompt_tokens, prompt_mask, sample, references)
        host = multihost_utils.process_allgather((prompt_tokens, prompt_mask, sample.response_tokens,
                                                  sample.response_mask, scores), tiled=True)
        rows = sft_rows(*host[:4])
        scores = np.asarray(host[4], np.float64)
        scored = time.perf_counter()
        metrics = {name: float(value) for name, value in jax.device_get(metrics).items()}
        metrics.update({"reward/mean": float(np.mean(scores)),
                        "reward/max": float(np.mean(scores.reshape(-1, stage.num_samples).max(axis=1)))})
        policy = state.policy
        for phase, (threshold, keep) in enumerate(improve_selections(stage, scores), start=1):
            kept = np.flatnonzero(keep)
            metrics[f"filter/kept_{phase}"] = float(len(kept))
            metrics[f"filter/kept_fraction_{phase}"] = float(len(kept) / len(keep))
            if threshold is not None:
                metrics[f"filter/threshold_{phase}"] = float(threshold)
            losses = []
            for index in _batches(kept, stage.sft_batch_size, jax.random.fold_in(shuffle_key, phase), stage.sft_epochs):
                chunk = {name: value[np.maximum(index, 0)] for name, value in rows.items()}
                chunk["loss_mask"] = chunk["loss_mask"] & (index >= 0)[:, None]  # fill rows carry no loss
                policy, step_metrics = train_step(*frozen, policy, prepare(chunk))
                losses.append(float(step_metrics["sft/loss"]))
            metrics[f"sft/loss_{phase}"] = float(np.mean(losses)) if losses else float("nan")
            metrics[f"sft/steps_{phase}"] = float(len(losses))
        trained = time.perf_counter()
        metrics["filter/kept_fraction"] = metrics["filter/kept_fraction_1"]
        metrics.update({"time/generate": generated - start, "time/score": scored - generated,
                        "time/train": trained - scored})
        last_rows["last"] = (host[0], host[1], host[2], np.asarray(sample.response_lengths), scores)
        return FilterState(step=state.step + 1, policy=policy, rng=rng), metrics

    evaluate = rollouts.evaluator(stage.generation_batch_size or stage.rollout_batch_size * stage.num_samples)

    def log_samples(step: int, logger) -> None:
        sample_every = experiment.logging.sample_every
        if sample_every and (step % sample_every == 0 or step == 1):
            logger.log_samples(step, decoded_samples(rollouts.tokenizer, *last_rows["last"], 4))

    state, records = fit(
        experiment=experiment, stage=stage, stage_dir=stage_dir, state=state, step_fn=iteration, batches=iterator,
        total_steps=iterations, host_state=lambda: {"data": iterator.get_state()},
        restore_host_state=lambda saved: iterator.set_state(saved["data"]), prepare=rollouts.prepare,
        after_step=log_samples, evaluate=evaluate and (lambda state: evaluate(state.policy.params)),
        eval_every=stage.eval_every,
    )
    last_metrics = {k: v for k, v in records[-1].items() if k != "step"} if records else {}
    rollouts.export(stage_dir, state.policy.params, {"stage": stage.name, "iterations": int(state.step)})
    write_summary(stage_dir, f"{str(stage.kind).upper()} stage '{stage.name}'",
                  {"iterations": int(state.step), **last_metrics})


def _raw_prompts(data, split: str) -> dict:
    """origin ("file:line") -> the prompt as its file gives it (text or messages), for the written dataset."""
    from rlhf_jax.data.sources import read_records

    path = data.eval_path if split == "eval" and data.eval_path else data.path
    records, _ = read_records(path, "prompt", format=str(data.format), check=False)
    return {record.origin: record.prompt for record in records}


def _sft_record(prompt, response: str) -> dict:
    """A row an SFT stage reads: {"prompt", "response"} for a text prompt, {"messages"} for a chat one."""
    if isinstance(prompt, str):
        return {"prompt": prompt, "response": response}
    return {"messages": [dataclasses.asdict(m) for m in prompt] + [{"role": "assistant", "content": response}]}


def run_best_of_n(experiment, stage, stage_dir: Path, resolve) -> None:
    """Sample `num_samples` responses per prompt, score them, write the best of each and the summary."""
    rollouts = load_rollouts(experiment, stage, resolve, jax.random.key(experiment.seed))
    prompts = rollouts.eval_prompts if stage.split == "eval" else rollouts.prompts
    if prompts is None:
        raise UserError(f"stages.{stage.name}.split: 'eval' but the data has no held-out prompts (set "
                        "data.eval_path or data.eval_fraction, or split='train')")
    if stage.num_prompts is not None:
        prompts = dataclasses.replace(prompts, examples=prompts.examples[: stage.num_prompts])
    raw = _raw_prompts(rollouts.data, stage.split)
    batches = DataIterator(prompts, batch_size=min(stage.rollout_batch_size, len(prompts)), shuffle=False,
                           drop_remainder=False)
    key = jax.random.key(experiment.seed)
    selected, single, rows = [], [], []
    for number, batch in enumerate(batches):
        count = len(batch["index"])
        fill = np.minimum(np.arange(batches.batch_size), count - 1)  # one shape: repeat the last prompt
        tokens, mask = place_batch((batch["prompt_tokens"][fill], batch["prompt_mask"][fill]), rollouts.mesh)
        examples = [prompts.examples[int(batch["index"][row])] for row in fill]
        tokens, mask, references = rollouts.group_rows(tokens, mask, [e.reference for e in examples])
        sample = rollouts.generate(rollouts.trainable, tokens, mask, jax.random.fold_in(key, number))
        scores, _ = rollouts.score(tokens, mask, sample, references)
        host = multihost_utils.process_allgather((sample.response_tokens, sample.response_lengths, scores), tiled=True)
        grouped = np.asarray(host[2], np.float64).reshape(-1, stage.num_samples)[:count]
        best = np.argmax(grouped, axis=1)
        selected.extend(grouped[np.arange(count), best])
        single.extend(grouped.mean(axis=1))
        for row in range(count):
            flat = row * stage.num_samples + best[row]
            response = rollouts.tokenizer.decode(np.asarray(host[0])[flat, : int(np.asarray(host[1])[flat])],
                                                 skip_special_tokens=True)
            rows.append({**_sft_record(raw[examples[row].origin], response), "reward": float(grouped[row, best[row]]),
                         "mean_reward": float(grouped[row].mean()), "origin": examples[row].origin})
    summary = {"prompts": len(rows), "num_samples": stage.num_samples,
               "single/reward_mean": float(np.mean(single)), "best_of_n/reward_mean": float(np.mean(selected))}
    if is_main_process():
        path = stage_dir / "best_of_n.jsonl"
        partial = path.with_suffix(".jsonl.partial")
        partial.write_text("".join(json.dumps(row) + "\n" for row in rows))
        partial.replace(path)
    write_summary(stage_dir, f"Best-of-{stage.num_samples} stage '{stage.name}'", summary)
