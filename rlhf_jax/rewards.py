"""Reward sources: every way of scoring a rollout behind one interface, and the registries of reward functions.

A *reward source* scores a batch of rollouts (`ScoringBatch`: left-padded prompts, right-padded responses,
reference answers) with raw scores `[B]` float32; `combine` sums several with weights and logs each on its
own as `reward/<name>`. Three kinds, all built from spec strings by `build_reward_sources`:

    fn:NAME[:ARG...]      TokenReward: a pure jax function of token ids (jitted)
    text:NAME[:ARG...]    TextReward: a Python function of the decoded response, reference answer and prompt
    anything else         ModelReward: a reward model (the head at the last response token), loaded by the caller

Token reward functions (`fn:`) have the signature

    fn(prompt_tokens [B, P], prompt_mask [B, P], response_tokens [B, N], response_mask [B, N]) -> scores [B]

are pure `jax.numpy` (jittable, vmappable) and return float32. Masks are bool or {0, 1}; `response_mask`
is True up to and including the EOS token, as the sampler returns it.

    fn:target_token_fraction:123     fraction of response tokens equal to id 123
    fn:length                        response length in tokens
    fn:length:0.01                   0.01 × response length

Text reward functions (`text:`) have the signature `fn(response_text, reference, prompt_text) -> float`:

    text:arith_exact                 1 if the response's answer equals the integer reference answer, else 0

`get_reward_function(spec)` / `get_text_reward(spec)` build one; `register_reward_function(name,
description)` / `register_text_reward(name, description)` add a factory. See docs/rewards.md.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, NamedTuple, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.errors import UserError
from rlhf_jax.losses import last_token_index
from rlhf_jax.models import llama
from rlhf_jax.tasks.arithmetic import exact_answer_reward
from rlhf_jax.trainers.common import over_group_rows

RewardFunction = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
TextRewardFunction = Callable[[str, "str | None", str], float]  # (response_text, reference, prompt_text) -> score
SPEC_PREFIX = "fn:"
TEXT_SPEC_PREFIX = "text:"


# ---- registries: a spec `PREFIX NAME[:ARG...]` names a factory and its numeric arguments ------------------


@dataclasses.dataclass(frozen=True)
class RewardFactory:
    name: str
    description: str  # one line
    build: Callable[..., Callable]  # numeric arguments of the spec -> reward function


@dataclasses.dataclass(frozen=True)
class Registry:
    """Factories chosen by name from a spec `PREFIX NAME[:ARG...]`, arguments numbers; `noun` names them in errors."""

    prefix: str
    noun: str
    factories: dict[str, RewardFactory] = dataclasses.field(default_factory=dict)

    def register(self, name: str, description: str) -> Callable:
        """Decorator registering `build(*numbers) -> function` as `PREFIX<name>[:arg[:arg...]]`."""

        def decorator(build: Callable[..., Callable]) -> Callable[..., Callable]:
            existing = self.factories.get(name)
            if existing is not None and existing.build.__qualname__ != build.__qualname__:
                raise ValueError(f"{self.noun} {name!r} is registered twice")
            self.factories[name] = RewardFactory(name, description, build)
            return build

        return decorator

    def is_spec(self, spec: str) -> bool:
        return str(spec).startswith(self.prefix)

    def parse(self, spec: str) -> tuple[str, tuple[int | float, ...]]:
        """`"PREFIX NAME:ARG:ARG"` (the prefix optional) -> (NAME, numeric arguments)."""
        body = str(spec).removeprefix(self.prefix)
        name, *arguments = body.split(":")
        if not name:
            raise UserError(f"{self.noun} {spec!r}: expected {self.prefix}NAME[:ARG...]")
        return name, tuple(self._number(argument, spec) for argument in arguments)

    def _number(self, text: str, spec: str) -> int | float:
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        raise UserError(f"{self.noun} {spec!r}: argument {text!r} is not a number")

    def usage(self, name: str) -> str:
        """`PREFIX NAME:ARG[:OPTIONAL]` for a registered factory."""
        usage = f"{self.prefix}{name}"
        for parameter in inspect.signature(self.factories[name].build).parameters.values():
            optional = parameter.default is not inspect.Parameter.empty
            usage += f"[:{parameter.name.upper()}]" if optional else f":{parameter.name.upper()}"
        return usage

    def describe(self) -> str:
        """One line per registered factory: its usage and description."""
        return "\n".join(f"{self.usage(name)}  {self.factories[name].description}" for name in sorted(self.factories))

    def get(self, spec: str) -> Callable:
        """The function a spec names; `UserError` for an unknown name (listing the known ones) or bad arguments."""
        name, arguments = self.parse(spec)
        factory = self.factories.get(name)
        if factory is None:
            raise UserError(f"unknown {self.noun} {name!r} in {spec!r}; expected one of "
                            f"{', '.join(sorted(self.factories))}")
        try:
            inspect.signature(factory.build).bind(*arguments)
        except TypeError:
            raise UserError(f"{self.noun} {spec!r}: expected {self.usage(name)}") from None
        return factory.build(*arguments)


TOKEN_REWARDS = Registry(SPEC_PREFIX, "reward function")
TEXT_REWARDS = Registry(TEXT_SPEC_PREFIX, "text reward")
REWARD_FUNCTIONS: dict[str, RewardFactory] = TOKEN_REWARDS.factories

register_reward_function = TOKEN_REWARDS.register
is_reward_function_spec = TOKEN_REWARDS.is_spec
parse_reward_spec = TOKEN_REWARDS.parse
reward_function_usage = TOKEN_REWARDS.usage
describe_reward_functions = TOKEN_REWARDS.describe
get_reward_function: Callable[[str], RewardFunction] = TOKEN_REWARDS.get

register_text_reward = TEXT_REWARDS.register
is_text_reward_spec = TEXT_REWARDS.is_spec
describe_text_rewards = TEXT_REWARDS.describe
get_text_reward: Callable[[str], TextRewardFunction] = TEXT_REWARDS.get


# ---- token reward functions (`fn:`) ------------------------------------------------------------------------


def _response_lengths(response_mask: jax.Array) -> jax.Array:
    return jnp.sum(response_mask.astype(bool), axis=-1).astype(jnp.float32)


@register_reward_function("target_token_fraction", "fraction of response tokens equal to TOKEN_ID (0 if empty)")
def target_token_fraction(token_id: int) -> RewardFunction:
    """`score = Σ_t m_t [y_t = token_id] / max(Σ_t m_t, 1)`: in [0, 1], 0 for an empty response.

    Maximised by a policy that emits `token_id` and nothing else (its EOS counts as a response token).
    """
    if int(token_id) != token_id or token_id < 0:
        raise UserError(f"target_token_fraction: the token id must be a non-negative integer, got {token_id}")
    token_id = int(token_id)

    def reward(prompt_tokens, prompt_mask, response_tokens, response_mask):
        del prompt_tokens, prompt_mask
        mask = response_mask.astype(bool)
        hits = jnp.sum(mask & (response_tokens == token_id), axis=-1).astype(jnp.float32)
        return hits / jnp.maximum(_response_lengths(mask), 1.0)

    return reward


@register_reward_function("token_id_below", "fraction of response tokens with an id below THRESHOLD (0 if empty)")
def token_id_below(threshold: int) -> RewardFunction:
    """`score = Σ_t m_t [y_t < threshold] / max(Σ_t m_t, 1)`: in [0, 1], 0 for an empty response.

    A smoke-test reward any random model can learn: with `threshold` half the vocabulary an untrained
    policy scores about 0.5, with spread between samples, and the optimum is far away.
    """
    if int(threshold) != threshold or threshold < 1:
        raise UserError(f"token_id_below: the threshold must be a positive integer, got {threshold}")
    threshold = int(threshold)

    def reward(prompt_tokens, prompt_mask, response_tokens, response_mask):
        del prompt_tokens, prompt_mask
        mask = response_mask.astype(bool)
        hits = jnp.sum(mask & (response_tokens < threshold), axis=-1).astype(jnp.float32)
        return hits / jnp.maximum(_response_lengths(mask), 1.0)

    return reward


@register_reward_function("length", "SCALE × response length in tokens, EOS included (SCALE defaults to 1)")
def length(scale: float = 1.0) -> RewardFunction:
    """`score = scale · Σ_t m_t`: the response length in tokens (EOS included), scaled."""
    scale = float(scale)

    def reward(prompt_tokens, prompt_mask, response_tokens, response_mask):
        del prompt_tokens, prompt_mask, response_tokens
        return scale * _response_lengths(response_mask)

    return reward


# ---- text reward functions (`text:`) -----------------------------------------------------------------------


def _integer_reference(reference: Any) -> int:
    if reference is None:
        raise UserError("no reference answer (the prompt record needs an integer `reference`)")
    try:
        return int(str(reference).strip())
    except ValueError:
        raise UserError(f"the reference answer {reference!r} is not an integer") from None


@register_text_reward("arith_exact", "1 if the response's answer equals the integer reference answer, else 0")
def arith_exact() -> TextRewardFunction:
    """`score = [parse_answer(response) = int(reference)]` (`rlhf_jax.tasks.arithmetic.exact_answer_reward`).

    A missing or non-integer reference is a `UserError`: the prompt data does not fit this reward.
    """

    def reward(response_text: str, reference: str | None, prompt_text: str) -> float:
        del prompt_text
        return exact_answer_reward(response_text, _integer_reference(reference))

    return reward


# ---- reward sources ------------------------------------------------------------------------------------------


class ScoringBatch(NamedTuple):
    """What every reward source scores: a batch of rollouts as the sampler returns them."""

    prompt_tokens: jax.Array  # [B, P] int32, left-padded
    prompt_mask: jax.Array  # [B, P] bool
    response_tokens: jax.Array  # [B, N] int32, right-padded
    response_mask: jax.Array  # [B, N] bool, True up to and including EOS
    references: tuple  # B entries: the prompt record's reference answer (str) or None
    group_size: int = 1  # > 1: contiguous groups of this many rows share their prompt, computed once by models


@runtime_checkable
class RewardSource(Protocol):
    name: str  # metrics log its mean raw score as f"reward/{name}"

    def __call__(self, batch: ScoringBatch) -> jax.Array:
        """Raw scores [B] float32 (a device or a numpy array)."""
        ...


def model_scores(config, params, prompt_tokens, prompt_mask, response_tokens, response_mask,
                 group_size: int = 1) -> jax.Array:
    """A reward model's scores [B]: its head at the last real token of `[prompt (left-padded) | response]`.

    The sequence is the prompt's P columns then the response's N; its mask is the two masks side by side,
    so the score lands on the last response token (EOS when there is one), or on the last prompt token for an
    empty response. As `trainers.ppo.make_experience` scores.

    group_size: rows come in contiguous groups of this many with the same prompt, and the backbone runs each
    group's prompt once (`trainers.common.prompt_group_rows`); the same scores to float rounding.
    """
    tokens = jnp.concatenate([prompt_tokens, response_tokens], axis=1).astype(jnp.int32)
    attention_mask = jnp.concatenate([prompt_mask.astype(bool), response_mask.astype(bool)], axis=1)
    if group_size == 1:
        return llama.rewards_forward(config, params, tokens, attention_mask).astype(jnp.float32)
    values, slots = over_group_rows(lambda *rows, **layout: llama.values_forward(config, params, *rows, **layout),
                                    tokens, attention_mask, prompt_tokens.shape[1], group_size)  # [B/G, L]
    member = jnp.arange(tokens.shape[0]) % group_size
    slot = slots[member, last_token_index(attention_mask)]
    return values[jnp.arange(tokens.shape[0]) // group_size, slot].astype(jnp.float32)


class ModelReward:
    """A reward model `{"backbone", "head"}` as a reward source; compiled once per instance and batch shape.

    Scores are normalised as `(score − mean) / std` with `normalisation` = (mean, std), the statistics its
    reward stage recorded (`reward_mean`, `reward_std` in the artifact's metadata; (0, 1) when absent), so
    sources of different scales can be weighted and summed.
    """

    def __init__(self, name: str, config, params, normalisation: tuple[float, float] = (0.0, 1.0)):
        self.name, self.config, self.params = name, config, params
        self.normalisation = (float(normalisation[0]), float(normalisation[1]) or 1.0)
        self._score = jax.jit(functools.partial(model_scores, config), static_argnums=5)

    def __call__(self, batch: ScoringBatch) -> jax.Array:
        mean, std = self.normalisation
        scores = self._score(self.params, batch.prompt_tokens, batch.prompt_mask, batch.response_tokens,
                             batch.response_mask, batch.group_size)
        return (scores - jnp.float32(mean)) / jnp.float32(std)

    def __repr__(self) -> str:
        return f"ModelReward({self.name!r})"


class TokenReward:
    """A token reward function (`fn:` spec) as a reward source, jitted."""

    def __init__(self, name: str, fn: RewardFunction):
        self.name, self.fn = name, fn
        self._score = jax.jit(lambda *arrays: fn(*arrays).astype(jnp.float32))

    def __call__(self, batch: ScoringBatch) -> jax.Array:
        return self._score(batch.prompt_tokens, batch.prompt_mask, batch.response_tokens, batch.response_mask)

    def __repr__(self) -> str:
        return f"TokenReward({self.name!r})"


class TextReward:
    """A text reward function (`text:` spec) as a reward source, on the host.

    Each row's response is its tokens where `response_mask` holds (EOS included, then dropped with the other
    special tokens by `tokenizer.decode(ids, skip_special_tokens=True)`), its prompt likewise: never cut at a
    token id, since pad = EOS for some tokenizers. A `UserError` from `fn` is re-raised naming the row.
    """

    def __init__(self, name: str, fn: TextRewardFunction, tokenizer):
        self.name, self.fn, self.tokenizer = name, fn, tokenizer

    def __call__(self, batch: ScoringBatch) -> np.ndarray:
        prompt_tokens, prompt_mask, response_tokens, response_mask = (
            np.asarray(array) for array in (batch.prompt_tokens, batch.prompt_mask, batch.response_tokens,
                                            batch.response_mask))
        if len(batch.references) != len(response_tokens):
            raise ValueError(f"{len(batch.references)} references for {len(response_tokens)} responses")
        scores = np.zeros(len(response_tokens), np.float32)
        for row, reference in enumerate(batch.references):
            response = self._decode(response_tokens[row][response_mask[row].astype(bool)])
            prompt = self._decode(prompt_tokens[row][prompt_mask[row].astype(bool)])
            try:
                scores[row] = self.fn(response, reference, prompt)
            except UserError as error:
                raise UserError(f"text reward {self.name!r}, row {row} of the batch: {error}") from None
        return scores

    def _decode(self, ids: np.ndarray) -> str:
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"TextReward({self.name!r})"


def source_scores(sources: Sequence[RewardSource], weights: Sequence[float],
                  batch: ScoringBatch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Each source's raw scores and their weighted sum: `(total [B] float32, {name: scores [B]})`, with
    `total = Σ_i w_i · score_i`. A source of weight 0 is scored but left out of the sum (so a NaN it returns
    cannot reach the total: 0 · NaN = NaN)."""
    if len(weights) != len(sources):
        raise UserError(f"{len(weights)} reward weights for {len(sources)} reward sources "
                        f"({', '.join(source.name for source in sources)})")
    names = [source.name for source in sources]
    if not sources or len(set(names)) != len(names):
        raise ValueError(f"expected one or more reward sources with distinct names, got {names}")
    batch_size = batch.response_tokens.shape[0]
    total = jnp.zeros((batch_size,), jnp.float32)
    by_source = {}
    for source, weight in zip(sources, weights):
        scores = jnp.asarray(source(batch), jnp.float32)
        assert scores.shape == (batch_size,), (source.name, scores.shape)
        by_source[source.name] = scores
        if weight != 0:
            total = total + jnp.float32(weight) * scores
    return total, by_source


