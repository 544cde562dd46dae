"""KL estimators and KL-shaped per-token rewards (score at the last response token)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from rlhf_jax.losses import (
    KL_ESTIMATORS,
    get_kl_estimator,
    kl_estimate,
    kl_penalized_rewards,
    last_token_mask,
    masked_mean,
)

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)
FP32 = dict(rtol=1e-5, atol=1e-6)
SHAPES = [(1, 1), (4, 8)]


def ref_estimator(name, logp, logq):
    """float64 numpy, from Schulman's definitions with r = q/p."""
    logp, logq = np.asarray(logp, np.float64), np.asarray(logq, np.float64)
    if name == "k1":
        return logp - logq
    if name == "k2":
        return 0.5 * (logp - logq) ** 2
    return np.exp(logq - logp) - 1 - (logq - logp)


def ref_rewards(scores, logp, logq, mask, kl_coef, name):
    """A plain loop: −β KL on response tokens, the score added at the last True position of each row."""
    kl = np.where(mask, ref_estimator(name, np.where(mask, logp, 0), np.where(mask, logq, 0)), 0.0)
    rewards = np.where(mask, -kl_coef * kl, 0.0)
    for b in range(mask.shape[0]):
        positions = np.flatnonzero(mask[b])
        if positions.size:
            rewards[b, positions[-1]] += scores[b]
    return rewards, kl


def random_batch(seed, batch, length, density):
    rng = np.random.default_rng(seed)
    logp = (rng.normal(size=(batch, length)) - 2).astype(np.float32)
    logq = (logp + rng.normal(size=(batch, length)) * 0.5).astype(np.float32)
    mask = rng.random((batch, length)) < density
    scores = (rng.normal(size=batch) * 2).astype(np.float32)
    return scores, logp, logq, mask


_kl_estimate = jax.jit(kl_estimate, static_argnums=2)
_rewards = jax.jit(kl_penalized_rewards, static_argnums=5)


@pytest.mark.parametrize("name", sorted(KL_ESTIMATORS))
@SETTINGS
@given(seed=st.integers(0, 2**31), shape=st.sampled_from(SHAPES), density=st.sampled_from([0.0, 0.4, 1.0]))
def test_estimators_match_float64_numpy(name, seed, shape, density):
    _, logp, logq, mask = random_batch(seed, *shape, density)
    got = _kl_estimate(logp, logq, name)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), ref_estimator(name, logp, logq), **FP32)
    got_masked = _kl_estimate(logp, logq, name, mask)
    np.testing.assert_allclose(np.asarray(got_masked), np.where(mask, ref_estimator(name, logp, logq), 0), **FP32)


def test_estimators_hand_computed():
    # p = 0.5, q = 0.25: log ratio ln 2 = 0.693147
    # k1 = ln 2;  k2 = ½ (ln 2)² = 0.240227;  k3 = q/p − 1 − ln(q/p) = 0.5 − 1 + ln 2 = 0.193147
    logp, logq = jnp.array([[math.log(0.5)]]), jnp.array([[math.log(0.25)]])
    np.testing.assert_allclose(float(kl_estimate(logp, logq, "k1")[0, 0]), math.log(2), rtol=1e-6)
    np.testing.assert_allclose(float(kl_estimate(logp, logq, "k2")[0, 0]), 0.5 * math.log(2) ** 2, rtol=1e-6)
    np.testing.assert_allclose(float(kl_estimate(logp, logq, "k3")[0, 0]), math.log(2) - 0.5, rtol=1e-6)
    np.testing.assert_allclose(0.240227, 0.5 * math.log(2) ** 2, atol=1e-6)
    np.testing.assert_allclose(0.193147, math.log(2) - 0.5, atol=1e-6)


@pytest.mark.parametrize("name", ["k1", "k3"])
def test_unbiased_estimators_average_to_the_exact_kl(name):
    # Under tokens sampled from p, E_p[k1] = E_p[k3] = KL(p ‖ q) exactly (E_p[q/p] = 1): summing over the
    # vocabulary with weights p checks this without sampling noise.
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(12))
    q = rng.dirichlet(np.ones(12))
    exact = float(np.sum(p * np.log(p / q)))
    per_token = np.asarray(kl_estimate(jnp.log(p)[None].astype(jnp.float32), jnp.log(q)[None].astype(jnp.float32),
                                       name))[0]
    np.testing.assert_allclose(float(np.sum(p * per_token)), exact, rtol=1e-5)


