"""Masked sum / mean / var / whiten against float64 numpy, by hand, and under jit, vmap, bf16 and NaN padding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from rlhf_jax.losses import masked_count, masked_mean, masked_sum, masked_var, masked_whiten

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)
FP32 = dict(rtol=1e-5, atol=1e-6)
SHAPES = [(1, 1), (3, 5), (4, 8)]  # a few shapes, so jit compiles are reused across examples


def random_batch(seed, batch, length, density):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(batch, length)) * 3 + 1
    mask = rng.random((batch, length)) < density
    return values, mask


# float64 numpy references, written from the definitions


def ref_sum(x, m, axis=None):
    return np.where(m, x, 0.0).sum(axis=axis)


def ref_mean(x, m, axis=None):
    n = m.sum(axis=axis)
    return np.where(n > 0, ref_sum(x, m, axis) / np.maximum(n, 1), 0.0)


def ref_var(x, m, axis=None, unbiased=False):
    mu = ref_mean(x, m, axis)
    if axis is not None:
        mu = np.expand_dims(mu, axis)
    n = m.sum(axis=axis)
    denominator = n - 1 if unbiased else n
    ss = np.where(m, (x - mu) ** 2, 0.0).sum(axis=axis)
    return np.where(denominator > 0, ss / np.maximum(denominator, 1), 0.0)


def ref_whiten(x, m, shift_mean=True, eps=1e-8, axis=None):
    mu, var = ref_mean(x, m, axis), ref_var(x, m, axis)
    if axis is not None:
        mu, var = np.expand_dims(mu, axis), np.expand_dims(var, axis)
    out = (x - mu) / np.sqrt(var + eps) + (0 if shift_mean else mu)
    return np.where(m, out, 0.0)


CASES = {
    "sum": (masked_sum, ref_sum),
    "sum_rows": (lambda x, m: masked_sum(x, m, axis=-1), lambda x, m: ref_sum(x, m, axis=-1)),
    "mean": (masked_mean, ref_mean),
    "mean_rows": (lambda x, m: masked_mean(x, m, axis=-1), lambda x, m: ref_mean(x, m, axis=-1)),
    "var": (masked_var, ref_var),
    "var_unbiased": (lambda x, m: masked_var(x, m, unbiased=True), lambda x, m: ref_var(x, m, unbiased=True)),
    "var_rows": (lambda x, m: masked_var(x, m, axis=-1), lambda x, m: ref_var(x, m, axis=-1)),
    "whiten": (masked_whiten, ref_whiten),
    "whiten_keep_mean": (lambda x, m: masked_whiten(x, m, shift_mean=False),
                         lambda x, m: ref_whiten(x, m, shift_mean=False)),
    "whiten_rows": (lambda x, m: masked_whiten(x, m, axis=-1), lambda x, m: ref_whiten(x, m, axis=-1)),
}
# every function, and the per-row axis, for the shared properties (the reference test covers all of CASES)
PROPERTY_CASES = ["sum", "mean", "var", "var_unbiased", "whiten", "whiten_keep_mean", "whiten_rows"]


@pytest.mark.parametrize("name", sorted(CASES))
@SETTINGS
@given(seed=st.integers(0, 2**31), shape=st.sampled_from(SHAPES), density=st.sampled_from([0.0, 0.3, 0.7, 1.0]))
def test_matches_float64_numpy(name, seed, shape, density):
    fn, ref = CASES[name]
    values, mask = random_batch(seed, *shape, density)
    got = jax.jit(fn)(jnp.asarray(values, jnp.float32), jnp.asarray(mask))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), ref(values.astype(np.float32).astype(np.float64), mask), **FP32)


def test_hand_computed():
    # x = [1, 2, 3, 4] with the 3 masked out: selected {1, 2, 4}
    # sum = 7, mean = 7/3; deviations -4/3, -1/3, 5/3 -> squares 16/9 + 1/9 + 25/9 = 42/9
    # var = 42/9 / 3 = 14/9; unbiased var = 42/9 / 2 = 7/3
    # whiten = (x - 7/3) / sqrt(14/9) = 3 (x - 7/3) / sqrt(14) -> [-4, -1, _, 5] / sqrt(14), 0 at the masked slot
    x = jnp.array([[1.0, 2.0, 3.0, 4.0]])
    m = jnp.array([[1, 1, 0, 1]])
    assert float(masked_count(m)) == 3
    assert float(masked_sum(x, m)) == 7.0
    np.testing.assert_allclose(float(masked_mean(x, m)), 7 / 3, rtol=1e-7)
    np.testing.assert_allclose(float(masked_var(x, m)), 14 / 9, rtol=1e-6)
    np.testing.assert_allclose(float(masked_var(x, m, unbiased=True)), 7 / 3, rtol=1e-6)
    expected = np.array([[-4, -1, 0, 5]]) / math.sqrt(14)
    np.testing.assert_allclose(np.asarray(masked_whiten(x, m, eps=0.0)), expected, rtol=1e-6)
    # shift_mean=False adds the mean back at selected slots only
    expected_kept = np.where([[1, 1, 0, 1]], expected + 7 / 3, 0)
    np.testing.assert_allclose(np.asarray(masked_whiten(x, m, shift_mean=False, eps=0.0)), expected_kept, rtol=1e-6)


def test_empty_selection_gives_zero_not_nan():
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    m = jnp.zeros((2, 2), bool)
    for name, (fn, _) in CASES.items():
        out = np.asarray(fn(x, m))
        assert np.all(out == 0), name
    # one selected entry: the unbiased variance has no degrees of freedom -> 0
    assert float(masked_var(x, jnp.array([[1, 0], [0, 0]]), unbiased=True)) == 0.0


@pytest.mark.parametrize("name", PROPERTY_CASES)
def test_jit_equals_eager(name):
    fn, _ = CASES[name]
    values, mask = random_batch(1, 3, 6, 0.6)
    x, m = jnp.asarray(values, jnp.float32), jnp.asarray(mask)
    # XLA may fuse and reassociate under jit: equal to float32 rounding
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(x, m)), np.asarray(fn(x, m)), rtol=1e-6, atol=1e-7)


def poison_under_mask(values, mask):
    """NaN, inf and −inf (in turn) at the masked-out entries."""
    poison = np.resize(np.array([np.nan, np.inf, -np.inf]), values.shape)
    return np.where(mask, values, poison)


@pytest.mark.parametrize("name", PROPERTY_CASES)
def test_nan_and_inf_under_mask_do_not_leak(name):
    fn, _ = CASES[name]
    values, mask = random_batch(2, 3, 6, 0.5)
    mask[0, :3] = False
    clean = jnp.asarray(values, jnp.float32)
    poisoned = jnp.asarray(poison_under_mask(values, mask), jnp.float32)
    m = jnp.asarray(mask)
    out = fn(poisoned, m)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(fn(clean, m)))
    # gradients: finite, equal to the clean ones, and zero under the mask
    weights = jnp.asarray(np.random.default_rng(0).normal(size=np.shape(out)), jnp.float32)
    grad_fn = jax.grad(lambda x: jnp.sum(fn(x, m) * weights))
    grad_poisoned, grad_clean = grad_fn(poisoned), grad_fn(clean)
    assert np.all(np.isfinite(grad_poisoned))
    np.testing.assert_allclose(np.asarray(grad_poisoned), np.asarray(grad_clean), rtol=1e-6, atol=1e-7)
    assert np.all(np.asarray(grad_poisoned)[~mask] == 0)


@pytest.mark.parametrize("name", PROPERTY_CASES)
def test_bf16_input_gives_float32_output(name):
    fn, ref = CASES[name]
    values, mask = random_batch(3, 3, 6, 0.7)
    x_bf16 = jnp.asarray(values, jnp.bfloat16)
    out = fn(x_bf16, jnp.asarray(mask))
    assert out.dtype == jnp.float32
    # the result is that of float32 arithmetic on the bf16 values, not bf16 arithmetic
    exact = ref(np.asarray(x_bf16.astype(jnp.float32), np.float64), mask)
    np.testing.assert_allclose(np.asarray(out), exact, **FP32)


@pytest.mark.parametrize("name", PROPERTY_CASES)
def test_vmap_over_leading_axis(name):
    fn, _ = CASES[name]
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(5, 3, 6)), jnp.float32)
    m = jnp.asarray(rng.random((5, 3, 6)) < 0.6)
    batched = jax.vmap(fn)(x, m)
    for i in range(5):
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(fn(x[i], m[i])), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", PROPERTY_CASES)
def test_int_mask_equals_bool_mask(name):
    fn, _ = CASES[name]
    values, mask = random_batch(5, 3, 6, 0.5)
    x = jnp.asarray(values, jnp.float32)
    np.testing.assert_array_equal(np.asarray(fn(x, jnp.asarray(mask.astype(np.int32)))),
                                  np.asarray(fn(x, jnp.asarray(mask))))


@pytest.mark.parametrize("name", ["mean", "var_unbiased", "whiten_keep_mean", "whiten_rows"])
def test_gradient_float64(name):
    fn, _ = CASES[name]
    values, mask = random_batch(6, 3, 5, 0.7)
    with jax.enable_x64(True):
        m = jnp.asarray(mask)
        weights = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5)))

        def scalar(x):
            return jnp.sum(fn(x, m) * (weights if fn(x, m).ndim == 2 else 1.0))

        x = jnp.asarray(values, jnp.float64)
        assert fn(x, m).dtype == jnp.float64
        check_grads(jax.jit(scalar), (x,), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)
