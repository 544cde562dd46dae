"""Log-probabilities of chosen tokens and per-token entropy, from logits or from hidden states.

All results are float32 (float64 if the inputs are), whatever the dtype of the logits. The chunked variants
never materialise a float32 ``[B, T, V]`` array:

* over the sequence, ``lax.map`` visits ``seq_chunk`` positions at a time, under ``jax.checkpoint`` so the
  backward pass recomputes a chunk instead of storing every chunk's activations;
* over the vocabulary (``vocab_chunk`` set), ``logsumexp`` (and the entropy) are accumulated online, a
  running maximum ``m`` and ``s = Σ exp(z − m)`` per chunk (as in flash attention), so at most
  ``[B, seq_chunk, vocab_chunk]`` float32 values exist at a time.

:func:`logprobs_from_hidden` goes one step further and takes the final hidden states and the unembedding
matrix, computing the logits of one chunk at a time. Token ids are used only to gather. Every function takes
an optional ``mask`` [B, T]: masked positions give 0, and what their logits or hidden states hold (padding,
even NaN) reaches neither the result nor the gradient. Without a mask each position's result depends on that
position's logits only, so the losses' own masking keeps NaN out of the loss value; pass the mask here too
to keep it out of the gradient (the backward pass of log-softmax multiplies by the probabilities).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from rlhf_jax.losses.masked import as_bool, as_float


def _finite_or_zero(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.where(jnp.isfinite(x), x, 0)


def _check_temperature(temperature):
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def _entropy_from_logp(logp: jnp.ndarray) -> jnp.ndarray:
    # H = −Σ p log p, summed from log-softmax values (which are computed relative to the maximum logit), not
    # as logsumexp(z) − Σ p z, which cancels two large numbers and loses ulp(max z) when logits are large.
    # A −inf logit has p = 0 and contributes 0 (not 0 · −inf = NaN).
    return -jnp.sum(jnp.exp(logp) * _finite_or_zero(logp), axis=-1)


def _masked_log_softmax(logits, temperature, mask) -> jnp.ndarray:
    _check_temperature(temperature)
    logits = as_float(logits)
    if mask is not None:
        logits = jnp.where(as_bool(mask)[..., None], logits, 0)
    return jax.nn.log_softmax(logits / temperature, axis=-1)


def _zero_masked(values, mask) -> jnp.ndarray:
    return values if mask is None else jnp.where(as_bool(mask), values, 0)


def logprobs_from_logits(logits, tokens, temperature: float = 1.0, mask=None) -> jnp.ndarray:
    """``log softmax(logits / τ)[tokens]``: log-probability of each chosen token.

    logits: [B, T, V] (any dtype; upcast to float32); tokens: [B, T] int; mask: [B, T] or None (masked
    positions give 0, whatever their logits hold, with zero gradient). Returns [B, T] float32.
    The whole float32 ``[B, T, V]`` log-softmax is formed; see :func:`chunked_token_logprobs` to avoid it.
    """
    logp = _masked_log_softmax(logits, temperature, mask)
    return _zero_masked(jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0], mask)


def token_entropy(logits, temperature: float = 1.0, mask=None) -> jnp.ndarray:
    """Entropy of ``softmax(logits / τ)`` at each position: ``H = −Σ_v p_v log p_v``.

    logits: [B, T, V]; mask: [B, T] or None (0 at masked positions). Returns [B, T] float32.
    See :func:`chunked_token_entropy` for the chunked variant.
    """
    return _zero_masked(_entropy_from_logp(_masked_log_softmax(logits, temperature, mask)), mask)


# ----------------------------------------------------------------------------------------------------------
# Chunking machinery


def _map_over_sequence(chunk_fn: Callable, length: int, seq_chunk: int | None, arrays: dict,
                       skip_masked: bool = False, recompute: bool = True):
    """``chunk_fn(**slices)`` on slices of ``seq_chunk`` positions, the [..., c] results concatenated along T.

    ``arrays`` maps each keyword of ``chunk_fn`` to ``(array, time_axis)``. When ``seq_chunk`` does not divide
    T the last slice starts at ``T − c`` (overlapping the previous one) and only its new positions are kept,
    so no input is padded or copied. Each chunk is recomputed in the backward pass (``jax.checkpoint``) unless
    ``recompute`` is False. With ``skip_masked`` a chunk whose ``mask`` slice holds no True entry is not
    computed (``lax.cond``, forward and backward): its results are zeros, what ``chunk_fn`` gives there.
    """
    if seq_chunk is None or seq_chunk >= length:
        return chunk_fn(**{name: array for name, (array, _) in arrays.items()})
    if seq_chunk < 1:
        raise ValueError(f"seq_chunk must be a positive integer, got {seq_chunk}")
    chunk = seq_chunk
    num_chunks = -(-length // chunk)

    def one_chunk(index):
        start = jnp.minimum(index * chunk, length - chunk)
        slices = {name: lax.dynamic_slice_in_dim(array, start, chunk, axis=axis)
                  for name, (array, axis) in arrays.items()}
        if not skip_masked:
            return chunk_fn(**slices)
        skipped = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(lambda: chunk_fn(**slices)))
        return lax.cond(jnp.any(slices["mask"]), lambda: chunk_fn(**slices), lambda: skipped)

    stacked = lax.map(jax.checkpoint(one_chunk) if recompute else one_chunk, jnp.arange(num_chunks))

    def assemble(ys):  # ys: [num_chunks, ..., chunk]
        ys = jnp.moveaxis(ys, 0, -2)
        full = ys[..., : num_chunks - 1, :].reshape(*ys.shape[:-2], (num_chunks - 1) * chunk)
        remainder = length - (num_chunks - 1) * chunk
        return jnp.concatenate([full, ys[..., -1, chunk - remainder:]], axis=-1)

    return jax.tree.map(assemble, stacked)


def _vocab_statistics(logit_slice: Callable, vocab_size: int, vocab_chunk: int | None, temperature,
                      with_entropy: bool):
    """Online ``logsumexp`` (and entropy) of ``z = x / τ`` over the vocabulary, ``vocab_chunk`` columns at a time.

    ``logit_slice(start, size)`` returns the unscaled float logits ``x`` ``[..., size]`` of columns
    ``start .. start + size``. Returns ``(shift, log_sum_exp, entropy or None)``, each ``[...]``, with
    ``logsumexp(x / τ) = shift / τ + log_sum_exp``; ``shift`` is the maximum logit (0 if it is not finite) and
    carries no gradient. Callers form ``log p = (x_token − shift) / τ − log_sum_exp``: subtracting before
    scaling makes the top token's centred logit exactly 0, and keeps the precision that
    ``z − logsumexp(z)`` would lose (ulp(max z)) for large logits.
    """
    if vocab_chunk is None or vocab_chunk >= vocab_size:
        x = logit_slice(0, vocab_size)
        shift = lax.stop_gradient(_finite_or_zero(jnp.max(x, axis=-1)))
        centred = (x - shift[..., None]) / temperature
        log_sum_exp = jnp.log(jnp.sum(jnp.exp(centred), axis=-1))
        entropy = _entropy_from_logp(centred - log_sum_exp[..., None]) if with_entropy else None
        return shift, log_sum_exp, entropy
    if vocab_chunk < 1:
        raise ValueError(f"vocab_chunk must be a positive integer, got {vocab_chunk}")
    chunk = vocab_chunk
    num_chunks = -(-vocab_size // chunk)

    def step(carry, index):
        # Invariants, with m the running maximum of x (shift 0 while it is −inf) and z − m meaning (x − m) / τ:
        #   sum_exp = Σ exp(z − m),  sum_exp_centred = Σ exp(z − m) (z − m)  over the columns seen so far.
        running_max, sum_exp, sum_exp_centred = carry
        nominal_start = index * chunk
        start = jnp.minimum(nominal_start, vocab_size - chunk)
        x = logit_slice(start, chunk)
        # The clamped last chunk overlaps the previous one: count each column once.
        fresh = (start + jnp.arange(chunk)) >= nominal_start
        # d logsumexp / dz does not depend on the shift, so the running maximum carries no gradient (as in
        # jax.nn.logsumexp); every rescaling factor is then a constant.
        new_max = lax.stop_gradient(jnp.maximum(running_max, jnp.max(jnp.where(fresh, x, -jnp.inf), axis=-1)))
        old_shift, new_shift = _finite_or_zero(running_max), _finite_or_zero(new_max)
        rescale = jnp.exp((running_max - new_shift) / temperature)
        centred = (x - new_shift[..., None]) / temperature
        weights = jnp.where(fresh, jnp.exp(centred), 0)
        if with_entropy:
            # Σ e (z − m_new) = rescale · (Σ e_old (z − m_old) + (m_old − m_new) Σ e_old) + this chunk's terms
            sum_exp_centred = rescale * (sum_exp_centred + (old_shift - new_shift) / temperature * sum_exp) + jnp.sum(
                weights * _finite_or_zero(centred), axis=-1)
        sum_exp = sum_exp * rescale + jnp.sum(weights, axis=-1)
        return (new_max, sum_exp, sum_exp_centred), None

    probe = jax.eval_shape(lambda: logit_slice(0, chunk))
    zeros = jnp.zeros(probe.shape[:-1], probe.dtype)
    init = (jnp.full_like(zeros, -jnp.inf), zeros, zeros)
    (running_max, sum_exp, sum_exp_centred), _ = lax.scan(jax.checkpoint(step), init, jnp.arange(num_chunks))
    log_sum_exp = jnp.log(sum_exp)
    # H = −Σ p log p = −Σ (e/s) ((z − m) − log s) = log s − Σ e (z − m) / s
    entropy = log_sum_exp - sum_exp_centred / sum_exp if with_entropy else None
    return _finite_or_zero(running_max), log_sum_exp, entropy


# ----------------------------------------------------------------------------------------------------------
# Public chunked functions


def _chunk_fn(temperature, vocab_chunk, want_logprobs: bool, want_entropy: bool, unembedding=None):
    """Per-chunk computation over ``(source, tokens, mask)``; ``source`` is logits, or hidden states when
    ``unembedding`` is given. Masked positions have their source replaced by zeros (so NaN/inf there reach
    neither the value nor the gradient) and their outputs set to 0."""

    def chunk_fn(source, tokens=None, mask=None):
        if mask is not None:
            source = jnp.where(mask[..., None], source, jnp.zeros((), source.dtype))
        if unembedding is None:
            vocab_size = source.shape[-1]

            def logit_slice(start, size):
                return as_float(lax.dynamic_slice_in_dim(source, start, size, axis=source.ndim - 1))
        else:
            vocab_size = unembedding.shape[-1]
            compute = jnp.promote_types(jnp.promote_types(source.dtype, unembedding.dtype), jnp.float32)

            def logit_slice(start, size):
                columns = lax.dynamic_slice_in_dim(unembedding, start, size, axis=1)
                return jnp.einsum("...d,dv->...v", source, columns, preferred_element_type=compute)

        # every logit at once (no vocab_chunk): one product; the chosen logit is read from it
        logits = logit_slice(0, vocab_size) if vocab_chunk is None or vocab_chunk >= vocab_size else None
        if logits is not None:
            def logit_slice(start, size):
                return logits

        shift, log_sum_exp, entropy = _vocab_statistics(logit_slice, vocab_size, vocab_chunk, temperature,
                                                        want_entropy)
        out = {}
        if want_logprobs:
            token_ids = tokens.astype(jnp.int32)
            if unembedding is None:
                # Gathering commutes with the upcast, so gather first: only [..., c] values are upcast.
                chosen = as_float(jnp.take_along_axis(source, token_ids[..., None], axis=-1)[..., 0])
            elif logits is not None:
                # Read from the product rather than recomputed from gathered columns: the columns' gradient is
                # a scatter into W that made XLA's CPU backend compute the head's weight gradient ~1.4× slower.
                chosen = jnp.take_along_axis(logits, token_ids[..., None], axis=-1)[..., 0]
            else:
                # x[token] = h · W[:, token]: gather the chosen columns instead of forming every logit.
                columns = jnp.moveaxis(jnp.take(unembedding, token_ids, axis=1), 0, -1)  # [..., c, D]
                chosen = jnp.einsum("...d,...d->...", source, columns, preferred_element_type=compute)
            out["logprobs"] = (chosen - shift) / temperature - log_sum_exp
        if want_entropy:
            out["entropy"] = entropy
        if mask is not None:
            out = {name: jnp.where(mask, value, 0) for name, value in out.items()}
        return out

    return chunk_fn


def _chunked(source, tokens, mask, temperature, seq_chunk, vocab_chunk, want_logprobs, want_entropy,
             unembedding=None, masked_first: int | None = None):
    _check_temperature(temperature)
    if unembedding is not None and source.shape[-1] != unembedding.shape[0]:
        raise ValueError(f"hidden size {source.shape[-1]} does not match unembedding rows {unembedding.shape[0]}")
    chunk_fn = _chunk_fn(temperature, vocab_chunk, want_logprobs, want_entropy, unembedding)
    if masked_first is not None:  # chunks of `masked_first` positions; `seq_chunk` only says whether to recompute
        return _over_kept_positions(chunk_fn, source, tokens, mask, masked_first, seq_chunk is not None)
    # [B, T, ·] source, [B, T] tokens and mask: each is sliced along its T axis.
    arrays = {"source": (source, source.ndim - 2)}
    if tokens is not None:
        arrays["tokens"] = (tokens, tokens.ndim - 1)
    if mask is not None:
        arrays["mask"] = (as_bool(mask), mask.ndim - 1)
    return _map_over_sequence(chunk_fn, source.shape[-2], seq_chunk, arrays)


def _over_kept_positions(chunk_fn, source, tokens, mask, chunk: int, recompute: bool):
    """``chunk_fn`` over every position of ``mask``'s shape [..., T], computing only where ``mask`` holds.

    Along T each row's kept positions are moved to the front (a stable sort), then the rows are visited ``chunk``
    columns at a time; a chunk where no row has a kept position is skipped, so the work follows the longest row's
    count of kept positions, without a shape that depends on it. A caller that flattens its positions into few
    rows (one per data shard) makes that the number of kept positions of the whole batch.
    """
    if mask is None:
        raise ValueError("skipping masked positions needs a mask")
    if chunk < 1:
        raise ValueError(f"the chunk of kept positions must be a positive integer, got {chunk}")
    kept = as_bool(mask)
    order = jnp.argsort(jnp.logical_not(kept), axis=-1, stable=True)  # kept positions first, each group in order
    source = jnp.take_along_axis(jnp.asarray(source), order[..., None], axis=-2)
    arrays = {"source": (source, source.ndim - 2), "mask": (jnp.take_along_axis(kept, order, axis=-1), kept.ndim - 1)}
    if tokens is not None:
        arrays["tokens"] = (jnp.take_along_axis(jnp.asarray(tokens), order, axis=-1), kept.ndim - 1)
    out = _map_over_sequence(chunk_fn, kept.shape[-1], chunk, arrays, skip_masked=True, recompute=recompute)
    back = jnp.argsort(order, axis=-1)  # the inverse permutation
    return {name: jnp.take_along_axis(value, back, axis=-1) for name, value in out.items()}


def chunked_token_logprobs(logits, tokens, temperature: float = 1.0, *, mask=None, seq_chunk: int | None = 128,
                           vocab_chunk: int | None = None) -> jnp.ndarray:
    """:func:`logprobs_from_logits` computed ``seq_chunk`` positions (and ``vocab_chunk`` columns) at a time.

    ``log p_t = (x_t[tokens_t] − m_t) / τ − log Σ_v exp((x_{t,v} − m_t) / τ)``, ``m_t = max_v x_{t,v}``.
    logits x: [B, T, V]; tokens: [B, T]; mask: [B, T] or None (masked positions give 0, whatever their logits
    hold, with zero gradient). Returns [B, T] float32. Peak float32 memory is ``B·seq_chunk·V``
    (``B·seq_chunk·vocab_chunk`` with ``vocab_chunk``) instead of ``B·T·V``, forward and backward.
    """
    return _chunked(logits, tokens, mask, temperature, seq_chunk, vocab_chunk, True, False)["logprobs"]


def chunked_token_entropy(logits, temperature: float = 1.0, *, mask=None, seq_chunk: int | None = 128,
                          vocab_chunk: int | None = None) -> jnp.ndarray:
    """:func:`token_entropy` computed ``seq_chunk`` positions (and ``vocab_chunk`` columns) at a time.

    ``H_t = −Σ_v p_{t,v} log p_{t,v}``, accumulated online over vocabulary chunks as ``log s − w / s`` with
    ``s = Σ exp(z − m)``, ``w = Σ exp(z − m)(z − m)`` and ``m`` the running maximum. logits: [B, T, V];
    mask: [B, T] or None (0 at masked positions). Returns [B, T] float32.
    """
    return _chunked(logits, None, mask, temperature, seq_chunk, vocab_chunk, False, True)["entropy"]


def logprobs_from_hidden(hidden, unembedding, tokens, temperature: float = 1.0, *, mask=None,
                         seq_chunk: int | None = 128, vocab_chunk: int | None = None,
                         masked_first: int | None = None) -> jnp.ndarray:
    """Chosen-token log-probs from final hidden states, never forming the full ``[B, T, V]`` logits.

    ``x = h @ W``, ``log p_t = (x_t[tokens_t] − m_t) / τ − log Σ_v exp((x_{t,v} − m_t) / τ)``, with the chosen
    logit computed as ``h_t · W[:, tokens_t]``. hidden: [B, T, D]; unembedding W: [D, V] (for tied embeddings
    pass ``embedding.T``); tokens: [B, T]; mask: [B, T] or None (0 at masked positions, zero gradient).
    Products accumulate in float32. Returns [B, T] float32.

    masked_first: None, or a number of positions c: the head then runs only where ``mask`` holds (the same
    numbers), for a mask whose shape is fixed and whose count is not, such as sampled responses' ends. Each row's
    kept positions go first and the rows are visited c columns at a time, a chunk with none in any row skipped;
    ``seq_chunk`` None then keeps each chunk's values for the backward pass, else they are recomputed.
    """
    return _chunked(hidden, tokens, mask, temperature, seq_chunk, vocab_chunk, True, False, unembedding,
                    masked_first)["logprobs"]


def logprobs_and_entropy_from_hidden(hidden, unembedding, tokens, temperature: float = 1.0, *, mask=None,
                                     seq_chunk: int | None = 128, vocab_chunk: int | None = None,
                                     masked_first: int | None = None):
    """:func:`logprobs_from_hidden` plus the per-token entropy of ``softmax(x_t / τ)``, in the same pass.

    hidden: [B, T, D]; unembedding: [D, V]; tokens, mask: [B, T]. Returns ``(logprobs, entropy)``, each
    [B, T] float32.
    """
    out = _chunked(hidden, tokens, mask, temperature, seq_chunk, vocab_chunk, True, True, unembedding, masked_first)
    return out["logprobs"], out["entropy"]


# ----------------------------------------------------------------------------------------------------------
# The head at a leading run of rows whose length is known only when the step runs


def kept_rows_logprobs_from_hidden(hidden, unembedding, tokens, mask, temperature: float = 1.0, *,
                                   sizes: tuple[int, ...], vocab_first: bool = False) -> jnp.ndarray:
    """Chosen-token log-probs of K rows of hidden states, the head run at the first k rows only.

    hidden: [K, D]; unembedding: [D, V], or with ``vocab_first`` [V, D] (a tied embedding as it is stored);
    tokens, mask: [K]. Returns [K] float32, 0 where ``mask`` is False: the numbers of
    :func:`logprobs_from_hidden` on the same rows. ``k`` is the smallest of ``sizes`` (and K) that holds the last
    row of ``mask``, chosen when the step runs (a ``lax.switch`` with a branch per size), so a fixed K sized for
    the largest count of kept rows costs what the kept rows need, when they come first. Every logit of the k
    rows is formed at once (k·V values, forward and backward; callers keep that small).

    The gradient is written out (a custom VJP): differentiating the switch would have every branch return every
    other branch's saved values (zeros), which cost more than the rows saved. The forward keeps the logits of
    the k rows; the backward forms ``(onehot − p) / τ`` from them and the two products at those k rows.
    The weight enters the branches in its stored layout: a transposed operand would be copied in each branch.
    """
    _check_temperature(temperature)
    rows = hidden.shape[0]
    width = unembedding.shape[1 if vocab_first else 0]
    if hidden.ndim != 2 or unembedding.ndim != 2 or hidden.shape[1] != width:
        raise ValueError(f"hidden [K, D] and unembedding {'[V, D]' if vocab_first else '[D, V]'} expected, got "
                         f"{hidden.shape} and {unembedding.shape}")
    sizes = tuple(sorted({min(int(size), rows) for size in sizes if size > 0} | {rows}))
    kept = as_bool(mask)
    needed = jnp.max(jnp.where(kept, jnp.arange(1, rows + 1), 0))
    branch = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), needed).astype(jnp.int32)  # smallest size >= needed
    compute = jnp.promote_types(jnp.promote_types(hidden.dtype, unembedding.dtype), jnp.float32)
    return _kept_rows_head(hidden, unembedding, tokens.astype(jnp.int32), kept, branch,
                           jnp.asarray(temperature, compute), sizes, vocab_first)


def _head_rows(hidden, unembedding, tokens, kept, rows: int, temperature, vocab_first: bool):
    """(log-probs [rows], logits [rows, V], shift [rows], Σ exp [rows]) of the first `rows` rows, as
    `_vocab_statistics` forms them; masked rows' hidden states are replaced by zeros (as `_chunk_fn` does) and
    their log-probs are 0."""
    source = jnp.where(kept[:rows, None], hidden[:rows], jnp.zeros((), hidden.dtype))
    compute = jnp.promote_types(jnp.promote_types(hidden.dtype, unembedding.dtype), jnp.float32)
    logits = jnp.einsum("kd,vd->kv" if vocab_first else "kd,dv->kv", source, unembedding,
                        preferred_element_type=compute)
    shift = _finite_or_zero(jnp.max(logits, axis=-1))
    sum_exp = jnp.sum(jnp.exp((logits - shift[:, None]) / temperature), axis=-1)
    # read from the product, as `_chunk_fn` does
    chosen = jnp.take_along_axis(logits, tokens[:rows, None], axis=-1)[:, 0]
    logprobs = jnp.where(kept[:rows], (chosen - shift) / temperature - jnp.log(sum_exp), 0)
    return logprobs, logits, shift, sum_exp


def _pad_rows(values, rows: int):
    return jnp.pad(values, [(0, rows - values.shape[0])] + [(0, 0)] * (values.ndim - 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _kept_rows_head(hidden, unembedding, tokens, kept, branch, temperature, sizes, vocab_first):
    rows = hidden.shape[0]
    return lax.switch(branch, [lambda k=k: _pad_rows(
        _head_rows(hidden, unembedding, tokens, kept, k, temperature, vocab_first)[0], rows) for k in sizes])


def _kept_rows_head_fwd(hidden, unembedding, tokens, kept, branch, temperature, sizes, vocab_first):
    rows = hidden.shape[0]

    def run(k):  # the logits are kept, not the probabilities: the backward forms those inside its product's input
        return tuple(_pad_rows(value, rows)
                     for value in _head_rows(hidden, unembedding, tokens, kept, k, temperature, vocab_first))

    logprobs, *statistics = lax.switch(branch, [functools.partial(run, k) for k in sizes])
    return logprobs, (hidden, unembedding, tokens, kept, branch, temperature, *statistics)


def _kept_rows_head_bwd(sizes, vocab_first, saved, cotangent):
    hidden, unembedding, tokens, kept, branch, temperature, logits, shift, sum_exp = saved
    rows, compute = hidden.shape[0], logits.dtype

    def run(k):
        weight = jnp.where(kept[:k], cotangent[:k], 0).astype(compute)
        onehot = lax.broadcasted_iota(jnp.int32, (k, logits.shape[1]), 1) == tokens[:k, None]
        # d log p_t / d logit_v = ([v = t] − p_v) / τ, p_v = exp(z_v − m) / Σ exp(z − m); formed in the order
        # autodiff of the forward forms it: the same logits' gradient as `logprobs_from_hidden`, to the bit
        spread = (-(weight / sum_exp[:k])[:, None] * jnp.exp((logits[:k] - shift[:k, None]) / temperature)) / temperature
        d_logits = jnp.where(onehot, spread + (weight / temperature)[:, None], spread)
        source = jnp.where(kept[:k, None], hidden[:k], jnp.zeros((), hidden.dtype))
        d_hidden = jnp.einsum("kv,vd->kd" if vocab_first else "kv,dv->kd", d_logits, unembedding,
                              preferred_element_type=compute)
        d_unembedding = jnp.einsum("kv,kd->vd" if vocab_first else "kd,kv->dv", *(
            (d_logits, source) if vocab_first else (source, d_logits)), preferred_element_type=compute)
        return _pad_rows(d_hidden.astype(hidden.dtype), rows), d_unembedding.astype(unembedding.dtype)

    d_hidden, d_unembedding = lax.switch(branch, [functools.partial(run, k) for k in sizes])
    return d_hidden, d_unembedding, None, None, None, None  # no gradient for τ (a setting, not a parameter)


_kept_rows_head.defvjp(_kept_rows_head_fwd, _kept_rows_head_bwd)
