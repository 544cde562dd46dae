"""Exact gradient accumulation over micro-batches.

Losses return an unreduced `(loss_sum, count)`; gradients of `loss_sum` are summed over the
micro-batches and divided once by the total count, so the result equals the big-batch mean-loss
gradient (a mean of micro-batch means would not, when counts differ). Metrics travel the same way, each as
a `losses.Weighted` (total, count) with its own denominator.

Per-micro-batch lengths: a padded batch ordered by :func:`order_by_length` (host) carries `LENGTH_BUCKET`, and
each micro-batch then runs at the shortest of a few lengths that holds its rows (:func:`by_length`), not at
the batch's: the rows are sorted by length so that each micro-batch holds rows of similar lengths. The
losses and metrics are sums over rows, so the order changes none of them. Shared-prefix rows
(`data.batching.share_prefixes`) are cut the same way; their pairs are ordered before the rows are built.

Per-layer weights (`per_layer=True`, for a decoder whose layers are unrolled, `models.llama.layers_unrolled`):
the layers' weights are stacked on a leading axis (`nn.scan`), and a program that slices layer i out of the
stack inside the micro-batch loop copies every layer's weights once per micro-batch (XLA has no views of
slices), then copies every layer's gradient back into a stack to add it to the sum. Passed into the loop one
array per layer (:func:`unstack_layers`) and stacked again inside the loss (:func:`stack_layers`), the slices of
the stack are the arrays themselves, and both copies go: the same arithmetic. Params already per layer (a
per-layer train state, `training.state`) run the same way and get their gradients per layer, so the step's
program copies no layer at all (`models.layout`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data.batching import SHARED_LOSS_KEYS, SHARED_ROW_KEYS
from rlhf_jax.losses.aggregation import metric_values
from rlhf_jax.models.layout import has_per_layer, stack_layers, unstack_layers  # noqa: F401  (re-exported)

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


LENGTH_BUCKET = "length_bucket"  # [B, K] one-hot: the length each row's micro-batch runs at (`order_by_length`)
_TOKEN_AXIS = ("tokens", "attention_mask", "loss_mask", "positions", "segment_ids")  # key endings: [B, T] arrays
_INDEX_KEYS = ("loss_index", "pair_loss_index")  # flat positions in a [rows, T] stack (`trainers.common`)


def micro_lengths(length: int, buckets: int) -> tuple[int, ...]:
    """The lengths a micro-batch of a batch padded to `length` may run at: k/`buckets` of it for k = 1 ...
    `buckets`, rounded up to a multiple of 8 (at most `length`), without repeats."""
    def round_up(k):
        fraction = -(-length * k // buckets)
        return min(length, -(-fraction // 8) * 8)

    return tuple(sorted({round_up(k) for k in range(1, buckets + 1)}))


def _is_token_axis(key: str) -> bool:
    # a shared-prefix row's [B, L] arrays are cut too; its loss entries ([B, K]) stay whole
    return key in SHARED_ROW_KEYS or (key.endswith(_TOKEN_AXIS) and not key.startswith("shared_"))


def _token_length(batch: dict) -> int:
    return next(value.shape[1] for key, value in batch.items() if _is_token_axis(key))


def order_by_length(batch: dict, num_microbatches: int, buckets: int, needed: np.ndarray | None = None,
                    length: int | None = None) -> dict:
    """A padded batch (host numpy) with its rows reordered so that the strided split (`split_microbatches`)
    gives micro-batch m the m-th block of rows in order of length, and `LENGTH_BUCKET` naming the length of
    :func:`micro_lengths` each micro-batch runs at: the shortest that holds its rows' last real token.

    A row's length is one past its last True entry of any `*attention_mask` (the pair's longer side; a
    left-padded row counts whole). Every array whose first axis is the batch's rows moves with its row (the
    example `index` too); a batch without an attention mask, or `buckets` 1, is returned as it is.
    needed, length: each row's length [B] and the length the step's rows will have, when the step runs other
    rows than these (a pair's shared-prefix row, `data.batching.shared_row_lengths`).
    """
    masks = [np.asarray(value) for key, value in batch.items()
             if key.endswith("attention_mask") and _is_token_axis(key)]
    if buckets <= 1 or not masks:
        return batch
    rows = masks[0].shape[0]
    if needed is None:
        length = masks[0].shape[1]
        columns = np.arange(1, length + 1)
        needed = np.max([np.max(np.where(mask.astype(bool), columns, 1), axis=1) for mask in masks], axis=0)
    size = rows // num_microbatches
    order = np.argsort(needed, kind="stable")
    # row j·M + m of the result is the j-th of block m (micro-batch m holds rows m, m + M, ...)
    permutation = order.reshape(num_microbatches, size).T.reshape(-1)
    onehot = length_choice(needed[order].reshape(num_microbatches, size).max(axis=1), length, buckets, rows)
    moved = {key: (np.asarray(value)[permutation] if np.ndim(value) and np.shape(value)[0] == rows else value)
             for key, value in batch.items()}
    return {**moved, LENGTH_BUCKET: onehot}


def length_choice(longest, length: int, buckets: int, rows: int, xp=np):
    """`LENGTH_BUCKET` [rows, buckets] (bool): micro-batch m (rows m, m + M, ... of M = len(longest)) at the
    shortest of `micro_lengths(length, buckets)` that holds `longest[m]`, its longest row. `xp`: numpy, or
    jax.numpy for traced values."""
    chosen = xp.searchsorted(xp.asarray(micro_lengths(length, buckets)), longest)
    return xp.tile(xp.arange(buckets)[None, :] == chosen[:, None], (rows // len(longest), 1))


def widen_shared_rows(batch: dict, length: int, entries: int | None, num_microbatches: int) -> dict:
    """A shared-prefix batch (`data.batching.share_prefixes`) with its rows laid out in `length` slots and its loss
    entries in `entries` (None: as they are), each at least its own: the same rows and entries, more padding
    after them (zeros: segment 0, loss side 0), so that batches of several row lengths can be stacked into one
    call of several steps (`training.calls`). A `LENGTH_BUCKET` is chosen again for the new length as
    :func:`order_by_length` chooses it: the shortest of `micro_lengths(length)` that holds each micro-batch's
    rows, so a micro-batch runs at about its own length still. numpy or jax arrays (traced too)."""
    own = batch["shared_tokens"].shape[1]
    out = dict(batch)
    for keys, width in ((SHARED_ROW_KEYS, length), (SHARED_LOSS_KEYS if entries is not None else (), entries)):
        for key in keys:
            value = batch[key]
            if width < value.shape[1]:
                raise ValueError(f"{key}: {value.shape[1]} entries a row cannot be laid out in {width}")
            out[key] = jnp.pad(value, ((0, 0), (0, width - value.shape[1])))
    if LENGTH_BUCKET in batch and length != own:
        rows, buckets = batch[LENGTH_BUCKET].shape
        # a row's real slots are those of segment 1 or 2, from slot 0 on
        needed = jnp.max(jnp.where(batch["shared_segment_ids"] > 0, jnp.arange(1, own + 1), 1), axis=1)
        # row j·M + m belongs to micro-batch m (the strided split)
        longest = jnp.max(needed.reshape(rows // num_microbatches, num_microbatches), axis=0)
        out[LENGTH_BUCKET] = length_choice(longest, length, buckets, rows, jnp)
    return out


def trim_to_length(batch: dict, length: int) -> dict:
    """The micro-batch cut to its first `length` columns: every [b, T] token array sliced, and the loss
    index's flat positions (row·T + column, padding rows·T) re-based to row·length + column."""
    full = _token_length(batch)

    def trim(key, value):
        if _is_token_axis(key):
            return value[:, :length]
        if key in _INDEX_KEYS:
            return value // full * length + value % full
        return value

    return {key: trim(key, value) for key, value in batch.items()}


def by_length(fn: Callable[[Any], Any], microbatch: dict) -> Any:
    """fn(microbatch), run at the micro-batch's length when it carries `LENGTH_BUCKET`: one `lax.switch`
    branch per length of :func:`micro_lengths`, each on the micro-batch cut to it (:func:`trim_to_length`)."""
    if not isinstance(microbatch, dict) or LENGTH_BUCKET not in microbatch:
        return fn(microbatch)
    onehot = microbatch[LENGTH_BUCKET]
    rest = {key: value for key, value in microbatch.items() if key != LENGTH_BUCKET}
    lengths = micro_lengths(_token_length(rest), onehot.shape[-1])
    branches = [lambda batch, length=length: fn(trim_to_length(batch, length)) for length in lengths]
    return jax.lax.switch(jnp.argmax(onehot[0]), branches, rest)


def accumulate_gradients(loss_sum_fn: LossSumFn, params: Any, batch: Any, num_microbatches: int = 1,
                         per_layer: bool = False):
    """Mean-loss gradient over `batch`, computed micro-batch by micro-batch with `lax.scan` (each at its own
    length when the batch carries `LENGTH_BUCKET`, see :func:`by_length`).

    loss_sum_fn(params, microbatch) -> (loss_sum, (count, metrics)) where each metric is a
    `losses.Weighted` (total, count) over the micro-batch: totals and counts are summed over the
    micro-batches and each metric divided by its own count at the end.
    Returns (loss, grads, metrics) with loss = Σ loss_sum / Σ count and metrics their values.
    `per_layer`: the stacked layer weights enter the loop one array per layer (module docstring); only for a
    decoder whose layers are unrolled, and only with more than one micro-batch. Params per layer
    (`models.layout`) get their gradients per layer, whatever `per_layer` says.
    """
    stored_per_layer = has_per_layer(params)  # a per-layer train state (`models.layout`): gradients per layer
    if stored_per_layer or (per_layer and num_microbatches > 1):
        loss, grads, metrics = _accumulate(lambda layers, rows: loss_sum_fn(stack_layers(layers), rows),
                                           unstack_layers(params), batch, num_microbatches)
        return loss, (grads if stored_per_layer else stack_layers(grads)), metrics
    return _accumulate(loss_sum_fn, params, batch, num_microbatches)


def _accumulate(loss_sum_fn: LossSumFn, params: Any, batch: Any, num_microbatches: int):
    grad_fn = jax.value_and_grad(loss_sum_fn, has_aux=True)
    microbatches = split_microbatches(batch, num_microbatches)

    def body(carry, microbatch):
        grads_acc, loss_acc, count_acc, metrics_acc = carry
        (loss_sum, (count, metrics)), grads = by_length(lambda rows: grad_fn(params, rows), microbatch)
        grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
        metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
        return (grads_acc, loss_acc + loss_sum, count_acc + count, metrics_acc), None

    first = jax.tree.map(lambda x: x[0], microbatches)
    loss_shape, (count_shape, metrics_shape) = jax.eval_shape(
        lambda: by_length(lambda rows: loss_sum_fn(params, rows), first))

    def zeros(like):  # sums in float32, or in the model's float64
        return jnp.zeros(like.shape, jnp.promote_types(like.dtype, jnp.float32))

    init = (jax.tree.map(zeros, params), zeros(loss_shape), zeros(count_shape), jax.tree.map(zeros, metrics_shape))
    (grads, loss_sum, count, metrics), _ = jax.lax.scan(body, init, microbatches)
    denominator = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grads, params)
    return loss_sum / denominator, grads, metric_values(metrics)


def map_microbatches(fn: Callable[[Any, dict], Any], params: Any, batch: dict, num_microbatches: int,
                     per_layer: bool = False) -> Any:
    """fn(params, microbatch) -> a pytree of per-row arrays [b, ...], over `batch` micro-batch by micro-batch
    (`lax.map`; forward only, `params` are not differentiated), each at its own length when the batch carries
    `LENGTH_BUCKET` (:func:`by_length`), returned [B, ...] in the batch's row order. `per_layer`: as in
    :func:`accumulate_gradients`."""
    params = jax.lax.stop_gradient(params)
    if has_per_layer(params) or (per_layer and num_microbatches > 1):
        layers = unstack_layers(params)
        run = lambda rows: fn(stack_layers(layers), rows)  # noqa: E731
    else:
        run = functools.partial(fn, params)
    outputs = jax.lax.map(lambda microbatch: by_length(run, microbatch), split_microbatches(batch, num_microbatches))
    # [M, B/M, ...] -> [B, ...]: micro-batch m holds rows m, m + M, ... (`split_microbatches`)
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), outputs)
