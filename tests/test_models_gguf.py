"""GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes them -> load() -> logit parity."""

from __future__ import annotations

import math
import re

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as QType

from rlhf_jax.errors import UserError
from rlhf_jax.models import SUPPORTED_TENSOR_TYPES, RopeScaling, load
from rlhf_jax.models.gguf_io import permute_qk, unpermute_qk

# HF name -> llama.cpp name, written out independently of rlhf_jax.models.gguf_io's table
GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}
LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
# byte offsets of the float16 scale fields inside one 256-element K-quant block (ggml-common.h layouts)
K_QUANT_F16_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
TOLERANCE = 1e-4


def gguf_name(name: str) -> str:
    if name in GLOBAL:
        return GLOBAL[name]
    _, _, layer, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER[module]}.{kind}"


def random_k_quant_blocks(rows: int, cols: int, type_name: str, rng) -> np.ndarray:
    """Random bytes of a K-quant tensor, its f16 scales set small (gguf-py cannot quantise K types)."""
    block_elements, block_bytes = gguf.GGML_QUANT_SIZES[QType[type_name]]
    blocks = rng.integers(0, 256, size=(rows * cols // block_elements, block_bytes), dtype=np.uint8)
    for offset in K_QUANT_F16_OFFSETS[type_name]:
        scale = rng.uniform(1e-4, 4e-4, size=blocks.shape[0]).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, cols // block_elements * block_bytes)


def write_gguf(path, arch: str, hf_config, tensors: dict[str, np.ndarray], types: dict[str, str] | None = None,
               rope_freqs: np.ndarray | None = None, seed: int = 0) -> None:
    """A GGUF file of HF-named float32 tensors, permuting Q/K rows for `llama` as llama.cpp does."""
    types = types or {}
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny test model")
    writer.add_block_count(hf_config.num_hidden_layers)
    writer.add_context_length(hf_config.max_position_embeddings)
    writer.add_embedding_length(hf_config.hidden_size)
    writer.add_feed_forward_length(hf_config.intermediate_size)
    writer.add_head_count(hf_config.num_attention_heads)
    writer.add_head_count_kv(hf_config.num_key_value_heads)
    writer.add_rope_dimension_count(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads)
    writer.add_rope_freq_base(hf_config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(hf_config.rms_norm_eps)
    writer.add_vocab_size(hf_config.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for name, array in tensors.items():
        array = np.asarray(array, np.float32)
        if arch == "llama" and ".q_proj." in name:
            array = permute_qk(array, hf_config.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            array = permute_qk(array, hf_config.num_key_value_heads)
        type_name = types.get(name, "F32")
        if type_name in K_QUANT_F16_OFFSETS:
            data = random_k_quant_blocks(*array.shape, type_name, rng)
        else:
            data = gguf.quants.quantize(array, QType[type_name])
        writer.add_tensor(gguf_name(name), data, raw_dtype=QType[type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_cpp_rope_freqs(theta: float, head_dim: int, factor: float) -> np.ndarray:
    """`rope_freqs` as convert_hf_to_gguf.py computes it for rope_type llama3 (standard band edges)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    low_wavelen, high_wavelen = 8192 / 1.0, 8192 / 4.0
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, np.float32)


def _state_dict(model) -> dict[str, np.ndarray]:
    tied = model.config.tie_word_embeddings
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}


def _randomise(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.05
            param.copy_(noise + 1.0 if "norm" in name else noise)
    return model.eval()


def _batch(left_padded, vocab_size, seed=0):
    rng = np.random.default_rng(seed)
    return left_padded([rng.integers(3, vocab_size, size=n).tolist() for n in (12, 5, 9)], pad_id=2)


def test_unpermute_inverts_llama_cpp_permutation():
    weight = np.arange(6 * 8 * 5, dtype=np.float32).reshape(6 * 8, 5)
    permuted = permute_qk(weight, 6)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(unpermute_qk(permuted, 6), weight)
    # llama.cpp interleaves the two RoPE halves of each head: rows (0, hd/2, 1, hd/2+1, ...)
    np.testing.assert_array_equal(permuted[:4, 0], weight[[0, 4, 1, 5], 0])  # head_dim 8


def test_llama_gguf_matches_original_model(tmp_path, logit_parity, left_padded):
    """F32 GGUF of a GQA, untied, Llama-3-RoPE model: our loader (un-permute + rope_freqs) vs the original."""
    theta, factor = 500000.0, 8.0
    hf_config = transformers.LlamaConfig(
        vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, rms_norm_eps=1e-5,
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        rope_scaling={"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192, "rope_theta": theta},
    )
    model = _randomise(transformers.LlamaForCausalLM(hf_config), seed=0)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama", hf_config, _state_dict(model), rope_freqs=llama_cpp_rope_freqs(theta, 16, factor))
    config, params, tokenizer = load(path)
    assert tokenizer is None  # no tokenizer metadata in this file
    assert config.rope_scaling == RopeScaling(rope_type="llama3", factor=factor)
    assert (config.num_kv_heads, config.tie_word_embeddings, config.rope_theta) == (2, False, theta)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    result = logit_parity(config, params, model, *_batch(left_padded, config.vocab_size))
    assert result["rel_err"] <= TOLERANCE and result["argmax_agree"] == 1.0, result


def test_qwen2_gguf_has_biases_and_no_permutation(tmp_path, logit_parity, left_padded):
    hf_config = transformers.Qwen2Config(
        vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256, rope_theta=1e6,
    )
    model = _randomise(transformers.Qwen2ForCausalLM(hf_config), seed=1)
    path = tmp_path / "tiny-qwen2.gguf"
    write_gguf(path, "qwen2", hf_config, _state_dict(model))
    config, params, _ = load(path)
    assert config.family == "qwen2" and config.attention_bias and config.tie_word_embeddings
    result = logit_parity(config, params, model, *_batch(left_padded, config.vocab_size))
    assert result["rel_err"] <= TOLERANCE and result["argmax_agree"] == 1.0, result


def test_every_supported_tensor_type_matches_transformers(tmp_path, logit_parity, left_padded):
    """One tensor per supported type (K-quants need rows of 256); reference: transformers' own GGUF loader."""
    hf_config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, tie_word_embeddings=False, rms_norm_eps=1e-5,
        max_position_embeddings=128, rope_theta=10000.0,
    )
    model = _randomise(transformers.LlamaForCausalLM(hf_config), seed=2)
    tensors = _state_dict(model)
    matrices = [name for name, array in tensors.items() if array.ndim == 2]
    assert len(matrices) >= len(SUPPORTED_TENSOR_TYPES)
    types = {name: SUPPORTED_TENSOR_TYPES[i % len(SUPPORTED_TENSOR_TYPES)] for i, name in enumerate(matrices)}
    path = tmp_path / "mixed.gguf"
    write_gguf(path, "llama", hf_config, tensors, types=types)
    written = {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert written == set(SUPPORTED_TENSOR_TYPES)
    config, params, _ = load(path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
    result = logit_parity(config, params, reference, *_batch(left_padded, config.vocab_size))
    assert result["rel_err"] <= TOLERANCE and result["argmax_agree"] == 1.0, result


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16", "F16"])
def test_quantise_round_trip_is_close(type_name):
    """The dequantised values are the weights up to the type's quantisation step (catches layout mix-ups)."""
    from rlhf_jax.models.gguf_io import _dequantize

    weights = np.random.default_rng(0).normal(0, 0.05, size=(8, 64)).astype(np.float32)
    data = gguf.quants.quantize(weights, QType[type_name])

    class Tensor:  # the ReaderTensor fields _dequantize reads
        name, tensor_type, shape = "w", QType[type_name], np.array([64, 8])

    Tensor.data = data
    restored = _dequantize(Tensor, "test")
    step = {"Q8_0": 2**-7, "Q5_0": 2**-4, "Q5_1": 2**-5, "Q4_0": 2**-3, "Q4_1": 2**-4, "BF16": 2**-8, "F16": 2**-11}
    assert np.max(np.abs(restored - weights)) <= step[type_name] * np.max(np.abs(weights)) * 1.01


def test_unsupported_tensor_type_names_file_tensor_and_type(tmp_path):
    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in dict(block_count=1, embedding_length=256, feed_forward_length=256, head_count=4).items():
        getattr(writer, f"add_{key}")(value)
    _, block_bytes = gguf.GGML_QUANT_SIZES[QType.IQ2_XXS]
    writer.add_tensor("token_embd.weight", np.zeros((4, block_bytes), np.uint8), raw_dtype=QType.IQ2_XXS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError) as error:
        load(path)
    message = str(error.value)
    assert str(path) in message and "'token_embd.weight'" in message and "IQ2_XXS" in message
    assert "unsupported quantisation type" in message


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match=r"gpt2\.gguf: unsupported GGUF architecture 'gpt2'"):
        load(path)


def _assert_read_as_gguf_reader_reads(path):
    """`read_gguf` against `gguf.GGUFReader` (the gguf package's own reader): every field's value and Python
    type, every tensor's name, type, shape and bytes."""
    from rlhf_jax.models.gguf_io import read_gguf

    ours, theirs = read_gguf(path), gguf.GGUFReader(str(path))
    fields = {key: field for key, field in theirs.fields.items() if not key.startswith("GGUF.")}  # its header
    assert list(ours.metadata) == list(fields)
    for key, field in fields.items():
        want = field.contents()
        assert type(ours.metadata[key]) is type(want) and ours.metadata[key] == want, key
        if isinstance(want, list) and want:
            assert [type(v) for v in ours.metadata[key]] == [type(v) for v in want], key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, reference in zip(ours.tensors, theirs.tensors):
        assert mine.tensor_type == reference.tensor_type and mine.shape == tuple(reference.shape.tolist())
        assert mine.data.dtype == reference.data.dtype and mine.data.shape == reference.data.shape
        np.testing.assert_array_equal(mine.data, reference.data)
    return ours


def test_read_gguf_reads_every_value_type_and_tensor_type_as_the_gguf_package(tmp_path):
    path = tmp_path / "values.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    scalars = {"uint8": 7, "int8": -7, "uint16": 65000, "int16": -300, "uint32": 4_000_000_000, "int32": -5,
               "uint64": 2**60, "int64": -(2**60), "float32": 0.1, "float64": 0.1, "bool": True}
    for kind, value in scalars.items():
        getattr(writer, f"add_{kind}")(f"test.{kind}", value)
    writer.add_string("test.string", "héllo ✓")
    writer.add_string("test.empty", "")
    writer.add_array("test.ints", [1, -2, 3])
    writer.add_array("test.floats", [0.5, -1.25])
    writer.add_array("test.strings", ["a", "", "Ġworld", "✓"])
    writer.add_array("test.no_items", [])
    writer.add_custom_alignment(64)
    rng = np.random.default_rng(0)
    for index, type_name in enumerate(SUPPORTED_TENSOR_TYPES):
        weights = rng.normal(0, 0.05, size=(2, 256)).astype(np.float32)
        if type_name in K_QUANT_F16_OFFSETS:
            data = random_k_quant_blocks(*weights.shape, type_name, rng)
        else:
            data = gguf.quants.quantize(weights, QType[type_name])
        writer.add_tensor(f"t{index}.{type_name}", data, raw_dtype=QType[type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = _assert_read_as_gguf_reader_reads(path)
    assert ours.metadata["test.string"] == "héllo ✓" and ours.metadata["general.alignment"] == 64
    assert {t.tensor_type.name for t in ours.tensors} == set(SUPPORTED_TENSOR_TYPES)


def test_read_gguf_reads_smollm2_as_the_gguf_package(smollm2_path):
    ours = _assert_read_as_gguf_reader_reads(smollm2_path)
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152 and len(ours.tensors) == 272


def test_a_truncated_or_unknown_gguf_is_one_error_naming_the_file(tmp_path):
    from rlhf_jax.models.gguf_io import read_gguf

    path = tmp_path / "whole.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("test.strings", ["a" * 40] * 8)
    writer.add_tensor("w", np.ones((4, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    whole = path.read_bytes()
    kind = whole.index((1).to_bytes(8, "little") + b"w") + 8 + 1 + 4 + 2 * 8  # tensor w: name, n_dims, dims, type
    for name, content, expected in [
            ("unknown_type.gguf", whole[:kind] + (200).to_bytes(4, "little") + whole[kind + 4:],
             "200 is not a valid GGMLQuantizationType"),
            ("in_strings.gguf", whole[:120], "runs past the end of the file"),
            ("in_tensor.gguf", whole[:-16], "tensor 'w' runs past the end of the file"),
            ("version1.gguf", whole[:4] + (1).to_bytes(4, "little") + whole[8:], "GGUF version 1"),
            ("short.gguf", b"GG", "bad magic"), ("empty.gguf", b"", "empty file")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError, match=rf"{name}: not a readable GGUF file \(.*{re.escape(expected)}"):
            read_gguf(tmp_path / name)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not a gguf file at all" * 4)
    with pytest.raises(UserError, match=r"junk\.gguf: not a readable GGUF file"):
        load(path)
