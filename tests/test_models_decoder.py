"""Decoder behaviour on tiny models: KV-cache decoding, packed sequences, value/reward heads."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import (
    forward,
    init_cache,
    init_params,
    init_scalar_model,
    load,
    rewards_forward,
    tiny_config,
    values_forward,
)

jit_forward = jax.jit(forward, static_argnums=0, static_argnames=("compute_logits",))
jit_values = jax.jit(values_forward, static_argnums=0)
jit_rewards = jax.jit(rewards_forward, static_argnums=0)
ATOL = 2e-5


@pytest.fixture(scope="module")
def tiny():
    config, params, _ = load("tiny:llama")
    return config, params


def _configs(config):
    # Mistral-style sliding window smaller than the sequences below exercises the window in the cache too.
    return {"full": config, "window": dataclasses.replace(config, family="mistral", sliding_window=4)}


@pytest.mark.parametrize("variant", ["full", "window"])
def test_kv_cache_decode_equals_full_forward(tiny, variant, left_padded):
    config, params = tiny
    config = _configs(config)[variant]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, config.vocab_size, size=n).tolist() for n in (6, 3, 5)]
    prompt_tokens, prompt_mask = left_padded(prompts, pad_id=config.pad_token_id)
    steps = 5
    continuation = rng.integers(3, config.vocab_size, size=(3, steps)).astype(np.int32)
    continuation[0, 2] = config.eos_token_id  # an EOS (= pad id) inside the response is still a real token
    tokens = np.concatenate([prompt_tokens, continuation], axis=1)
    mask = np.concatenate([prompt_mask, np.ones_like(continuation, bool)], axis=1)
    full = np.asarray(jit_forward(config, params, tokens, attention_mask=mask).logits)

    cache = init_cache(config, batch_size=3, max_length=tokens.shape[1] + 2)
    out = jit_forward(config, params, prompt_tokens, attention_mask=prompt_mask, cache=cache)
    prompt_len = prompt_tokens.shape[1]
    np.testing.assert_allclose(np.asarray(out.logits)[prompt_mask], full[:, :prompt_len][prompt_mask], atol=ATOL)
    cache = out.cache
    for t in range(steps):
        step = jit_forward(config, params, continuation[:, t:t + 1], attention_mask=np.ones((3, 1), bool), cache=cache)
        np.testing.assert_allclose(np.asarray(step.logits)[:, 0], full[:, prompt_len + t], atol=ATOL)
        cache = step.cache
    assert int(cache.index) == tokens.shape[1]


@pytest.mark.parametrize("variant", ["full", "window"])
def test_packed_segments_equal_separate_sequences(tiny, variant):
    config, params = tiny
    config = _configs(config)[variant]
    rng = np.random.default_rng(1)
    first, second = rng.integers(3, config.vocab_size, size=7), rng.integers(3, config.vocab_size, size=5)
    packed = np.concatenate([first, second, [config.pad_token_id] * 3])[None].astype(np.int32)
    segment_ids = np.array([[1] * 7 + [2] * 5 + [0] * 3], np.int32)
    logits = np.asarray(jit_forward(config, params, packed, segment_ids=segment_ids).logits)[0]
    alone_first = np.asarray(jit_forward(config, params, first[None].astype(np.int32)).logits)[0]
    alone_second = np.asarray(jit_forward(config, params, second[None].astype(np.int32)).logits)[0]
    np.testing.assert_allclose(logits[:7], alone_first, atol=ATOL)
    np.testing.assert_allclose(logits[7:12], alone_second, atol=ATOL)
    assert np.isfinite(logits).all()  # fully masked pad rows stay finite


def test_scalar_model_shares_backbone_with_fresh_head(tiny):
    config, params = tiny
    model = init_scalar_model(config, params, jax.random.key(1))
    assert "lm_head" in params and "lm_head" not in model["backbone"]
    assert model["backbone"]["layers"] is params["layers"]  # shared, not copied
    assert model["backbone"]["embed_tokens"] is params["embed_tokens"]
    assert model["head"]["kernel"].shape == (config.hidden_size, 1)
    np.testing.assert_array_equal(model["head"]["bias"], 0.0)
    tokens = np.arange(3, 11, dtype=np.int32)[None]
    hidden = jit_forward(config, params, tokens, compute_logits=False).hidden
    values = jit_values(config, model, tokens)
    expected = np.asarray(hidden) @ np.asarray(model["head"]["kernel"])[:, 0]
    np.testing.assert_allclose(np.asarray(values)[0], expected[0], atol=1e-5)


def test_reward_reads_last_real_token_with_pad_equal_eos(tiny, left_padded):
    config, params = tiny
    model = init_scalar_model(config, params, jax.random.key(2))
    eos = config.eos_token_id
    assert eos == config.pad_token_id
    sequences = [[5, 9, 13, 17, eos], [7, 8, eos], [20, 21, 22, 23]]  # responses ending in EOS = pad
    tokens, mask = left_padded(sequences, pad_id=eos)
    left = np.asarray(jit_rewards(config, model, tokens, mask))
    # the score sits on the final EOS (a real token), not on a pad after it nor on the token before it
    right_tokens = np.full_like(tokens, eos)
    right_mask = np.zeros_like(mask)
    for row, sequence in enumerate(sequences):
        right_tokens[row, :len(sequence)] = sequence
        right_mask[row, :len(sequence)] = True
    right = np.asarray(jit_rewards(config, model, right_tokens, right_mask))
    values = np.asarray(jit_values(config, model, right_tokens, attention_mask=right_mask))
    np.testing.assert_allclose(right, [values[row, len(s) - 1] for row, s in enumerate(sequences)], atol=1e-6)
    assert not np.allclose(right, [values[row, len(s) - 2] for row, s in enumerate(sequences)], atol=1e-3)
    # right pads cannot change a causal model's values at real positions, so `right` is the padding-free
    # reference: left pads must be masked out exactly
    np.testing.assert_allclose(left, right, atol=1e-5)


def test_bfloat16_compute_is_close_to_float32(tiny):
    config, params = tiny
    config16 = dataclasses.replace(config, dtype="bfloat16")
    tokens = np.arange(3, 15, dtype=np.int32)[None]
    logits32 = np.asarray(jit_forward(config, params, tokens).logits)
    logits16 = jit_forward(config16, params, tokens).logits
    assert logits16.dtype == jnp.float32  # logits always float32
    rel = np.linalg.norm(np.asarray(logits16) - logits32) / np.linalg.norm(logits32)
    assert rel < 0.05
    assert tiny_config("llama") == dataclasses.replace(config, dtype="float32")


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_policies_give_the_same_loss_and_gradients(policy):
    config = tiny_config("llama")
    params = init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, config.vocab_size)

    def loss(config, params):
        logits = forward(config, params, tokens).logits
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    plain = jax.jit(jax.value_and_grad(lambda p: loss(config, p)))(params)
    remat = dataclasses.replace(config, remat=True, remat_policy=policy)
    checkpointed = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(params)
    np.testing.assert_allclose(checkpointed[0], plain[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(checkpointed[1]), jax.tree.leaves(plain[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_unrolled_layers_compute_what_the_scan_computes():
    from rlhf_jax.models.llama import layer_unroll

    config = tiny_config("llama")
    params = init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, config.vocab_size)
    outputs = {}
    for unroll in (1, config.num_layers):
        variant = dataclasses.replace(config, scan_unroll=unroll)
        assert layer_unroll(variant) == unroll
        loss = lambda p, c=variant: jnp.sum(forward(c, p, tokens).logits ** 2)  # noqa: E731
        outputs[unroll] = (forward(variant, params, tokens).logits, jax.grad(loss)(params))
    np.testing.assert_allclose(outputs[config.num_layers][0], outputs[1][0], rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), outputs[config.num_layers][1],
                 outputs[1][1])
    assert layer_unroll(dataclasses.replace(config, scan_unroll=None)) == (
        config.num_layers if jax.default_backend() == "cpu" else 1)


def _softmax_attention_float64(q, k, v, allowed):
    """numpy float64: softmax(q k^T / sqrt(hd)) v over the allowed keys, each key head shared by H/Hkv query
    heads; a query with no allowed key averages every value (uniform weights), as the decoder defines it."""
    num_heads, num_kv_heads, head_dim = q.shape[2], k.shape[2], q.shape[3]
    k = np.repeat(k, num_heads // num_kv_heads, axis=2)
    v = np.repeat(v, num_heads // num_kv_heads, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(head_dim)
    scores = np.where(allowed[:, None], scores, -np.inf)
    none = ~allowed.any(-1)[:, None, :, None]
    scores = np.where(none, 0.0, scores)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", weights, v)


def _autodiff_attention(q, k, v, allowed):
    """The attention written plainly, for jax.grad to differentiate (the decoder's has its own backward)."""
    num_heads, num_kv_heads, head_dim = q.shape[2], k.shape[2], q.shape[3]
    k = jnp.repeat(k, num_heads // num_kv_heads, axis=2)
    v = jnp.repeat(v, num_heads // num_kv_heads, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(head_dim)
    scores = jnp.where(allowed[:, None], scores, jnp.where(allowed.any(-1)[:, None, :, None], -jnp.inf, 0.0))
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)


def test_attention_and_its_recomputing_backward_match_the_softmax_and_autodiff_in_float64():
    from rlhf_jax.models.llama import grouped_query_attention

    rng = np.random.default_rng(0)
    batch, length, keys, num_heads, num_kv_heads, head_dim = 2, 5, 7, 6, 2, 4
    q = rng.normal(size=(batch, length, num_heads, head_dim))
    k, v = rng.normal(size=(2, batch, keys, num_kv_heads, head_dim))
    allowed = rng.random((batch, length, keys)) < 0.6
    allowed[0, 1] = False  # a query that sees no key: uniform weights
    allowed[1, 2] = True
    cotangent = rng.normal(size=q.shape)
    with jax.enable_x64(True):
        args = [jnp.asarray(x) for x in (q, k, v)]
        out = grouped_query_attention(*args, jnp.asarray(allowed))
        np.testing.assert_allclose(np.asarray(out), _softmax_attention_float64(q, k, v, allowed), rtol=1e-12, atol=1e-12)
        grads = {}
        for name, fn in (("decoder", grouped_query_attention), ("autodiff", _autodiff_attention)):
            loss = lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v, jnp.asarray(allowed)) * cotangent)  # noqa: E731
            grads[name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
        for ours, reference in zip(grads["decoder"], grads["autodiff"]):
            assert ours.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=1e-10, atol=1e-12)
        assert np.abs(np.asarray(grads["decoder"][2])).max() > 0.1  # v's gradient (uniform row included) is not zero
    # narrower inputs keep their dtype, and their gradients stay close to float64's
    for dtype, tolerance in ((jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)):
        narrow = [jnp.asarray(x, dtype) for x in (q, k, v)]
        loss = lambda q, k, v: jnp.sum(grouped_query_attention(q, k, v, jnp.asarray(allowed)).astype(jnp.float32)  # noqa: E731
                                       * cotangent.astype(np.float32))
        for ours, reference in zip(jax.grad(loss, argnums=(0, 1, 2))(*narrow), grads["autodiff"]):
            assert ours.dtype == dtype
            scale = np.abs(np.asarray(reference)).max()
            np.testing.assert_allclose(np.asarray(ours, np.float64), np.asarray(reference), atol=tolerance * scale)


