"""GAE against a plain Python loop (float64), by hand, with gaps, NaN padding, bf16, jit, vmap; whitening."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from rlhf_jax.losses import gae, masked_mean, masked_var, whiten_advantages

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)
FP32 = dict(rtol=1e-5, atol=1e-5)
SHAPES = [(1, 1), (1, 9), (3, 6), (4, 12)]


def loop_gae(rewards, values, mask, gamma, lam):
    """The convention, written as a loop over the valid positions only (float64)."""
    advantages = np.zeros(rewards.shape, np.float64)
    for b in range(rewards.shape[0]):
        valid = np.flatnonzero(mask[b])
        next_value = next_advantage = 0.0  # V = A = 0 past the last valid token
        for t in valid[::-1]:
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_advantage = delta + gamma * lam * next_advantage
            next_value = values[b, t]
            advantages[b, t] = next_advantage
    returns = np.where(mask, advantages + values, 0.0)
    return advantages, returns


def random_batch(seed, batch, length, density):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(batch, length)).astype(np.float32)
    values = rng.normal(size=(batch, length)).astype(np.float32)
    return rewards, values, rng.random((batch, length)) < density


_gae = jax.jit(gae)


@SETTINGS
@given(seed=st.integers(0, 2**31), shape=st.sampled_from(SHAPES), density=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
       gamma=st.sampled_from([1.0, 0.99, 0.5]), lam=st.sampled_from([1.0, 0.95, 0.0]))
def test_matches_python_loop(seed, shape, density, gamma, lam):
    rewards, values, mask = random_batch(seed, *shape, density)
    want_adv, want_ret = loop_gae(rewards.astype(np.float64), values.astype(np.float64), mask, gamma, lam)
    # float32, as trainers run it
    advantages, returns = _gae(rewards, values, mask, gamma, lam)
    assert advantages.dtype == returns.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(advantages), want_adv, **FP32)
    np.testing.assert_allclose(np.asarray(returns), want_ret, **FP32)
    # float64: the same recursion to rounding
    with jax.enable_x64(True):
        adv64, ret64 = _gae(jnp.asarray(rewards, jnp.float64), jnp.asarray(values, jnp.float64), mask, gamma, lam)
        assert adv64.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(adv64), want_adv, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(ret64), want_ret, rtol=1e-12, atol=1e-12)


def test_hand_computed():
    # rewards [1, 0, 2], values [0.5, 1.0, 1.5], γ = 0.9, λ = 0.8 (γλ = 0.72), V past the end = 0
    # t=2: δ = 2 + 0.9·0 − 1.5 = 0.5;     A2 = 0.5
    # t=1: δ = 0 + 0.9·1.5 − 1.0 = 0.35;  A1 = 0.35 + 0.72·0.5 = 0.71
    # t=0: δ = 1 + 0.9·1.0 − 0.5 = 1.4;   A0 = 1.4 + 0.72·0.71 = 1.9112
    # returns = A + V = [2.4112, 1.71, 2.0]
    rewards = jnp.array([[1.0, 0.0, 2.0]])
    values = jnp.array([[0.5, 1.0, 1.5]])
    advantages, returns = gae(rewards, values, jnp.ones((1, 3), bool), 0.9, 0.8)
    np.testing.assert_allclose(np.asarray(advantages), [[1.9112, 0.71, 0.5]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(returns), [[2.4112, 1.71, 2.0]], rtol=1e-6)

    # a masked gap at t=1 (holding junk) is skipped: t=0 bootstraps from t=2
    # t=2: A2 = 0.5;  t=0: δ = 1 + 0.9·1.5 − 0.5 = 1.85, A0 = 1.85 + 0.72·0.5 = 2.21;  A1 = 0
    rewards_gap = jnp.array([[1.0, 99.0, 2.0]])
    values_gap = jnp.array([[0.5, jnp.nan, 1.5]])
    advantages, returns = gae(rewards_gap, values_gap, jnp.array([[1, 0, 1]]), 0.9, 0.8)
    np.testing.assert_allclose(np.asarray(advantages), [[2.21, 0.0, 0.5]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(returns), [[2.71, 0.0, 2.0]], rtol=1e-6)


def test_left_padding_and_prompt_positions_are_skipped():
    # [pad, prompt, resp, resp, pad]: only the response counts, and shifting it does not change the result
    rewards = jnp.array([[0.0, 0.0, 0.3, 1.0, 0.0], [0.3, 1.0, 0.0, 0.0, 0.0]])
    values = jnp.array([[5.0, 5.0, 0.2, 0.4, 5.0], [0.2, 0.4, 5.0, 5.0, 5.0]])
    mask = jnp.array([[0, 0, 1, 1, 0], [1, 1, 0, 0, 0]])
    advantages, _ = gae(rewards, values, mask, 1.0, 1.0)
    # γ = λ = 1: A_t = Σ_{s ≥ t} r_s − V_t -> A = [1.3 − 0.2, 1.0 − 0.4] = [1.1, 0.6]
    np.testing.assert_allclose(np.asarray(advantages), [[0, 0, 1.1, 0.6, 0], [1.1, 0.6, 0, 0, 0]], rtol=1e-6)


def test_jit_equals_eager():
    rewards, values, mask = random_batch(1, 3, 8, 0.7)
    for got, want in zip(_gae(rewards, values, mask, 0.99, 0.95), gae(rewards, values, mask, 0.99, 0.95)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)


def test_nan_and_inf_under_mask_do_not_leak():
    rewards, values, mask = random_batch(2, 3, 8, 0.6)
    mask[0, :3] = False
    poison = np.resize(np.array([np.nan, np.inf, -np.inf]), rewards.shape)
    bad_rewards, bad_values = np.where(mask, rewards, poison), np.where(mask, values, poison[:, ::-1])
    advantages, returns = _gae(bad_rewards, bad_values, mask, 0.99, 0.95)
    clean = _gae(rewards, values, mask, 0.99, 0.95)
    assert np.all(np.isfinite(advantages)) and np.all(np.isfinite(returns))
    np.testing.assert_array_equal(np.asarray(advantages), np.asarray(clean[0]))
    np.testing.assert_array_equal(np.asarray(returns), np.asarray(clean[1]))
    # differentiable through the scan (e.g. for analysis), with no NaN from the padding
    grad = jax.grad(lambda v: jnp.sum(gae(bad_rewards, v, mask, 0.99, 0.95)[0]))(jnp.asarray(bad_values))
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~mask] == 0)


def test_bf16_inputs_give_float32():
    rewards, values, mask = random_batch(3, 3, 8, 0.7)
    r16, v16 = jnp.asarray(rewards, jnp.bfloat16), jnp.asarray(values, jnp.bfloat16)
    advantages, returns = _gae(r16, v16, mask, 0.99, 0.95)
    assert advantages.dtype == returns.dtype == jnp.float32
    want_adv, want_ret = loop_gae(np.asarray(r16.astype(jnp.float32), np.float64),
                                  np.asarray(v16.astype(jnp.float32), np.float64), mask, 0.99, 0.95)
    np.testing.assert_allclose(np.asarray(advantages), want_adv, **FP32)
    np.testing.assert_allclose(np.asarray(returns), want_ret, **FP32)


def test_vmap_over_leading_axis():
    rng = np.random.default_rng(4)
    rewards = jnp.asarray(rng.normal(size=(4, 3, 7)), jnp.float32)
    values = jnp.asarray(rng.normal(size=(4, 3, 7)), jnp.float32)
    mask = jnp.asarray(rng.random((4, 3, 7)) < 0.6)
    gammas = jnp.array([1.0, 0.99, 0.9, 0.5])  # per-member hyperparameters vmap too
    advantages, _ = jax.vmap(lambda r, v, m, g: gae(r, v, m, g, 0.95))(rewards, values, mask, gammas)
    for i in range(4):
        want, _ = loop_gae(np.asarray(rewards[i], np.float64), np.asarray(values[i], np.float64), np.asarray(mask[i]),
                           float(gammas[i]), 0.95)
        np.testing.assert_allclose(np.asarray(advantages[i]), want, **FP32)


@SETTINGS
@given(seed=st.integers(0, 2**31), shape=st.sampled_from(SHAPES), density=st.sampled_from([0.3, 1.0]),
       shift_mean=st.booleans())
def test_whiten_advantages(seed, shape, density, shift_mean):
    rewards, _, mask = random_batch(seed, *shape, density)
    advantages = rewards * 3 + 2
    whitened = jax.jit(whiten_advantages, static_argnums=2)(advantages, mask, shift_mean)
    x = advantages.astype(np.float64)[mask]
    if x.size:
        want = (x - x.mean()) / np.sqrt(x.var() + 1e-8) + (0 if shift_mean else x.mean())
        np.testing.assert_allclose(np.asarray(whitened)[mask], want, **FP32)
    assert np.all(np.asarray(whitened)[~mask] == 0)
    if x.size > 1 and x.var() > 1e-3:
        np.testing.assert_allclose(float(masked_var(whitened, mask)), 1.0, rtol=1e-4)
        np.testing.assert_allclose(float(masked_mean(whitened, mask)), 0.0 if shift_mean else x.mean(), atol=1e-5)


def test_whiten_advantages_hand_computed():
    # A = [1, 3] (third entry masked): mean 2, variance 1 -> [−1, 1, 0]; keeping the mean -> [1, 3, 0]
    advantages = jnp.array([[1.0, 3.0, jnp.nan]])
    mask = jnp.array([[True, True, False]])
    np.testing.assert_allclose(np.asarray(whiten_advantages(advantages, mask, eps=0.0)), [[-1.0, 1.0, 0.0]])
    np.testing.assert_allclose(np.asarray(whiten_advantages(advantages, mask, shift_mean=False, eps=0.0)),
                               [[1.0, 3.0, 0.0]])


def test_gae_gradient_float64():
    # A = L_r r − L_v v for fixed masks: check d(ΣwA)/dr and d(ΣwA)/dv by float64 autodiff vs central differences
    rewards, values, mask = random_batch(5, 2, 6, 0.7)
    with jax.enable_x64(True):
        weights = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6)))
        check_grads(lambda r, v: jnp.sum(weights * gae(r, v, mask, 0.9, 0.8)[0]),
                                  (jnp.asarray(rewards, jnp.float64), jnp.asarray(values, jnp.float64)), order=1,
                                  modes=("rev",), atol=1e-8, rtol=1e-8)
