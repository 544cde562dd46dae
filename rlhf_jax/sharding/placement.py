"""Putting batches and states on the mesh, and compiling steps with explicit shardings and donation.

Batches are split along their leading (batch) axis over ("data", "fsdp") and replicated over "tensor".
In a multi-process run each process passes its own part of the batch and `place_batch` assembles the
global array (`jax.make_array_from_process_local_data`); on one process the local batch is the batch.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from rlhf_jax.errors import UserError
from rlhf_jax.sharding.mesh import activation_rules
from rlhf_jax.sharding.partition import DEFAULT_RULES, LogicalRules, replicated

BATCH_AXES = ("data", "fsdp")


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that split the batch."""
    return tuple(axis for axis in BATCH_AXES if mesh.shape[axis] > 1)


def batch_shards(mesh: Mesh | AbstractMesh | None = None) -> int:
    """How many parts `batch_sharding` splits a batch's rows into: data × fsdp (an axis the mesh lacks counts 1).

    mesh: a `Mesh` or `AbstractMesh`; None: the mesh being traced under (`jax.sharding.get_abstract_mesh`, which
    `rlhf_jax.sharding.activation_rules` sets), 1 outside one."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return 1 if mesh.empty else math.prod(mesh.shape.get(axis, 1) for axis in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis over ("data", "fsdp"), other axes replicated; applies to every leaf of a batch."""
    axes = batch_axes(mesh)
    return NamedSharding(mesh, PartitionSpec(axes) if axes else PartitionSpec())


def _local_batch_shards(mesh: Mesh) -> int:
    """How many distinct batch shards this process's devices hold (all of them on one process)."""
    names = list(mesh.axis_names)
    positions = set()
    for index, device in np.ndenumerate(mesh.devices):
        if device.process_index == jax.process_index():
            positions.add(tuple(index[names.index(axis)] for axis in BATCH_AXES))
    return len(positions)


def place_batch(batch: Any, mesh: Mesh) -> Any:
    """Global `jax.Array`s sharded by `batch_sharding(mesh)` from a pytree of this process's arrays.

    batch: pytree of numpy arrays [B_local, ...] (B_local = B on one process) or of global jax.Arrays
    (resharded). Raises `UserError` naming the batch size and the mesh axes when the global batch size
    is not divisible by mesh.data * mesh.fsdp.
    """
    sharding = batch_sharding(mesh)
    shards = batch_shards(mesh)
    local_shards = _local_batch_shards(mesh)

    def place(path, leaf):
        if isinstance(leaf, jax.Array):  # already global: reshard
            if leaf.ndim and leaf.shape[0] % shards:
                raise _indivisible(path, leaf.shape[0], mesh, shards)
            return jax.device_put(leaf, sharding if leaf.ndim else replicated(mesh))
        leaf = np.asarray(leaf)
        if leaf.ndim == 0:
            return jax.device_put(leaf, replicated(mesh))
        rows = leaf.shape[0]
        if rows % local_shards:
            raise _indivisible(path, rows, mesh, shards, local_shards)
        global_shape = (rows * shards // local_shards, *leaf.shape[1:])
        return jax.make_array_from_process_local_data(sharding, leaf, global_shape)

    return jax.tree_util.tree_map_with_path(place, batch)


def _indivisible(path, rows: int, mesh: Mesh, shards: int, local_shards: int | None = None) -> UserError:
    from rlhf_jax.sharding.partition import path_string

    axes = f"mesh.data*mesh.fsdp = {mesh.shape['data']}*{mesh.shape['fsdp']} = {shards}"
    if local_shards is not None and jax.process_count() > 1:
        return UserError(f"this process's batch size {rows} (batch field '{path_string(path)}') is not divisible by "
                         f"the {local_shards} batch shards on its devices ({axes} over {jax.process_count()} "
                         "processes)")
    return UserError(f"batch size {rows} (batch field '{path_string(path)}') is not divisible by {axes}; use a "
                     "batch size (per micro-batch) that is a multiple of it")


def supports_host_offload() -> bool:
    """Whether the devices have a pinned host memory space (`memory_kind="pinned_host"`)."""
    return "pinned_host" in {memory.kind for memory in jax.devices()[0].addressable_memories()}


def move_to_memory(tree: Any, memory_kind: str) -> Any:
    """`tree` (placed arrays) with the same shardings in `memory_kind` ("device" or "pinned_host").

    Used to park frozen roles in host memory while the policy trains; a no-op where the backend has no
    pinned host memory."""
    if not supports_host_offload():
        return tree
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding.with_memory_kind(memory_kind)), tree)


def place_state(state: Any, shardings: Any) -> Any:
    """`jax.device_put` of a state (or params) onto its shardings (e.g. from `state_shardings`).

    With several processes each one holds the whole value (same seed, same file) and keeps only the shards
    on its own devices: `device_put` cannot reach other processes' devices."""
    if jax.process_count() == 1:
        return jax.device_put(state, shardings)
    return jax.tree.map(_place_from_host, state, shardings)


