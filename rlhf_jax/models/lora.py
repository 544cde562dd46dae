"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv:2106.09685) on the decoder's projections.

A targeted kernel W: [L, in, out] (stacked over layers) gets a: [L, in, r] and b: [L, r, out]; the
adapted layer computes

    y = x W + s (x a) b,    s = alpha / r,

with b = 0 at init, so the adapted model starts equal to the base. Adapters are a nested dict that
mirrors the params, `adapters["layers"]["self_attn"]["q_proj"] = {"lora_a", "lora_b"}` (the names
`llama.Dense` and `rlhf_jax.sharding` know): they are the whole train state (and checkpoint) of a LoRA
run; the base params stay a frozen, non-differentiated input.

Two ways to run the adapted model:

- `apply_lora(params, adapters, config)` (training, sampling): inserts `lora_a = a`, `lora_b = s b`
  next to each targeted kernel; `llama.Dense` then adds `(x a) b` to its output. Nothing of size
  [in, out] is formed: no merged weight and, under `jax.grad` w.r.t. the adapters, no weight-sized
  gradient (da = xᵀ (dy (s b)ᵀ), db = s (x a)ᵀ dy are computed from activations). The cost is two
  thin matmuls per targeted projection and per token, and the [B, T, r] activation `x a`.
- `merge(params, adapters, config)` (export): W + s a b in W's dtype, plain params any consumer
  loads (`save_hf`, artifacts). Untargeted leaves are the same arrays, not copies.

The frozen reference of PPO/DPO under LoRA is the base params: no second copy of the backbone.

Every stage trains through one pair of functions, whether LoRA is on or off:

- `trainable_params(params, config, key, keep)`: what the train state holds. Off (rank 0): `params`. On:
  the adapters, plus the whole top-level subtrees named in `keep` (a scalar model's fresh `head`), in one
  sparse mirror of the params.
- `full_params(base, trainable, config)`: the model the loss runs. Off: `trainable` itself (`base` is `{}`,
  see `frozen_base`). On: `base` with the kept subtrees replaced and the adapters applied.
- `merged_params(base, trainable, config)`: the same model as plain params, for export.
"""

from __future__ import annotations

import math
import re
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from rlhf_jax.errors import ConfigError
from rlhf_jax.models.layout import stack_layers

Params = Any
Path = tuple[str, ...]

__all__ = ["LoRASettings", "adapter_paths", "apply_lora", "frozen_base", "full_params", "init_lora", "lora_scale",
           "merge", "merged_params", "nbytes", "num_params", "projection_paths", "trainable_params"]


class LoRASettings(Protocol):
    """What the adapter functions read. The launcher's `rlhf_jax.config.LoRAConfig` is one; the model layer takes
    any object with these fields and imports no config."""

    rank: int  # 0: off
    alpha: float  # the update is scaled by alpha / rank
    targets: tuple[str, ...]  # regular expressions searched in each projection's path


def lora_scale(config: LoRASettings) -> float:
    """s = alpha / rank, the factor on the low-rank update."""
    return config.alpha / config.rank


def _key_name(key) -> str:
    return str(getattr(key, "key", key))


def projection_paths(params: Params) -> list[Path]:
    """Module paths of the projections LoRA may adapt: every `kernel` inside the decoder layers.

    Embeddings and the LM head are excluded: the training losses read the unembedding matrix directly
    (`llama.unembedding`), so an adapter there would not be seen by them.
    """
    paths = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = tuple(_key_name(key) for key in path)
        if names[-1] == "kernel" and "layers" in names[:-1] and len(leaf.shape) >= 2:
            paths.append(names[:-1])
    return paths


def adapter_paths(params: Params, config: LoRASettings) -> list[Path]:
    """The projections whose "/"-joined path some pattern of `config.targets` matches (`re.search`).

    Raises ConfigError when a pattern matches no projection, listing the ones there are.
    """
    available = projection_paths(params)
    names = ["/".join(path) for path in available]
    chosen = set()
    for pattern in config.targets:
        matched = {name for name in names if re.search(pattern, name)}
        if not matched:
            raise ConfigError(f"lora.targets: pattern {pattern!r} matches no projection; the projections are: "
                              f"{', '.join(names)}")
        chosen |= matched
    return [path for path, name in zip(available, names) if name in chosen]


def _get(tree: Params, path: Path) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def _with(tree: Params, path: Path, value: Any) -> Params:
    """A copy of the nested dict `tree` with `tree[path] = value` (only the dicts on the path are copied)."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = _with(tree.get(path[0], {}), path[1:], value)
    return out


def init_lora(params: Params, config: LoRASettings, key: jax.Array, dtype=jnp.float32) -> Params:
    """Adapters for the projections `config.targets` selects: {path: {"lora_a": [..., in, r], "lora_b": [..., r, out]}}.

    a ~ U(-1/√in, 1/√in) (PEFT's default), b = 0, so the adapted model equals the base at init. Adapters
    are float32 whatever the base dtype: they are small, and an optimizer updating them in bfloat16 loses
    most small steps. Works on `jax.ShapeDtypeStruct` params under `jax.eval_shape`.
    """
    if config.rank < 1:
        raise ConfigError(f"lora.rank: got {config.rank!r}, expected an integer >= 1 to add adapters")
    paths = adapter_paths(params, config)
    adapters: Params = {}
    for path, path_key in zip(paths, jax.random.split(key, len(paths))):
        kernel = _get(params, path)["kernel"]
        *lead, fan_in, fan_out = kernel.shape
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(path_key, (*lead, fan_in, config.rank), dtype, -bound, bound)
        b = jnp.zeros((*lead, config.rank, fan_out), dtype)
        adapters = _with(adapters, path, {"lora_a": a, "lora_b": b})
    return adapters


def _adapted_modules(adapters: Params) -> list[tuple[Path, Params]]:
    """(module path, {"lora_a", "lora_b"}) for every adapter in the tree."""
    found = []
    for path, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]:
        names = tuple(_key_name(key) for key in path)
        if names[-1] == "lora_a":
            found.append((names[:-1], _get(adapters, names[:-1])))
    return found