@pytest.mark.parametrize("length", [320, 450])
def test_causal_blocks_give_the_whole_attention_in_float64(length):
    """`grouped_query_attention(..., causal=True)` splits the queries into blocks that skip the keys after
    them: the same values and gradients on every row that sees a key, with segments, padding, a window and a
    shared prefix in the mask (`attention_mask_bias`), and an uneven last block."""
    from rlhf_jax.models.llama import attention_mask_bias, grouped_query_attention

    rng = np.random.default_rng(1)
    batch, num_heads, num_kv_heads, head_dim = 2, 4, 2, 8
    q = rng.normal(size=(batch, length, num_heads, head_dim))
    k, v = rng.normal(size=(2, batch, length, num_kv_heads, head_dim))
    slots = np.broadcast_to(np.arange(length), (batch, length))
    valid = slots < np.array([[length], [length - 137]])  # row 1 right-padded past a block
    segments = np.where(slots < 70, 1, 2) * valid  # two segments per row
    shared = np.zeros((batch, length), bool)
    shared[0, :30] = True  # row 0's first 30 tokens are a prefix every later segment sees
    allowed = np.asarray(attention_mask_bias(jnp.asarray(slots), jnp.asarray(slots), jnp.asarray(valid),
                                             jnp.asarray(segments), jnp.asarray(segments), jnp.asarray(slots),
                                             jnp.asarray(slots), 100, key_shared=jnp.asarray(shared)))
    seen = allowed.any(-1)  # [B, T]: rows with a visible key (padding rows see none)
    cotangent = rng.normal(size=q.shape) * seen[:, :, None, None]
    with jax.enable_x64(True):
        args = [jnp.asarray(x) for x in (q, k, v)]
        outs, grads = {}, {}
        for causal in (False, True):
            fn = functools.partial(grouped_query_attention, allowed=jnp.asarray(allowed), causal=causal)
            outs[causal] = np.asarray(jax.jit(fn)(*args))
            loss = lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v) * cotangent)  # noqa: E731
            grads[causal] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
        np.testing.assert_allclose(outs[True][seen], outs[False][seen], rtol=1e-12, atol=1e-12)
        for ours, reference in zip(grads[True], grads[False]):
            np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=1e-10, atol=1e-12)
        assert not seen.all()  # the padded rows were in the batch


