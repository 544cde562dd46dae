"""The worker side of the suite's protocol: one JSON object per line on stdin, one reply per line on stdout.

A request is `{"cmd": NAME, ...}`; the reply is `{"ok": true, ...}` with the handler's fields, or
`{"ok": false, "error": traceback}`. `{"cmd": "quit"}` ends the loop. The protocol keeps the process's
real stdout for itself and points file descriptor 1 at stderr, so whatever the frameworks print (progress
bars, warnings) cannot corrupt a reply. Nothing here imports JAX or torch.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback
from typing import Any, Callable


def serve(handlers: dict[str, Callable[[dict], dict]]) -> None:
    """Answer requests on stdin with `handlers[request["cmd"]](request)` until `quit` or end of input."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if request["cmd"] == "quit":
            break
        try:
            reply = {"ok": True, **handlers[request["cmd"]](request)}
        except Exception:  # the coordinator reports it and stops the workload
            reply = {"ok": False, "error": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")


def serve_workloads(build: Callable[[dict], tuple[Any, dict]], free: Callable[[], None],
                    matmul: Callable[[int, str, str], Callable[[], None]], **more: Callable[[dict], dict]) -> None:
    """`serve` the requests every worker answers, one workload at a time:

    setup {spec}     free the last workload, `build(spec)` -> (workload, facts to reply)
    step {index}     `workload.step(index)`;  check: `workload.check()`
    steps {indices}  `workload.steps(indices)`: several steps, in calls of several (`--steps-per-call`)
    peak {size, dtype, device}  the matmul rate of `matmul(size, dtype, device)` (a callable doing one
                     synchronised product)
    release          drop the workload and `free()` what it held
    """
    current: dict = {}

    def release(request: dict) -> dict:
        current.clear()
        free()
        return {"peak_rss_gib": peak_rss_gib()}

    def setup(request: dict) -> dict:
        release(request)
        reset_peak_rss()
        current["workload"], facts = build(request["spec"])
        return facts

    serve({
        "setup": setup, "release": release,
        "step": lambda request: current["workload"].step(request["index"]),
        "steps": lambda request: current["workload"].steps(request["indices"]),
        "check": lambda request: current["workload"].check(),
        "peak": lambda request: {"gflops": matmul_gflops(
            matmul(request["size"], request.get("dtype", "float32"), request.get("device", "cpu")), request["size"])},
        **more,
    })


def peak_rss_gib() -> float:
    """This process's peak resident memory since the last `reset_peak_rss` (Linux `VmHWM`), in GiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident size


def npz_batches(inputs, prefix: str = "") -> list[dict]:
    """The batches `{prefix}{i}/{key}` of a workload's .npz, i < `{prefix}count`, as dicts of numpy arrays."""
    batches = []
    for index in range(int(inputs[f"{prefix}count"])):
        head = f"{prefix}{index}/"
        batches.append({name[len(head):]: inputs[name] for name in inputs.files if name.startswith(head)})
    return batches


def matmul_gflops(matmul: Callable[[], None], size: int, runs: int = 5) -> float:
    """Median GFLOP/s of `runs` calls of `matmul()` (one size × size product each, synchronised)
    after one warm-up call."""
    matmul()
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        matmul()
        seconds.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(seconds) / 1e9

