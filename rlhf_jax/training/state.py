"""Train state and optimizer construction.

A stage's state is a pytree (params, optimizer state, step, PRNG key); frozen roles (reference,
reward model) are params only and never allocate optimizer state.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax.errors import UserError
from rlhf_jax.models.layout import stack_layers, unstack_layers

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "linear", "cosine")


class TrainState(flax.struct.PyTreeNode):
    """step: [] int32; params: pytree; opt_state: optax state; key: PRNG key."""

    step: jax.Array
    params: Any
    opt_state: Any
    key: jax.Array
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, key: jax.Array, per_layer: bool = False) -> "TrainState":
        """`per_layer`: hold the layers' weights (and the optimizer's moments) one array per layer
        (`models.layout`), for a decoder whose layers are unrolled: the train step then copies no layer."""
        params = unstack_layers(params) if per_layer else params
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), key=key, tx=tx)

    @property
    def stacked_params(self):
        """The params in the canonical layout (layers stacked), whatever the state holds."""
        return stack_layers(self.params)

    def apply_gradients(self, grads) -> "TrainState":
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates), opt_state=opt_state)


def learning_rate_schedule(
    learning_rate: float, schedule: str, warmup_steps: int, total_steps: int, final_fraction: float = 0.0
) -> optax.Schedule:
    """Linear warm-up from 0 over `warmup_steps`, then constant / linear decay / cosine decay to
    `final_fraction * learning_rate` at `total_steps`."""
    if schedule not in SCHEDULES:
        raise UserError(f"optimizer.schedule={schedule!r} is not one of {SCHEDULES}")
    decay_steps = max(total_steps - warmup_steps, 1)
    end_value = learning_rate * final_fraction
    if schedule == "constant":
        decay = optax.constant_schedule(learning_rate)
    elif schedule == "linear":
        decay = optax.linear_schedule(learning_rate, end_value, decay_steps)
    else:
        decay = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=final_fraction)
    if warmup_steps <= 0:
        return decay
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def make_optimizer(
    name: str = "adamw",
    learning_rate: float = 1e-5,
    *,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int = 1,
    grad_clip: float | None = 1.0,
    trainable: Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
    """optax chain: global-norm clipping, then the optimizer with its learning-rate schedule.

    `trainable`, when given, maps params to a pytree of bools; only True leaves are updated (others
    get no optimizer state: `optax.multi_transform` with `set_to_zero`).
    """
    lr = learning_rate_schedule(learning_rate, schedule, warmup_steps, total_steps)
    if name == "adamw":
        opt = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    elif name == "adam":
        opt = optax.adam(lr, b1=b1, b2=b2, eps=eps)
    elif name == "sgd":
        opt = optax.sgd(lr, momentum=b1 or None)
    else:
        raise UserError(f"optimizer.name={name!r} is not one of {OPTIMIZERS}")
    parts = ([optax.clip_by_global_norm(grad_clip)] if grad_clip else []) + [opt]
    tx = optax.chain(*parts)
    if trainable is not None:
        tx = optax.multi_transform(
            {True: tx, False: optax.set_to_zero()}, lambda params: trainable(params)
        )
    return tx
