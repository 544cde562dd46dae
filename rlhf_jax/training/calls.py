"""Several optimizer steps in one compiled call (``optimizer.steps_per_call``).

XLA's CPU runtime allocates a step's temporaries as one block when a call starts and frees it when the call ends;
glibc maps a block that large afresh each time, so every call faults all of it in again, 4 KiB at a time (for
SmolLM2's padded SFT step in 4 micro-batches, a 2.2 GiB block and about 600 thousand faults a step:
`docs/performance.md`). A call that runs K steps, a `lax.scan` over K batches, allocates the block once.

The steps are the same functions of the same inputs: every state, loss and metric equals the one-step-a-call
run's to float rounding (the scan's body is compiled as its own program). A call may run fewer than K steps (the
run's last steps, a checkpoint or an evaluation due earlier, a batch of another shape): the others are skipped
by a `lax.cond` and cost nothing, so one program serves every call of a batch shape. Batches whose loss indexes
(`trainers.common.with_loss_index`, sized by their own loss positions) differ in width only go in one call, each
index widened to the widest with padding (`trainers.common.common_loss_index`): the same positions, and the LM
head still runs at each micro-batch's own size. So do shared-prefix batches (`data.batching.share_prefixes`,
whose rows take the length of their longest pair) run at per-micro-batch lengths: their rows and loss entries are
padded to the call's longest, and each micro-batch still runs at about its own length
(`training.accumulate.widen_shared_rows`). Without per-micro-batch lengths a wider row would be computed whole,
so those batches go in one call only at one row length.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data.batching import SHARED_LOSS_KEYS, SHARED_ROW_KEYS
from rlhf_jax.trainers.common import LOSS_INDEX_KEYS, common_loss_index
from rlhf_jax.training.accumulate import LENGTH_BUCKET, widen_shared_rows


def in_one_call(step_fn: Callable, count: int, leading: int) -> Callable:
    """`step_fn(*leading args, batch) -> (*states, metrics)` as `calls(*leading args, (batches, active))`.

    leading: how many arguments come before the batch (frozen inputs, then the states; the states are the last
    `len(states)` of them and are what the step returns). batches: the step's batch with a leading axis of
    `count`; active: an int32 scalar, how many of them to run (the first `active`). Returns (*states, metrics with
    a leading axis of `count`, zeros for the skipped steps).
    """
    def calls(*args):
        fixed, (batches, active) = args[:leading], args[leading]
        first = jax.tree.map(lambda x: x[0], batches)
        out_shape = jax.eval_shape(lambda: step_fn(*fixed, first))
        states = len(out_shape) - 1
        frozen, carried = fixed[: leading - states], tuple(fixed[leading - states:])

        def body(carried, inputs):
            batch, index = inputs

            def run(carried):
                *updated, metrics = step_fn(*frozen, *carried, batch)
                return tuple(updated), metrics

            def skip(carried):
                return carried, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape[-1])

            return jax.lax.cond(index < active, run, skip, carried)

        carried, metrics = jax.lax.scan(body, carried, (batches, jnp.arange(count)))
        return (*carried, metrics)

    return calls


def _loose(batch: Any) -> set[str]:
    """The entries whose last axis may differ between the batches of one call (:func:`common_shapes`)."""
    loose = set(LOSS_INDEX_KEYS)
    if isinstance(batch, dict) and LENGTH_BUCKET in batch:
        loose |= set(SHARED_ROW_KEYS) | set(SHARED_LOSS_KEYS)
    return loose


def signature(batch: Any) -> tuple:
    """What batches must share to run in one call: their tree, and each array's shape and dtype (the width of a
    loss index aside, and the length of shared-prefix rows run at per-micro-batch lengths, with their loss
    entries': the call widens them, :func:`common_shapes`)."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(batch)
    loose_keys = _loose(batch)

    def shape(path, leaf):
        last = path[-1] if path else None
        loose = isinstance(last, jax.tree_util.DictKey) and last.key in loose_keys
        return tuple(np.shape(leaf))[: -1 if loose else None]

    return tree, tuple((shape(path, leaf), str(leaf.dtype)) for path, leaf in leaves)


def common_shapes(batches: list, num_microbatches: int) -> list:
    """The batches of one call (one :func:`signature`) with equal shapes: loss indexes widened to the widest
    (`trainers.common.common_loss_index`), and shared-prefix rows and loss entries to the longest
    (`training.accumulate.widen_shared_rows`). numpy or jax arrays (traced too)."""
    if not isinstance(batches[0], dict):
        return batches
    batches = common_loss_index(batches, num_microbatches)
    if "shared_tokens" in batches[0]:
        length = max(batch["shared_tokens"].shape[1] for batch in batches)
        entries = (max(batch[SHARED_LOSS_KEYS[0]].shape[1] for batch in batches)
                   if SHARED_LOSS_KEYS[0] in batches[0] else None)
        batches = [widen_shared_rows(batch, length, entries, num_microbatches) for batch in batches]
    return batches


def joins(call: list, batch: Any, steps_per_call: int) -> bool:
    """Whether `batch` goes in the same call as the batches `call` holds so far (the run's order kept): room
    left, and the same :func:`signature` (`stages.common.fit`'s rule, and the benchmark worker's)."""
    return not call or (len(call) < steps_per_call and signature(batch) == signature(call[0]))


class StepCalls:
    """Up to `steps_per_call` train steps in one call: `calls(*states, batches) -> (*states, [metrics, ...])`.

    program: `jax.jit` of :func:`in_one_call` (frozen inputs bound), taking `(batches stacked, active)`;
    stack: the batches (each placed on the mesh, all of one `signature`) -> one batch with a leading axis of
    `steps_per_call`, sharded as the program takes it; place_count: an int -> the program's `active` scalar.
    The returned metrics are host numpy, one dict per step run.
    """

    def __init__(self, program: Callable, steps_per_call: int, stack: Callable, place_count: Callable):
        self.program = program
        self.steps_per_call = steps_per_call
        self._stack = stack
        self._place_count = place_count

    def __call__(self, *args):
        *states, batches = args
        if not 1 <= len(batches) <= self.steps_per_call:
            raise ValueError(f"a call runs 1 to {self.steps_per_call} batches, got {len(batches)}")
        shapes = {signature(batch) for batch in batches}
        if len(shapes) > 1:
            raise ValueError("the batches of one call must have the same arrays and shapes (training.calls."
                             "signature)")
        # the unused slots repeat the last batch; their steps are skipped
        padded = list(batches) + [batches[-1]] * (self.steps_per_call - len(batches))
        *states, metrics = self.program(*states, (self._stack(padded), self._place_count(len(batches))))
        metrics = jax.device_get(metrics)
        return (*states, [jax.tree.map(lambda value: value[i], metrics) for i in range(len(batches))])


def one_step_calls(step_fn: Callable) -> Callable:
    """A one-step `step_fn(*states, batch)` in :class:`StepCalls`' form, `(*states, [batch]) -> (*states,
    [metrics])`, its metrics left on the device."""
    def calls(*args):
        *states, batches = args
        if len(batches) != 1:
            raise ValueError(f"a one-step call runs one batch, got {len(batches)}")
        *states, metrics = step_fn(*states, batches[0])
        return (*states, [metrics])

    return calls
