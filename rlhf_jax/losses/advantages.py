"""Generalised advantage estimation (Schulman et al. 2016) over masked token sequences, and whitening."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from rlhf_jax.losses.masked import as_bool, as_float, masked_whiten


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimates and returns, by a reverse ``lax.scan`` over the valid tokens.

    ``δ_t = r_t + γ V_{t'} − V_t``,  ``A_t = δ_t + γλ A_{t'}``,  ``R_t = A_t + V_t``,

    where ``t'`` is the next valid position after ``t`` (masked positions are skipped, so a masked-out gap
    inside a response does not break the recursion) and ``V_{t'} = A_{t'} = 0`` past the last valid token
    (the episode ends there: bootstrap value 0). Advantages and returns at masked positions are 0, and what
    rewards/values hold there (even NaN) is ignored.

    rewards, values, mask: [B, T] (any leading axes); gamma γ, lam λ: scalars (may be traced).
    Returns ``(advantages, returns)``, each [B, T] float32.
    """
    rewards = as_float(rewards)
    values = as_float(values)
    dtype = jnp.promote_types(rewards.dtype, values.dtype)
    rewards, values = jnp.broadcast_arrays(rewards.astype(dtype), values.astype(dtype))
    mask = jnp.broadcast_to(as_bool(mask), rewards.shape)
    rewards = jnp.where(mask, rewards, 0)
    values = jnp.where(mask, values, 0)
    gamma = jnp.asarray(gamma, dtype)
    lam = jnp.asarray(lam, dtype)

    def step(carry, inputs):
        next_value, next_advantage = carry
        reward, value, valid = inputs
        delta = reward + gamma * next_value - value
        advantage = delta + gamma * lam * next_advantage
        carry = (jnp.where(valid, value, next_value), jnp.where(valid, advantage, next_advantage))
        return carry, jnp.where(valid, advantage, 0)

    time_major = [jnp.moveaxis(x, -1, 0) for x in (rewards, values, mask)]
    zeros = jnp.zeros(rewards.shape[:-1], dtype)
    _, advantages = lax.scan(step, (zeros, zeros), time_major, reverse=True)
    advantages = jnp.moveaxis(advantages, 0, -1)
    returns = jnp.where(mask, advantages + values, 0)
    return advantages, returns


def whiten_advantages(advantages, mask, shift_mean: bool = True, eps: float = 1e-8) -> jnp.ndarray:
    """Whitened advantages ``(A − μ) / sqrt(σ² + eps)`` over the masked tokens of the whole batch; 0 elsewhere.

    μ, σ² are the masked mean and (population) variance. advantages, mask: [B, T]. Returns [B, T] float32.
    """
    return masked_whiten(advantages, mask, shift_mean=shift_mean, eps=eps)
