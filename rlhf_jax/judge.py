"""An AI judge (RLAIF): which of two responses a language model prefers, read from the log-probability of its verdict.

The judge reads a chat-formatted prompt, rendered with its own chat template: written principles, the
conversation, ``Response A: …``, ``Response B: …`` and the question "Which response is more helpful and harmless?
Answer with A or B.", followed by the opening of its own (assistant) turn. Its next-token log-probabilities of the
two verdict tokens give the preference logit

    logit = log p(A | judge prompt) − log p(B | judge prompt),

and σ(logit) is its probability that A is the better response (the two verdicts renormalised: Lee et al. 2023,
"RLAIF: Scaling Reinforcement Learning from Human Feedback with AI Feedback", §2.1, which scores the verdict
tokens' log-probabilities the same way; the principles follow Bai et al. 2022, "Constitutional AI: Harmlessness
from AI Feedback"). Language models favour one slot whatever it holds (position bias), so each pair is judged in
both orders and the two are averaged (Lee et al. 2023, §2.1.1):

    p(1 ≻ 2) = ½ [σ(logit_AB) + σ(−logit_BA)],

where logit_AB is judged with response 1 in slot A and logit_BA with response 1 in slot B.

The model call, :func:`verdict_logprobs`, is pure and jitted once per batch shape; masks come from the prompts'
lengths, never from token ids. The host side renders and truncates the prompts (:func:`judge_prompts`) and runs
them in batches of a fixed size, each padded to one of a few length buckets (:func:`judge_logprobs`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data.records import Preference, Prompt
from rlhf_jax.errors import UserError
from rlhf_jax.losses import logprobs_from_hidden
from rlhf_jax.losses.masked import last_token_index
from rlhf_jax.models import llama
from rlhf_jax.models.config import DecoderConfig

QUESTION = "Which response is more helpful and harmless? Answer with A or B."
VERDICTS = ("A", "B")  # the judge's answer for slot A (first) and slot B (second)
ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
ELLIPSIS = "…"  # marks where a conversation or a response was cut
MIN_RESPONSE_TOKENS = 16  # the judge prompt must leave at least this much of each response


# ---- the model call (pure) --------------------------------------------------------------------------------------


def verdict_logprobs(config: DecoderConfig, params, tokens: jax.Array, attention_mask: jax.Array,
                     verdict_ids: jax.Array) -> jax.Array:
    """Next-token log-probabilities of the verdict tokens after each prompt: log p(v_k | prompt_b).

    tokens, attention_mask: [B, T] (left- or right-padded: a prompt's last token is the last True of its mask);
    verdict_ids: [K] int32. One teacher-forced forward pass; the LM head runs at each prompt's last position only.
    Returns [B, K] float32.
    """
    rows, num_verdicts = tokens.shape[0], verdict_ids.shape[0]
    out = llama.forward(config, params, tokens, None, attention_mask, None, compute_logits=False)
    last = last_token_index(attention_mask)
    hidden = jnp.take_along_axis(out.hidden, last[:, None, None], axis=1)  # [B, 1, D]
    hidden = jnp.broadcast_to(hidden, (rows, num_verdicts, hidden.shape[-1]))
    targets = jnp.broadcast_to(verdict_ids.astype(jnp.int32), (rows, num_verdicts))
    return logprobs_from_hidden(hidden, llama.unembedding(config, params), targets, seq_chunk=None)


def preference_logit(verdict_logprobs: jax.Array) -> jax.Array:
    """logit = log p(A) − log p(B): [..., 2] -> [...]; σ(logit) is the judge's probability that A is better."""
    return verdict_logprobs[..., 0] - verdict_logprobs[..., 1]


def combined_preference(logit_ab, logit_ba):
    """The judge's preference for response 1, position bias averaged out: p(1 ≻ 2) = ½ [σ(logit_AB) + σ(−logit_BA)].

    logit_ab: [N] judged with response 1 in slot A; logit_ba: [N] with response 1 in slot B. Returns [N] in [0, 1];
    p > ½ exactly when logit_AB > logit_BA (σ is increasing), the comparison to decide by.
    """
    return 0.5 * (jax.nn.sigmoid(logit_ab) + jax.nn.sigmoid(-jnp.asarray(logit_ba)))


_verdict_logprobs = jax.jit(verdict_logprobs, static_argnums=0)  # compiled once per (config, batch shape)


# ---- judge prompts (host) ---------------------------------------------------------------------------------------


def conversation_text(prompt: Prompt) -> str:
    """The conversation as the judge reads it: ``User: …`` / ``Assistant: …`` turns (a text prompt as it is)."""
    if isinstance(prompt, str):
        return prompt.strip()
    return "\n\n".join(f"{ROLE_NAMES[message.role]}: {message.content.strip()}" for message in prompt)


def judge_content(principles: str, conversation: str, first: str, second: str) -> str:
    """The judge's user message: principles, conversation, the two responses in slots A and B, the question."""
    return (f"{principles.strip()}\n\nConversation:\n{conversation}\n\nResponse A: {first}\n\n"
            f"Response B: {second}\n\n{QUESTION}")


def render_judge_prompt(tokenizer, principles: str, conversation: str, first: str, second: str) -> str:
    """The judge prompt in the judge's chat template, ending with the opening of its turn (the generation prompt)."""
    messages = [{"role": "user", "content": judge_content(principles, conversation, first, second)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _encode(tokenizer, text: str) -> list[int]:
    # the chat template writes its own special tokens
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def verdict_token_ids(tokenizer, principles: str) -> tuple[int, ...]:
    """The token each verdict (``A``, ``B``) opens the judge's turn with, as the template makes it: the one token
    that ``judge prompt + verdict`` adds to the judge prompt's tokens (SmolLM2: ``A`` = 49 after
    ``<|im_start|>assistant\\n``, not `` A`` = 330). `UserError` when a verdict is not one such token."""
    prompt = render_judge_prompt(tokenizer, principles, "User: Hello.", "Hi!", "Hello!")
    prompt_ids = _encode(tokenizer, prompt)
    ids = []
    for verdict in VERDICTS:
        extended = _encode(tokenizer, prompt + verdict)
        if extended[: len(prompt_ids)] != prompt_ids or len(extended) != len(prompt_ids) + 1:
            raise UserError(f"the judge's tokenizer does not write the verdict {verdict!r} as one token after its "
                            "chat template's generation prompt; use a judge with another tokenizer")
        ids.append(extended[-1])
    if len(set(ids)) != len(ids):
        raise UserError(f"the judge's tokenizer writes the verdicts {VERDICTS} as the same token")
    return tuple(ids)


def _keep_end(tokenizer, text: str, budget: int) -> tuple[str, bool]:
    """`text` cut to (about) its last `budget` tokens, marked with an ellipsis; and whether it was cut."""
    ids = _encode(tokenizer, text)
    if len(ids) <= budget:
        return text, False
    return ELLIPSIS + tokenizer.decode(ids[len(ids) - max(budget - 1, 1):]).lstrip(), True


def _keep_start(tokenizer, text: str, budget: int) -> tuple[str, bool]:
    """`text` cut to (about) its first `budget` tokens, marked with an ellipsis; and whether it was cut."""
    ids = _encode(tokenizer, text)
    if len(ids) <= budget:
        return text, False
    return tokenizer.decode(ids[: max(budget - 1, 1)]).rstrip() + ELLIPSIS, True


def _share(room: int, first: int, second: int) -> tuple[int, int]:
    """Token budgets of two responses of `first` and `second` tokens in `room` tokens: a short one is kept whole,
    the long one gets the rest; two long ones get half each."""
    if first + second <= room:
        return first, second
    half = room // 2
    if first <= half:
        return first, room - first
    if second <= half:
        return room - second, second
    return half, room - half


@dataclasses.dataclass(frozen=True)
class JudgePrompts:
    """One pair's judge prompts as token ids: `input_order` has response 1 (the input's chosen) in slot A,
    `swapped_order` has it in slot B; `truncated`: the conversation or a response was cut to fit."""

    input_order: list[int]
    swapped_order: list[int]
    truncated: bool


def prompt_overhead(tokenizer, principles: str) -> int:
    """Tokens of a judge prompt around the conversation and the responses (template, principles, question)."""
    return len(_encode(tokenizer, render_judge_prompt(tokenizer, principles, "", "", "")))


def check_budget(tokenizer, principles: str, max_length: int, max_conversation_length: int) -> None:
    """`UserError` unless a judge prompt of `max_length` tokens leaves room for both responses."""
    overhead = prompt_overhead(tokenizer, principles)
    needed = overhead + max_conversation_length + 2 * MIN_RESPONSE_TOKENS
    if max_length < needed:
        raise UserError(f"data.max_length={max_length} is too short for a judge prompt: the principles, question and "
                        f"template take {overhead} tokens and the conversation up to data.max_prompt_length="
                        f"{max_conversation_length}; set data.max_length to {needed} or more (or lower "
                        "data.max_prompt_length)")


def judge_prompts(tokenizer, principles: str, pair: Preference, max_length: int,
                  max_conversation_length: int) -> JudgePrompts:
    """The pair's judge prompts in both orders, each at most `max_length` tokens.

    The conversation keeps its last `max_conversation_length` tokens (the latest turns); the responses share the
    rest (`_share`), each keeping its start. Both orders hold the same (cut) texts. Run `check_budget` first.
    """
    conversation, cut = _keep_end(tokenizer, conversation_text(pair.prompt), max_conversation_length)
    room = max_length - len(_encode(tokenizer, render_judge_prompt(tokenizer, principles, conversation, "", "")))
    lengths = [len(_encode(tokenizer, text)) for text in (pair.chosen, pair.rejected)]
    for _ in range(8):  # re-tokenised in context a cut text may take a token or two more: shrink and retry
        assert room >= 2, f"no room for the responses in a judge prompt of {max_length} tokens"
        (first, cut_first), (second, cut_second) = (
            _keep_start(tokenizer, text, budget) for text, budget in zip((pair.chosen, pair.rejected),
                                                                          _share(room, *lengths)))
        input_order = _encode(tokenizer, render_judge_prompt(tokenizer, principles, conversation, first, second))
        swapped = _encode(tokenizer, render_judge_prompt(tokenizer, principles, conversation, second, first))
        excess = max(len(input_order), len(swapped)) - max_length
        if excess <= 0:
            return JudgePrompts(input_order, swapped, cut or cut_first or cut_second)
        room -= excess
    raise AssertionError(f"judge prompt of {pair.origin} does not fit in {max_length} tokens")


# ---- batches (host) ---------------------------------------------------------------------------------------------


def length_buckets(max_length: int, smallest: int = 64) -> tuple[int, ...]:
    """Padded prompt lengths: 64, 96, 128, 192, 256, 384, ... (two per octave: at most a third of a row is padding)
    below `max_length`, then `max_length`; few shapes, few compiled programs."""
    buckets, octave = [], smallest
    while octave < max_length:
        buckets.extend(size for size in (octave, octave * 3 // 2) if size < max_length)
        octave *= 2
    return (*buckets, max_length)


def left_padded(prompts: Sequence[Sequence[int]], rows: int, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens [rows, length] int32 with every prompt ending at column length − 1, and the mask of real tokens
    [rows, length] bool, from the prompts' lengths (rows past the prompts are all padding)."""
    tokens = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), bool)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt):] = prompt
        mask[row, length - len(prompt):] = True
    return tokens, mask


def judge_logprobs(config: DecoderConfig, params, prompts: Sequence[Sequence[int]], verdict_ids: Sequence[int], *,
                   batch_size: int, buckets: Sequence[int], pad_id: int,
                   on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """log p(v_k | prompt) of each verdict token after each prompt: [N, K] float32, in the prompts' order
    (`preference_logit` of it is log p(A) − log p(B)).

    Prompts run shortest first, `batch_size` at a time (the last batch filled with padding rows), each batch
    left-padded to the smallest of `buckets` holding its longest prompt: at most `len(buckets)` compiled programs.
    `on_batch(prompts done)` is called after each batch.
    """
    from rlhf_jax.data.batching import bucket_length

    order = np.argsort([len(prompt) for prompt in prompts], kind="stable")
    verdicts = jnp.asarray(verdict_ids, jnp.int32)
    logprobs = np.zeros((len(prompts), len(verdict_ids)), np.float32)
    for start in range(0, len(prompts), batch_size):
        rows = order[start:start + batch_size]
        length = bucket_length(max(len(prompts[i]) for i in rows), buckets)
        tokens, mask = left_padded([prompts[i] for i in rows], batch_size, length, pad_id)
        logprobs[rows] = np.asarray(_verdict_logprobs(config, params, tokens, mask, verdicts))[: len(rows)]
        if on_batch is not None:
            on_batch(start + len(rows))
    return logprobs
