"""Record types and their parsing from rows (dicts read from JSONL, Parquet, Arrow or TFDS).

A prompt is either raw text (`str`) or chat messages (`tuple[Message, ...]`); the tokenizer renders it
with the model's chat template or as plain text. Every parser raises `BadRecord(reason)` for a row
that cannot be used; the source adds the file and line.

Accepted rows, per kind:
  sft        {"prompt", "response" | "completion"} · {"messages": [..., assistant]} · an HH/conversational pair
             row ({"chosen", "rejected"}, the chosen side is the demonstration)
  preference {"prompt", "chosen", "rejected"} · whole dialogues {"chosen", "rejected"} sharing a prefix, as HH
             text or as message lists
  unpaired   {"prompt", "response" | "completion", "label": bool} · a pair row gives two records (True, False)
  prompt     {"prompt", "reference"?} · {"messages"} · a pair row gives its prompt
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Union

ROLES = ("system", "user", "assistant")
KINDS = ("sft", "preference", "unpaired", "prompt")


class BadRecord(Exception):
    """A row that cannot be used; ``str(exc)`` is the reason."""


@dataclasses.dataclass(frozen=True)
class Message:
    role: str
    content: str


Prompt = Union[str, tuple[Message, ...]]


@dataclasses.dataclass(frozen=True)
class Demonstration:
    """SFT example: the response is trained on, the prompt is context."""

    prompt: Prompt
    response: str
    origin: str = ""


@dataclasses.dataclass(frozen=True)
class Preference:
    """A pairwise comparison: ``chosen`` is preferred over ``rejected`` for the same prompt."""

    prompt: Prompt
    chosen: str
    rejected: str
    origin: str = ""


@dataclasses.dataclass(frozen=True)
class Feedback:
    """Unpaired binary feedback (KTO): ``label`` is True for a desirable response."""

    prompt: Prompt
    response: str
    label: bool
    origin: str = ""


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """A prompt to sample from, with an optional reference answer for verifiable rewards."""

    prompt: Prompt
    reference: str | None = None
    origin: str = ""


Record = Union[Demonstration, Preference, Feedback, PromptRecord]


def parse_record(row: Any, kind: str, origin: str = "") -> list[Record]:
    """The records of one row for ``kind`` (one, or two for an unpaired pair row); raises `BadRecord`."""
    assert kind in KINDS, kind
    if not isinstance(row, Mapping):
        raise BadRecord(f"expected an object with named fields, got {type(row).__name__}")
    if kind == "sft":
        prompt, response = _demonstration(row)
        return [Demonstration(prompt, response, origin)]
    if kind == "preference":
        prompt, chosen, rejected = _preference(row)
        return [Preference(prompt, chosen, rejected, origin)]
    if kind == "unpaired":
        if "label" not in row and "chosen" in row:
            prompt, chosen, rejected = _preference(row)
            return [Feedback(prompt, chosen, True, origin), Feedback(prompt, rejected, False, origin)]
        prompt, response = _demonstration(row)
        label = row.get("label")
        if label is None:
            raise BadRecord("missing field 'label'")
        if not isinstance(label, bool):
            raise BadRecord(f"field 'label' must be true or false, got {label!r}")
        return [Feedback(prompt, response, label, origin)]
    return [PromptRecord(*_prompt_record(row), origin)]


def _messages(value: Any, field: str) -> tuple[Message, ...]:
    if not isinstance(value, (list, tuple)):
        raise BadRecord(f"field {field!r} must be text or a list of messages, got {type(value).__name__}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise BadRecord(f"{field}[{i}] is not a message with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise BadRecord(f"{field}[{i}] has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise BadRecord(f"{field}[{i}] content must be text, got {type(content).__name__}")
        messages.append(Message(role, content))
    return tuple(messages)


def _field(row: Mapping, *names: str) -> Any:
    for name in names:
        if row.get(name) is not None:
            return row[name]
    raise BadRecord(f"missing field {names[0]!r}" + (f" (or {', '.join(map(repr, names[1:]))})" if names[1:] else ""))


def _prompt(row: Mapping) -> Prompt:
    value = _field(row, "prompt")
    prompt = value if isinstance(value, str) else _messages(value, "prompt")
    if not prompt or (isinstance(prompt, str) and not prompt.strip()):
        raise BadRecord("empty prompt")
    return prompt


def _answer(value: Any, field: str) -> str:
    """A completion: text, or a one-message assistant list (the conversational format)."""
    if not isinstance(value, str):
        messages = _messages(value, field)
        if len(messages) != 1 or messages[0].role != "assistant":
            raise BadRecord(f"field {field!r} must be text or a single assistant message")
        value = messages[0].content
    if not value.strip():
        raise BadRecord("empty response" + (f" ({field})" if field in ("chosen", "rejected") else ""))
    return value


def _split_conversation(messages: tuple[Message, ...], field: str) -> tuple[tuple[Message, ...], str]:
    if not messages or messages[-1].role != "assistant":
        raise BadRecord(f"no assistant turn (the last message of {field!r} must be from the assistant)")
    if len(messages) == 1:
        raise BadRecord(f"no prompt before the assistant turn in {field!r}")
    if not messages[-1].content.strip():
        raise BadRecord("empty response" + (f" ({field})" if field in ("chosen", "rejected") else ""))
    return messages[:-1], messages[-1].content


def _demonstration(row: Mapping) -> tuple[Prompt, str]:
    from rlhf_jax.data import hh

    if row.get("messages") is not None:
        return _split_conversation(_messages(row["messages"], "messages"), "messages")
    if row.get("prompt") is not None:
        # a pair row {prompt, chosen, rejected} is a demonstration of its chosen side
        field = "chosen" if row.get("response") is None and row.get("completion") is None and "chosen" in row else None
        return _prompt(row), _answer(_field(row, field or "response", "completion"), field or "response")
    if row.get("chosen") is not None:
        chosen = row["chosen"]
        if isinstance(chosen, str):
            return hh.parse_dialogue(chosen)
        return _split_conversation(_messages(chosen, "chosen"), "chosen")
    raise BadRecord("missing field 'prompt' (or 'messages')")


def _preference(row: Mapping) -> tuple[Prompt, str, str]:
    from rlhf_jax.data import hh

    if row.get("prompt") is not None:
        prompt = _prompt(row)
        chosen = _answer(_field(row, "chosen"), "chosen")
        rejected = _answer(_field(row, "rejected"), "rejected")
    else:
        chosen, rejected = _field(row, "chosen"), _field(row, "rejected")
        if isinstance(chosen, str) and isinstance(rejected, str):
            return hh.parse_pair(chosen, rejected)
        chosen_messages, rejected_messages = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        if chosen_messages == rejected_messages:
            raise BadRecord("chosen and rejected are identical")
        prompt, chosen = _split_conversation(chosen_messages, "chosen")
        rejected_prompt, rejected = _split_conversation(rejected_messages, "rejected")
        if prompt != rejected_prompt:
            raise BadRecord("chosen and rejected prompts differ (all messages before the last)")
    if chosen == rejected:
        raise BadRecord("chosen and rejected are identical")
    return prompt, chosen, rejected


def _prompt_record(row: Mapping) -> tuple[Prompt, str | None]:
    from rlhf_jax.data import hh

    if row.get("prompt") is not None:
        prompt = _prompt(row)
    elif row.get("messages") is not None:
        prompt = _messages(row["messages"], "messages")
        if not prompt:
            raise BadRecord("empty prompt")
    elif isinstance(row.get("chosen"), str):
        prompt = hh.dialogue_messages(hh.split_dialogue(row["chosen"])[0])
    elif row.get("chosen") is not None:
        prompt = _split_conversation(_messages(row["chosen"], "chosen"), "chosen")[0]
    else:
        raise BadRecord("missing field 'prompt' (or 'messages')")
    reference = row.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise BadRecord(f"field 'reference' must be text, got {type(reference).__name__}")
    return prompt, reference
