"""One writer per run directory: `<run_dir>/.lock`, held by the launcher (process 0) for the whole run.

The lock is an exclusive `flock` on the file, which the kernel releases when its holder dies however it
dies (SIGKILL included), plus the holder's host, pid and start time written inside so a refused launch can
name it (the file is emptied, never removed, on release). A lock file left by a dead process is therefore
free and is taken over; a live holder makes a second launch stop with `RunLocked` (exit status 2) naming it.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import pathlib
import socket

from rlhf_jax.errors import UserError

LOCK_FILE = ".lock"


class RunLocked(UserError):
    """Another live process holds the run directory."""


class RunLock:
    """`with RunLock(run_dir):` holds the lock; `stale` tells whether a dead holder's file was taken over."""

    def __init__(self, run_dir: str | pathlib.Path):
        self.path = pathlib.Path(run_dir) / LOCK_FILE
        self._handle = None
        self.stale: dict | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read(self.path)
            handle.close()
            who = (f"process {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started')}"
                   if holder else "another process")
            raise RunLocked(f"run_dir {self.path.parent}: in use by {who}; wait for it to finish or stop it "
                            f"(a run directory has one writer at a time)") from None
        previous = _read(self.path)
        if previous:  # the file of a holder that died without removing it: its flock went with it
            self.stale = previous
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}))
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is None:
            return
        try:  # emptied, not removed: removing it would let two later launches lock two different files
            self._handle.seek(0)
            self._handle.truncate()
            self._handle.flush()
        finally:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(path: pathlib.Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
