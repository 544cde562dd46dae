"""Start N processes of the launcher on this machine, joined by `jax.distributed` on localhost.

    python launch/local.py -n 2 -- experiment=tiny_sft run_dir=runs/two_procs
    python launch/local.py -n 2 --devices-per-process 1 -- experiment=NAME ...   # GPUs 0 and 1, one each

Each child runs ``python -m rlhf_jax.launch ARGS --coordinator 127.0.0.1:PORT --num-processes N --process-id I``
(PORT: a free port, or --port). Their output is forwarded line by line with a ``[pI]`` prefix. When a child
fails, the others are stopped and this exits with the failed child's status (the first failure's).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _forward(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"{prefix}{line}")
        out.flush()
    stream.close()


def _child_command(args, process_id: int, port: int) -> list[str]:
    command = [sys.executable, "-m", "rlhf_jax.launch", *args.launch_args, "--coordinator", f"127.0.0.1:{port}",
               "--num-processes", str(args.num_processes), "--process-id", str(process_id)]
    if args.devices_per_process:
        first = process_id * args.devices_per_process
        ids = ",".join(str(i) for i in range(first, first + args.devices_per_process))
        command += ["--local-device-ids", ids]
    return command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python launch/local.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--num-processes", type=int, default=2, help="processes to start (default 2)")
    parser.add_argument("--port", type=int, help="coordinator port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--devices-per-process", type=int,
                        help="give process I the accelerators I*K .. I*K+K-1 (default: each sees all)")
    parser.add_argument("launch_args", nargs=argparse.REMAINDER, help="-- then the launcher's arguments")
    args = parser.parse_args(argv)
    if args.launch_args[:1] == ["--"]:
        args.launch_args = args.launch_args[1:]
    if args.num_processes < 1:
        parser.error(f"-n {args.num_processes}: expected at least 1")
    port = args.port or free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    children = [subprocess.Popen(_child_command(args, i, port), cwd=os.getcwd(), env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, bufsize=1)
                for i in range(args.num_processes)]
    forwarders = [threading.Thread(target=_forward, args=(stream, f"[p{i}] ", out), daemon=True)
                  for i, child in enumerate(children)
                  for stream, out in ((child.stdout, sys.stdout), (child.stderr, sys.stderr))]
    for forwarder in forwarders:
        forwarder.start()
    status = 0
    try:
        while any(child.poll() is None for child in children):
            failed = [child for child in children if child.returncode not in (None, 0)]
            if failed:
                status = failed[0].returncode
                for child in children:
                    if child.poll() is None:
                        child.terminate()
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        for child in children:
            if child.poll() is None:
                child.terminate()
        status = 130
    for child in children:
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    for forwarder in forwarders:
        forwarder.join(timeout=5)
    if status == 0:
        status = next((child.returncode for child in children if child.returncode != 0), 0)
    if status != 0:
        codes = ", ".join(f"p{i}={child.returncode}" for i, child in enumerate(children))
        print(f"launch/local.py: a process failed ({codes})", file=sys.stderr)
    return status if status > 0 else 1 if status else 0


if __name__ == "__main__":
    sys.exit(main())
