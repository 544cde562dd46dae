"""Tokenizers as `transformers` fast tokenizers, from an HF directory or from GGUF metadata.

A `.gguf` file's tokenizer is built here from its metadata, without torch (transformers' own GGUF reader
imports torch, which only the `test` extra installs). For `tokenizer.ggml.model == "gpt2"` (byte-level BPE:
SmolLM2, Llama-3, Qwen2) we rebuild what `transformers.integrations.gguf` builds:
- BPE over `tokenizer.ggml.tokens` (tokens not spelled in the byte alphabet re-spelled from their UTF-8
  bytes) and `tokenizer.ggml.merges`; ByteLevel pre-tokenizer and decoder;
- the split regex named by `tokenizer.ggml.pre` (`GGUF_PRE_TOKENIZER_SPLITS`; other names keep GPT-2's);
- `token_type` 3 (control) as special added tokens, 4 (user-defined) as plain added tokens;
- bos/eos/unk/pad from `tokenizer.ggml.*_token_id`, `add_bos_token`/`add_eos_token`, `tokenizer.chat_template`.
Other tokenizer models (e.g. sentencepiece "llama") go through transformers, which needs torch.

Pad token: when a tokenizer declares none we pad with EOS (SmolLM2 already does: pad = `<|im_end|>` =
EOS = id 2). Padding is therefore never recognised by token id anywhere in rlhf_jax: masks come from
lengths and positions, so a real EOS is never mistaken for padding.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from rlhf_jax.errors import UserError, require
from rlhf_jax.models.config import DecoderConfig

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> the regex its merges were learned with; as transformers'
# `GGUF_PRE_TOKENIZER_SPLITS`. Any other name (gpt-2, smollm, ...) keeps GPT-2's ByteLevel regex.
GGUF_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano",
         "dbrx", "smaug-bpe"),
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_SPECIAL_TOKEN_IDS = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}


def load_tokenizer(path: str | os.PathLike, gguf_file=None):
    """A `transformers` tokenizer from an HF directory or a `.gguf` file (its embedded vocab and chat template;
    `gguf_file`: that file as `gguf_io.read_gguf` read it, when it already has).

    Sets `pad_token` to EOS when the tokenizer has none. Raises `UserError` naming `path` when no tokenizer
    can be built.
    """
    path = Path(path)
    if path.suffix == ".gguf":
        tokenizer = gguf_tokenizer(path, gguf_file)
    else:
        tokenizer = _auto_tokenizer(path, str(path))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"{path}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _auto_tokenizer(path: Path, directory: str, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as error:
        message = " ".join(str(error).split())[:300]
        raise UserError(f"{path}: cannot build a tokenizer ({type(error).__name__}: {message})") from None


def gguf_tokenizer(path: str | os.PathLike, gguf_file=None):
    """The tokenizer embedded in a GGUF file, as a `PreTrainedTokenizerFast` (see the module docstring);
    `gguf_file`: the file as `gguf_io.read_gguf` read it, when it already has.

    Byte-level BPE ("gpt2") files need no torch; other tokenizer models fall back to transformers' GGUF
    reader, which needs torch (`UserError` naming the file and the model when it is not installed).
    """
    from rlhf_jax.models.gguf_io import read_gguf, read_tokenizer_metadata

    path = Path(path)
    metadata = read_tokenizer_metadata(read_gguf(path) if gguf_file is None else gguf_file)
    model = metadata.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in metadata:
        raise UserError(f"{path}: the GGUF file embeds no tokenizer (no tokenizer.ggml.model / tokenizer.ggml.tokens)")
    if model != "gpt2":
        require("torch", f"the {model!r} tokenizer of {path} (only 'gpt2' GGUF tokenizers are built without it)")
        return _auto_tokenizer(path, str(path.parent), gguf_file=path.name)
    return _byte_level_bpe_tokenizer(metadata, path)


def _byte_level_bpe_tokenizer(metadata: dict[str, Any], path: Path):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = [str(token) for token in metadata["tokenizer.ggml.tokens"]]
    token_types = list(metadata.get("tokenizer.ggml.token_type") or [])
    if "tokenizer.ggml.merges" not in metadata:
        raise UserError(f"{path}: byte-level BPE tokenizer without tokenizer.ggml.merges")
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[byte] for byte in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    merges = [tuple(merge.split(" ")) for merge in metadata["tokenizer.ggml.merges"]]
    try:
        backend = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                end_of_word_suffix="", fuse_unk=False))
    except Exception as error:  # tokenizers raises its own exception type for a merge of unknown tokens
        raise UserError(f"{path}: invalid BPE vocab/merges ({error})") from None
    split = GGUF_PRE_TOKENIZER_SPLITS.get(metadata.get("tokenizer.ggml.pre"))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    # Control tokens spelled outside the byte alphabet are llama.cpp mislabels; adding them would grow the
    # vocab past the model's, so (as transformers does) they are skipped.
    backend.add_special_tokens([
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, token_types) if kind == _CONTROL and set(token) <= alphabet
    ])
    backend.add_tokens([
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, token_types) if kind == _USER_DEFINED and token in vocab
    ])

    special_ids = {}
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and not 0 <= int(token_id) < len(tokens):
            raise UserError(f"{path}: tokenizer.ggml.{key}_token_id={token_id} is outside the vocab of {len(tokens)}")
        special_ids[name] = None if token_id is None else int(token_id)
    special = {name: None if i is None else tokens[i] for name, i in special_ids.items()}
    # BOS/EOS added by the post-processor, so the backend alone (tokenizer.json) encodes like the wrapper.
    added = {}  # "bos_token"/"eos_token" -> id, for those the file says to add
    for name in ("bos_token", "eos_token"):
        if metadata.get(f"tokenizer.ggml.add_{name}", False):
            if special_ids[name] is None:
                raise UserError(f"{path}: tokenizer.ggml.add_{name} is set but the file has no {name} id")
            added[name] = special_ids[name]
    before = [f"{special['bos_token']}:0"] if "bos_token" in added else []
    after = [f"{special['eos_token']}:0"] if "eos_token" in added else []
    backend.post_processor = processors.TemplateProcessing(
        single=[*before, "$A:0", *after],
        pair=[*before, "$A:0", *after, *before, "$B:1", *after],
        special_tokens=[(special[name], token_id) for name, token_id in added.items()],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        name_or_path=str(path),
        chat_template=metadata.get("tokenizer.chat_template"),
        add_bos_token="bos_token" in added,
        add_eos_token="eos_token" in added,
        clean_up_tokenization_spaces=False,
        **special,
    )


def apply_chat_template(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` ([{"role": ..., "content": ...}]) rendered with the tokenizer's chat template.

    The template already writes its special tokens, so none are added when tokenizing the rendered text.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template")
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_tokenizer_vocab(tokenizer, config: DecoderConfig, source: str) -> None:
    """Raise `UserError` when the tokenizer can produce ids the model has no embedding for.

    The model's vocab may be larger than the tokenizer's (padded embedding tables); never smaller.
    """
    size = len(tokenizer)
    largest_id = max(tokenizer.get_vocab().values(), default=-1)
    special_ids = [i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) if i is not None]
    largest_id = max([largest_id, *special_ids])
    if size > config.vocab_size or largest_id >= config.vocab_size:
        raise UserError(
            f"{source}: tokenizer/model vocab mismatch: the tokenizer has {size} tokens (largest id {largest_id}) "
            f"but the model's vocab_size is {config.vocab_size}"
        )
