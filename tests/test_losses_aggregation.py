"""Loss aggregation modes, and exact gradient accumulation over micro-batches with (sum, count)."""

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.losses import (
    AGGREGATION_MODES,
    aggregate,
    aggregate_mean,
    nll_per_token,
    ppo_policy_loss_per_token,
    logprobs_from_logits,
    value_loss_per_token,
)

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)
FP32 = dict(rtol=1e-5, atol=1e-6)
SHAPES = [(1, 1), (3, 5), (4, 8)]


def ref_aggregate(loss, mask, mode, normaliser=None):
    """float64 numpy, from the definitions in the docstring."""
    masked = np.where(mask, loss, 0.0)
    if mode == "token-mean":
        return masked.sum(), mask.sum()
    if mode == "sequence-mean":
        counts = mask.sum(-1)
        per_sequence = [masked[b].sum() / counts[b] for b in range(len(counts)) if counts[b] > 0]
        return float(np.sum(per_sequence)), len(per_sequence)
    tokens_per_sequence = mask.shape[-1] if normaliser is None else normaliser
    return masked.sum(), tokens_per_sequence * mask.shape[0]


def random_batch(seed, batch, length, density):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, length)) * 2, rng.random((batch, length)) < density


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
@SETTINGS
@given(seed=st.integers(0, 2**31), shape=st.sampled_from(SHAPES), density=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
       normaliser=st.sampled_from([None, 16]))
def test_matches_float64_numpy(mode, seed, shape, density, normaliser):
    loss, mask = random_batch(seed, *shape, density)
    loss32 = loss.astype(np.float32)
    got_sum, got_count = jax.jit(aggregate, static_argnums=(2,))(jnp.asarray(loss32), jnp.asarray(mask), mode,
                                                                 normaliser)
    want_sum, want_count = ref_aggregate(loss32.astype(np.float64), mask, mode, normaliser)
    assert got_sum.dtype == got_count.dtype == jnp.float32
    np.testing.assert_allclose(float(got_sum), want_sum, **FP32)
    assert float(got_count) == want_count
    mean = float(aggregate_mean(jnp.asarray(loss32), jnp.asarray(mask), mode, normaliser))
    np.testing.assert_allclose(mean, want_sum / want_count if want_count else 0.0, **FP32)


def test_hand_computed():
    # loss = [[1, 2, 3], [4, 5, 6]], mask = [[1, 1, 0], [0, 0, 1]]
    # token-mean:    sum = 1 + 2 + 6 = 9, count = 3               -> 3
    # sequence-mean: row means 1.5 and 6, sum = 7.5, count = 2     -> 3.75
    # sum-fixed:     sum = 9, count = normaliser 4 * 2 rows = 8    -> 1.125 (default normaliser T=3: 9/6 = 1.5)
    loss = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = jnp.array([[1, 1, 0], [0, 0, 1]])
    assert [float(v) for v in aggregate(loss, mask, "token-mean")] == [9.0, 3.0]
    assert [float(v) for v in aggregate(loss, mask, "sequence-mean")] == [7.5, 2.0]
    assert [float(v) for v in aggregate(loss, mask, "sum-fixed", 4)] == [9.0, 8.0]
    assert float(aggregate_mean(loss, mask, "sum-fixed")) == 1.5
    assert float(aggregate_mean(loss, mask, "sequence-mean")) == 3.75
    # a row with no tokens is not a sequence for sequence-mean: 3 rows, one empty
    loss3 = jnp.concatenate([loss, jnp.full((1, 3), 100.0)])
    mask3 = jnp.concatenate([mask, jnp.zeros((1, 3), int)])
    assert [float(v) for v in aggregate(loss3, mask3, "sequence-mean")] == [7.5, 2.0]


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="unknown loss aggregation mode 'mean'.*token-mean, sequence-mean, sum-fixed"):
        aggregate(jnp.zeros((2, 3)), jnp.ones((2, 3)), "mean")


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_jit_equals_eager(mode):
    loss, mask = random_batch(0, 3, 6, 0.5)
    x, m = jnp.asarray(loss, jnp.float32), jnp.asarray(mask)
    for got, want in zip(jax.jit(aggregate, static_argnums=(2,))(x, m, mode), aggregate(x, m, mode)):
        np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_nan_and_inf_under_mask_do_not_leak(mode):
    loss, mask = random_batch(1, 3, 6, 0.5)
    mask[1] = False  # an empty row too
    m = jnp.asarray(mask)
    clean = jnp.asarray(loss, jnp.float32)
    poison = np.resize(np.array([np.nan, np.inf, -np.inf]), loss.shape)
    poisoned = jnp.asarray(np.where(mask, loss, poison), jnp.float32)
    assert float(aggregate_mean(poisoned, m, mode)) == float(aggregate_mean(clean, m, mode))
    grad = jax.grad(aggregate_mean)(poisoned, m, mode)
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~mask] == 0)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(jax.grad(aggregate_mean)(clean, m, mode)))


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_bf16_input_gives_float32(mode):
    loss, mask = random_batch(2, 3, 6, 0.7)
    bf16 = jnp.asarray(loss, jnp.bfloat16)
    loss_sum, count = aggregate(bf16, jnp.asarray(mask), mode)
    assert loss_sum.dtype == count.dtype == jnp.float32
    want_sum, _ = ref_aggregate(np.asarray(bf16.astype(jnp.float32), np.float64), mask, mode)
    np.testing.assert_allclose(float(loss_sum), want_sum, **FP32)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_vmap_over_leading_axis(mode):
    rng = np.random.default_rng(3)
    loss = jnp.asarray(rng.normal(size=(4, 3, 6)), jnp.float32)
    mask = jnp.asarray(rng.random((4, 3, 6)) < 0.5)
    sums, counts = jax.vmap(lambda l, m: aggregate(l, m, mode))(loss, mask)
    for i in range(4):
        s, c = aggregate(loss[i], mask[i], mode)
        np.testing.assert_allclose(float(sums[i]), float(s), rtol=1e-6)
        assert float(counts[i]) == float(c)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_gradient_float64(mode):
    loss, mask = random_batch(4, 3, 5, 0.6)
    with jax.enable_x64(True):
        x = jnp.asarray(loss, jnp.float64)
        assert aggregate(x, mask, mode)[0].dtype == jnp.float64
        # a non-linear per-token loss so the check is not trivial
        check_grads(jax.jit(lambda v: aggregate_mean(jnp.sin(v) * v, mask, mode, 7)), (x,), order=1, modes=("rev",),
                    atol=1e-8, rtol=1e-8)


