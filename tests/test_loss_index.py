"""The loss-position index: the LM head runs only where a loss is, with the same numbers as every position."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import llama
from rlhf_jax.models.config import tiny_config
from rlhf_jax.trainers.common import index_bucket, predicted_mask, teacher_forced_logprobs, with_loss_index
from rlhf_jax.config import PreferenceLoss
from rlhf_jax.trainers.dpo import pair_logprobs, preference_train_step, reference_logprobs
from rlhf_jax.trainers.sft import sft_train_step
from rlhf_jax.training.accumulate import split_microbatches
from rlhf_jax.training.state import TrainState, make_optimizer

CONFIG = tiny_config("llama")


def _rows(rng, batch, length, prefix=""):
    tokens = rng.integers(3, CONFIG.vocab_size, (batch, length))
    lengths = rng.integers(length // 2, length + 1, batch)
    prompt_lengths = rng.integers(1, length // 2, batch)
    column = np.arange(length)[None]
    attention = column < lengths[:, None]
    return {f"{prefix}tokens": tokens.astype(np.int32), f"{prefix}attention_mask": attention,
            f"{prefix}loss_mask": attention & (column >= prompt_lengths[:, None])}


def _pairs(seed, pairs=4, length=10):
    rng = np.random.default_rng(seed)
    return {**_rows(rng, pairs, length, "chosen_"), **_rows(rng, pairs, length, "rejected_")}


def _device(batch):
    return {key: jnp.asarray(value) for key, value in batch.items()}


@pytest.mark.parametrize("count, limit, want", [(0, 1000, 64), (64, 1000, 64), (65, 1000, 96), (96, 1000, 96),
                                                (97, 1000, 128), (129, 1000, 192), (331, 4096, 384),
                                                (385, 4096, 512), (900, 1000, 1000), (10, 40, 40)])
def test_index_bucket_two_sizes_per_octave_never_above_the_batch(count, limit, want):
    assert index_bucket(count, limit) == want


@pytest.mark.parametrize("num_microbatches", [1, 2, 4])
def test_each_microbatch_gets_exactly_its_predicted_positions(num_microbatches):
    batch = _rows(np.random.default_rng(1), 8, 12)
    indexed = with_loss_index(batch, num_microbatches)
    micro = split_microbatches({key: jnp.asarray(value) for key, value in indexed.items()}, num_microbatches)
    for m in range(num_microbatches):
        mask = np.asarray(predicted_mask({key: value[m] for key, value in micro.items()}))
        flat = np.asarray(micro["loss_index"][m]).reshape(-1)
        real = flat[flat < mask.size]
        np.testing.assert_array_equal(real, np.flatnonzero(mask))  # every position, once, in order
        assert np.all(flat[real.size:] == mask.size)  # then padding only


def test_packed_rows_index_skips_segment_starts():
    batch = {"tokens": np.ones((1, 6), np.int32), "loss_mask": np.ones((1, 6), bool),
             "segment_ids": np.array([[1, 1, 1, 2, 2, 0]])}
    flat = with_loss_index(batch)["loss_index"].reshape(-1)
    np.testing.assert_array_equal(flat[flat < 6], [1, 2, 4])


def test_indexed_token_logprobs_equal_every_position_where_a_loss_is_and_zero_elsewhere():
    params = llama.init_params(CONFIG, jax.random.key(0))
    batch = _device(_rows(np.random.default_rng(2), 4, 12))
    indexed = with_loss_index(batch)
    full = np.asarray(teacher_forced_logprobs(CONFIG, params, batch))
    ours = np.asarray(teacher_forced_logprobs(CONFIG, params, batch, index=jnp.asarray(indexed["loss_index"])))
    mask = np.asarray(predicted_mask(batch))
    np.testing.assert_allclose(ours[mask], full[mask], rtol=1e-5, atol=1e-6)
    assert np.all(ours[~mask] == 0)


@pytest.mark.parametrize("num_microbatches", [1, 2])
def test_sft_step_with_the_index_equals_the_step_without(num_microbatches):
    params = llama.init_params(CONFIG, jax.random.key(0))
    batch = _rows(np.random.default_rng(3), 4, 12)
    step = jax.jit(functools.partial(sft_train_step, CONFIG, num_microbatches))
    outputs = []
    for prepared in (batch, with_loss_index(batch, num_microbatches)):
        state = TrainState.create(params, make_optimizer("adamw", 1e-3), jax.random.key(0))
        state, metrics = step(state, _device(prepared))
        outputs.append((state.params, metrics))
    (plain_params, plain), (indexed_params, indexed) = outputs
    np.testing.assert_allclose(indexed["sft/loss"], plain["sft/loss"], rtol=1e-6)
    np.testing.assert_allclose(indexed["optim/grad_norm"], plain["optim/grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), indexed_params, plain_params)


def test_pair_logprobs_and_dpo_step_with_the_index_equal_the_step_without():
    params = llama.init_params(CONFIG, jax.random.key(0))
    reference = llama.init_params(CONFIG, jax.random.key(1))
    batch = _pairs(4)
    assert with_loss_index(batch, 2)["pair_loss_index"].shape[0] == 4  # travels in the pair rows
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
                 pair_logprobs(CONFIG, params, _device(with_loss_index(batch))),
                 pair_logprobs(CONFIG, params, _device(batch)))
    step = jax.jit(functools.partial(preference_train_step, CONFIG, PreferenceLoss(), 2))
    outputs = []
    for prepared in (batch, with_loss_index(batch, 2)):
        prepared = _device(prepared)
        prepared = {**prepared, **reference_logprobs(CONFIG, reference, prepared, 2)}
        state = TrainState.create(params, make_optimizer("adamw", 1e-3), jax.random.key(0))
        outputs.append(step(state, prepared)[1])
    # the reference in micro-batches, with or without the index, equals one pass over the whole batch
    whole = reference_logprobs(CONFIG, reference, _device(batch))
    for split in (_device(batch), _device(with_loss_index(batch, 2))):
        for key, value in reference_logprobs(CONFIG, reference, split, 2).items():
            np.testing.assert_allclose(value, whole[key], rtol=1e-5, err_msg=key)
    for name in outputs[0]:
        np.testing.assert_allclose(outputs[1][name], outputs[0][name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_batch_without_loss_masks_is_unchanged():
    batch = {"chosen_tokens": np.zeros((2, 4), np.int32)}
    assert with_loss_index(batch) is batch