def apply_lora(params: Params, adapters: Params, config: LoRASettings) -> Params:
    """Params whose targeted projections compute x W + s (x a) b (factored; see the module docstring).

    Adds `lora_a = a`, `lora_b = s b` beside each adapted kernel; the base arrays are shared, not copied.
    Differentiable w.r.t. `adapters`; use inside the jitted loss with `params` a frozen input.
    """
    scale = lora_scale(config)
    for path, adapter in _adapted_modules(adapters):
        module = _get(params, path)
        params = _with(params, path, {**module, "lora_a": adapter["lora_a"], "lora_b": scale * adapter["lora_b"]})
    return params


def merge(params: Params, adapters: Params, config: LoRASettings) -> Params:
    """Plain params with W + s a b for every adapted kernel (in W's dtype), for export.

    Same model as `apply_lora`, loadable by anything (`save_hf`, `save_artifact`, transformers). Only the
    adapted kernels are new arrays; the other leaves are `params`' own.
    """
    scale = lora_scale(config)
    for path, adapter in _adapted_modules(adapters):
        module = _get(params, path)
        kernel = module["kernel"]
        wide = jnp.promote_types(kernel.dtype, jnp.float32)  # at least float32; a float64 kernel stays float64
        update = jnp.matmul(adapter["lora_a"].astype(wide), adapter["lora_b"].astype(wide))
        merged = (kernel.astype(wide) + scale * update).astype(kernel.dtype)
        params = _with(params, path, {**module, "kernel": merged})
    return params


def num_params(tree: Params) -> int:
    """Number of scalars in a pytree of arrays or `jax.ShapeDtypeStruct`s."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def nbytes(tree: Params) -> int:
    """Bytes held by a pytree of arrays or `jax.ShapeDtypeStruct`s (from shapes and dtypes)."""
    return sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def _kept(trainable: Params) -> dict:
    """The whole subtrees a LoRA train state holds beside the adapters (top-level keys without adapters)."""
    return {name: value for name, value in trainable.items() if not _adapted_modules({name: value})}


def trainable_params(params: Params, config: LoRASettings, key: jax.Array, keep: tuple[str, ...] = ()) -> Params:
    """What a stage trains (and checkpoints): `params` when `config.rank == 0`; otherwise the adapters of
    `init_lora` plus `params[name]` for each top-level `name` in `keep` that `params` has (e.g. "head")."""
    if config.rank == 0:
        return params
    return {**init_lora(params, config, key), **{name: params[name] for name in keep if name in params}}


def frozen_base(params: Params, config: LoRASettings) -> Params:
    """The frozen input of the steps: the base weights under LoRA, `{}` (nothing) without."""
    return params if config.rank > 0 else {}


def full_params(base: Params, trainable: Params, config: LoRASettings) -> Params:
    """The params the forward runs: `trainable` without LoRA; with it, `base` whose subtrees the train state
    keeps whole are replaced by its own, and whose targeted projections get the adapters (`apply_lora`).
    Differentiable w.r.t. `trainable`; `base` is never differentiated."""
    if config.rank == 0:
        return trainable
    return apply_lora({**base, **_kept(trainable)}, trainable, config)


def merged_params(base: Params, trainable: Params, config: LoRASettings) -> Params:
    """`full_params` as plain params (adapters merged into the kernels, `merge`; the layers stacked,
    `models.layout`), for export and evaluation."""
    if config.rank == 0:
        return stack_layers(trainable)
    return merge({**base, **_kept(trainable)}, trainable, config)
