"""KL-coefficient controllers: pure ``state -> state`` updates over a small pytree (checkpointable, jit-able).

A controller is an ``(init, update)`` pair in the style of optax: ``init() -> KLControllerState`` and
``update(state, current_kl, n_steps) -> KLControllerState``. The state holds only the coefficient; the
hyperparameters are numbers captured when the controller is built.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp

from rlhf_jax.losses.masked import as_float


class KLControllerState(NamedTuple):
    kl_coef: jnp.ndarray  # β, a float32 scalar


class KLController(NamedTuple):
    init: Callable[[], KLControllerState]
    update: Callable[[KLControllerState, jnp.ndarray, int], KLControllerState]


def adaptive_kl_coef(kl_coef, current_kl, n_steps, target: float, horizon: float) -> jnp.ndarray:
    """One step of the adaptive KL controller of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
    Preferences", §2.2):

    ``e = clip(KL / KL_target − 1, −0.2, 0.2)``,  ``β ← β · (1 + e · n_steps / horizon)``.

    The paper writes ``β ← β(1 + K_β e)``; its released code (lm-human-preferences) sets ``K_β = n_steps /
    horizon``, with ``n_steps`` the number of samples in the batch, and so do we. This is a proportional
    controller with a bounded error, not the 0.9/1.1 step rule sometimes shown in tutorials. ``current_kl``
    should be the mean over sequences of the sequence-summed KL (``kl/sequence_kl``).

    kl_coef, current_kl, n_steps: scalars (may be traced). Returns the new β, float32.
    """
    kl_coef = as_float(kl_coef)
    error = jnp.clip(as_float(current_kl) / target - 1, -0.2, 0.2)
    return kl_coef * (1 + error * as_float(n_steps) / horizon)


def fixed_kl_controller(kl_coef: float) -> KLController:
    """A constant β: ``update`` returns the state unchanged."""

    def init() -> KLControllerState:
        return KLControllerState(kl_coef=jnp.asarray(kl_coef, jnp.float32))

    def update(state: KLControllerState, current_kl, n_steps) -> KLControllerState:
        del current_kl, n_steps
        return state

    return KLController(init, update)


def adaptive_kl_controller(init_kl_coef: float, target: float, horizon: float) -> KLController:
    """The adaptive controller of Ziegler et al. 2019; see :func:`adaptive_kl_coef` for the rule.

    target: KL_target in nats per sequence (e.g. 6.0); horizon: samples over which the error is corrected
    (e.g. 10000).
    """
    if target <= 0 or horizon <= 0:
        raise ValueError(f"adaptive KL controller needs target > 0 and horizon > 0, got {target}, {horizon}")

    def init() -> KLControllerState:
        return KLControllerState(kl_coef=jnp.asarray(init_kl_coef, jnp.float32))

    def update(state: KLControllerState, current_kl, n_steps) -> KLControllerState:
        return KLControllerState(kl_coef=adaptive_kl_coef(state.kl_coef, current_kl, n_steps, target, horizon))

    return KLController(init, update)