def _place_from_host(leaf, sharding):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:  # already global: reshard
        return jax.device_put(leaf, sharding)
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        data = _place_from_host(jax.random.key_data(leaf), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_train_step(step_fn: Callable, state_shardings: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES,
                     frozen_shardings: tuple = (), steps_per_call: int = 1) -> Callable:
    """`jax.jit(step_fn)` with explicit shardings: `step_fn(*frozen, *states, batch) -> (*states, metrics)`.

    state_shardings: one state's shardings (a `TrainState` of `NamedSharding`s) or a tuple of them for a
    step over several states (PPO: policy and critic). frozen_shardings: shardings of leading frozen
    arguments (e.g. LoRA's base params), never donated. States are donated; the batch is sharded by
    `batch_sharding`; metrics come back replicated. The step is traced under the logical-axis `rules`,
    so the decoder's activation constraints apply.

    steps_per_call > 1: the program runs that many steps (`training.calls.in_one_call`), its last argument
    `(batches stacked on a leading axis, how many to run)` with the stacked batch split along its second axis
    (`stacked_batch_sharding`); its metrics get a leading axis of `steps_per_call`.
    """
    from rlhf_jax.training.calls import in_one_call

    states = state_shardings if isinstance(state_shardings, tuple) else (state_shardings,)
    frozen = tuple(frozen_shardings)
    name = getattr(step_fn, "__name__", getattr(getattr(step_fn, "func", None), "__name__", "step"))
    batch = batch_sharding(mesh)
    if steps_per_call > 1:
        step_fn = in_one_call(step_fn, steps_per_call, len(frozen) + len(states))
        batch = (stacked_batch_sharding(mesh), replicated(mesh))

    def constrained(*args):
        with activation_rules(mesh, rules):
            return step_fn(*args)

    constrained.__name__ = name
    return jax.jit(constrained, in_shardings=(*frozen, *states, batch),
                   out_shardings=(*states, replicated(mesh)),
                   donate_argnums=tuple(range(len(frozen), len(frozen) + len(states))))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
    """`batch_sharding` for batches stacked on a new leading axis (one per step of a call): that axis whole,
    the rows (the second axis) over ("data", "fsdp")."""
    axes = batch_axes(mesh)
    return NamedSharding(mesh, PartitionSpec(None, axes) if axes else PartitionSpec())


def stack_batches(mesh: Mesh, align: Callable[[list], list] = lambda batches: batches) -> Callable[[list], Any]:
    """Placed batches of one shape -> one batch with a leading axis, one entry per batch, on the mesh as
    `stacked_batch_sharding` lays it out (a program compiled once per batch shape). `align` first makes their
    shapes equal (`training.calls.common_shapes`: the loss indexes' widths, shared-prefix rows' lengths)."""
    sharding = stacked_batch_sharding(mesh)

    @functools.partial(jax.jit, out_shardings=sharding)
    def stack(batches):
        return jax.tree.map(lambda *leaves: jax.numpy.stack(leaves), *align(batches))

    def checked(batches):
        scalars = [leaf for leaf in jax.tree.leaves(batches[0]) if not np.ndim(leaf)]
        if scalars:
            raise ValueError("a batch run several steps a call has a scalar entry; batch entries must have rows")
        return stack(batches)

    return checked


def place_for_training(step_fn: Callable, states: tuple, mesh: Mesh, frozen: tuple = (),
                       rules: LogicalRules = DEFAULT_RULES, steps_per_call: int = 1,
                       micro_batches: int = 1) -> tuple[tuple, Callable]:
    """Put train `states` and `frozen` params on the mesh and compile `step_fn(*frozen, *states, batch)`.

    Returns (the states on the mesh, step) with `step(*states, batch) -> (*states, metrics)` (the frozen
    params bound); batches go in through `place_batch`. What a stage runner calls. With `steps_per_call` > 1
    the step is a `training.calls.StepCalls`, `step(*states, [batch, ...]) -> (*states, [metrics, ...])`, up to
    that many steps in one call (`optimizer.steps_per_call`; `stages.common.fit` takes either); `micro_batches`
    is the step's count, which says how the batches' loss indexes are laid out (`training.calls.common_shapes`).
    """
    from rlhf_jax.sharding.partition import param_shardings, state_shardings

    frozen_shardings = tuple(param_shardings(params, mesh, rules) for params in frozen)
    shardings = tuple(state_shardings(state, mesh, rules) for state in states)
    frozen = place_state(tuple(frozen), frozen_shardings)
    states = place_state(tuple(states), shardings)
    step = shard_train_step(step_fn, shardings, mesh, rules, frozen_shardings, steps_per_call)
    step = functools.partial(step, *frozen) if frozen else step
    if steps_per_call > 1:
        from rlhf_jax.training.calls import StepCalls, common_shapes

        count = replicated(mesh)
        step = StepCalls(step, steps_per_call,
                         stack_batches(mesh, functools.partial(common_shapes, num_microbatches=micro_batches)),
                         lambda active: jax.device_put(np.int32(active), count))
    return states, step
