"""Graceful stops on SIGTERM / SIGINT: finish the current step, checkpoint it, exit with `EXIT_PREEMPTED`.

SLURM and Kubernetes send SIGTERM before they kill a job; Ctrl-C sends SIGINT. While `StopSignals` is
installed (the launcher holds it for the whole run):

- inside a training loop (`StopSignals.training()`), the first signal sets a flag; the loop reads it
  with `should_stop(step)` after each step, saves a checkpoint of that step and raises `Preempted`; the
  launcher prints one line saying how to resume and exits with `EXIT_PREEMPTED` (75, `EX_TEMPFAIL`:
  "try again later"), which a scheduler tells apart from success (0) and from a user error (2);
- outside a loop (loading models, compiling, evaluating, writing outputs) nothing can be saved: the
  first signal exits at once with `EXIT_PREEMPTED` (the stage restarts from its last checkpoint);
- a second signal exits at once with status 128 + signal number, without saving.

In a multi-process run `should_stop(step)` is a collective: every process calls it after every step and all
get the same answer (any process signalled), so all save the same step.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """A training loop stopped on a signal after checkpointing `step`."""

    def __init__(self, stage: str, step: int, signal_name: str):
        super().__init__(f"stage {stage}: stopped by {signal_name} after step {step} (checkpoint saved)")
        self.stage, self.step, self.signal_name = stage, step, signal_name


class StopSignals:
    """Install with `with StopSignals(resume_hint):`; see the module docstring."""

    _active: "StopSignals | None" = None

    def __init__(self, resume_hint: str = ""):
        self.resume_hint = resume_hint
        self.received: int | None = None
        self._in_training = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only; nothing to install here
        for number in SIGNALS:
            self._previous[number] = signal.signal(number, self._handle)
        StopSignals._active = self
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        if StopSignals._active is self:
            StopSignals._active = None

    @staticmethod
    def active() -> "StopSignals | None":
        return StopSignals._active

    def _handle(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        if self.received is not None:
            _say(f"second {name}: aborting now without saving")
            os._exit(128 + number)
        self.received = number
        if not self._in_training:
            _say(f"{name} received outside a training loop: nothing to save, stopping now. {self.resume_hint}")
            os._exit(EXIT_PREEMPTED)
        _say(f"{name} received: finishing the current step and saving a checkpoint (send it again to abort)")

    @contextlib.contextmanager
    def training(self):
        self._in_training += 1
        try:
            yield self
        finally:
            self._in_training -= 1

    @property
    def signal_name(self) -> str:
        if self.received is not None:
            return signal.Signals(self.received).name
        return "a preemption notice (SIGTERM to one of the processes)"


def _say(message: str) -> None:
    print(message.strip(), file=sys.stderr, flush=True)


@contextlib.contextmanager
def training_loop():
    """Mark a training loop (a checkpoint can be saved after each step); no-op when no `StopSignals` is active."""
    active = StopSignals._active
    if active is None:
        yield
        return
    with active.training():
        yield


def should_stop(step: int) -> bool:
    """Whether to stop after `step`: a signal here or, in a multi-process run, in any process (a collective:
    every process calls it after every step and all get the same answer).

    With several processes `jax.distributed` handles SIGTERM itself (its preemption notifier replaces Python's
    handler and tells every process); `reached_preemption_sync_point(step)` is then true in all processes at
    the same step, which is the step they save. SIGINT and signals Python sees are shared with an all-gather.
    """
    import jax

    active = StopSignals._active
    local = active is not None and active.received is not None
    if jax.process_count() == 1:
        return local
    import numpy as np
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.array([int(local)], np.int32))
    return bool(np.asarray(flags).any()) or bool(multihost_utils.reached_preemption_sync_point(step))


def stopped(stage: str, step: int) -> Preempted:
    """The exception a loop raises after saving `step` on a stop request."""
    active = StopSignals._active
    return Preempted(stage, step, active.signal_name if active is not None else "a signal")
