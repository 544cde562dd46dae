"""A/B of two versions of our SFT, reward-model or DPO step in one process, steps alternating, medians after
warm-up:

- `--compare lengths`: each micro-batch at the batch's length, and at its own (`optimizer.length_buckets`);
- `--compare per-layer`: the decoder's stacked layer weights sliced inside the micro-batch loop, and passed into
  it one array per layer (`training.accumulate`'s `per_layer`, what the trainers do when the layers are
  unrolled); both with `--length-buckets`;
- `--compare loss-index`: the LM head at every position, and only at the positions that carry a loss (the
  index `trainers.common.with_loss_index` adds, what the stages pass); with `--sampled P,N` on rows like RAFT's
  and ReST's kept samples (`stages.filtered.sft_rows`: a left-padded prompt of P, a response of N);
- `--compare per-layer-state`: the train state holding the layers' weights stacked, and one array per layer
  (`TrainState.create(per_layer=True)`, what the stages do when the layers are unrolled), with the same
  unrolled step; both with `--length-buckets`, or with `--step sft --packed` on packed rows.

A diagnostic, not a comparison with TRL (that is `suite.py`): random weights at SmolLM2-135M's shapes and fixed
row lengths (HH-like, the longest at 256), so that the two programs see the same rows in the same process and
the host's drift between runs does not enter the ratio.

    .venv/bin/python benchmarks/step_ab.py --step dpo --micro-batches 4 --length-buckets 8
    .venv/bin/python benchmarks/step_ab.py --compare per-layer --step rm --micro-batches 8 --length-buckets 8
    .venv/bin/python benchmarks/step_ab.py --compare per-layer-state --step sft --micro-batches 2
    .venv/bin/python benchmarks/step_ab.py --compare per-layer-state --step sft --packed --micro-batches 2
    .venv/bin/python benchmarks/step_ab.py --step sft --micro-batches 4 --profile 30
    .venv/bin/python benchmarks/step_ab.py --compare loss-index --step sft --sampled 48,24 --micro-batches 1

`--profile N` then runs one more step of the second version under `jax.profiler` and prints where it went: the
time of XLA's CPU operations (thunks) summed by kind and by the JAX operation they came from (the HLO's
`op_name`, layer numbers dropped), the N largest. Operations that run at the same time on the machine's threads
each count their own time, so the sum can exceed the step.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import glob
import re
import statistics
import tempfile
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import PreferenceLoss
from rlhf_jax.models import llama
from rlhf_jax.models.config import tiny_config
from rlhf_jax.trainers.common import with_loss_index
from rlhf_jax.trainers.dpo import preference_train_step, reference_logprobs
from rlhf_jax.trainers.reward import reward_train_step
from rlhf_jax.trainers.sft import sft_train_step
from rlhf_jax.training.accumulate import order_by_length
from rlhf_jax.training.state import TrainState, make_optimizer

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)
LENGTH = 256
# (chosen, rejected) lengths per pair; the prompt (no loss) is the first 40 tokens
PAIRS = {"dpo": ([256, 170, 120, 90], [230, 150, 140, 70]),
         "rm": ([256, 256, 200, 170, 120, 90, 80, 60], [256, 230, 150, 140, 130, 70, 90, 50])}
ROWS = {"sft": [256, 240, 200, 170, 150, 120, 90, 60]}  # SFT rows' lengths
LOSS_KEY = {"sft": "sft/loss", "rm": "rm/loss", "dpo": "dpo/loss"}


def pair_batch(step: str, length: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    column = np.arange(length)[None]
    batch = {}
    sides = (("", ROWS[step]),) if step in ROWS else zip(("chosen_", "rejected_"), PAIRS[step])
    for prefix, lengths in sides:
        mask = column < np.minimum(lengths, length)[:, None]
        batch[f"{prefix}tokens"] = rng.integers(3, 1000, mask.shape).astype(np.int32)
        batch[f"{prefix}attention_mask"] = mask
        if step != "rm":
            batch[f"{prefix}loss_mask"] = mask & (column >= min(40, length // 4))
    return batch


def packed_sft_batch(length: int, rows: int = 8, seed: int = 0) -> dict:
    """SFT rows packed as the stage packs them (`packing=true`): sequences of 20–120 tokens (HH-like, each
    with a 10-token prompt that carries no loss) placed one after another in each row, with segment ids and
    per-sequence positions; a row ends where the next sequence would leave fewer than 8 slots."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 1000, (rows, length)).astype(np.int32)
    segments, positions = np.zeros((rows, length), np.int32), np.zeros((rows, length), np.int32)
    loss = np.zeros((rows, length), bool)
    for row in range(rows):
        start, segment = 0, 0
        while length - start >= 8:
            size = min(int(rng.integers(20, 121)), length - start)
            segment += 1
            segments[row, start:start + size] = segment
            positions[row, start:start + size] = np.arange(size)
            loss[row, start + min(10, size - 1):start + size] = True
            start += size
    return {"tokens": tokens, "attention_mask": segments > 0, "loss_mask": loss, "segment_ids": segments,
            "positions": positions}


