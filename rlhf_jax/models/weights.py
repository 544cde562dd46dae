"""Name tables between Hugging Face state dicts and our stacked param pytree.

HF stores `model.layers.{i}.self_attn.q_proj.weight` as [out, in]; we store
`layers/self_attn/q_proj/kernel` as [L, in, out]. One table serves Llama, Mistral and Qwen2 (their
HF names agree); Qwen2 adds q/k/v biases, untied models add `lm_head.weight`.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

import numpy as np

from rlhf_jax.errors import UserError
from rlhf_jax.models.config import DecoderConfig

# our layer param path -> (HF name inside `model.layers.{i}.`, is a linear weight to transpose)
LAYER_TABLE: dict[tuple[str, ...], tuple[str, bool]] = {
    ("input_layernorm", "scale"): ("input_layernorm.weight", False),
    ("post_attention_layernorm", "scale"): ("post_attention_layernorm.weight", False),
    ("self_attn", "q_proj", "kernel"): ("self_attn.q_proj.weight", True),
    ("self_attn", "k_proj", "kernel"): ("self_attn.k_proj.weight", True),
    ("self_attn", "v_proj", "kernel"): ("self_attn.v_proj.weight", True),
    ("self_attn", "o_proj", "kernel"): ("self_attn.o_proj.weight", True),
    ("mlp", "gate_proj", "kernel"): ("mlp.gate_proj.weight", True),
    ("mlp", "up_proj", "kernel"): ("mlp.up_proj.weight", True),
    ("mlp", "down_proj", "kernel"): ("mlp.down_proj.weight", True),
}
BIAS_TABLE: dict[tuple[str, ...], tuple[str, bool]] = {
    ("self_attn", "q_proj", "bias"): ("self_attn.q_proj.bias", False),
    ("self_attn", "k_proj", "bias"): ("self_attn.k_proj.bias", False),
    ("self_attn", "v_proj", "bias"): ("self_attn.v_proj.bias", False),
}
GLOBAL_TABLE: dict[tuple[str, ...], tuple[str, bool]] = {
    ("embed_tokens", "embedding"): ("model.embed_tokens.weight", False),
    ("norm", "scale"): ("model.norm.weight", False),
}
LM_HEAD = (("lm_head", "kernel"), ("lm_head.weight", True))


def layer_table(config: DecoderConfig) -> dict[tuple[str, ...], tuple[str, bool]]:
    return {**LAYER_TABLE, **(BIAS_TABLE if config.attention_bias else {})}


def expected_hf_names(config: DecoderConfig) -> list[str]:
    """Every HF tensor name a checkpoint of `config` must hold."""
    names = [hf for hf, _ in GLOBAL_TABLE.values()]
    for i in range(config.num_layers):
        names += [f"model.layers.{i}.{hf}" for hf, _ in layer_table(config).values()]
    if not config.tie_word_embeddings:
        names.append(LM_HEAD[1][0])
    return names


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def params_from_hf(config: DecoderConfig, get: Callable[[str], np.ndarray], source: str, dtype=np.float32) -> dict:
    """Build our param pytree (numpy) from `get(hf_name) -> array [out, in]`.

    Raises `UserError` naming `source` and the tensor on a missing tensor or a shape mismatch.
    """

    def fetch(name: str, transpose: bool) -> np.ndarray:
        try:
            array = np.asarray(get(name), dtype=dtype)
        except KeyError:
            raise UserError(f"{source}: tensor {name!r} is missing") from None
        return array.T if transpose else array

    params: dict = {}
    for path, (name, transpose) in GLOBAL_TABLE.items():
        _set(params, path, fetch(name, transpose))
    for path, (name, transpose) in layer_table(config).items():
        stacked = np.stack([fetch(f"model.layers.{i}.{name}", transpose) for i in range(config.num_layers)])
        _set(params, ("layers",) + path, stacked)
    if not config.tie_word_embeddings:
        _set(params, LM_HEAD[0], fetch(*LM_HEAD[1]))
    _check_shapes(config, params, source)
    return params


def _check_shapes(config: DecoderConfig, params: dict, source: str) -> None:
    from rlhf_jax.models.llama import abstract_params  # local: keeps this module numpy-only at import

    import jax

    expected = jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]
    for path, leaf in expected:
        keys = tuple(k.key for k in path)
        node = params
        for key in keys:
            node = node[key]
        if tuple(node.shape) != tuple(leaf.shape):
            raise UserError(
                f"{source}: tensor for {'/'.join(keys)} has shape {tuple(node.shape)}, expected {tuple(leaf.shape)} "
                "from the config"
            )


def hf_tensors_from_params(config: DecoderConfig, params: Mapping) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, numpy array in HF layout) for every tensor of `params`."""

    def get(path: tuple[str, ...]):
        node = params
        for key in path:
            node = node[key]
        return np.asarray(node)

    for path, (name, transpose) in GLOBAL_TABLE.items():
        array = get(path)
        yield name, (array.T if transpose else array)
    for path, (name, transpose) in layer_table(config).items():
        stacked = get(("layers",) + path)
        for i in range(config.num_layers):
            yield f"model.layers.{i}.{name}", np.ascontiguousarray(stacked[i].T if transpose else stacked[i])
    if not config.tie_word_embeddings:
        yield LM_HEAD[1][0], np.ascontiguousarray(get(LM_HEAD[0]).T)
