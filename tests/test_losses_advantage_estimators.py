"""Critic-free advantage estimators vs float64 numpy, by hand, jit, vmap, invariances; token broadcast; names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.losses import (
    ADVANTAGE_ESTIMATORS,
    CRITIC_ESTIMATORS,
    dr_grpo,
    gae,
    get_advantage_estimator,
    grpo,
    kl_penalized_rewards,
    masked_mean,
    needs_critic,
    reinforce,
    reinforce_pp,
    rloo,
    sequence_to_token_advantages,
    whiten_advantages,
)

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)
FP32 = dict(rtol=1e-5, atol=1e-5)
NAMES = tuple(ADVANTAGE_ESTIMATORS)
GROUP_SIZES = [1, 2, 3, 4, 8]
NUM_PROMPTS = [1, 3, 5]


# float64 references, written per group as the papers state them (the leave-one-out mean literally)

def reference_grpo(scores, k, eps):
    out = np.zeros_like(scores)
    for p in range(len(scores) // k):
        group = scores[p * k:(p + 1) * k]
        std = group.std(ddof=1) if k > 1 else 0.0  # sample std, as torch.std in TRL
        out[p * k:(p + 1) * k] = 0.0 if std == 0 else (group - group.mean()) / (std + eps)
    return out


def reference_dr_grpo(scores, k, eps):
    return np.concatenate([g - g.mean() for g in scores.reshape(-1, k)])


def reference_rloo(scores, k, eps):
    out = np.zeros_like(scores)
    for p in range(len(scores) // k):
        group = scores[p * k:(p + 1) * k]
        for i in range(k):
            out[p * k + i] = group[i] - np.mean(np.delete(group, i))
    return out


def reference_reinforce(scores, k, eps):
    return scores - scores.mean()


def reference_reinforce_pp(scores, k, eps):
    return reference_grpo(scores, len(scores), eps)


REFERENCES = {"grpo": reference_grpo, "dr_grpo": reference_dr_grpo, "rloo": reference_rloo,
              "reinforce": reference_reinforce, "reinforce_pp": reference_reinforce_pp}
JITTED = {name: jax.jit(fn, static_argnums=1) for name, fn in ADVANTAGE_ESTIMATORS.items()}


def random_scores(seed, num_prompts, k, kind):
    rng = np.random.default_rng(seed)
    if kind == "binary":  # verifiable rewards: many groups all right or all wrong
        return rng.integers(0, 2, num_prompts * k).astype(np.float32)
    return (rng.normal(size=num_prompts * k) * 2 + 0.7).astype(np.float32)


def test_table():
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "dr_grpo", "rloo", "reinforce", "reinforce_pp"}
    assert ADVANTAGE_ESTIMATORS["grpo"] is grpo and ADVANTAGE_ESTIMATORS["rloo"] is rloo
    assert CRITIC_ESTIMATORS == ("gae",)
    assert set(REFERENCES) == set(ADVANTAGE_ESTIMATORS)


@SETTINGS
@given(seed=st.integers(0, 2**31), name=st.sampled_from(NAMES), num_prompts=st.sampled_from(NUM_PROMPTS),
       k=st.sampled_from(GROUP_SIZES), kind=st.sampled_from(["normal", "binary"]), eps=st.sampled_from([1e-4, 0.1]))
def test_matches_numpy_float64(seed, name, num_prompts, k, kind, eps):
    if name == "rloo" and k == 1:
        k = 2
    scores = random_scores(seed, num_prompts, k, kind)
    want = REFERENCES[name](scores.astype(np.float64), k, eps)
    # float32, as trainers run it; eps traced
    got = JITTED[name](scores, k, eps)
    assert got.shape == scores.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, **FP32)
    with jax.enable_x64(True):
        got64 = JITTED[name](jnp.asarray(scores, jnp.float64), k, eps)
        assert got64.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got64), want, rtol=1e-12, atol=1e-12)


def test_hand_computed():
    # 2 prompts × k = 3: r = [1, 2, 6 | 4, 4, 4]
    # group 1: mean 3, r − mean = [−2, −1, 3], sample var = (4 + 1 + 9) / 2 = 7, std = √7 = 2.6457513
    # group 2: all equal -> every estimator gives 0 there (no signal); batch mean = 21 / 6 = 3.5
    scores = jnp.array([1.0, 2.0, 6.0, 4.0, 4.0, 4.0])
    sqrt7 = np.sqrt(7.0)
    # GRPO, eps = 0: [−2, −1, 3] / √7 = [−0.7559289, −0.3779645, 1.1338934]
    np.testing.assert_allclose(np.asarray(grpo(scores, 3, 0.0)), [-2 / sqrt7, -1 / sqrt7, 3 / sqrt7, 0, 0, 0],
                               rtol=1e-6)
    # GRPO, eps = 1: [−2, −1, 3] / (√7 + 1) = [−0.5485837, −0.2742919, 0.8228756]
    np.testing.assert_allclose(np.asarray(grpo(scores, 3, 1.0)), [-0.5485837, -0.2742919, 0.8228756, 0, 0, 0],
                               rtol=1e-6)
    # Dr. GRPO: r − mean = [−2, −1, 3, 0, 0, 0]
    np.testing.assert_allclose(np.asarray(dr_grpo(scores, 3)), [-2, -1, 3, 0, 0, 0], rtol=1e-6)
    # RLOO: r_i − mean of the two others: 1 − (2+6)/2 = −3, 2 − (1+6)/2 = −1.5, 6 − (1+2)/2 = 4.5
    #       (= 3/2 · [−2, −1, 3]); group 2: 4 − 4 = 0
    np.testing.assert_allclose(np.asarray(rloo(scores, 3)), [-3, -1.5, 4.5, 0, 0, 0], rtol=1e-6)
    # REINFORCE: r − 3.5 = [−2.5, −1.5, 2.5, 0.5, 0.5, 0.5], whatever the grouping
    for k in (1, 2, 3, 6):
        np.testing.assert_allclose(np.asarray(reinforce(scores, k)), [-2.5, -1.5, 2.5, 0.5, 0.5, 0.5], rtol=1e-6)
    # REINFORCE++, eps = 0: sample var over the batch = (6.25 + 2.25 + 6.25 + 3 · 0.25) / 5 = 3.1, std = 1.7606817
    want = np.array([-2.5, -1.5, 2.5, 0.5, 0.5, 0.5]) / np.sqrt(3.1)
    for k in (1, 3):
        np.testing.assert_allclose(np.asarray(reinforce_pp(scores, k, 0.0)), want, rtol=1e-6)


def test_group_of_one():
    scores = jnp.array([0.3, -1.0, 2.5, 7.0])
    # one sample per prompt: no group baseline, so GRPO and Dr. GRPO give 0 (not NaN, as torch.std of one value)
    np.testing.assert_array_equal(np.asarray(grpo(scores, 1)), np.zeros(4))
    np.testing.assert_array_equal(np.asarray(grpo(scores, 1, 0.0)), np.zeros(4))
    np.testing.assert_array_equal(np.asarray(dr_grpo(scores, 1)), np.zeros(4))
    with pytest.raises(ValueError, match="rloo needs group_size >= 2"):
        rloo(scores, 1)
    # the batch estimators ignore the groups
    np.testing.assert_allclose(np.asarray(reinforce(scores, 1)), np.asarray(reinforce(scores, 4)))
    np.testing.assert_allclose(np.asarray(reinforce_pp(scores, 1)), np.asarray(reinforce_pp(scores, 2)))


def test_equal_scores_give_exact_zeros():
    # the float32 mean of eight 0.1s is 0.1 + 7e-9: centring alone would leave ±7e-9, and with a small eps GRPO
    # would scale that ulp by 1/std into an O(1) advantage. A group of equal scores must give exactly 0.
    scores = jnp.concatenate([jnp.full(8, 0.1, jnp.float32), jnp.arange(8, dtype=jnp.float32)])
    for name in NAMES:
        got = np.asarray(ADVANTAGE_ESTIMATORS[name](scores, 8, 1e-8))
        assert np.all(np.isfinite(got))
        if name not in ("reinforce", "reinforce_pp"):
            np.testing.assert_array_equal(got[:8], 0.0)
    # a whole batch of equal scores, even with eps = 0
    for name in NAMES:
        np.testing.assert_array_equal(np.asarray(ADVANTAGE_ESTIMATORS[name](jnp.full(8, 0.1), 4, 0.0)), 0.0)


@pytest.mark.parametrize("name", NAMES)
def test_jit_equals_eager(name):
    scores = random_scores(0, 3, 4, "normal")
    got = JITTED[name](scores, 4, 1e-4)
    want = ADVANTAGE_ESTIMATORS[name](scores, 4, 1e-4)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_group_shift_invariance(name):
    # adding a constant per group (a prompt that is easier for everyone) changes nothing
    k = 4
    scores = random_scores(1, 5, k, "normal")
    shifts = np.repeat(np.array([0.0, 3.0, -10.0, 0.25, 100.0], np.float32), k)
    fn = JITTED[name]
    np.testing.assert_allclose(np.asarray(fn(scores + shifts, k, 1e-4)), np.asarray(fn(scores, k, 1e-4)),
                               rtol=1e-4, atol=1e-4)


def test_grpo_scale_invariance():
    # scaling a group by c > 0 scales both r − mean and std: only the eps term differs, so use eps = 0
    k = 4
    scores = random_scores(2, 5, k, "normal")
    scales = np.repeat(np.array([1.0, 0.01, 7.0, 300.0, 2.5], np.float32), k)
    np.testing.assert_allclose(np.asarray(grpo(scores * scales, k, 0.0)), np.asarray(grpo(scores, k, 0.0)),
                               rtol=1e-5, atol=1e-5)
    # and reinforce_pp under a batch-wide affine map
    np.testing.assert_allclose(np.asarray(reinforce_pp(3.0 * scores - 2.0, k, 0.0)),
                               np.asarray(reinforce_pp(scores, k, 0.0)), rtol=1e-5, atol=1e-5)


def test_relations_between_estimators():
    k = 4
    scores = random_scores(3, 5, k, "normal")
    # RLOO = k / (k − 1) · Dr. GRPO; REINFORCE++ = GRPO with one group spanning the batch
    np.testing.assert_allclose(np.asarray(rloo(scores, k)), k / (k - 1) * np.asarray(dr_grpo(scores, k)), **FP32)
    np.testing.assert_allclose(np.asarray(reinforce_pp(scores, k)), np.asarray(grpo(scores, scores.size)), **FP32)
    # group-centred advantages sum to 0 within each group; batch-centred ones over the batch
    for name in ("grpo", "dr_grpo", "rloo"):
        sums = np.asarray(ADVANTAGE_ESTIMATORS[name](scores, k)).reshape(-1, k).sum(axis=1)
        np.testing.assert_allclose(sums, 0.0, atol=1e-5)
    for name in ("reinforce", "reinforce_pp"):
        assert abs(float(jnp.sum(ADVANTAGE_ESTIMATORS[name](scores, k)))) < 1e-5


def test_groups_are_contiguous_rows():
    # rows p·k .. p·k + k − 1 belong to prompt p: permuting whole groups permutes the advantages with them
    k = 3
    scores = random_scores(4, 4, k, "normal")
    order = np.concatenate([np.arange(p * k, (p + 1) * k) for p in (2, 0, 3, 1)])
    for name in NAMES:
        fn = ADVANTAGE_ESTIMATORS[name]
        np.testing.assert_allclose(np.asarray(fn(scores[order], k)), np.asarray(fn(scores, k))[order], **FP32)


def test_vmap_over_leading_axis():
    rng = np.random.default_rng(5)
    scores = jnp.asarray(rng.normal(size=(3, 12)), jnp.float32)
    for name in NAMES:
        got = jax.vmap(lambda s, fn=ADVANTAGE_ESTIMATORS[name]: fn(s, 4, 1e-4))(scores)
        for i in range(3):
            np.testing.assert_allclose(np.asarray(got[i]), REFERENCES[name](np.asarray(scores[i], np.float64), 4, 1e-4),
                                       **FP32)


def test_integer_and_bf16_scores_give_float32():
    # rewards built from integer arrays are never truncated or kept integer
    for scores in (jnp.array([1, 0, 0, 1]), jnp.array([1.0, 0.5, 0.25, 1.0], jnp.bfloat16)):
        for name in NAMES:
            assert ADVANTAGE_ESTIMATORS[name](scores, 2).dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(dr_grpo(jnp.array([1, 0, 0, 0]), 2)), [0.5, -0.5, 0, 0])


def test_gradient_is_finite_for_equal_groups():
    # advantages are stop-gradiented in the loss, but analysis code may differentiate them: no NaN from std = 0
    scores = jnp.array([1.0, 1.0, 0.0, 2.0])
    for name in NAMES:
        grad = jax.grad(lambda s, fn=ADVANTAGE_ESTIMATORS[name]: jnp.sum(fn(s, 2, 0.0) * jnp.arange(4.0)))(scores)
        assert np.all(np.isfinite(np.asarray(grad))), name


@pytest.mark.parametrize("name", NAMES)
def test_layout_errors(name):
    fn = ADVANTAGE_ESTIMATORS[name]
    with pytest.raises(ValueError, match=r"10 scores do not split into groups of group_size=4: expected "
                                         r"B = num_prompts \* group_size"):
        fn(jnp.zeros(10), 4)
    with pytest.raises(ValueError, match=r"scores must be \[B\], one per sequence, got shape \(2, 4\)"):
        fn(jnp.zeros((2, 4)), 2)
    with pytest.raises(ValueError, match="group_size must be >= 1, got 0"):
        fn(jnp.zeros(4), 0)
    with pytest.raises(ValueError, match="group_size must be a static Python int, got float"):
        fn(jnp.zeros(4), 2.0)


# the broadcast over response tokens

def test_sequence_to_token_advantages():
    rng = np.random.default_rng(6)
    advantages = rng.normal(size=5).astype(np.float32)
    mask = rng.random((5, 7)) < 0.6
    mask[3] = False  # a row with no response token
    got = jax.jit(sequence_to_token_advantages)(advantages, mask)
    assert got.shape == (5, 7) and got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.where(mask, advantages[:, None], 0.0))
    # {0, 1} masks work the same; hand case: A = [2, −1], mask [[1, 1, 0], [0, 1, 1]]
    np.testing.assert_array_equal(
        np.asarray(sequence_to_token_advantages(jnp.array([2.0, -1.0]), jnp.array([[1, 1, 0], [0, 1, 1]]))),
        [[2.0, 2.0, 0.0], [0.0, -1.0, -1.0]])


def test_sequence_to_token_advantages_nan_under_mask_does_not_leak():
    # a row with no response (e.g. an empty generation) may carry a NaN/inf advantage: it must give zeros,
    # in the value and in the gradient (NaN * 0 = NaN is what multiplication by the mask would give)
    advantages = jnp.array([1.5, jnp.nan, -0.5, jnp.inf])
    mask = jnp.array([[1, 1, 0], [0, 0, 0], [0, 1, 1], [0, 0, 0]], bool)
    got = np.asarray(sequence_to_token_advantages(advantages, mask))
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got, [[1.5, 1.5, 0], [0, 0, 0], [0, -0.5, -0.5], [0, 0, 0]])
    weights = jnp.full((4, 3), jnp.nan).at[mask].set(1.0)  # NaN upstream cotangents under the mask too
    grad = jax.grad(lambda a: jnp.sum(jnp.where(mask, weights * sequence_to_token_advantages(a, mask), 0)))(advantages)
    np.testing.assert_array_equal(np.asarray(grad), [2.0, 0.0, 2.0, 0.0])


def test_sequence_to_token_advantages_float64():
    with jax.enable_x64(True):
        got = sequence_to_token_advantages(jnp.array([0.1, 0.2], jnp.float64), jnp.ones((2, 2), bool))
        assert got.dtype == jnp.float64


def test_kl_in_reward_feeds():
    # what the engine passes as a sequence score under KL-in-reward is the return from the first response token,
    # score − β Σ_t KL_t; the token-level REINFORCE++ form takes returns-to-go (gae with V = 0, γ = λ = 1)
    rng = np.random.default_rng(7)
    mask = np.array([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0], [1, 1, 0, 0, 0]], bool)
    logprobs, ref_logprobs = (jnp.asarray(rng.normal(size=(4, 5)) - 2, jnp.float32) for _ in range(2))
    scores, kl_coef = jnp.array([1.0, 0.0, 0.5, 0.25]), 0.1
    rewards, _ = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    returns_to_go, _ = gae(rewards, 0.0, mask, 1.0, 1.0)
    kl = np.where(mask, np.asarray(logprobs, np.float64) - np.asarray(ref_logprobs, np.float64), 0.0)
    sequence_scores = np.asarray(scores) - kl_coef * kl.sum(axis=1)
    first = mask.argmax(axis=1)
    np.testing.assert_allclose(np.asarray(returns_to_go)[np.arange(4), first], sequence_scores, **FP32)
    token_level = whiten_advantages(returns_to_go, mask)
    np.testing.assert_allclose(float(masked_mean(token_level, mask)), 0.0, atol=1e-6)
    advantages = reinforce_pp(jnp.asarray(sequence_scores, jnp.float32), 2)
    np.testing.assert_allclose(np.asarray(advantages), reference_reinforce_pp(sequence_scores, 2, 1e-4), **FP32)


# names

def test_names():
    assert get_advantage_estimator("grpo") is grpo
    assert get_advantage_estimator("reinforce_pp") is reinforce_pp
    assert [needs_critic(name) for name in (*NAMES, "gae")] == [False] * len(NAMES) + [True]
    expected = "expected one of grpo, dr_grpo, rloo, reinforce, reinforce_pp, gae"
    with pytest.raises(ValueError, match=f"unknown advantage estimator 'ppo'; {expected}"):
        get_advantage_estimator("ppo")
    with pytest.raises(ValueError, match=f"unknown advantage estimator 'GRPO'; {expected}"):
        needs_critic("GRPO")
    with pytest.raises(ValueError, match="unknown advantage estimator None"):
        get_advantage_estimator(None)
    with pytest.raises(ValueError, match=r"advantage estimator 'gae' needs a critic: call gae\(rewards, values"):
        get_advantage_estimator("gae")