def combine(sources: Sequence[RewardSource], weights: Sequence[float],
            batch: ScoringBatch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum of reward sources (`source_scores`) and the metrics: `reward/<name>` = mean raw score of
    each source over the batch (each objective logged on its own, before weighting)."""
    total, by_source = source_scores(sources, weights, batch)
    return total, {f"reward/{name}": jnp.mean(scores) for name, scores in by_source.items()}


# ---- sources from specs --------------------------------------------------------------------------------------


_MODEL_KINDS = {"lm": "a language model", "scalar": "a reward model"}


def check_reward_specs(specs: Sequence[str], has_tokenizer: bool = True) -> None:
    """Validate the `fn:` and `text:` specs (names, arguments, a tokenizer for text) without loading any model."""
    if not specs:
        raise UserError("no reward sources: give a reward model, fn:NAME or text:NAME")
    for spec in specs:
        if is_reward_function_spec(spec):
            get_reward_function(spec)
        elif is_text_reward_spec(spec):
            get_text_reward(spec)
            if not has_tokenizer:
                raise UserError(f"reward {spec!r}: a text reward needs a tokenizer to decode the responses, "
                                f"and there is none")


def build_reward_sources(specs: Sequence[str], load_model: Callable[[str], tuple[Any, Any, str, dict]],
                         tokenizer=None) -> list[RewardSource]:
    """One reward source per spec, in order: `fn:...` a TokenReward, `text:...` a TextReward (needs
    `tokenizer`), anything else a ModelReward from `load_model(spec) -> (config, params, kind, metadata)`, where
    kind must be "scalar" (metadata: the artifact's, for `reward_mean` / `reward_std`). Every `fn:`/`text:` spec
    is checked before any model is loaded.

    Names: the function's name for `fn:`/`text:` (`arith_exact`), `rm` for a model; a repeated name gets
    `_2`, `_3`, ... in order.
    """
    check_reward_specs(specs, has_tokenizer=tokenizer is not None)
    sources: list[RewardSource] = []
    taken: dict[str, int] = {}
    for spec in specs:
        base = _source_name(spec)
        taken[base] = taken.get(base, 0) + 1
        name = base if taken[base] == 1 else f"{base}_{taken[base]}"
        if is_reward_function_spec(spec):
            sources.append(TokenReward(name, get_reward_function(spec)))
        elif is_text_reward_spec(spec):
            sources.append(TextReward(name, get_text_reward(spec), tokenizer))
        else:
            config, params, metadata = _reward_model(spec, load_model)
            sources.append(ModelReward(name, config, params, (metadata.get("reward_mean", 0.0),
                                                              metadata.get("reward_std", 1.0))))
    return sources


def _source_name(spec: str) -> str:
    if is_reward_function_spec(spec):
        return TOKEN_REWARDS.parse(spec)[0]
    if is_text_reward_spec(spec):
        return TEXT_REWARDS.parse(spec)[0]
    return "rm"


def _reward_model(spec: str, load_model: Callable[[str], tuple[Any, Any, str, dict]]) -> tuple[Any, Any, dict]:
    config, params, kind, metadata = load_model(spec)
    if kind != "scalar":
        raise UserError(f"reward {spec!r}: {_MODEL_KINDS.get(kind, f'a model of kind {kind!r}')}, "
                        f"expected a reward model")
    return config, params, metadata or {}