def test_k3_and_k2_are_non_negative_k1_is_not():
    _, logp, logq, _ = random_batch(1, 4, 8, 1.0)
    assert np.all(np.asarray(kl_estimate(logp, logq, "k3")) >= 0)
    assert np.all(np.asarray(kl_estimate(logp, logq, "k2")) >= 0)
    assert np.any(np.asarray(kl_estimate(logp, logq, "k1")) < 0)


def test_unknown_estimator_raises():
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'; expected one of k1, k2, k3"):
        kl_estimate(jnp.zeros((1, 2)), jnp.zeros((1, 2)), "k4")
    with pytest.raises(ValueError, match="unknown KL estimator"):
        get_kl_estimator("")


@pytest.mark.parametrize("name", sorted(KL_ESTIMATORS))
@SETTINGS
@given(seed=st.integers(0, 2**31), shape=st.sampled_from(SHAPES), density=st.sampled_from([0.0, 0.4, 0.8, 1.0]))
def test_rewards_match_a_plain_loop(name, seed, shape, density):
    scores, logp, logq, mask = random_batch(seed, *shape, density)
    rewards, metrics = _rewards(scores, logp, logq, mask, 0.05, name)
    want, want_kl = ref_rewards(scores.astype(np.float64), logp, logq, mask, 0.05, name)
    assert rewards.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(rewards), want, **FP32)
    has_response = mask.any(-1)
    sequence_kl = want_kl.sum(-1)[has_response]
    np.testing.assert_allclose(float(metrics["kl/sequence_kl"]), sequence_kl.mean() if sequence_kl.size else 0.0,
                               **FP32)
    np.testing.assert_allclose(float(metrics["reward/total"]),
                               want.sum(-1)[has_response].mean() if has_response.any() else 0.0, **FP32)


def test_rewards_hand_computed():
    # Row 0: response at positions 1..3 (position 0 is prompt, 4 is padding); row 1: no response at all.
    # k1 with log ratio 0.5 everywhere, β = 0.1 -> −0.05 per response token; score 0.7 at position 3.
    # row 0 -> [0, −0.05, −0.05, 0.65, 0];  row 1 -> zeros (its NaN score lands nowhere)
    logp = jnp.full((2, 5), -1.0)
    logq = jnp.full((2, 5), -1.5)
    mask = jnp.array([[0, 1, 1, 1, 0], [0, 0, 0, 0, 0]])
    rewards, metrics = kl_penalized_rewards(jnp.array([0.7, jnp.nan]), logp, logq, mask, 0.1)
    np.testing.assert_allclose(np.asarray(rewards), [[0, -0.05, -0.05, 0.65, 0], [0, 0, 0, 0, 0]], atol=1e-7)
    np.testing.assert_allclose(float(metrics["kl/sequence_kl"]), 1.5, rtol=1e-6)  # 3 tokens × 0.5, one sequence
    np.testing.assert_allclose(float(metrics["kl/token_kl"]), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["reward/score"]), 0.7, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["reward/kl_penalty"]), -0.15, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["reward/total"]), 0.55, rtol=1e-6)
    assert float(metrics["kl/coef"]) == pytest.approx(0.1)


def test_score_lands_on_the_last_response_token_even_when_pad_equals_eos():
    # tokens: prompt [5, 6], response [7, 2] where 2 is EOS and also the pad id; the mask comes from lengths.
    # Finding "the last token" from token ids (first/last 2) would pick a pad slot; the mask says position 3.
    eos = pad = 2
    tokens = np.array([[5, 6, 7, eos, pad, pad]])
    prompt_length, response_length = 2, 2
    positions = np.arange(tokens.shape[1])
    mask = (positions >= prompt_length) & (positions < prompt_length + response_length)
    assert last_token_mask(mask[None]).tolist() == [[False, False, False, True, False, False]]
    rewards, _ = kl_penalized_rewards(jnp.array([0.7]), jnp.zeros((1, 6)), jnp.zeros((1, 6)), mask[None], 0.1)
    np.testing.assert_allclose(np.asarray(rewards), [[0, 0, 0, 0.7, 0, 0]], atol=1e-7)