@pytest.mark.parametrize("prefix, groups, size, window", [(6, 3, 5, None), (7, 2, 9, 4), (330, 2, 40, 100),
                                                           (9, 2, 330, None)])
def test_prefix_and_segments_give_the_whole_attention_in_float64(prefix, groups, size, window):
    """A row laid out as a prefix then segments that each see it and not each other
    (`prefix_segment_masks`, `PrefixSegments`): attention over the blocks it keeps gives the whole masked
    attention's values and gradients on every query that sees a key, with a left-padded prefix, right-padded
    segments, a sliding window, and a prefix or segments long enough for causal blocks (330). The reference is
    the whole row's attention in one block."""
    from rlhf_jax.models.llama import (PrefixSegments, attention_mask_bias, grouped_query_attention,
                                       prefix_segment_masks)

    rng = np.random.default_rng(2)
    batch, num_heads, num_kv_heads, head_dim = 2, 4, 2, 8
    length = prefix + groups * size
    q = rng.normal(size=(batch, length, num_heads, head_dim))
    k, v = rng.normal(size=(2, batch, length, num_kv_heads, head_dim))
    slots = np.broadcast_to(np.arange(length), (batch, length))
    lengths = rng.integers(0, size + 1, (batch, groups))
    lengths[0, 0], lengths[1, -1] = size, 0  # a full segment and an empty one
    valid = np.concatenate([slots[:, :prefix] >= np.array([[0], [prefix // 3]]),  # row 1's prefix left-padded
                            (np.arange(size)[None, None] < lengths[:, :, None]).reshape(batch, -1)], axis=1)
    segments = np.concatenate([np.zeros((batch, prefix), int), np.repeat(np.arange(1, groups + 1), size)[None]
                               .repeat(batch, 0)], axis=1)
    shared = slots < prefix
    positions = np.cumsum(valid, axis=1) - 1  # any positions: only the window reads them
    arrays = [jnp.asarray(x) for x in (slots, valid, segments, positions, shared)]
    slots_, valid_, segments_, positions_, shared_ = arrays
    whole = attention_mask_bias(slots_, slots_, valid_, segments_, segments_, positions_, positions_, window,
                                key_shared=shared_)
    blocks = prefix_segment_masks(slots_, valid_, segments_, positions_, window, shared_, prefix, groups)
    assert isinstance(blocks, PrefixSegments)
    assert blocks.segments.shape == (batch, groups, size, prefix + size)
    # every key the whole mask shows a segment's query lies in the prefix or in its own segment
    own = (slots[:, None, :] < prefix) | (segments[:, None, :] == segments[:, :, None])
    assert not np.any(np.asarray(whole) & ~own)
    seen = np.asarray(whole).any(-1)
    assert not seen.all() and seen[:, prefix:].any()
    cotangent = rng.normal(size=q.shape) * seen[:, :, None, None]
    with jax.enable_x64(True):
        args = [jnp.asarray(x) for x in (q, k, v)]
        outs, grads = {}, {}
        for name, allowed in (("whole", whole), ("blocks", blocks)):
            fn = functools.partial(grouped_query_attention, allowed=allowed, causal=name == "blocks")
            outs[name] = np.asarray(jax.jit(fn)(*args))
            loss = lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v) * cotangent)  # noqa: E731
            grads[name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
        np.testing.assert_allclose(outs["blocks"][seen], outs["whole"][seen], rtol=1e-12, atol=1e-12)
        for ours, reference in zip(grads["blocks"], grads["whole"]):
            np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=1e-10, atol=1e-12)
