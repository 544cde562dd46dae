"""A/B of glibc's huge pages (`glibc.malloc.hugetlb=1`, what `RLHF_JAX_HUGE_PAGES=on python -m rlhf_jax.launch`
sets; see `rlhf_jax.host_memory`) on our SFT, reward-model or DPO step: two worker processes, the same step,
rows and weights, one started without the tunable and one with it (glibc reads it once, at start), steps alternating
between them, medians after warm-up; with each side's page faults, system CPU seconds and peak memory per step,
and a check that both computed the same first loss.

    .venv/bin/python benchmarks/huge_pages_ab.py --step sft --packed --micro-batches 2 --steps 12 --block 4
    .venv/bin/python benchmarks/huge_pages_ab.py --step rm --micro-batches 4 --steps 12 --block 4
    .venv/bin/python benchmarks/huge_pages_ab.py --step dpo --micro-batches 4 --length-buckets 8
    .venv/bin/python benchmarks/huge_pages_ab.py --touch     # a fresh GiB, first and after idle spells

`--block K` runs K steps of one side back to back before the other side runs its K, and takes the median over
the steps that follow a step of the same side. That is how a training run steps, and it matters where freed
memory is handed back to a hypervisor after a few idle seconds (virtio-balloon free page reporting): with
huge pages a block freed at the end of a step and taken again at the start of the next is still backed, while
one that sat free through the other side's step faults in again through the host (docs/performance.md,
item 30). With the default (alternating step by step) every step of either side follows such an idle spell.

A diagnostic, not a comparison with TRL (that is `suite.py`, whose `--huge-pages on` gives both workers the
tunable): random weights at SmolLM2-135M's shapes and `step_ab.py`'s rows. Only the environment differs
between the two sides.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from suite import timed_records, turns  # noqa: E402  (the suite's turns and the steps its medians count)
SIDES = {"4 KiB pages": "", "huge pages": "glibc.malloc.hugetlb=1"}


def worker(args) -> None:
    """Build the step, then run one step per `step` line on stdin, answering each with a JSON line."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(HERE))
    import step_ab
    from rlhf_jax.models import llama
    from rlhf_jax.models.config import tiny_config
    from rlhf_jax.training.accumulate import order_by_length
    from rlhf_jax.training.state import TrainState, make_optimizer

    config = tiny_config("smollm2", **({} if args.tiny else step_ab.SMOLLM2))
    length = 32 if args.tiny else step_ab.LENGTH
    params, prepare, run, _ = step_ab.build_step(args.step, config, llama.init_params(config, jax.random.key(0)),
                                                 args.micro_batches)
    batch = step_ab.packed_sft_batch(length) if args.packed else step_ab.pair_batch(args.step, length)
    if args.length_buckets > 1:
        batch = order_by_length(batch, args.micro_batches, args.length_buckets)
    batch = {k: jnp.asarray(v) for k, v in prepare(batch).items()}
    # a copy: the step donates its state, and DPO's reference pass reads `params`
    state = TrainState.create(jax.tree.map(jnp.copy, params), make_optimizer("adamw", 1e-5), jax.random.key(0),
                              per_layer=llama.layers_unrolled(config))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        state, metrics = run(state, batch)
        loss = float(jax.device_get(metrics[step_ab.LOSS_KEY[args.step]]))
        seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({"seconds": seconds, "loss": loss, "faults": after.ru_minflt - before.ru_minflt,
                          "system_s": after.ru_stime - before.ru_stime, "user_s": after.ru_utime - before.ru_utime,
                          "peak_gib": after.ru_maxrss / 2**20}), flush=True)


TOUCH_BYTES = 2**30


def idle_spells(text: str) -> list[float]:
    return [float(seconds) for seconds in text.split(",") if seconds.strip()]


