"""Programmatic reward functions, chosen by name: scores computed from token ids instead of a reward model.

For tests of PPO (a reward whose optimum is known) and for verifiable rewards. Every reward function has
the signature

    fn(prompt_tokens [B, P], prompt_mask [B, P], response_tokens [B, N], response_mask [B, N]) -> scores [B]

is pure `jax.numpy` (jittable, vmappable) and returns float32. Masks are bool or {0, 1}; `response_mask`
is True up to and including the EOS token, as the sampler returns it. A spec names one and its arguments:

    fn:target_token_fraction:123     fraction of response tokens equal to id 123
    fn:length                        response length in tokens
    fn:length:0.01                   0.01 × response length

`get_reward_function(spec)` builds one; `register_reward_function(name, description)` adds a factory.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

import jax
import jax.numpy as jnp

from rlhf_jax.errors import UserError

RewardFunction = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
SPEC_PREFIX = "fn:"


@dataclasses.dataclass(frozen=True)
class RewardFactory:
    name: str
    description: str  # one line
    build: Callable[..., RewardFunction]  # numeric arguments of the spec -> reward function


REWARD_FUNCTIONS: dict[str, RewardFactory] = {}


def register_reward_function(name: str, description: str) -> Callable:
    """Decorator registering `build(*numbers) -> RewardFunction` as `fn:<name>[:arg[:arg...]]`."""

    def decorator(build: Callable[..., RewardFunction]) -> Callable[..., RewardFunction]:
        existing = REWARD_FUNCTIONS.get(name)
        if existing is not None and existing.build.__qualname__ != build.__qualname__:
            raise ValueError(f"reward function {name!r} is registered twice")
        REWARD_FUNCTIONS[name] = RewardFactory(name, description, build)
        return build

    return decorator


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


@register_reward_function("length", "SCALE × response length in tokens, EOS included (SCALE defaults to 1)")
def length(scale: float = 1.0) -> RewardFunction:
    """`score = scale · Σ_t m_t`: the response length in tokens (EOS included), scaled."""
    scale = float(scale)

    def reward(prompt_tokens, prompt_mask, response_tokens, response_mask):
        del prompt_tokens, prompt_mask, response_tokens
        return scale * _response_lengths(response_mask)

    return reward


def is_reward_function_spec(spec: str) -> bool:
    return str(spec).startswith(SPEC_PREFIX)


def _number(text: str, spec: str) -> int | float:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    raise UserError(f"reward function {spec!r}: argument {text!r} is not a number")


def parse_reward_spec(spec: str) -> tuple[str, tuple[int | float, ...]]:
    """`"fn:NAME:ARG:ARG"` (the `fn:` prefix optional) -> (NAME, numeric arguments)."""
    body = str(spec).removeprefix(SPEC_PREFIX)
    name, *arguments = body.split(":")
    if not name:
        raise UserError(f"reward function {spec!r}: expected fn:NAME[:ARG...]")
    return name, tuple(_number(argument, spec) for argument in arguments)


def reward_function_usage(name: str) -> str:
    """`fn:NAME:ARG[:OPTIONAL]` for a registered reward function."""
    usage = f"{SPEC_PREFIX}{name}"
    for parameter in inspect.signature(REWARD_FUNCTIONS[name].build).parameters.values():
        optional = parameter.default is not inspect.Parameter.empty
        usage += f"[:{parameter.name.upper()}]" if optional else f":{parameter.name.upper()}"
    return usage


def describe_reward_functions() -> str:
    """One line per registered reward function: its usage and description."""
    return "\n".join(f"{reward_function_usage(name)}  {REWARD_FUNCTIONS[name].description}"
                     for name in sorted(REWARD_FUNCTIONS))


def get_reward_function(spec: str) -> RewardFunction:
    """The reward function a spec names; `UserError` for an unknown name (listing the known ones) or bad
    arguments."""
    name, arguments = parse_reward_spec(spec)
    factory = REWARD_FUNCTIONS.get(name)
    if factory is None:
        raise UserError(f"unknown reward function {name!r} in {spec!r}; expected one of "
                        f"{', '.join(sorted(REWARD_FUNCTIONS))}")
    try:
        inspect.signature(factory.build).bind(*arguments)
    except TypeError:
        raise UserError(f"reward function {spec!r}: expected {reward_function_usage(name)}") from None
    return factory.build(*arguments)
