"""Logical axis names for every parameter, and the rules mapping them to mesh axes (MaxText style).

Each parameter gets one logical name per dimension from its path (`PARAM_AXES`), e.g.
`layers/self_attn/q_proj/kernel: [L, D, H*hd] -> ("layers", "embed", "heads")`. `DEFAULT_RULES` then
maps logical names to mesh axes: "embed" over "fsdp" (params and optimizer state are FSDP-sharded),
"heads"/"kv_heads"/"mlp"/"vocab" over "tensor" (Megatron-style tensor parallelism), "batch" over
("data", "fsdp"). Names with no rule ("layers", "norm", "length", ...) are replicated.

Fallback: a dimension whose size is not divisible by its mesh axes is replicated instead (e.g. a
vocabulary of 49152 + 1 on tensor=2), except the attention heads, where `validate_mesh_for_model`
refuses the mesh before anything compiles. Parameters whose path matches no rule are replicated.
Works on concrete arrays and on `jax.ShapeDtypeStruct` trees (ahead-of-time plans).
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax.errors import ConfigError

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Logical name -> mesh axes, in priority order (flax `nn.logical_axis_rules` format). A mesh axis is
# used at most once per array: for activations ("batch", "length", "embed") "batch" takes "fsdp" first,
# so "embed" stays unsharded there.
DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
)

# Path suffix (regex, searched in "a/b/c" paths) -> logical axes. Layer params carry the leading
# [L] axis of the `nn.scan` stack. First match wins.
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"(^|/)embed_tokens/embedding$", ("vocab", "embed")),
    (r"(^|/)lm_head/kernel$", ("embed", "vocab")),
    (r"(^|/)lm_head/bias$", ("vocab",)),
    (r"(^|/)q_proj/kernel$", ("layers", "embed", "heads")),
    (r"(^|/)[kv]_proj/kernel$", ("layers", "embed", "kv_heads")),
    (r"(^|/)q_proj/bias$", ("layers", "heads")),
    (r"(^|/)[kv]_proj/bias$", ("layers", "kv_heads")),
    (r"(^|/)o_proj/kernel$", ("layers", "heads", "embed")),
    (r"(^|/)(gate|up)_proj/kernel$", ("layers", "embed", "mlp")),
    (r"(^|/)down_proj/kernel$", ("layers", "mlp", "embed")),
    (r"(^|/)(input_layernorm|post_attention_layernorm)/scale$", ("layers", "norm")),
    (r"(^|/)norm/scale$", ("norm",)),
)
# A LoRA pair on a dense layer: lora_a [..., in, r] keeps the kernel's input axis, lora_b [..., r, out]
# its output axis; the rank is replicated.
_LORA = re.compile(r"^(?P<layer>.*)/lora_(?P<which>[ab])$")


def path_string(path) -> str:
    """A `jax.tree_util` key path as "a/b/c"."""
    parts = []
    for key in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def logical_axes_for(path: str, ndim: int) -> PartitionSpec:
    """Logical axes of the parameter at `path` ("a/b/c") with `ndim` dimensions.

    Unknown paths, and known paths of another rank, are replicated (all None). One layer's weights in the
    per-layer layout (`layers/3/...`) take the stacked weight's axes without the layer axis.
    """
    lora = _LORA.match(path)
    if lora:
        kernel = logical_axes_for(f"{lora['layer']}/kernel", ndim)
        axes = tuple(kernel)
        if any(axes):
            axes = axes[:-1] + (None,) if lora["which"] == "a" else axes[:-2] + (None, axes[-1])
        return PartitionSpec(*axes)
    one_layer = re.search(r"(^|/)layers/\d+/", path)  # a per-layer layout's layer (`models.layout`)
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, path):
            axes = axes[1:] if one_layer and axes[:1] == ("layers",) else axes
            return PartitionSpec(*axes) if len(axes) == ndim else PartitionSpec(*(None,) * ndim)
    return PartitionSpec(*(None,) * ndim)


def param_logical_axes(params) -> Any:
    """Pytree like `params` of `PartitionSpec`s of logical names (one per dimension).

    params: arrays or `jax.ShapeDtypeStruct`s, e.g. embed_tokens/embedding [V, D] -> P("vocab", "embed").
    """
    return jax.tree_util.tree_map_with_path(lambda path, leaf: logical_axes_for(path_string(path), len(leaf.shape)),
                                            params)


def _rule_axes(mesh_axes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def logical_to_mesh_spec(logical: PartitionSpec | Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                         rules: LogicalRules = DEFAULT_RULES) -> PartitionSpec:
    """Mesh `PartitionSpec` for an array of `shape` with `logical` names, under `rules`.

    Rules apply in order: a dimension takes the first rule for its name whose mesh axes are still unused
    in this array and whose size product divides the dimension; otherwise it is replicated (the fallback).
    Mesh axes of size 1 are dropped, so a 1-device mesh gives a fully replicated spec.
    """
    logical = tuple(logical)
    assigned: list[str | tuple[str, ...] | None] = [None] * len(logical)
    done = [name is None for name in logical]
    used: set[str] = set()
    for name, mesh_axes in rules:
        for dim, dim_name in enumerate(logical):
            if done[dim] or dim_name != name:
                continue
            axes = tuple(axis for axis in _rule_axes(mesh_axes) if mesh.shape[axis] > 1)
            size = math.prod(mesh.shape[axis] for axis in axes)
            if not axes or used.intersection(axes) or shape[dim] % size:
                continue
            assigned[dim] = axes[0] if len(axes) == 1 else axes
            used.update(axes)
            done[dim] = True
    return PartitionSpec(*assigned)


def param_shardings(params, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """Pytree like `params` of `NamedSharding`s (arrays or `ShapeDtypeStruct`s)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(
            mesh, logical_to_mesh_spec(logical_axes_for(path_string(path), len(leaf.shape)), leaf.shape, mesh, rules)),
        params)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def opt_state_shardings(tx: optax.GradientTransformation, opt_state, params, mesh: Mesh,
                        rules: LogicalRules = DEFAULT_RULES) -> Any:
    """Shardings of an optax state: leaves that mirror a param (Adam's mu, nu...) get its sharding, the
    rest (step counts, scalars) are replicated.

    Uses `optax.tree_map_params`; where a transformation cannot be initialised on its placeholder (e.g.
    `multi_transform` with a label function), falls back to the same path rules as the params (an Adam
    moment at `.../mu/layers/self_attn/q_proj/kernel` is matched by its path suffix and shape).
    """
    by_param = param_shardings(params, mesh, rules)
    rep = replicated(mesh)

    def mirror(leaf, sharding, param):
        return sharding if tuple(leaf.shape) == tuple(param.shape) else rep

    try:
        return optax.tree_map_params(tx, mirror, opt_state, by_param, params, transform_non_params=lambda _: rep,
                                     is_leaf=lambda x: x is None)
    except Exception:  # noqa: BLE001 - any failure of the placeholder init: use the path rules
        return param_shardings(opt_state, mesh, rules)


def state_shardings(state, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """A `TrainState` (or its `jax.eval_shape`) of `NamedSharding`s: params by the rules, optimizer state
    mirroring the params, `step` and `key` replicated."""
    rep = replicated(mesh)
    return state.replace(step=rep, key=rep, params=param_shardings(state.params, mesh, rules),
                         opt_state=opt_state_shardings(state.tx, state.opt_state, state.params, mesh, rules))


def validate_mesh_for_model(config, mesh: Mesh) -> None:
    """Refuse a mesh whose "tensor" axis does not divide the attention heads (before compiling).

    config: a `DecoderConfig`; mesh: a `Mesh` or `AbstractMesh`. Raises `ConfigError`.
    """
    tensor = dict(mesh.shape).get("tensor", 1)
    for field in ("num_heads", "num_kv_heads"):
        heads = getattr(config, field)
        if heads % tensor:
            raise ConfigError(f"model {field}={heads} is not divisible by mesh.tensor={tensor}; choose mesh.tensor "
                              f"dividing {heads}")
