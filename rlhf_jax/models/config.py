"""Architecture config of the Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2).

One frozen dataclass describes every supported family; `from_hf_dict` / `to_hf_dict` translate
to and from a Hugging Face `config.json`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rlhf_jax.errors import UserError

SUPPORTED_ARCHITECTURES = {
    # HF `architectures[0]` -> (our family name, HF model_type)
    "LlamaForCausalLM": ("llama", "llama"),
    "MistralForCausalLM": ("mistral", "mistral"),
    "Qwen2ForCausalLM": ("qwen2", "qwen2"),
}
MODEL_TYPE_TO_FAMILY = {model_type: family for family, model_type in SUPPORTED_ARCHITECTURES.values()}
FAMILY_TO_ARCHITECTURE = {family: arch for arch, (family, _) in SUPPORTED_ARCHITECTURES.items()}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling: `"linear"` (positions / factor) or `"llama3"` (Llama 3.1 band-wise)."""

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """Shapes and options of a Llama-family decoder.

    `dtype` is the compute dtype (activations, matmuls); `param_dtype` the storage dtype of params.
    Norms, softmax, RoPE tables and logits are always computed in float32.
    """

    family: str = "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    remat_policy: str = "nothing_saveable"  # a `jax.checkpoint_policies` name, used when remat is on
    scan_unroll: int | None = None  # layers per scan iteration; None: all of them on a CPU, 1 elsewhere

    @property
    def num_query_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        """Parameter count of the LM (without value/reward heads)."""
        d, i, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.attention_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * d * i + 2 * d
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + self.num_layers * layer + d + head


def validate_decoder_config(config: DecoderConfig, source: str = "config") -> None:
    """Raise `UserError` naming `source` when the shapes are inconsistent."""
    problems = []
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
        if getattr(config, field) <= 0:
            problems.append(f"{field}={getattr(config, field)} must be positive")
    if config.num_kv_heads > 0 and config.num_heads % config.num_kv_heads:
        problems.append(f"num_heads={config.num_heads} is not a multiple of num_kv_heads={config.num_kv_heads}")
    if config.head_dim % 2:
        problems.append(f"head_dim={config.head_dim} must be even for RoPE")
    if config.family not in MODEL_TYPE_TO_FAMILY.values():
        problems.append(f"family={config.family!r} is not one of {sorted(MODEL_TYPE_TO_FAMILY.values())}")
    if config.rope_scaling is not None and config.rope_scaling.rope_type not in ("linear", "llama3"):
        problems.append(f"rope_scaling.rope_type={config.rope_scaling.rope_type!r} is not 'linear' or 'llama3'")
    if problems:
        raise UserError(f"{source}: " + "; ".join(problems))


def _first_int(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def from_hf_dict(hf: dict, source: str = "config.json") -> DecoderConfig:
    """Build a `DecoderConfig` from a Hugging Face `config.json` dict.

    Raises `UserError` (naming `source`) for an unsupported architecture or missing field.
    """
    architectures = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if architectures and architectures[0] in SUPPORTED_ARCHITECTURES:
        family = SUPPORTED_ARCHITECTURES[architectures[0]][0]
    elif model_type in MODEL_TYPE_TO_FAMILY:
        family = MODEL_TYPE_TO_FAMILY[model_type]
    else:
        found = architectures[0] if architectures else model_type
        raise UserError(
            f"{source}: unsupported architecture {found!r}; expected one of {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    try:
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        rope_scaling = None
        rs = hf.get("rope_scaling") or None
        rope_params = hf.get("rope_parameters") or None  # transformers >= 5 layout
        rope_theta = hf.get("rope_theta")
        if rope_params:
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rs = rope_params
        if rs:
            rope_type = rs.get("rope_type", rs.get("type"))
            if rope_type not in ("linear", "llama3", "default"):
                raise UserError(f"{source}: rope_scaling type {rope_type!r} is not supported (linear, llama3)")
            if rope_type != "default":
                rope_scaling = RopeScaling(
                    rope_type=rope_type,
                    factor=float(rs.get("factor", 1.0)),
                    low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
                    high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
                    original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
                )
        sliding_window = hf.get("sliding_window")
        if family == "qwen2" and not hf.get("use_sliding_window", False):
            sliding_window = None
        config = DecoderConfig(
            family=family,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hidden // num_heads),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", family == "qwen2")),
            sliding_window=None if sliding_window is None else int(sliding_window),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            bos_token_id=_first_int(hf.get("bos_token_id")),
            eos_token_id=_first_int(hf.get("eos_token_id")),
            pad_token_id=_first_int(hf.get("pad_token_id")),
        )
    except KeyError as missing:
        raise UserError(f"{source}: missing field {missing.args[0]!r}") from None
    validate_decoder_config(config, source)
    return config


def to_hf_dict(config: DecoderConfig, torch_dtype: str = "float32") -> dict:
    """The Hugging Face `config.json` dict for `config` (loadable by `transformers`)."""
    hf = {
        "architectures": [FAMILY_TO_ARCHITECTURE[config.family]],
        "model_type": config.family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }
    if config.family != "qwen2":
        hf["attention_bias"] = config.attention_bias
        hf["mlp_bias"] = False
    if config.rope_scaling is not None:
        rs = config.rope_scaling
        hf["rope_scaling"] = {"rope_type": rs.rope_type, "factor": rs.factor}
        if rs.rope_type == "llama3":
            hf["rope_scaling"].update(
                low_freq_factor=rs.low_freq_factor,
                high_freq_factor=rs.high_freq_factor,
                original_max_position_embeddings=rs.original_max_position_embeddings,
            )
    if config.family == "mistral":
        hf["sliding_window"] = config.sliding_window
    if config.family == "qwen2":
        hf["use_sliding_window"] = config.sliding_window is not None
        hf["sliding_window"] = config.sliding_window
        hf["max_window_layers"] = config.num_layers
    return hf


TINY_PRESETS = {
    "llama": dict(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                  pad_token_id=2),
    # SmolLM2's vocabulary and special ids, with tiny shapes: a fast stand-in that runs on real text
    "smollm2": dict(family="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=100000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                    pad_token_id=2),
    "qwen2": dict(family="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1000000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, attention_bias=True, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2),
}

LLAMA2_PRESETS = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8),
}


def tiny_config(family: str = "llama", **overrides) -> DecoderConfig:
    """A tiny random-init config for tests (`tiny:llama`, `tiny:qwen2`)."""
    if family not in TINY_PRESETS:
        raise UserError(f"tiny model preset {family!r} is unknown; expected one of {sorted(TINY_PRESETS)}")
    return DecoderConfig(**{**TINY_PRESETS[family], **overrides})


def llama2_config(size: str, **overrides) -> DecoderConfig:
    """Llama-2 shapes (`llama2:7b|13b|70b`) for planning large runs."""
    if size not in LLAMA2_PRESETS:
        raise UserError(f"llama2 preset {size!r} is unknown; expected one of {sorted(LLAMA2_PRESETS)}")
    shapes = LLAMA2_PRESETS[size]
    return DecoderConfig(
        family="llama", vocab_size=32000, head_dim=shapes["hidden_size"] // shapes["num_heads"],
        rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, **{**shapes, **overrides},
    )
