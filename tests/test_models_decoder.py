"""Decoder behaviour on tiny models: KV-cache decoding, packed sequences, value/reward heads."""

from __future__ import annotations

import dataclasses

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
