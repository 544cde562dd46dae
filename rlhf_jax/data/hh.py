"""HH-RLHF dialogues: ``"\n\nHuman: ...\n\nAssistant: ..."`` strings split into chat messages.

A pair stores two whole dialogues that share everything up to and including the last
``"\n\nAssistant:"``; that shared text is the prompt and the rest of each side is its final answer.
"""

from __future__ import annotations

import re

from rlhf_jax.data.records import BadRecord, Message

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}
_LABELS = {"user": "Human", "assistant": "Assistant"}


def split_dialogue(text: str) -> tuple[str, str]:
    """``(prompt, answer)``: prompt = text up to and including the last ``"\n\nAssistant:"``, answer = the rest."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise BadRecord("no assistant turn (no '\\n\\nAssistant:' marker)")
    cut += len(ASSISTANT)
    return text[:cut], text[cut:]


def dialogue_messages(prompt: str) -> tuple[Message, ...]:
    """The turns of an HH prompt (ending in ``"\n\nAssistant:"``) as messages, contents stripped.

    The final empty assistant turn is the one to be answered and is left out.
    """
    if prompt.startswith(("Human:", "Assistant:")):
        prompt = "\n\n" + prompt
    turns = _TURN.split(prompt)
    # turns = [text before the first marker, role, content, role, content, ...]
    if turns[0].strip():
        raise BadRecord("dialogue does not start with a '\\n\\nHuman:' turn")
    roles, contents = turns[1::2], turns[2::2]
    assert roles and roles[-1] == "Assistant" and not contents[-1].strip(), prompt[-40:]
    messages = tuple(Message(_ROLES[role], content.strip()) for role, content in zip(roles[:-1], contents[:-1]))
    if not messages:
        raise BadRecord("dialogue has no Human turn before the final answer")
    return messages


def render_dialogue(messages: tuple[Message, ...]) -> str:
    """Messages back in HH text form, ending in ``"\n\nAssistant:"`` (the raw-text prompt format)."""
    parts = []
    for message in messages:
        label = _LABELS.get(message.role, message.role.capitalize())
        parts.append(f"\n\n{label}: {message.content}")
    return "".join(parts) + ASSISTANT


def parse_pair(chosen: str, rejected: str) -> tuple[tuple[Message, ...], str, str]:
    """``(prompt messages, chosen answer, rejected answer)`` of an HH pair; raises `BadRecord`.

    Bad: a side without an assistant turn, identical sides, prompts that differ, an empty answer.
    """
    if ASSISTANT not in chosen or ASSISTANT not in rejected:
        sides = [name for name, text in (("chosen", chosen), ("rejected", rejected)) if ASSISTANT not in text]
        raise BadRecord(f"no assistant turn in {' and '.join(sides)} (no '\\n\\nAssistant:' marker)")
    if chosen == rejected:
        raise BadRecord("chosen and rejected are identical")
    chosen_prompt, chosen_answer = split_dialogue(chosen)
    rejected_prompt, rejected_answer = split_dialogue(rejected)
    if chosen_prompt != rejected_prompt:
        raise BadRecord("chosen and rejected prompts differ (the text up to the last '\\n\\nAssistant:')")
    empty = [name for name, answer in (("chosen", chosen_answer), ("rejected", rejected_answer)) if not answer.strip()]
    if empty:
        raise BadRecord(f"empty response ({' and '.join(empty)})")
    return dialogue_messages(chosen_prompt), chosen_answer.strip(), rejected_answer.strip()


def parse_dialogue(text: str) -> tuple[tuple[Message, ...], str]:
    """``(prompt messages, final answer)`` of one HH dialogue; raises `BadRecord`."""
    prompt, answer = split_dialogue(text)
    if not answer.strip():
        raise BadRecord("empty response")
    return dialogue_messages(prompt), answer.strip()