# --------------------------------------------------------------------------------------------------------------
# Gradient accumulation: Σ_micro grad(loss_sum) / Σ_micro count == grad(big-batch loss), exactly (float64)

B, T, V, D = 8, 6, 5, 3


def _problem(seed):
    rng = np.random.default_rng(seed)
    params = {"w": rng.normal(size=(D, V)), "v": rng.normal(size=(D,))}
    features = rng.normal(size=(B, T, D))
    tokens = rng.integers(0, V, size=(B, T))
    # very uneven masks: micro-batches hold different numbers of tokens, and row 5 is empty
    lengths = np.array([6, 1, 3, 6, 2, 0, 5, 4])
    mask = np.arange(T)[None] < lengths[:, None]
    old_logprobs = rng.normal(size=(B, T)) * 0.1 - 1.5
    advantages = rng.normal(size=(B, T))
    returns = rng.normal(size=(B, T))
    old_values = rng.normal(size=(B, T)) * 0.1
    return params, (features, tokens, mask, old_logprobs, advantages, returns, old_values)


def _per_token_loss(kind, params, batch):
    features, tokens, mask, old_logprobs, advantages, returns, old_values = batch
    logprobs = logprobs_from_logits(features @ params["w"], tokens)
    if kind == "sft":
        return nll_per_token(logprobs, mask)
    if kind == "policy":
        return ppo_policy_loss_per_token(logprobs, old_logprobs, advantages, mask, 0.2)[0]
    values = features @ params["v"]
    return value_loss_per_token(values, old_values, returns, mask, 0.2)[0]


@pytest.mark.parametrize("kind", ["sft", "policy", "value"])
@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_micro_batch_accumulation_is_exact(kind, mode):
    with jax.enable_x64(True):
        params, batch = _problem(0)
        params = jax.tree.map(jnp.asarray, params)
        batch = tuple(jnp.asarray(x) for x in batch)
        mask = batch[2]

        def big_batch_loss(p):
            return aggregate_mean(_per_token_loss(kind, p, batch), mask, mode, normaliser=T)

        def micro_sum_and_count(p, micro):
            return aggregate(_per_token_loss(kind, p, micro), micro[2], mode, normaliser=T)

        def micro_mean(p, micro):
            return aggregate_mean(_per_token_loss(kind, p, micro), micro[2], mode, normaliser=T)

        micro_grad_and_count = jax.jit(jax.grad(micro_sum_and_count, has_aux=True))  # count rides along as aux
        micro_mean_grad = jax.jit(jax.grad(micro_mean))

        grad_sum = jax.tree.map(jnp.zeros_like, params)
        count_total = 0.0
        naive = jax.tree.map(jnp.zeros_like, params)  # the "mean of means" that accumulation must not do
        for rows in np.split(np.arange(B), 4):
            micro = tuple(x[rows] for x in batch)
            grads, count = micro_grad_and_count(params, micro)
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            count_total += float(count)
            naive = jax.tree.map(lambda a, g: a + g / 4, naive, micro_mean_grad(params, micro))

        accumulated = jax.tree.map(lambda g: g / count_total, grad_sum)
        expected = jax.jit(jax.grad(big_batch_loss))(params)
        for name in params:
            assert expected[name].dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(accumulated[name]), np.asarray(expected[name]), rtol=1e-10,
                                       atol=1e-12)
        if mode != "sum-fixed":  # the test can fail: averaging per-micro-batch means gives another gradient
            differs = [not np.allclose(naive[n], expected[n], rtol=1e-3) for n in params]
            assert any(differs)
