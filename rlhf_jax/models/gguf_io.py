"""GGUF files (llama.cpp): metadata -> `DecoderConfig`, tensors -> our params.

Files are read by `read_gguf` (metadata decoded with numpy, tensors memory-mapped) and tensors dequantised to
float32 with `gguf.quants.dequantize`, one at a time. llama.cpp names are mapped to Hugging Face names, then
`weights.params_from_hf` builds the stacked param tree, so GGUF and HF share one import path.

Two llama.cpp conventions are undone here:
- Q/K row permutation. For the `llama` architecture `convert_hf_to_gguf.py` reorders the rows of
  `attn_q` (per query head) and `attn_k` (per key/value head) from HF's half-split RoPE layout to
  llama.cpp's interleaved one: `w.reshape(n, 2, rows // n // 2, cols).swapaxes(1, 2)`. We apply the
  inverse, `w.reshape(n, rows // n // 2, 2, cols).swapaxes(1, 2)`. `qwen2` files are not permuted.
- Llama-3 RoPE scaling is stored as a `rope_freqs.weight` tensor of per-frequency divisors instead of
  parameters; we recover `RopeScaling(rope_type="llama3", factor=max(divisors))` with the standard
  band edges and check that it reproduces the tensor.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_jax.errors import UserError
from rlhf_jax.models.config import DecoderConfig, RopeScaling, validate_decoder_config
from rlhf_jax.models.weights import params_from_hf

# GGUF `general.architecture` -> our family; whether llama.cpp permuted the Q/K rows
GGUF_ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False)}

# Types we dequantise (each covered by a test). Others (IQ*, TQ*, MXFP4, integer types...) are refused.
SUPPORTED_TENSOR_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(.+)")
ROPE_FREQS = "rope_freqs.weight"


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face tensor name of a llama.cpp tensor name, or None when it has none."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_PATTERN.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Invert llama.cpp's per-head Q/K row permutation. weight: [num_heads * hd, ...] (rows first)."""
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def permute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's permutation (`convert_hf_to_gguf.LlamaModel.permute`), for writing test files."""
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


# GGUF metadata value types (the spec's `gguf_type`): numpy scalar types; 7 bool, 8 string, 9 array
_SCALAR_TYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
                 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
# tensor types that are plain arrays (the others are blocks of bytes, `gguf.quants.dequantize` reads them)
_PLAIN_TENSOR_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                       "I32": np.int32, "I64": np.int64}


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: its llama.cpp name, `gguf.GGMLQuantizationType`, shape in GGUF's order (`ne`,
    innermost first) and data, memory-mapped as `gguf.GGUFReader` gives it (the plain types as their numpy type
    in row-major order, the quantised ones as rows of block bytes)."""

    name: str
    tensor_type: Any
    shape: tuple[int, ...]
    data: np.ndarray


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """A GGUF file's metadata ({key: value}: numbers, strings, lists) and tensors (`GGUFTensor`), in file order."""

    metadata: dict[str, Any]
    tensors: list[GGUFTensor]


