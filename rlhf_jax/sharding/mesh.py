"""The device mesh ("data", "fsdp", "tensor") and the context that turns on activation constraints.

A mesh is built from `MeshConfig` once, before anything is compiled: its size must equal the device
count (one axis may be -1, "all the remaining devices"). Every sharding in the package is a
`NamedSharding` over this mesh; axes of size 1 are left out of partition specs.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Protocol, Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh

from rlhf_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


class MeshAxes(Protocol):
    """Axis sizes of a mesh, -1 for "the remaining devices": the launcher's `rlhf_jax.config.MeshConfig` is one;
    the sharding layer takes any object with these fields and imports no config."""

    data: int
    fsdp: int
    tensor: int


def mesh_shape(mesh_config: MeshAxes, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes with the -1 axis resolved to the remaining devices.

    Raises `ConfigError` naming `mesh.data/fsdp/tensor` and the device count when the sizes do not
    multiply to `num_devices` (or the fixed sizes do not divide it, with a -1 axis).
    """
    sizes = [getattr(mesh_config, axis) for axis in MESH_AXES]
    setting = ", ".join(f"mesh.{axis}={size}" for axis, size in zip(MESH_AXES, sizes))
    for axis, size in zip(MESH_AXES, sizes):
        if size != -1 and size < 1:
            raise ConfigError(f"mesh.{axis}={size}: expected an integer >= 1, or -1 for the remaining devices")
    if sizes.count(-1) > 1:
        raise ConfigError(f"{setting}: at most one mesh axis may be -1")
    fixed = math.prod(size for size in sizes if size != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ConfigError(f"{setting}: the fixed axes use {fixed} devices, which does not divide the "
                              f"{num_devices} devices available")
        sizes[sizes.index(-1)] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(f"{setting}: the mesh has {fixed} devices but {num_devices} are available; make the "
                          "product equal the device count, or set one axis to -1 for the remaining devices")
    return tuple(sizes)


def make_mesh(mesh_config: MeshAxes, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` over `devices` (default: all devices) with axes ("data", "fsdp", "tensor").

    Axis types are `Auto` (the compiler propagates shardings between the explicit ones we give).
    The device order comes from `jax.make_mesh`, which lays "tensor" (the last axis) over the devices
    with the fastest links.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=None) -> Iterator[Mesh]:
    """Make `mesh` the current mesh and `rules` (default `DEFAULT_RULES`) the logical-axis rules.

    Inside, functions traced by `jax.jit` get the decoder's activation constraints
    (`nn.with_logical_constraint` on [B, T, D] hidden states); outside, those are no-ops. jit keys its
    cache on the current mesh, so a function traced outside and called inside is traced again.
    """
    from rlhf_jax.sharding.partition import DEFAULT_RULES

    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES if rules is None else rules):
        yield mesh


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules=None) -> Iterator[None]:
    """`use_mesh` for use *inside* a traced function: sets the abstract mesh and the rules only."""
    from rlhf_jax.sharding.partition import DEFAULT_RULES

    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
            nn.logical_axis_rules(DEFAULT_RULES if rules is None else rules):
        yield
