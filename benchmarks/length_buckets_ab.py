"""A/B of per-micro-batch lengths in one process: our reward-model or DPO step, each micro-batch at the batch's
length and at its own (`optimizer.length_buckets`), steps alternating, medians after warm-up.

A diagnostic, not a comparison with TRL (that is `suite.py --length-buckets K`): random weights at SmolLM2-135M's
shapes and fixed row lengths (HH-like, the longest at 256), so that the two programs see the same rows in the
same process and the host's drift between runs does not enter the ratio.

    .venv/bin/python benchmarks/length_buckets_ab.py --step dpo --micro-batches 4 --length-buckets 8
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import PreferenceLoss
from rlhf_jax.models import llama
from rlhf_jax.models.config import tiny_config
from rlhf_jax.trainers.common import with_loss_index
from rlhf_jax.trainers.dpo import preference_train_step, reference_logprobs
from rlhf_jax.trainers.reward import reward_train_step
from rlhf_jax.training.accumulate import order_by_length
from rlhf_jax.training.state import TrainState, make_optimizer

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)
LENGTH = 256
# (chosen, rejected) lengths per pair; the prompt (no loss) is the first 40 tokens
PAIRS = {"dpo": ([256, 170, 120, 90], [230, 150, 140, 70]),
         "rm": ([256, 256, 200, 170, 120, 90, 80, 60], [256, 230, 150, 140, 130, 70, 90, 50])}


def pair_batch(step: str, length: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    column = np.arange(length)[None]
    batch = {}
    for prefix, lengths in zip(("chosen_", "rejected_"), PAIRS[step]):
        mask = column < np.minimum(lengths, length)[:, None]
        batch[f"{prefix}tokens"] = rng.integers(3, 1000, mask.shape).astype(np.int32)
        batch[f"{prefix}attention_mask"] = mask
        if step == "dpo":
            batch[f"{prefix}loss_mask"] = mask & (column >= min(40, length // 4))
    return batch


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step", choices=sorted(PAIRS), default="rm")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--length-buckets", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="per side, the first two left out of the median")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and 32-token rows (smoke test)")
    args = parser.parse_args(argv)
    config = tiny_config("smollm2", **({} if args.tiny else SMOLLM2))
    length, micro = (32 if args.tiny else LENGTH), args.micro_batches
    params = llama.init_params(config, jax.random.key(0))
    batch = pair_batch(args.step, length)
    if args.step == "rm":
        params = llama.init_scalar_model(config, params, jax.random.key(1))
        step = jax.jit(functools.partial(reward_train_step, config, 0.0, micro), donate_argnums=0)
        prepare, run = (lambda b: b), step
    else:
        reference = jax.jit(functools.partial(reference_logprobs, config), static_argnums=2)
        step = jax.jit(functools.partial(preference_train_step, config, PreferenceLoss(), micro), donate_argnums=0)
        prepare = functools.partial(with_loss_index, num_microbatches=micro)
        run = lambda state, b: step(state, {**b, **reference(params, b, micro)})  # noqa: E731
    variants = {"padded": batch, "per-micro-batch lengths": order_by_length(batch, micro, args.length_buckets)}
    variants = {name: {k: jnp.asarray(v) for k, v in prepare(b).items()} for name, b in variants.items()}
    states = {name: TrainState.create(jax.tree.map(jnp.copy, params), make_optimizer("adamw", 1e-5), jax.random.key(0))
              for name in variants}
    seconds = {name: [] for name in variants}
    losses = {}
    for _ in range(args.steps):
        for name, device_batch in variants.items():
            start = time.perf_counter()
            states[name], metrics = run(states[name], device_batch)
            losses.setdefault(name, float(jax.device_get(metrics["dpo/loss" if args.step == "dpo" else "rm/loss"])))
            seconds[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(times[2:] or times) for name, times in seconds.items()}
    for name, times in seconds.items():
        print(f"{args.step}, {micro} micro-batches, {name}: steps {', '.join(f'{t:.2f}' for t in times)} s; "
              f"median {medians[name]:.2f} s; first loss {losses[name]:.6f}")
    print(f"speed-up {medians['padded'] / medians['per-micro-batch lengths']:.2f}×")
    return {"seconds": seconds, "medians": medians, "losses": losses}


if __name__ == "__main__":
    main()
