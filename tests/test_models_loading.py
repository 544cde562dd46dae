"""load(spec) specs and every user error, through `load` and through the convert CLI (one line, exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from rlhf_jax import convert
from rlhf_jax.errors import UserError
from rlhf_jax.models import apply_chat_template, llama2_config, load, save_hf, tiny_config


def _word_tokenizer(size: int, chat_template: str | None = None):
    """A small word-level transformers tokenizer with `size` tokens (built locally, nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="w2")
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tiny_specs(family):
    config, params, tokenizer = load(f"tiny:{family}")
    assert config == tiny_config(family) and tokenizer is None
    assert all(isinstance(leaf, jax.Array) and leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    _, again, _ = load(f"tiny:{family}")  # seed 0: deterministic
    jax.tree.map(np.testing.assert_array_equal, again, params)



def test_param_dtype_override():
    config, params, _ = load("tiny:llama", param_dtype="bfloat16")
    assert config.param_dtype == "bfloat16" and config.dtype == "float32"
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))


def test_llama2_spec_is_abstract():
    config, params, tokenizer = load("llama2:7b")
    assert config == llama2_config("7b") and tokenizer is None
    leaves = jax.tree.leaves(params)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    assert abs(sum(leaf.size for leaf in leaves) - 6.74e9) < 0.01e9  # Llama-2-7B has 6.74B params
    assert sum(leaf.size for leaf in leaves) == config.num_params()


def _hf_dir(tmp_path, vocab_size=96, tokenizer=None):
    config = tiny_config("llama", vocab_size=vocab_size)
    params = jax.tree.map(lambda x: x, load("tiny:llama").params)  # a fresh dict tree to edit
    params["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"][:vocab_size]
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"][:, :vocab_size]
    return save_hf(tmp_path / "model", config, params, tokenizer=tokenizer)


def test_hf_dir_with_tokenizer(tmp_path):
    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w9{% endif %}"
    path = _hf_dir(tmp_path, tokenizer=_word_tokenizer(90, chat_template=template))
    config, _, tokenizer = load(path)
    assert len(tokenizer) == 90 and config.vocab_size == 96  # a larger (padded) model vocab is fine
    assert tokenizer.pad_token == tokenizer.eos_token == "w2"  # no pad declared -> pad with EOS
    assert apply_chat_template(tokenizer, [{"role": "user", "content": "w5 w7"}]) == [5, 7, 9]
    assert load(path, with_tokenizer=False).tokenizer is None


def _gpt2_dir(tmp_path):
    path = tmp_path / "gpt2"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    return path, path / "config.json"  # load the directory; the message names its config.json


def _unsupported_quant_gguf(tmp_path):
    import gguf

    path = tmp_path / "tq.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in dict(block_count=1, embedding_length=256, feed_forward_length=256, head_count=4).items():
        getattr(writer, f"add_{key}")(value)
    _, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.TQ2_0]
    writer.add_tensor("token_embd.weight", np.zeros((4, block_bytes), np.uint8),
                      raw_dtype=gguf.GGMLQuantizationType.TQ2_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, path


def _empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty", tmp_path / "empty"


def _vocab_mismatch(tmp_path):
    path = _hf_dir(tmp_path, vocab_size=64, tokenizer=_word_tokenizer(100))
    return path, path


# bad input -> (builder(tmp_path) -> (spec, file the message must name), phrases the message must hold)
BAD_INPUTS = {
    "missing file": (lambda tmp: (tmp / "nope" / "model.gguf",) * 2, ["no such file or directory"]),
    "not a model directory": (_empty_dir, ["no config.json"]),
    "unsupported architecture": (_gpt2_dir, ["unsupported architecture 'GPT2LMHeadModel'"]),
    "unsupported quantisation": (_unsupported_quant_gguf, ["'token_embd.weight'", "unsupported quantisation type TQ2_0"]),
    "vocab mismatch": (_vocab_mismatch, ["tokenizer/model vocab mismatch", "100 tokens", "vocab_size is 64"]),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_user_error_naming_the_file(name, tmp_path):
    spec, file = BAD_INPUTS[name][0](tmp_path)
    with pytest.raises(UserError) as error:
        load(spec)
    message = str(error.value)
    assert str(file) in message
    for phrase in BAD_INPUTS[name][1]:
        assert phrase in message
    assert "\n" not in message


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_convert_cli_prints_one_line_and_exits_2(name, tmp_path, capsys):
    spec, file = BAD_INPUTS[name][0](tmp_path)
    assert convert.main([str(spec), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(file) in err
    assert not (tmp_path / "out").exists()


def test_convert_cli_subprocess_missing_file(tmp_path):
    missing = tmp_path / "missing.gguf"
    done = subprocess.run([sys.executable, "-m", "rlhf_jax.convert", str(missing), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {missing}: no such file or directory"]


def test_missing_safetensors_and_bad_specs(tmp_path):
    path = tmp_path / "weightless"
    path.mkdir()
    hf = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2).to_dict()
    hf["architectures"] = ["LlamaForCausalLM"]
    (path / "config.json").write_text(json.dumps(hf))
    (path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match=r"weightless: no model\.safetensors .*found pytorch_model\.bin"):
        load(path)
    with pytest.raises(UserError, match="tiny model preset 'gpt2' is unknown"):
        load("tiny:gpt2")
    with pytest.raises(UserError, match="gguf:nope: unknown packaged model"):
        load("gguf:nope")
    with pytest.raises(UserError, match="llama2 preset '3b' is unknown"):
        load("llama2:3b")
    with pytest.raises(UserError, match="param_dtype='int8' is not a floating-point dtype"):
        load("tiny:llama", param_dtype="int8")
    with pytest.raises(UserError, match="no weights"):
        convert.convert("llama2:7b", str(tmp_path / "out"))
