"""PPO clipped policy loss, clipped value loss, explained variance and entropy bonus."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from rlhf_jax.losses import (
    entropy_bonus,
    explained_variance,
    ppo_policy_loss,
    ppo_policy_loss_per_token,
    value_loss,
    value_loss_per_token,
)

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)
FP32 = dict(rtol=1e-5, atol=1e-6)
SHAPES = [(1, 1), (4, 8)]


# float64 numpy references, from the formulas


def ref_policy(logp, old, adv, mask, eps_low, eps_high, dual_clip):
    ratio = np.exp(logp - old)
    unclipped = -adv * ratio
    clipped = -adv * np.clip(ratio, 1 - eps_low, 1 + eps_high)
    loss = np.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = np.where(adv < 0, np.minimum(loss, -dual_clip * adv), loss)
    n = mask.sum()
    mean = (lambda x: x[mask].mean() if n else 0.0)
    return np.where(mask, loss, 0.0), {
        "policy/loss": mean(loss),
        "policy/clipfrac": mean((clipped > unclipped).astype(float)),
        "policy/approx_kl": mean((ratio - 1) - np.log(ratio)),
        "policy/ratio_mean": mean(ratio),
        "policy/ratio_max": ratio[mask].max() if n else 0.0,
    }


def ref_value(values, old_values, returns, mask, eps):
    unclipped = (values - returns) ** 2
    clipped = (np.clip(values, old_values - eps, old_values + eps) - returns) ** 2
    loss = 0.5 * np.maximum(unclipped, clipped)
    n = mask.sum()
    return np.where(mask, loss, 0.0), {
        "value/loss": loss[mask].mean() if n else 0.0,
        "value/clipfrac": (clipped > unclipped)[mask].mean() if n else 0.0,
    }


def ref_explained_variance(values, returns, mask):
    r, v = returns[mask], values[mask]
    return 0.0 if r.size == 0 or r.var() == 0 else 1 - (r - v).var() / r.var()


def random_batch(seed, batch, length, density):
    rng = np.random.default_rng(seed)
    old = (rng.normal(size=(batch, length)) - 2).astype(np.float32)
    logp = (old + rng.normal(size=(batch, length)) * 0.3).astype(np.float32)
    adv = rng.normal(size=(batch, length)).astype(np.float32)
    mask = rng.random((batch, length)) < density
    return logp, old, adv, mask


_policy = jax.jit(ppo_policy_loss_per_token)
_policy_loss = jax.jit(ppo_policy_loss)
_value = jax.jit(value_loss_per_token)


@SETTINGS
@given(seed=st.integers(0, 2**31), shape=st.sampled_from(SHAPES), density=st.sampled_from([0.0, 0.4, 1.0]),
       eps=st.sampled_from([(0.2, 0.2), (0.2, 0.28), (0.1, 0.3)]), dual_clip=st.sampled_from([None, 3.0]))
def test_policy_loss_matches_float64_numpy(seed, shape, density, eps, dual_clip):
    logp, old, adv, mask = random_batch(seed, *shape, density)
    eps_low, eps_high = eps
    loss, metrics = _policy_loss(logp, old, adv, mask, eps_low, eps_high, dual_clip)
    want, want_metrics = ref_policy(logp.astype(np.float64), old.astype(np.float64), adv.astype(np.float64), mask,
                                    eps_low, eps_high, dual_clip)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), want_metrics["policy/loss"], **FP32)
    for name, value in want_metrics.items():
        np.testing.assert_allclose(float(metrics[name]), value, **FP32, err_msg=name)
    if shape == SHAPES[-1]:  # the per-token form, on one shape to bound compile time
        per_token, _ = _policy(logp, old, adv, mask, eps_low, eps_high, dual_clip)
        assert per_token.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(per_token), want, **FP32)


def test_policy_loss_hand_computed():
    # ratio 1.5 (log ratio ln 1.5), ε = 0.2:
    #   A = 2:  −A·ρ = −3, −A·clip(ρ) = −2.4 -> max = −2.4 (clipped: the gain is capped)
    #   A = −1: −A·ρ = 1.5, −A·clip(ρ) = 1.2 -> max = 1.5 (not clipped: the loss is not capped)
    #   dual clip c = 3, A = −1, ρ = 5: max(5, 1.2) = 5 -> min(5, −c·A = 3) = 3
    # approx_kl at ρ = 1.5: (ρ − 1) − ln ρ = 0.5 − 0.405465 = 0.094535
    log_ratio = math.log(1.5)
    logp = jnp.array([[log_ratio, log_ratio]])
    old = jnp.zeros((1, 2))
    adv = jnp.array([[2.0, -1.0]])
    mask = jnp.ones((1, 2), bool)
    per_token, metrics = ppo_policy_loss_per_token(logp, old, adv, mask, 0.2)
    np.testing.assert_allclose(np.asarray(per_token), [[-2.4, 1.5]], rtol=1e-6)
    assert float(metrics["policy/clipfrac"]) == 0.5
    np.testing.assert_allclose(float(metrics["policy/approx_kl"]), 0.094535, atol=1e-6)
    np.testing.assert_allclose(float(metrics["policy/ratio_mean"]), 1.5, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["policy/ratio_max"]), 1.5, rtol=1e-6)
    loss, _ = ppo_policy_loss(logp, old, adv, mask, 0.2)
    np.testing.assert_allclose(float(loss), (-2.4 + 1.5) / 2, rtol=1e-6)

    big = jnp.array([[math.log(5.0)]])
    dual, dual_metrics = ppo_policy_loss_per_token(big, jnp.zeros((1, 1)), jnp.array([[-1.0]]), jnp.ones((1, 1)), 0.2,
                                                   dual_clip=3.0)
    np.testing.assert_allclose(np.asarray(dual), [[3.0]], rtol=1e-6)
    assert float(dual_metrics["policy/dual_clipfrac"]) == 1.0
    no_dual, _ = ppo_policy_loss_per_token(big, jnp.zeros((1, 1)), jnp.array([[-1.0]]), jnp.ones((1, 1)), 0.2)
    np.testing.assert_allclose(np.asarray(no_dual), [[5.0]], rtol=1e-6)

    # asymmetric clip: ε_low = 0.2, ε_high = 0.28 with A = 2, ρ = 1.5 -> −2 · 1.28 = −2.56
    asym, _ = ppo_policy_loss_per_token(logp[:, :1], old[:, :1], adv[:, :1], mask[:, :1], 0.2, clip_eps_high=0.28)
    np.testing.assert_allclose(np.asarray(asym), [[-2.56]], rtol=1e-6)


def test_dual_clip_must_exceed_one():
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ppo_policy_loss_per_token(jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.ones((1, 1)), 0.2,
                                  dual_clip=1.0)


@SETTINGS
@given(seed=st.integers(0, 2**31), shape=st.sampled_from(SHAPES), density=st.sampled_from([0.0, 0.4, 1.0]),
       eps=st.sampled_from([0.05, 0.2]))
def test_value_loss_matches_float64_numpy(seed, shape, density, eps):
    rng = np.random.default_rng(seed)
    values, old_values, returns = (rng.normal(size=shape).astype(np.float32) for _ in range(3))
    old_values = (values + old_values * 0.2).astype(np.float32)
    mask = rng.random(shape) < density
    per_token, metrics = _value(values, old_values, returns, mask, eps)
    want, want_metrics = ref_value(*(x.astype(np.float64) for x in (values, old_values, returns)), mask, eps)
    np.testing.assert_allclose(np.asarray(per_token), want, **FP32)
    loss, all_metrics = jax.jit(value_loss)(values, old_values, returns, mask, eps)
    np.testing.assert_allclose(float(loss), want_metrics["value/loss"], **FP32)
    for name, value in want_metrics.items():
        np.testing.assert_allclose(float(all_metrics[name]), value, **FP32, err_msg=name)
    np.testing.assert_allclose(float(metrics["value/clipfrac"]), want_metrics["value/clipfrac"], **FP32)
    # explained variance on the same data
    np.testing.assert_allclose(float(jax.jit(explained_variance)(values, returns, mask)),
                               ref_explained_variance(values.astype(np.float64), returns.astype(np.float64), mask),
                               rtol=1e-4, atol=1e-5)


def test_value_loss_hand_computed():
    # ε_v = 0.2:
    #   V = 1.0, V_old = 0.5, R = 0: unclipped 1.0, clipped V → 0.7: 0.49 -> ½·1.0 = 0.5, not clipped
    #   V = 0.9, V_old = 0.5, R = 1: unclipped 0.01, clipped V → 0.7: 0.09 -> ½·0.09 = 0.045, clipped
    #   masked position (junk) -> 0
    values = jnp.array([[1.0, 0.9, jnp.nan]])
    old_values = jnp.array([[0.5, 0.5, 0.0]])
    returns = jnp.array([[0.0, 1.0, 0.0]])
    mask = jnp.array([[1, 1, 0]])
    per_token, metrics = value_loss_per_token(values, old_values, returns, mask, 0.2)
    np.testing.assert_allclose(np.asarray(per_token), [[0.5, 0.045, 0.0]], rtol=1e-6)
    assert float(metrics["value/clipfrac"]) == 0.5
    loss, metrics = value_loss(values, old_values, returns, mask, 0.2)
    np.testing.assert_allclose(float(loss), (0.5 + 0.045) / 2, rtol=1e-6)
    # no clipping: ½ (V − R)² = [0.5, 0.005]
    unclipped, metrics = value_loss_per_token(values, old_values, returns, mask, None)
    np.testing.assert_allclose(np.asarray(unclipped), [[0.5, 0.005, 0.0]], rtol=1e-6)
    assert float(metrics["value/clipfrac"]) == 0.0


def test_explained_variance_hand_computed():
    # R = [1, 2, 3]: V = R -> 1;  V = [2, 2, 2] -> Var(R − V) = Var([−1, 0, 1]) = Var(R) -> 0
    # V = [3, 2, 1]: R − V = [−2, 0, 2], Var = 8/3 vs Var(R) = 2/3 -> 1 − 4 = −3;  constant R -> 0 (defined)
    returns = jnp.array([[1.0, 2.0, 3.0, 99.0]])
    mask = jnp.array([[1, 1, 1, 0]])
    for values, want in (([1, 2, 3, 0], 1.0), ([2, 2, 2, 0], 0.0), ([3, 2, 1, 0], -3.0)):
        np.testing.assert_allclose(float(explained_variance(jnp.array([values], jnp.float32), returns, mask)), want,
                                   atol=1e-6)
    assert float(explained_variance(jnp.zeros((1, 3)), jnp.ones((1, 3)), jnp.ones((1, 3)))) == 0.0


def test_entropy_bonus():
    # entropies [1, 2, (masked junk)], coef 0.01 -> loss −0.01 · 1.5 = −0.015; metric 1.5
    entropy = jnp.array([[1.0, 2.0, jnp.inf]])
    mask = jnp.array([[1, 1, 0]])
    loss, metrics = entropy_bonus(entropy, mask, 0.01)
    np.testing.assert_allclose(float(loss), -0.015, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["policy/entropy"]), 1.5, rtol=1e-6)
    grad = jax.grad(lambda e: entropy_bonus(e, mask, 0.01)[0])(entropy)
    np.testing.assert_allclose(np.asarray(grad), [[-0.005, -0.005, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(float(jax.jit(entropy_bonus, static_argnums=3)(entropy, mask, 0.01, "sum-fixed")[0]),
                               -0.01, rtol=1e-6)  # Σ = 3 over 3 slots, ×−0.01


def test_jit_equals_eager():
    logp, old, adv, mask = random_batch(1, 3, 6, 0.7)
    for got, want in zip(jax.tree.leaves(_policy(logp, old, adv, mask, 0.2, 0.28, 3.0)),
                         jax.tree.leaves(ppo_policy_loss_per_token(logp, old, adv, mask, 0.2, 0.28, 3.0))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
    for got, want in zip(jax.tree.leaves(_value(logp, old, adv, mask, 0.2)),
                         jax.tree.leaves(value_loss_per_token(logp, old, adv, mask, 0.2))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(jax.jit(explained_variance)(logp, old, mask)),
                               float(explained_variance(logp, old, mask)), rtol=1e-6)


def test_gradients_float64():
    logp, old, adv, mask = random_batch(2, 3, 5, 0.7)
    rng = np.random.default_rng(3)
    returns = rng.normal(size=logp.shape)
    with jax.enable_x64(True):
        lp, old64, adv64, ret64 = (jnp.asarray(x, jnp.float64) for x in (logp, old, adv, returns))
        # points away from the clip kinks: ρ = exp(±0.3-ish) is inside or outside [0.8, 1.2], never at the edge
        assert ppo_policy_loss(lp, old64, adv64, mask, 0.2)[0].dtype == jnp.float64
        check_grads(jax.jit(lambda x: ppo_policy_loss(x, old64, adv64, mask, 0.2, 0.28, 3.0)[0]), (lp,),
                    order=1, modes=("rev",), atol=1e-7, rtol=1e-7, eps=1e-6)
        check_grads(jax.jit(lambda v: value_loss(v, old64, ret64, mask, 0.2, mode="sequence-mean")[0]), (lp,), order=1,
                    modes=("rev",), atol=1e-7, rtol=1e-7, eps=1e-6)
        check_grads(jax.jit(lambda v: explained_variance(v, ret64, mask)), (lp,), order=1, modes=("rev",),
                    atol=1e-7, rtol=1e-7, eps=1e-6)


def test_nan_and_inf_under_mask_do_not_leak():
    logp, old, adv, mask = random_batch(4, 3, 6, 0.6)
    mask[0, :3] = False
    poison = np.resize(np.array([np.nan, np.inf, -np.inf]), logp.shape)
    bad_logp, bad_old, bad_adv = (np.where(mask, x, np.roll(poison, k)) for k, x in enumerate((logp, old, adv)))

    def total(lp, o, a):
        loss, metrics = ppo_policy_loss(lp, o, a, mask, 0.2, dual_clip=3.0)
        v_loss, v_metrics = value_loss(lp, o, a, mask, 0.2)
        e_loss, e_metrics = entropy_bonus(a, mask, 0.01)
        ev = explained_variance(lp, a, mask)
        return loss + v_loss + e_loss + ev, {**metrics, **v_metrics, **e_metrics}

    value_and_grad = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True))
    (value, metrics), grads = value_and_grad(bad_logp, bad_old, bad_adv)
    (clean_value, clean_metrics), clean_grads = value_and_grad(logp, old, adv)
    assert np.isfinite(float(value))
    np.testing.assert_allclose(float(value), float(clean_value), rtol=1e-6)
    for name in clean_metrics:
        np.testing.assert_allclose(float(metrics[name]), float(clean_metrics[name]), rtol=1e-6, err_msg=name)
    for grad, clean_grad in zip(grads, clean_grads):
        assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~mask] == 0)
        np.testing.assert_allclose(np.asarray(grad), np.asarray(clean_grad), rtol=1e-6, atol=1e-8)


def test_bf16_inputs_give_float32():
    logp, old, adv, mask = random_batch(5, 3, 6, 0.7)
    lp16, old16, adv16 = (jnp.asarray(x, jnp.bfloat16) for x in (logp, old, adv))
    per_token, metrics = _policy(lp16, old16, adv16, mask, 0.2, None, None)
    assert per_token.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in metrics.values())
    upcast = [np.asarray(x.astype(jnp.float32), np.float64) for x in (lp16, old16, adv16)]
    want, _ = ref_policy(*upcast, mask, 0.2, 0.2, None)
    np.testing.assert_allclose(np.asarray(per_token), want, **FP32)
    value_per_token, _ = _value(lp16, old16, adv16, mask, 0.2)
    assert value_per_token.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(value_per_token), ref_value(*upcast, mask, 0.2)[0], **FP32)
    assert explained_variance(lp16, adv16, mask).dtype == jnp.float32
    assert entropy_bonus(adv16, mask, 0.01)[0].dtype == jnp.float32


def test_vmap_over_leading_axis():
    rng = np.random.default_rng(6)
    logp, old, adv = (jnp.asarray(rng.normal(size=(4, 3, 6)) * 0.3, jnp.float32) for _ in range(3))
    mask = jnp.asarray(rng.random((4, 3, 6)) < 0.6)

    def losses(lp, o, a, m):
        return (ppo_policy_loss(lp, o, a, m, 0.2, dual_clip=3.0)[0], value_loss(lp, o, a, m, 0.2)[0],
                explained_variance(lp, a, m), entropy_bonus(a, m, 0.01)[0])

    batched = jax.jit(jax.vmap(losses))(logp, old, adv, mask)
    single = jax.jit(losses)
    for i in range(4):
        for b, s in zip(batched, single(logp[i], old[i], adv[i], mask[i])):
            np.testing.assert_allclose(float(b[i]), float(s), rtol=1e-6, atol=1e-7)