def sampled_sft_batch(prompt_length: int, new_tokens: int, rows: int = 8, seed: int = 0) -> dict:
    """RAFT/ReST's SFT rows (`stages.filtered.sft_rows`): prompts of 1/2 to all of `prompt_length` tokens,
    left-padded, and responses of 1/4 to all of `new_tokens`, right-padded (a quarter of them cut at the limit)."""
    from rlhf_jax.stages.filtered import sft_rows

    rng = np.random.default_rng(seed)
    prompts = rng.integers(prompt_length // 2, prompt_length + 1, rows)
    responses = np.minimum(rng.integers(max(new_tokens // 4, 1), new_tokens * 4 // 3 + 1, rows), new_tokens)
    prompt_mask = np.arange(prompt_length)[None] >= (prompt_length - prompts)[:, None]
    response_mask = np.arange(new_tokens)[None] < responses[:, None]
    return sft_rows(rng.integers(3, 1000, (rows, prompt_length)), prompt_mask,
                    rng.integers(3, 1000, (rows, new_tokens)), response_mask)


def build_step(step: str, config, params, micro: int):
    """(params, prepare(host batch) -> batch, run(state, batch) -> (state, metrics), programs(state, batch) ->
    the compiled HLO text of each jitted function `run` calls)."""
    if step == "rm":
        params = llama.init_scalar_model(config, params, jax.random.key(1))
        run = jax.jit(functools.partial(reward_train_step, config, 0.0, micro), donate_argnums=0)
        return params, (lambda b: b), run, lambda state, b: [run.lower(state, b).compile().as_text()]
    prepare = functools.partial(with_loss_index, num_microbatches=micro)
    if step == "sft":
        run = jax.jit(functools.partial(sft_train_step, config, micro), donate_argnums=0)
        return params, prepare, run, lambda state, b: [run.lower(state, b).compile().as_text()]
    reference = jax.jit(functools.partial(reference_logprobs, config), static_argnums=2)
    train = jax.jit(functools.partial(preference_train_step, config, PreferenceLoss(), micro), donate_argnums=0)

    def with_reference(b):
        return {**b, **reference(params, b, micro)}

    def programs(state, b):
        return [reference.lower(params, b, micro).compile().as_text(),
                train.lower(state, with_reference(b)).compile().as_text()]

    return params, prepare, lambda state, b: train(state, with_reference(b)), programs


def profile_step(run, state, batch, programs: list[str], top: int):
    """One step under `jax.profiler`: (state, rows of (kind, op_name, seconds, count), step seconds). XLA's CPU
    runtime records each operation (thunk) by its HLO name; `programs` (compiled HLO text) gives each its
    `op_name`."""
    op_names = {}
    for text in programs:
        module = re.match(r"HloModule (\S+?),", text).group(1)
        for name, op_name in re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", text, re.M):
            op_name = re.sub(r"branch_\d+_fun", "branch_N_fun", op_name.split("/", 1)[-1])  # `by_length`'s
            op_names[module, name] = re.sub(r"_\d+(?=/|$)", "_N", op_name)  # layers_12 -> layers_N
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder)
        start = time.perf_counter()
        state, metrics = run(state, batch)
        jax.block_until_ready(metrics)
        seconds = time.perf_counter() - start
        jax.profiler.stop_trace()
        trace = jax.profiler.ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
    totals, counts = collections.Counter(), collections.Counter()
    for plane in trace.planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if "hlo_op" not in stats or event.name.startswith("end: "):
                    continue
                kind = re.sub(r"\.\d+$", "", event.name)
                key = (kind, op_names.get((stats.get("hlo_module"), event.name), "?"))
                totals[key] += event.duration_ns / 1e9
                counts[key] += 1
    rows = [(kind, op_name, total, counts[kind, op_name]) for (kind, op_name), total in totals.most_common(top)]
    return state, rows, seconds


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step", choices=sorted(LOSS_KEY), default="rm")
    parser.add_argument("--compare", choices=("lengths", "per-layer", "per-layer-state", "loss-index"),
                        default="lengths")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--packed", action="store_true", help="with --step sft: packed rows (`packed_sft_batch`)")
    parser.add_argument("--sampled", default=None, metavar="P,N",
                        help="with --step sft: rows like RAFT's kept samples, prompts of P and responses of N tokens")
    parser.add_argument("--length-buckets", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="per side, the first two left out of the median")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and 32-token rows (smoke test)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="then profile one step of the second version and print its N largest operations")
    args = parser.parse_args(argv)
    config = tiny_config("smollm2", **({} if args.tiny else SMOLLM2))
    length, micro = (32 if args.tiny else LENGTH), args.micro_batches
    if args.packed and args.step != "sft":
        parser.error("--packed is for --step sft")
    if args.sampled and (args.step != "sft" or args.packed):
        parser.error("--sampled is for --step sft without --packed")
    if args.sampled:
        prompt_length, new_tokens = (int(n) for n in args.sampled.split(","))
        batch = sampled_sft_batch(prompt_length, new_tokens)
    else:
        batch = packed_sft_batch(length) if args.packed else pair_batch(args.step, length)
    variants = {}  # name: (run, host batch)
    per_layer_states = set()  # the variants whose train state holds the layers one array each
    unprepared = set()  # the variants whose batch goes in without the loss positions' index
    if args.compare == "per-layer-state":
        params, prepare, run, programs = build_step(args.step, config, llama.init_params(config, jax.random.key(0)),
                                                    micro)
        ordered = batch if args.packed else order_by_length(batch, micro, args.length_buckets)
        variants["stacked state"] = variants["per-layer state"] = (run, ordered)
        per_layer_states.add("per-layer state")
    elif args.compare == "loss-index":
        if args.step == "rm":
            parser.error("--compare loss-index is for --step sft or dpo (the reward model has no LM head)")
        params, prepare, run, programs = build_step(args.step, config, llama.init_params(config, jax.random.key(0)),
                                                    micro)
        variants["head at every position"] = (run, batch)
        unprepared.add("head at every position")
        variants["head at the loss positions"] = (run, batch)
    elif args.compare == "lengths":
        params, prepare, run, programs = build_step(args.step, config, llama.init_params(config, jax.random.key(0)),
                                                    micro)
        variants["padded"] = (run, batch)
        variants["per-micro-batch lengths"] = (run, order_by_length(batch, micro, args.length_buckets))
    else:
        # the trainers pass per-layer weights when llama.layers_unrolled(config): each side's own jitted
        # programs, every call under its setting (so that whenever jit traces, it traces that side's program)
        ordered = order_by_length(batch, micro, args.length_buckets)
        for name, unrolled in (("stacked weights", False), ("per-layer weights", True)):
            params, prepare, run, programs = build_step(args.step, config,
                                                        llama.init_params(config, jax.random.key(0)), micro)

            def patched(state, b, run=run, unrolled=unrolled):
                with mock.patch.object(llama, "layers_unrolled", lambda _: unrolled):
                    return run(state, b)

            variants[name] = (patched, ordered)
    variants = {name: (run, {k: jnp.asarray(v) for k, v in (b if name in unprepared else prepare(b)).items()})
                for name, (run, b) in variants.items()}
    states = {name: TrainState.create(jax.tree.map(jnp.copy, params), make_optimizer("adamw", 1e-5), jax.random.key(0),
                                      per_layer=name in per_layer_states) for name in variants}
    seconds = {name: [] for name in variants}
    losses = {}
    for _ in range(args.steps):
        for name, (run, device_batch) in variants.items():
            start = time.perf_counter()
            states[name], metrics = run(states[name], device_batch)
            losses.setdefault(name, float(jax.device_get(metrics[LOSS_KEY[args.step]])))
            seconds[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(times[2:] or times) for name, times in seconds.items()}
    for name, times in seconds.items():
        print(f"{args.step}, {micro} micro-batches, {name}: steps {', '.join(f'{t:.2f}' for t in times)} s; "
              f"median {medians[name]:.2f} s; first loss {losses[name]:.6f}")
    before, after = medians.values()
    print(f"speed-up {before / after:.2f}×")
    result = {"seconds": seconds, "medians": medians, "losses": losses}
    if args.profile:
        name = list(variants)[-1]
        run, device_batch = variants[name]
        # per-layer: trace the per-layer side's programs, as its calls do
        with (mock.patch.object(llama, "layers_unrolled", lambda _: True) if args.compare == "per-layer"
              else contextlib.nullcontext()):
            texts = programs(states[name], device_batch)
        states[name], rows, step_seconds = profile_step(run, states[name], device_batch, texts, args.profile)
        print(f"\nprofile of one step ({name}): {step_seconds:.2f} s under the profiler")
        for kind, op_name, total, count in rows:
            print(f"{total * 1e3:9.1f} ms {count:6d}  {kind:28s} {op_name[-110:]}")
        result["profile"] = rows
    return result


if __name__ == "__main__":
    main()
