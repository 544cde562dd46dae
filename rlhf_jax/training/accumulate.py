"""Exact gradient accumulation over micro-batches.

Losses return an unreduced `(loss_sum, count)`; gradients of `loss_sum` are summed over the
micro-batches and divided once by the total count, so the result equals the big-batch mean-loss
gradient (a mean of micro-batch means would not, when counts differ). Metrics travel the same way, each as
a `losses.Weighted` (total, count) with its own denominator.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.losses.aggregation import metric_values

LossSumFn = Callable[[Any, Any], tuple[jax.Array, tuple[jax.Array, dict]]]


def split_microbatches(batch: Any, num_microbatches: int) -> Any:
    """Reshape every leaf [B, ...] -> [M, B/M, ...] (B must be divisible by M), strided: micro-batch m
    holds rows m, m + M, m + 2M, ...

    Strided, because a batch sharded over devices in contiguous blocks of rows then has rows of every
    micro-batch on every device: the split moves no data, and each micro-batch stays spread over the
    batch axes of the mesh (the constraint; a no-op without `rlhf_jax.sharding` rules).
    """

    def split(x):
        assert x.shape[0] % num_microbatches == 0, (x.shape, num_microbatches)
        x = jnp.swapaxes(x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:]), 0, 1)
        return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, batch)


def accumulate_gradients(loss_sum_fn: LossSumFn, params: Any, batch: Any, num_microbatches: int = 1):
    """Mean-loss gradient over `batch`, computed micro-batch by micro-batch with `lax.scan`.

    loss_sum_fn(params, microbatch) -> (loss_sum, (count, metrics)) where each metric is a
    `losses.Weighted` (total, count) over the micro-batch: totals and counts are summed over the
    micro-batches and each metric divided by its own count at the end.
    Returns (loss, grads, metrics) with loss = Σ loss_sum / Σ count and metrics their values.
    """
    grad_fn = jax.value_and_grad(loss_sum_fn, has_aux=True)
    microbatches = split_microbatches(batch, num_microbatches)

    def body(carry, microbatch):
        grads_acc, loss_acc, count_acc, metrics_acc = carry
        (loss_sum, (count, metrics)), grads = grad_fn(params, microbatch)
        grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
        metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
        return (grads_acc, loss_acc + loss_sum, count_acc + count, metrics_acc), None

    first = jax.tree.map(lambda x: x[0], microbatches)
    metrics_shape = jax.eval_shape(lambda: loss_sum_fn(params, first)[1][1])
    zeros_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), metrics_shape)
    zeros_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    init = (zeros_grads, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros_metrics)
    (grads, loss_sum, count, metrics), _ = jax.lax.scan(body, init, microbatches)
    denominator = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grads, params)
    return loss_sum / denominator, grads, metric_values(metrics)