def test_rewards_are_float32_even_from_integer_inputs():
    # integer scores and log-probs (as if built with zeros_like(token_ids)) must not truncate 0.7 · β terms
    scores = jnp.array([1, 2], jnp.int32)
    logp = jnp.array([[0, 1, 1], [2, 0, 0]], jnp.int32)
    logq = jnp.zeros((2, 3), jnp.int32)
    rewards, _ = kl_penalized_rewards(scores, logp, logq, jnp.array([[1, 1, 1], [1, 1, 0]]), 0.7)
    assert rewards.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(rewards), [[0, -0.7, 1 - 0.7], [-1.4, 2, 0]], rtol=1e-6)


@pytest.mark.parametrize("name", sorted(KL_ESTIMATORS))
def test_jit_equals_eager(name):
    scores, logp, logq, mask = random_batch(2, 3, 6, 0.7)
    for got, want in zip(jax.tree.leaves(_rewards(scores, logp, logq, mask, 0.05, name)),
                         jax.tree.leaves(kl_penalized_rewards(scores, logp, logq, mask, 0.05, name))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(KL_ESTIMATORS))
def test_nan_and_inf_under_mask_do_not_leak(name):
    scores, logp, logq, mask = random_batch(3, 3, 6, 0.6)
    mask[0, :3] = False
    poison = np.resize(np.array([np.nan, np.inf, -np.inf]), logp.shape)
    bad_logp, bad_logq = np.where(mask, logp, poison), np.where(mask, logq, poison[::-1])
    rewards, metrics = _rewards(scores, bad_logp, bad_logq, mask, 0.05, name)
    clean, clean_metrics = _rewards(scores, logp, logq, mask, 0.05, name)
    assert np.all(np.isfinite(rewards)) and all(np.isfinite(float(v)) for v in metrics.values())
    np.testing.assert_array_equal(np.asarray(rewards), np.asarray(clean))

    # as a loss (GRPO-style KL term): value and gradient unaffected
    def kl_loss(lp):
        return masked_mean(kl_estimate(lp, bad_logq, name, mask), mask)

    grad = jax.grad(kl_loss)(jnp.asarray(bad_logp))
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~mask] == 0)


@pytest.mark.parametrize("name", sorted(KL_ESTIMATORS))
def test_bf16_inputs_give_float32(name):
    scores, logp, logq, mask = random_batch(4, 3, 6, 0.7)
    lp16, lq16 = jnp.asarray(logp, jnp.bfloat16), jnp.asarray(logq, jnp.bfloat16)
    rewards, _ = kl_penalized_rewards(jnp.asarray(scores, jnp.bfloat16), lp16, lq16, mask, 0.05, name)
    assert rewards.dtype == jnp.float32
    want, _ = ref_rewards(np.asarray(jnp.asarray(scores, jnp.bfloat16).astype(jnp.float32), np.float64),
                          np.asarray(lp16.astype(jnp.float32)), np.asarray(lq16.astype(jnp.float32)), mask, 0.05, name)
    np.testing.assert_allclose(np.asarray(rewards), want, **FP32)


@pytest.mark.parametrize("name", sorted(KL_ESTIMATORS))
def test_vmap_over_leading_axis(name):
    rng = np.random.default_rng(5)
    logp = jnp.asarray(rng.normal(size=(4, 3, 6)) - 2, jnp.float32)
    logq = jnp.asarray(rng.normal(size=(4, 3, 6)) - 2, jnp.float32)
    mask = jnp.asarray(rng.random((4, 3, 6)) < 0.6)
    scores = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    batched, _ = jax.vmap(lambda s, p, q, m: kl_penalized_rewards(s, p, q, m, 0.05, name))(scores, logp, logq, mask)
    for i in range(4):
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(_rewards(scores[i], logp[i], logq[i], mask[i],
                                                                               0.05, name)[0]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(KL_ESTIMATORS))
def test_kl_as_a_loss_gradient_float64(name):
    _, logp, logq, mask = random_batch(6, 3, 5, 0.7)
    with jax.enable_x64(True):
        lp, lq = jnp.asarray(logp, jnp.float64), jnp.asarray(logq, jnp.float64)
        assert kl_estimate(lp, lq, name).dtype == jnp.float64
        check_grads(jax.jit(lambda p, q: masked_mean(kl_estimate(p, q, name, mask), mask)), (lp, lq), order=1,
                    modes=("rev",), atol=1e-7, rtol=1e-7)
