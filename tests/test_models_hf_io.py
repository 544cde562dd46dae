"""HF directories: tiny random transformers models -> load(dir) -> logit parity; export -> transformers."""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from rlhf_jax.models import RopeScaling, load, read_hf_config, save_hf, tiny_config

TOLERANCE = 1e-4  # relative L2 error of logits over real positions


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values in every tensor (HF init leaves biases at 0 and norms at 1, hiding mapping bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.05
            param.copy_(noise + 1.0 if "norm" in name else noise * (2.0 if "bias" in name else 1.0))
    return model.eval()


def _tiny_hf_model(family: str, seed: int = 0) -> torch.nn.Module:
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if family == "llama":
        config = transformers.LlamaConfig(
            **common, head_dim=16, tie_word_embeddings=False, rms_norm_eps=1e-5,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64, "rope_theta": 10000.0},
        )
        model = transformers.LlamaForCausalLM(config)
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e6)
        model = transformers.Qwen2ForCausalLM(config)
    elif family == "mistral":
        config = transformers.MistralConfig(**common, sliding_window=5, tie_word_embeddings=False)
        config._attn_implementation = "eager"
        model = transformers.MistralForCausalLM(config)
    else:
        raise ValueError(family)
    return _randomise(model, seed)


def _batch(left_padded, vocab_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    sequences = [rng.integers(3, vocab_size, size=n).tolist() for n in (13, 7, 10)]
    return left_padded(sequences, pad_id=2)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_hf_dir_logit_parity(family, tmp_path, logit_parity, left_padded):
    model = _tiny_hf_model(family)
    model.save_pretrained(tmp_path)
    config, params, tokenizer = load(tmp_path)
    assert tokenizer is None
    assert config.family == family
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
    if family == "llama":
        assert config.rope_scaling == RopeScaling(rope_type="llama3", factor=8.0, original_max_position_embeddings=64)
        assert not config.tie_word_embeddings and config.num_kv_heads == 2
    if family == "qwen2":
        assert config.attention_bias and config.tie_word_embeddings
    if family == "mistral":
        assert config.sliding_window == 5  # smaller than the 13-token row below
    tokens, mask = _batch(left_padded, config.vocab_size)
    result = logit_parity(config, params, model, tokens, mask)
    assert result["rel_err"] <= TOLERANCE, result
    assert result["argmax_agree"] == 1.0, result
    # and out again: transformers reads our export as the same model
    save_hf(tmp_path / "export", config, params)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(exported) is type(model)
    result = logit_parity(config, params, exported, tokens, mask)
    assert result["rel_err"] <= TOLERANCE and result["argmax_agree"] == 1.0, result


def test_sharded_safetensors(tmp_path, logit_parity, left_padded):
    model = _tiny_hf_model("llama", seed=1)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    config, params, _ = load(tmp_path)
    result = logit_parity(config, params, model, *_batch(left_padded, config.vocab_size))
    assert result["rel_err"] <= TOLERANCE and result["argmax_agree"] == 1.0, result


def test_bfloat16_checkpoint(tmp_path, logit_parity, left_padded):
    model = _tiny_hf_model("qwen2", seed=2)
    with torch.no_grad():  # bf16-representable weights; RoPE buffers stay float32 in the reference
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path)
    config, params, _ = load(tmp_path)  # bf16 on disk -> float32 params by default
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
    result = logit_parity(config, params, model, *_batch(left_padded, config.vocab_size))
    assert result["rel_err"] <= TOLERANCE and result["argmax_agree"] == 1.0, result
    config16, params16, _ = load(tmp_path, param_dtype="bfloat16", dtype="bfloat16")
    assert config16.param_dtype == "bfloat16" and config16.dtype == "bfloat16"
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params16))
    # bf16 -> f32 -> bf16 is exact
    np.testing.assert_array_equal(
        np.asarray(params16["embed_tokens"]["embedding"], np.float32), np.asarray(params["embed_tokens"]["embedding"])
    )


@pytest.mark.parametrize("spec", ["tiny:llama", "tiny:qwen2"])
def test_export_round_trip(spec, tmp_path, logit_parity, left_padded):
    config, params, _ = load(spec)
    save_hf(tmp_path / "out", config, params)
    assert read_hf_config(tmp_path / "out") == config
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    result = logit_parity(config, params, reference, *_batch(left_padded, config.vocab_size))
    assert result["rel_err"] <= TOLERANCE and result["argmax_agree"] == 1.0, result
    # and back through our loader: identical params
    _, reloaded, _ = load(tmp_path / "out")
    jax.tree.map(np.testing.assert_array_equal, reloaded, params)


def test_export_llama3_rope_sharded_bf16(tmp_path, logit_parity, left_padded):
    """A llama3-RoPE, sliding-free, untied model exported in bf16 and in shards loads in transformers."""
    config = tiny_config("llama", rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=64))
    params = load("tiny:llama").params  # RoPE scaling changes no param shape
    save_hf(tmp_path / "out", config, params, dtype="bfloat16", max_shard_bytes=60_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert reference.config.rope_parameters["rope_type"] == "llama3"
    rounded = jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(jnp.float32), params)
    result = logit_parity(config, rounded, reference, *_batch(left_padded, config.vocab_size))
    assert result["rel_err"] <= TOLERANCE and result["argmax_agree"] == 1.0, result


def test_export_replaces_previous_weights(tmp_path):
    config, params, _ = load("tiny:llama")
    out = tmp_path / "out"
    save_hf(out, config, params, max_shard_bytes=60_000)
    assert (out / "model.safetensors.index.json").is_file()
    (out / "notes.txt").write_text("kept")
    save_hf(out, config, params)  # now a single file: stale shards and index must go
    assert (out / "model.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    assert not list(out.glob("model-*-of-*.safetensors"))
    assert (out / "notes.txt").read_text() == "kept"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == config.eos_token_id


def test_bfloat16_read_falls_back_to_flax_backend(tmp_path):
    """safetensors releases whose numpy backend lacks bfloat16 raise TypeError; we then read through jax."""
    from rlhf_jax.models.hf_io import SafetensorsCheckpoint

    torch.manual_seed(0)
    _tiny_hf_model("llama").to(torch.bfloat16).save_pretrained(tmp_path)
    checkpoint = SafetensorsCheckpoint(tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = checkpoint.get(name)
    assert expected.dtype.name == "bfloat16"

    class NumpyWithoutBfloat16:
        def get_tensor(self, name):
            raise TypeError("data type 'bfloat16' not understood")

    checkpoint._handles["model.safetensors"] = NumpyWithoutBfloat16()
    np.testing.assert_array_equal(checkpoint.get(name), expected)
