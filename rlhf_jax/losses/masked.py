"""Masked reductions: sum, mean, variance and whitening over the entries a mask selects.

Conventions shared by every module in ``rlhf_jax.losses``:

* A mask is a bool or {0, 1} array broadcastable to the values; ``True``/``1`` marks an entry that counts.
* Masking is done with ``jnp.where``, never by multiplication: a NaN or inf under the mask (``NaN * 0 = NaN``)
  must not reach the result or its gradient.
* Arithmetic is in float32 at least: bf16/f16/integer/bool inputs are upcast to float32; float64 inputs (with
  ``jax_enable_x64``) stay float64.
* An empty selection gives 0, not NaN.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

Axis = int | Sequence[int] | None


def as_float(values) -> jnp.ndarray:
    """Upcast to the accumulation dtype: float32, or float64 when the input already is."""
    values = jnp.asarray(values)
    return values.astype(jnp.promote_types(values.dtype, jnp.float32))


def as_bool(mask) -> jnp.ndarray:
    """A bool view of a bool or {0, 1} mask."""
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != 0


def safe_divide(numerator: jnp.ndarray, denominator: jnp.ndarray) -> jnp.ndarray:
    """``numerator / denominator``, and 0 where the denominator is 0 (no NaN in values or gradients)."""
    nonzero = denominator != 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1), 0)


def masked_count(mask, axis: Axis = None, dtype=jnp.float32) -> jnp.ndarray:
    """Number of selected entries, ``Σ m``, as a float (default float32)."""
    return jnp.sum(as_bool(mask), axis=axis, dtype=dtype)


def masked_sum(values, mask, axis: Axis = None) -> jnp.ndarray:
    """``Σ_{m=1} x`` over ``axis`` (all axes by default).

    values: [...]; mask: broadcastable to values. Returns float32 (or float64) with ``axis`` reduced.
    """
    values = as_float(values)
    mask = jnp.broadcast_to(as_bool(mask), values.shape)
    return jnp.sum(jnp.where(mask, values, 0), axis=axis)


def masked_mean(values, mask, axis: Axis = None) -> jnp.ndarray:
    """``Σ_{m=1} x / Σ m`` over ``axis``; 0 where nothing is selected.

    values: [...]; mask: broadcastable to values.
    """
    values = as_float(values)
    mask = jnp.broadcast_to(as_bool(mask), values.shape)
    count = masked_count(mask, axis=axis, dtype=values.dtype)
    return safe_divide(masked_sum(values, mask, axis=axis), count)


def masked_var(values, mask, axis: Axis = None, unbiased: bool = False) -> jnp.ndarray:
    """Variance of the selected entries: ``Σ_{m=1} (x − μ)² / (n − ddof)`` with ``μ`` the masked mean.

    ``unbiased=False`` (default) divides by ``n``; ``unbiased=True`` by ``n − 1`` (Bessel). 0 where fewer
    than ``1 + ddof`` entries are selected. values: [...]; mask: broadcastable to values.
    """
    values = as_float(values)
    mask = jnp.broadcast_to(as_bool(mask), values.shape)
    mean = masked_mean(values, mask, axis=axis)
    if axis is not None:
        mean = jnp.expand_dims(mean, axis)
    squared = jnp.square(jnp.where(mask, values - mean, 0))
    count = masked_count(mask, axis=axis, dtype=values.dtype)
    denominator = jnp.maximum(count - 1, 0) if unbiased else count
    return safe_divide(jnp.sum(squared, axis=axis), denominator)


def masked_whiten(values, mask, shift_mean: bool = True, eps: float = 1e-8, axis: Axis = None,
                  unbiased: bool = False) -> jnp.ndarray:
    """Standardise the selected entries: ``(x − μ) / sqrt(σ² + eps)``; zeros under the mask.

    ``μ``, ``σ²`` are the masked mean and variance (see :func:`masked_var`) over ``axis`` (all axes by
    default). With ``shift_mean=False`` the mean is added back, ``x ↦ (x − μ) / sqrt(σ² + eps) + μ``, which
    rescales without centring (used for rewards, whose sign carries meaning).
    values: [B, T]; mask: [B, T]. Returns an array of the values' shape.
    """
    values = as_float(values)
    mask = jnp.broadcast_to(as_bool(mask), values.shape)
    mean = masked_mean(values, mask, axis=axis)
    var = masked_var(values, mask, axis=axis, unbiased=unbiased)
    if axis is not None:
        mean = jnp.expand_dims(mean, axis)
        var = jnp.expand_dims(var, axis)
    whitened = (jnp.where(mask, values, mean) - mean) / jnp.sqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask, whitened, 0)


def last_token_index(mask) -> jnp.ndarray:
    """Index of the last True of each row of ``mask`` [..., T] (0 for an all-False row): [...] int32.

    Found from the mask itself, never from token ids (which breaks when pad = EOS). The one last-token helper:
    the reward/value head reads the hidden state there, the KL-shaped reward puts the score there.
    """
    mask = as_bool(mask)
    length = mask.shape[-1]
    flipped_first = jnp.argmax(mask[..., ::-1], axis=-1)
    return jnp.where(jnp.any(mask, axis=-1), length - 1 - flipped_first, 0).astype(jnp.int32)

