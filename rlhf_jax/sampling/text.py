"""From prompts (text or chat messages) to token ids and from sampled ids back to text.

Shared by `python -m rlhf_jax.generate` and the generate stage. Models without a tokenizer (`tiny:*`)
get `ByteTokenizer`: UTF-8 bytes are the token ids, and "the chat template" is the HH text form
(`\\n\\nHuman: ...\\n\\nAssistant:`), so the whole text path runs on a random tiny model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax

from rlhf_jax.data.hh import render_dialogue
from rlhf_jax.data.records import Message
from rlhf_jax.data.tokenize import end_of_turn_id, render_prompt
from rlhf_jax.errors import UserError
from rlhf_jax.models.config import DecoderConfig
from rlhf_jax.sampling.sampler import Completion, Sampler, SamplingSettings

Prompt = str | tuple[Message, ...]


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (for random tiny models, whose vocab is 256)."""

    chat_template = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def text_tokenizer(tokenizer: Any | None, config: DecoderConfig):
    """The model's tokenizer, or a `ByteTokenizer` for a model that has none; `UserError` if neither fits."""
    if tokenizer is not None:
        return tokenizer
    if config.vocab_size < 256:
        raise UserError(f"the model has no tokenizer and its vocab ({config.vocab_size}) is too small for bytes")
    return ByteTokenizer()


def as_messages(prompt: Prompt) -> list[dict]:
    """A prompt as chat messages ([{"role", "content"}]); text becomes one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dataclasses.asdict(message) for message in prompt]


def prompt_text(tokenizer, prompt: Prompt, chat_template: bool) -> str:
    """The text the model is fed: the chat template with the generation prompt, or the raw text.

    Raw chat messages are written in HH form; so is every prompt for a `ByteTokenizer` with the template on.
    """
    if isinstance(tokenizer, ByteTokenizer):
        if not chat_template and isinstance(prompt, str):
            return prompt
        messages = (Message("user", prompt),) if isinstance(prompt, str) else prompt
        return render_dialogue(messages)
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template; pass --no-chat-template to feed raw text")
    return render_prompt(tokenizer, prompt, chat_template)


def prompt_token_ids(tokenizer, prompt: Prompt, chat_template: bool) -> list[int]:
    """Token ids of `prompt_text(...)`; a chat template writes its own special tokens, raw text gets the
    tokenizer's (e.g. BOS)."""
    text = prompt_text(tokenizer, prompt, chat_template)
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return list(tokenizer(text, add_special_tokens=not chat_template)["input_ids"])


def stop_token_ids(tokenizer, config: DecoderConfig, chat_template: bool) -> tuple[int, ...]:
    """EOS ids that end a response: the model's EOS and, under a chat template, the end-of-turn token."""
    ids = [config.eos_token_id] if config.eos_token_id is not None else []
    if not isinstance(tokenizer, ByteTokenizer):
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        try:
            ids.append(end_of_turn_id(tokenizer, chat_template))
        except UserError:
            pass
    return tuple(dict.fromkeys(int(i) for i in ids if 0 <= int(i) < config.vocab_size))


def decode(tokenizer, ids: Sequence[int]) -> str:
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.decode(ids)
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def cut_at_stop(tokenizer, ids: Sequence[int], stop: Sequence[str]) -> tuple[int, str, bool]:
    """(tokens kept, text, whether a stop string was found) for a response.

    The kept tokens are the shortest prefix whose text contains a stop string (they include it); the
    text ends before the stop string. Without a match: every token, the whole text.
    """
    text = decode(tokenizer, ids)
    if not any(s in text for s in stop):
        return len(ids), text, False
    low, high = 1, len(ids)  # the smallest prefix containing a stop string: text grows with the prefix
    while low < high:
        middle = (low + high) // 2
        if any(s in decode(tokenizer, ids[:middle]) for s in stop):
            high = middle
        else:
            low = middle + 1
    text = decode(tokenizer, ids[:low])
    cut = min(text.find(s) for s in stop if s in text)
    return low, text[:cut], True


def completion_record(tokenizer, prompt: Prompt, prompt_ids: Sequence[int], completion: Completion,
                      stop: Sequence[str] = (), chat_template: bool = True) -> dict:
    """The JSON-ready record of one completion.

    Fields: prompt (text, or messages), prompt_text, prompt_token_ids, completion (text, special tokens
    and any stop string removed), completion_token_ids (up to and including EOS or the stop string's
    tokens), sum_logprob (over those tokens, under the sampling distribution), finish_reason
    ("eos" | "stop" | "length").
    """
    ids = completion.tokens
    kept, text, stopped = cut_at_stop(tokenizer, ids, stop) if stop else (len(ids), None, False)
    if stopped:
        reason = "stop"
    else:
        reason = "eos" if completion.ended_with_eos else "length"
        body = ids[:-1] if completion.ended_with_eos else ids
        text = decode(tokenizer, body)
    return {
        "prompt": prompt if isinstance(prompt, str) else as_messages(prompt),
        "prompt_text": prompt_text(tokenizer, prompt, chat_template),
        "prompt_token_ids": list(prompt_ids),
        "completion": text,
        "completion_token_ids": list(ids[:kept]),
        "sum_logprob": float(sum(completion.logprobs[:kept])),
        "finish_reason": reason,
    }


def generate_text(config: DecoderConfig, params, tokenizer, prompts: Sequence[Prompt], key: jax.Array,
                  settings: SamplingSettings, *, batch_size: int = 8, chat_template: bool = True,
                  num_samples: int = 1, stop: Sequence[str] = (), sampler: Sampler | None = None) -> list[dict]:
    """Sample `num_samples` responses per prompt; one `completion_record` each, prompt-major.

    `settings.eos_token_ids=None` means `stop_token_ids(...)`: the model's EOS and the end-of-turn token.
    """
    if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(params)):
        raise UserError("the model's params are shapes only (a llama2:* planning spec): nothing to sample from")
    tokenizer = text_tokenizer(tokenizer, config)
    if settings.eos_token_ids is None:
        settings = settings.replace(eos_token_ids=stop_token_ids(tokenizer, config, chat_template))
    prompt_ids = [prompt_token_ids(tokenizer, p, chat_template) for p in prompts]
    for index, ids in enumerate(prompt_ids):
        if not ids:
            raise UserError(f"prompt {index} is empty")
        if len(ids) + settings.max_new_tokens > config.max_position_embeddings:
            raise UserError(f"prompt {index} has {len(ids)} tokens: with max_new_tokens={settings.max_new_tokens} "
                            f"it exceeds the model's {config.max_position_embeddings} positions")
    sampler = sampler or Sampler(config)
    repeated = [ids for ids in prompt_ids for _ in range(num_samples)]
    completions = sampler.complete(params, repeated, key, settings, batch_size=batch_size)
    return [
        completion_record(tokenizer, prompts[i // num_samples], repeated[i], completion, stop, chat_template)
        for i, completion in enumerate(completions)
    ]