class _Cursor:
    """Little-endian reads from a GGUF file's bytes."""

    def __init__(self, buffer: memoryview):
        self.buffer, self.offset = buffer, 0

    def scalar(self, kind) -> Any:
        dtype = np.dtype(kind).newbyteorder("<")
        value = np.frombuffer(self.buffer, dtype, 1, self.offset)[0]
        self.offset += dtype.itemsize
        return value.item()

    def string(self) -> str:
        size = int.from_bytes(self.buffer[self.offset:self.offset + 8], "little")
        start = self.offset + 8
        if start + size > len(self.buffer):
            raise ValueError(f"a string of {size} bytes at offset {self.offset} runs past the end of the file")
        self.offset = start + size
        return str(self.buffer[start:self.offset], "utf-8")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.scalar(np.uint32), self.scalar(np.uint64)
            if item in _SCALAR_TYPES:  # a numeric array in one read
                dtype = np.dtype(_SCALAR_TYPES[item]).newbyteorder("<")
                values = np.frombuffer(self.buffer, dtype, count, self.offset)
                self.offset += count * dtype.itemsize
                return values.tolist()
            return [self.value(item) for _ in range(count)]
        if kind not in _SCALAR_TYPES:
            raise ValueError(f"unknown metadata value type {kind} at offset {self.offset - 4}")
        return self.scalar(_SCALAR_TYPES[kind])


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """The metadata and tensors of the GGUF file `path` (versions 2 and 3, little-endian), read with numpy: the
    same values as `gguf.GGUFReader`, which builds a Python view of every part of every field (seconds for a
    file with a 49,152-token vocab and its merges, on every load). UserError naming the file when it is missing,
    not GGUF, truncated, or holds a type this reader does not know."""
    import gguf
    from gguf.quants import quant_shape_to_byte_shape

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: GGUF file not found")
    try:
        mapped = np.memmap(path, np.uint8, mode="r")
        cursor = _Cursor(memoryview(mapped))
        if bytes(cursor.buffer[:4]) != b"GGUF":
            raise ValueError(f"bad magic {bytes(cursor.buffer[:4])!r}, expected b'GGUF'")
        cursor.offset = 4
        version = cursor.scalar(np.uint32)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (this reader reads versions 2 and 3, little-endian)")
        tensor_count, field_count = cursor.scalar(np.uint64), cursor.scalar(np.uint64)
        metadata = {}
        for _ in range(field_count):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.scalar(np.uint32))
        infos = []
        for _ in range(tensor_count):
            name = cursor.string()
            dims = tuple(cursor.scalar(np.uint64) for _ in range(cursor.scalar(np.uint32)))
            infos.append((name, gguf.GGMLQuantizationType(cursor.scalar(np.uint32)), dims, cursor.scalar(np.uint64)))
        alignment = int(metadata.get("general.alignment", 32))
        start = -(-cursor.offset // alignment) * alignment
        tensors, names = [], set()
        for name, kind, dims, offset in infos:
            if name in names:
                raise ValueError(f"tensor {name!r} appears twice")
            names.add(name)
            shape = tuple(reversed(dims))
            plain = _PLAIN_TENSOR_TYPES.get(kind.name)
            if plain is None:
                shape = quant_shape_to_byte_shape(shape, kind)
            dtype = np.dtype(plain or np.uint8).newbyteorder("<")
            count = math.prod(shape)
            if start + offset + count * dtype.itemsize > len(mapped):
                raise ValueError(f"tensor {name!r} runs past the end of the file")
            data = np.frombuffer(mapped, dtype, count, start + offset).reshape(shape)
            tensors.append(GGUFTensor(name, kind, dims, data))
        return GGUFFile(metadata, tensors)
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not a readable GGUF file (a string that is not UTF-8: {error})") from None
    except (ValueError, OSError, IndexError, KeyError, OverflowError) as error:
        # unknown tensor-type numbers (GGMLQuantizationType), bad magic and truncation all surface here
        raise UserError(f"{path}: not a readable GGUF file ({error})") from None


def _metadata(gguf_file: GGUFFile) -> dict[str, Any]:
    """The metadata without the tokenizer's large arrays."""
    large = ("tokens", "scores", "token_type", "merges")
    return {key: value for key, value in gguf_file.metadata.items()
            if not (key.startswith("tokenizer.ggml.") and key.rsplit(".", 1)[1] in large)}


def _llama3_rope_scaling(divisors: np.ndarray, config: DecoderConfig, source: str) -> RopeScaling | None:
    """Recover Llama-3 RoPE parameters from llama.cpp's `rope_freqs` divisors (see module docstring)."""
    if np.allclose(divisors, 1.0):
        return None
    scaling = RopeScaling(rope_type="llama3", factor=float(np.max(divisors)))
    exponents = np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim
    inv_freq = 1.0 / config.rope_theta**exponents
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    expected = np.where(
        wavelen < high_wavelen, 1.0,
        np.where(wavelen > low_wavelen, scaling.factor, 1.0 / ((1 - smooth) / scaling.factor + smooth)),
    )
    if divisors.shape != expected.shape or not np.allclose(divisors, expected, rtol=1e-4):
        raise UserError(
            f"{source}: tensor {ROPE_FREQS!r} does not match Llama-3 RoPE scaling with factor={scaling.factor} "
            "and the standard band edges; convert from the Hugging Face checkpoint instead"
        )
    return scaling


def read_gguf_config(gguf_file: GGUFFile, source: str) -> DecoderConfig:
    """Build a `DecoderConfig` from GGUF metadata (`{arch}.block_count`, `{arch}.embedding_length`, ...)."""
    meta = _metadata(gguf_file)
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UserError(f"{source}: unsupported GGUF architecture {arch!r}; expected one of {sorted(GGUF_ARCHITECTURES)}")
    family, _ = GGUF_ARCHITECTURES[arch]
    tensors = {t.name: t for t in gguf_file.tensors}

    def required(key: str):
        if f"{arch}.{key}" not in meta:
            raise UserError(f"{source}: GGUF metadata key {arch}.{key!s} is missing")
        return meta[f"{arch}.{key}"]

    def optional(key: str, default=None):
        return meta.get(f"{arch}.{key}", default)

    def token_id(name: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        return None if value is None else int(value)

    hidden = int(required("embedding_length"))
    num_heads = int(required("attention.head_count"))
    head_dim = int(optional("attention.key_length", hidden // num_heads))
    rope_dim = int(optional("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise UserError(f"{source}: partial rotary embeddings (rope.dimension_count={rope_dim} < head_dim={head_dim}) are not supported")
    if "token_embd.weight" not in tensors:
        raise UserError(f"{source}: tensor 'token_embd.weight' is missing")
    vocab_size = int(optional("vocab_size", int(tensors["token_embd.weight"].shape[-1])))
    rope_scaling = None
    scaling_type = optional("rope.scaling.type", "none")
    if scaling_type == "linear":
        rope_scaling = RopeScaling(rope_type="linear", factor=float(required("rope.scaling.factor")))
    elif scaling_type not in ("none", None):
        raise UserError(f"{source}: RoPE scaling type {scaling_type!r} is not supported (linear, llama3)")
    config = DecoderConfig(
        family=family,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(required("feed_forward_length")),
        num_layers=int(required("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(optional("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rope_theta=float(optional("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(optional("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        max_position_embeddings=int(optional("context_length", 4096)),
        bos_token_id=token_id("bos"),
        eos_token_id=token_id("eos"),
        pad_token_id=token_id("padding"),
    )
    if ROPE_FREQS in tensors:
        if rope_scaling is not None:
            raise UserError(f"{source}: both {ROPE_FREQS!r} and rope.scaling.type={scaling_type!r} are set")
        divisors = _dequantize(tensors[ROPE_FREQS], source)
        config = dataclasses.replace(config, rope_scaling=_llama3_rope_scaling(divisors, config, source))
    validate_decoder_config(config, source)
    return config


def _dequantize(tensor, source: str) -> np.ndarray:
    """float32 array in numpy (row-major) order, i.e. GGUF's `ne` reversed == HF's [out, in]."""
    from gguf.quants import dequantize

    type_name = tensor.tensor_type.name
    if type_name not in SUPPORTED_TENSOR_TYPES:
        raise UserError(
            f"{source}: tensor {tensor.name!r} has unsupported quantisation type {type_name}; "
            f"supported: {', '.join(SUPPORTED_TENSOR_TYPES)}"
        )
    array = dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.asarray(array, dtype=np.float32).reshape(shape)


def has_tokenizer(gguf_file: GGUFFile) -> bool:
    """Whether the GGUF file embeds a tokenizer (vocab, merges, chat template) in its metadata."""
    return "tokenizer.ggml.model" in gguf_file.metadata and "tokenizer.ggml.tokens" in gguf_file.metadata


def read_tokenizer_metadata(gguf_file: GGUFFile) -> dict[str, Any]:
    """Every `tokenizer.*` field (vocab, merges, token types, special ids, chat template), decoded."""
    return {key: value for key, value in gguf_file.metadata.items() if key.startswith("tokenizer.")}


def load_gguf(path: str | os.PathLike, gguf_file: GGUFFile | None = None) -> tuple[DecoderConfig, dict]:
    """Read a GGUF file (`gguf_file` when already read). Returns (config, params as float32 numpy).

    Raises `UserError` naming the file for an unsupported architecture, an unsupported tensor type (naming
    the tensor and type), a missing or unexpected tensor, or a shape that contradicts the metadata.
    """
    source = str(path)
    gguf_file = read_gguf(path) if gguf_file is None else gguf_file
    config = read_gguf_config(gguf_file, source)
    _, permuted = GGUF_ARCHITECTURES[gguf_file.metadata["general.architecture"]]
    by_hf_name = {}
    for tensor in gguf_file.tensors:
        name = hf_name(tensor.name)
        if name is None:
            if tensor.name == ROPE_FREQS:
                continue
            raise UserError(f"{source}: unexpected tensor {tensor.name!r} for a {config.family} model")
        if tensor.tensor_type.name not in SUPPORTED_TENSOR_TYPES:
            _dequantize(tensor, source)  # raises the unsupported-type error, before any slow work
        by_hf_name[name] = tensor

    def get(name: str) -> np.ndarray:
        array = _dequantize(by_hf_name[name], source)
        if permuted and name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            array = unpermute_qk(array, config.num_heads)
        elif permuted and name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            array = unpermute_qk(array, config.num_kv_heads)
        return array

    return config, params_from_hf(config, get, source=source)
