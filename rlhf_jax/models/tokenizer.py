"""Tokenizers through `transformers.AutoTokenizer`, from an HF directory or from GGUF metadata.

Pad token: when a tokenizer declares none we pad with EOS (SmolLM2 already does: pad = `<|im_end|>` =
EOS = id 2). Padding is therefore never recognised by token id anywhere in rlhf_jax: masks come from
lengths and positions, so a real EOS is never mistaken for padding.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from rlhf_jax.errors import UserError
from rlhf_jax.models.config import DecoderConfig


def load_tokenizer(path: str | os.PathLike):
    """A `transformers` tokenizer from an HF directory or a `.gguf` file (its embedded vocab and chat template).

    Sets `pad_token` to EOS when the tokenizer has none. Raises `UserError` naming `path` when no tokenizer
    can be built.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        if path.suffix == ".gguf":
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError) as error:
        message = " ".join(str(error).split())[:300]
        raise UserError(f"{path}: cannot build a tokenizer ({type(error).__name__}: {message})") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"{path}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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