def touch(args) -> None:
    """`--touch` in each side's process: write a fresh GiB from glibc's malloc and free it, once first, then after
    each idle spell of `--idle`; print the seconds of each as one JSON line."""
    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]

    def once() -> float:
        start = time.perf_counter()
        block = libc.malloc(TOUCH_BYTES)
        ctypes.memset(block, 1, TOUCH_BYTES)
        seconds = time.perf_counter() - start
        libc.free(block)
        return seconds

    first = once()
    after = []
    for idle in idle_spells(args.idle):
        time.sleep(idle)
        after.append(once())
    print(json.dumps({"first": first, "after": after}), flush=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step", choices=("sft", "rm", "dpo"), default="sft")
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--packed", action="store_true", help="with --step sft: packed rows")
    parser.add_argument("--length-buckets", type=int, default=1, help="order the rows for per-micro-batch lengths")
    parser.add_argument("--steps", type=int, default=6, help="per side, the first two left out of the median")
    parser.add_argument("--block", type=int, default=1,
                        help="steps a side runs back to back before the other runs its (default 1: alternating)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and 32-token rows (smoke test)")
    parser.add_argument("--touch", action="store_true",
                        help="instead of a step: how long writing a fresh GiB takes on each side, first and after "
                             "each idle spell of --idle (whether the host takes freed memory back)")
    parser.add_argument("--idle", default="0,0,5,0,10,0", help="with --touch: the idle spells, in seconds")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.packed and args.step != "sft":
        parser.error("--packed is for --step sft")
    if args.packed and args.length_buckets > 1:
        parser.error("--length-buckets is for padded rows")
    if args.worker:
        (touch if args.touch else worker)(args)
        return {}
    if args.block < 1 or args.steps < 1:
        parser.error("--block and --steps must be at least 1")
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RLHF_JAX_HUGE_PAGES")}
    envs = {name: {**base, **({"GLIBC_TUNABLES": tunable} if tunable else {})} for name, tunable in SIDES.items()}
    if args.touch:
        result = {}
        for name, env in envs.items():
            command = [sys.executable, __file__, "--worker", "--touch", "--idle", args.idle]
            result[name] = json.loads(subprocess.run(command, env=env, capture_output=True, text=True,
                                                     check=True).stdout)
            print(f"{name}: a fresh GiB written in {result[name]['first']:.3f} s first, then "
                  + ", ".join(f"{seconds:.3f} s after {idle} s idle"
                              for idle, seconds in zip(idle_spells(args.idle), result[name]["after"])))
        return result
    command = [sys.executable, __file__, "--worker", "--step", args.step, "--micro-batches", str(args.micro_batches),
               "--length-buckets", str(args.length_buckets), *(["--packed"] if args.packed else []),
               *(["--tiny"] if args.tiny else [])]
    workers = {name: subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for name, env in envs.items()}
    records = {name: [] for name in SIDES}
    try:
        for name, process in workers.items():
            if not json.loads(process.stdout.readline() or "{}").get("ready"):
                raise RuntimeError(f"the {name} worker did not start (exit {process.wait()})")
        for turn in turns(args.steps, args.block):
            for name, process in workers.items():
                for index in turn:
                    process.stdin.write("step\n")
                    process.stdin.flush()
                    line = process.stdout.readline()
                    if not line:
                        raise RuntimeError(f"the {name} worker exited ({process.wait()})")
                    records[name].append({**json.loads(line), "after_other": index == turn[0]})
    finally:
        for process in workers.values():
            if process.poll() is None:
                process.stdin.close()
                process.wait()
    result = {}
    for name, steps in records.items():
        # the median of the steps after the warm-up; with --block, of those that follow a step of the same side
        timed = [step for _, step in timed_records(steps, 2, args.block)] or steps
        result[name] = {key: statistics.median(step[key] for step in timed)
                        for key in ("seconds", "faults", "system_s", "user_s")}
        result[name].update(first_loss=steps[0]["loss"], peak_gib=max(step["peak_gib"] for step in steps),
                            steps=[step["seconds"] for step in steps])
        print(f"{args.step}, {args.micro_batches} micro-batches, {name}: steps "
              f"{', '.join(f'{t:.2f}' for t in result[name]['steps'])} s; median {result[name]['seconds']:.2f} s, "
              f"{result[name]['faults']:,.0f} page faults, {result[name]['system_s']:.1f} s system CPU a step; peak "
              f"{result[name]['peak_gib']:.1f} GiB; first loss {result[name]['first_loss']:.6f}")
    small, huge = (result[name] for name in SIDES)
    if abs(small["first_loss"] - huge["first_loss"]) > 1e-6 * max(1.0, abs(small["first_loss"])):
        raise SystemExit(f"the two sides' first losses differ: {small['first_loss']} and {huge['first_loss']}")
    result["speed_up"] = small["seconds"] / huge["seconds"]
    print(f"speed-up {result['speed_up']:.2f}×")
    return result


if __name__ == "__main__":
    main()
