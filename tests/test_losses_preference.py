"""Bradley-Terry reward-model loss: numpy reference, hand case, extremes, masking, dtypes, jit, vmap, gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from rlhf_jax.losses import aggregate, bradley_terry_loss, bradley_terry_per_pair

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)
FP32 = dict(rtol=1e-5, atol=1e-6)
METRICS = ("rm/loss", "rm/accuracy", "rm/margin", "rm/chosen_reward", "rm/rejected_reward", "rm/centering")


def ref_per_pair(chosen, rejected, margin, pair_mask, center_coef):
    chosen, rejected, margin = (np.asarray(x, np.float64) for x in (chosen, rejected, margin))
    per_pair = np.logaddexp(0.0, -(chosen - rejected - margin)) + center_coef * (chosen + rejected) ** 2
    return np.where(pair_mask, per_pair, 0.0)


def ref_bradley_terry(chosen, rejected, margin, pair_mask, center_coef):
    """float64 numpy from the definition: −log σ(x) = log(1 + exp(−x)), means over the masked pairs."""
    chosen, rejected, margin = (np.asarray(x, np.float64) for x in (chosen, rejected, margin))
    keep = np.asarray(pair_mask, bool)
    c, r, m = chosen[keep], rejected[keep], margin[keep]
    if c.size == 0:
        return {name: 0.0 for name in METRICS}
    centering = np.mean((c + r) ** 2)
    loss = np.mean(np.logaddexp(0.0, -(c - r - m))) + center_coef * centering
    return {"rm/loss": loss, "rm/accuracy": np.mean(c > r), "rm/margin": np.mean(c - r),
            "rm/chosen_reward": np.mean(c), "rm/rejected_reward": np.mean(r), "rm/centering": centering}


def random_pairs(seed, size, density, scale=2.0):
    rng = np.random.default_rng(seed)
    chosen = (rng.normal(size=size) * scale).astype(np.float32)
    rejected = (rng.normal(size=size) * scale).astype(np.float32)
    margin = np.abs(rng.normal(size=size)).astype(np.float32)
    return chosen, rejected, margin, rng.random(size) < density


_loss = jax.jit(bradley_terry_loss)
_per_pair = jax.jit(bradley_terry_per_pair)


@SETTINGS
@given(seed=st.integers(0, 2**31), size=st.sampled_from([1, 4, 16]), density=st.sampled_from([0.0, 0.5, 1.0]),
       use_margin=st.booleans(), center_coef=st.sampled_from([0.0, 0.01]), scale=st.sampled_from([0.5, 2.0, 50.0]))
def test_matches_float64_numpy(seed, size, density, use_margin, center_coef, scale):
    chosen, rejected, margin, pair_mask = random_pairs(seed, size, density, scale)
    if not use_margin:
        margin = np.zeros_like(margin)
    loss, metrics = _loss(chosen, rejected, margin if use_margin else None, pair_mask, center_coef)
    want = ref_bradley_terry(chosen, rejected, margin, pair_mask, center_coef)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), want["rm/loss"], **FP32)
    assert set(metrics) == set(METRICS)
    for name in METRICS:
        np.testing.assert_allclose(float(metrics[name]), want[name], **FP32, err_msg=name)
    # the per-pair form, and its (sum, count) for accumulation, give the same loss
    per_pair = _per_pair(chosen, rejected, margin if use_margin else None, pair_mask, center_coef)
    assert per_pair.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(per_pair), ref_per_pair(chosen, rejected, margin, pair_mask, center_coef),
                               **FP32)
    loss_sum, count = aggregate(per_pair, pair_mask)
    assert float(count) == pair_mask.sum()
    np.testing.assert_allclose(float(loss_sum), want["rm/loss"] * pair_mask.sum(), **FP32)


def test_hand_computed():
    # r_c = [2, 0], r_r = [0, 1]: differences [2, −1]
    # loss = ½ (log(1 + e^−2) + log(1 + e^1)) = ½ (0.126928 + 1.313262) = 0.720095
    # accuracy ½; margin mean ½; chosen mean 1; rejected mean ½
    # centering: ½ ((2 + 0)² + (0 + 1)²) = 2.5 -> with center_coef 0.01, loss + 0.025
    # margin m = [1, 0]: ½ (log(1 + e^−1) + log(1 + e^1)) = ½ (0.313262 + 1.313262) = 0.813262
    chosen, rejected = jnp.array([2.0, 0.0]), jnp.array([0.0, 1.0])
    loss, metrics = bradley_terry_loss(chosen, rejected)
    np.testing.assert_allclose(float(loss), 0.5 * (math.log1p(math.exp(-2)) + math.log1p(math.exp(1))), rtol=1e-6)
    np.testing.assert_allclose(float(loss), 0.720095, atol=1e-6)
    assert float(metrics["rm/accuracy"]) == 0.5
    assert float(metrics["rm/margin"]) == 0.5
    assert float(metrics["rm/chosen_reward"]) == 1.0 and float(metrics["rm/rejected_reward"]) == 0.5
    assert float(metrics["rm/centering"]) == 2.5
    np.testing.assert_allclose(float(bradley_terry_loss(chosen, rejected, center_coef=0.01)[0]), 0.720095 + 0.025,
                               atol=1e-6)
    np.testing.assert_allclose(float(bradley_terry_loss(chosen, rejected, margin=jnp.array([1.0, 0.0]))[0]),
                               0.813262, atol=1e-6)
    # per pair: [0.126928 + 0.01·4, 1.313262 + 0.01·1] = [0.166928, 1.323262]
    np.testing.assert_allclose(np.asarray(bradley_terry_per_pair(chosen, rejected, center_coef=0.01)),
                               [0.166928, 1.323262], atol=1e-6)
    # a tie counts as wrong
    assert float(bradley_terry_loss(jnp.array([1.0]), jnp.array([1.0]))[1]["rm/accuracy"]) == 0.0


def test_large_reward_differences_are_finite():
    # −log σ(1e4) = 0 and −log σ(−1e4) = 1e4, not log(0) = inf; gradients ∓1/B, finite
    chosen = jnp.array([1e4, -1e4])
    rejected = jnp.zeros(2)
    loss, _ = bradley_terry_loss(chosen, rejected)
    np.testing.assert_allclose(float(loss), 0.5 * 1e4, rtol=1e-6)
    grads = jax.grad(lambda c: bradley_terry_loss(c, rejected)[0])(chosen)
    np.testing.assert_allclose(np.asarray(grads), [0.0, -0.5], atol=1e-7)
    with_centering = bradley_terry_loss(chosen, rejected, center_coef=0.01)[0]
    assert np.isfinite(float(with_centering))
    np.testing.assert_allclose(np.asarray(bradley_terry_per_pair(chosen, rejected)), [0.0, 1e4], rtol=1e-6)


def test_jit_equals_eager():
    chosen, rejected, margin, pair_mask = random_pairs(1, 8, 0.7)
    eager = bradley_terry_loss(chosen, rejected, margin, pair_mask, 0.01)
    jitted = _loss(chosen, rejected, margin, pair_mask, 0.01)
    np.testing.assert_allclose(np.asarray(_per_pair(chosen, rejected, margin, pair_mask, 0.01)),
                               np.asarray(bradley_terry_per_pair(chosen, rejected, margin, pair_mask, 0.01)),
                               rtol=1e-6)
    np.testing.assert_allclose(float(jitted[0]), float(eager[0]), rtol=1e-6)
    for name in METRICS:
        np.testing.assert_allclose(float(jitted[1][name]), float(eager[1][name]), rtol=1e-6)


def test_gradient_float64():
    chosen, rejected, margin, pair_mask = random_pairs(2, 6, 0.7)
    with jax.enable_x64(True):
        c, r, m = (jnp.asarray(x, jnp.float64) for x in (chosen, rejected, margin))
        assert bradley_terry_loss(c, r, m, pair_mask, 0.1)[0].dtype == jnp.float64
        check_grads(jax.jit(lambda cc, rr: bradley_terry_loss(cc, rr, m, pair_mask, 0.1)[0]), (c, r), order=1,
                    modes=("rev",), atol=1e-7, rtol=1e-7)
        check_grads(jax.jit(lambda cc, rr: jnp.sum(bradley_terry_per_pair(cc, rr, m, pair_mask, 0.1))), (c, r),
                    order=1, modes=("rev",), atol=1e-7, rtol=1e-7)


def test_nan_and_inf_in_masked_pairs_do_not_leak():
    chosen, rejected, margin, pair_mask = random_pairs(3, 6, 1.0)
    pair_mask[[1, 4]] = False
    bad_chosen, bad_rejected, bad_margin = chosen.copy(), rejected.copy(), margin.copy()
    bad_chosen[1], bad_rejected[1], bad_margin[4], bad_chosen[4] = np.nan, np.inf, np.nan, -np.inf

    def loss(c, r):
        value, metrics = bradley_terry_loss(c, r, bad_margin, pair_mask, 0.01)
        return value + jnp.sum(bradley_terry_per_pair(c, r, bad_margin, pair_mask, 0.01)), metrics

    (value, metrics), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(bad_chosen, bad_rejected)
    clean = bradley_terry_loss(chosen, rejected, margin, pair_mask, 0.01)
    clean_total = clean[0] + jnp.sum(bradley_terry_per_pair(chosen, rejected, margin, pair_mask, 0.01))
    np.testing.assert_allclose(float(value), float(clean_total), rtol=1e-6)
    for name in METRICS:
        assert np.isfinite(float(metrics[name]))
        np.testing.assert_allclose(float(metrics[name]), float(clean[1][name]), rtol=1e-6)
    for grad in grads:
        assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~pair_mask] == 0)


def test_bf16_rewards_give_float32():
    chosen, rejected, margin, pair_mask = random_pairs(4, 8, 0.8)
    c16, r16 = jnp.asarray(chosen, jnp.bfloat16), jnp.asarray(rejected, jnp.bfloat16)
    loss, metrics = bradley_terry_loss(c16, r16, margin, pair_mask, 0.01)
    assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in metrics.values())
    want = ref_bradley_terry(np.asarray(c16.astype(jnp.float32)), np.asarray(r16.astype(jnp.float32)), margin,
                             pair_mask, 0.01)
    np.testing.assert_allclose(float(loss), want["rm/loss"], **FP32)
    per_pair = bradley_terry_per_pair(c16, r16, margin, pair_mask, 0.01)
    assert per_pair.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(per_pair), ref_per_pair(np.asarray(c16.astype(jnp.float32)),
                                                                  np.asarray(r16.astype(jnp.float32)), margin,
                                                                  pair_mask, 0.01), **FP32)


def test_vmap_over_leading_axis():
    rng = np.random.default_rng(5)
    chosen, rejected = (jnp.asarray(rng.normal(size=(3, 8)), jnp.float32) for _ in range(2))
    pair_mask = jnp.asarray(rng.random((3, 8)) < 0.7)
    losses, metrics = jax.vmap(lambda c, r, m: bradley_terry_loss(c, r, pair_mask=m, center_coef=0.01))(
        chosen, rejected, pair_mask)
    per_pair = jax.vmap(lambda c, r, m: bradley_terry_per_pair(c, r, pair_mask=m))(chosen, rejected, pair_mask)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(per_pair[i]), np.asarray(_per_pair(chosen[i], rejected[i], None,
                                                                                  pair_mask[i], 0.0)), rtol=1e-6)
        single_loss, single_metrics = _loss(chosen[i], rejected[i], None, pair_mask[i], 0.01)
        np.testing.assert_allclose(float(losses[i]), float(single_loss), rtol=1e-6)
        np.testing.assert_allclose(float(metrics["rm/accuracy"][i]), float(single_metrics["rm/accuracy"]))


@pytest.mark.parametrize("center_coef", [0.0, 0.05])
def test_traced_center_coef(center_coef):
    # the coefficient may come from a config or a schedule: a traced value works too
    chosen, rejected, margin, pair_mask = random_pairs(6, 8, 1.0)
    traced = jax.jit(lambda k: bradley_terry_loss(chosen, rejected, center_coef=k)[0])(center_coef)
    np.testing.assert_allclose(float(traced), float(bradley_terry_loss(chosen, rejected, center_coef=center_coef)[0]),
                               rtol=1e-6)
