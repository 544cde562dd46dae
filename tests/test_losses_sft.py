"""SFT next-token NLL: numpy reference, hand case, masking, dtypes, jit, vmap and gradients through logits."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from rlhf_jax.losses import AGGREGATION_MODES, chunked_token_logprobs, nll_per_token, sft_loss

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)
FP32 = dict(rtol=1e-5, atol=1e-6)
SHAPES = [(1, 1), (3, 5), (4, 8)]


def ref_sft(logprobs, mask, mode, normaliser=None):
    nll = np.where(mask, -logprobs, 0.0)
    n = mask.sum()
    if mode == "token-mean":
        loss = nll.sum() / n if n else 0.0
    elif mode == "sequence-mean":
        rows = [nll[b].sum() / mask[b].sum() for b in range(mask.shape[0]) if mask[b].any()]
        loss = np.mean(rows) if rows else 0.0
    else:
        loss = nll.sum() / ((mask.shape[-1] if normaliser is None else normaliser) * mask.shape[0])
    return nll, loss, {"sft/loss": loss, "sft/perplexity": math.exp(nll.sum() / n) if n else 1.0, "sft/tokens": n}


def random_batch(seed, batch, length, density):
    rng = np.random.default_rng(seed)
    return (-np.abs(rng.normal(size=(batch, length))) * 2).astype(np.float32), rng.random((batch, length)) < density


_sft = jax.jit(sft_loss, static_argnums=2)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
@SETTINGS
@given(seed=st.integers(0, 2**31), shape=st.sampled_from(SHAPES), density=st.sampled_from([0.0, 0.4, 1.0]))
def test_matches_float64_numpy(mode, seed, shape, density):
    logprobs, mask = random_batch(seed, *shape, density)
    loss, metrics = _sft(logprobs, mask, mode)
    nll, want_loss, want_metrics = ref_sft(logprobs.astype(np.float64), mask, mode)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), want_loss, **FP32)
    for name, value in want_metrics.items():
        np.testing.assert_allclose(float(metrics[name]), value, **FP32, err_msg=name)
    np.testing.assert_allclose(np.asarray(nll_per_token(logprobs, mask)), nll, **FP32)


def test_hand_computed():
    # log p = [ln ½, ln ¼, (masked)] -> NLL [ln 2, ln 4] = [0.693147, 1.386294]; token-mean 1.5 ln 2 = 1.039721
    # perplexity = exp(1.5 ln 2) = 2^1.5 = 2.828427; sum-fixed with normaliser 4: 3 ln 2 / 4 = 0.519860
    logprobs = jnp.array([[math.log(0.5), math.log(0.25), -7.0]])
    mask = jnp.array([[1, 1, 0]])
    np.testing.assert_allclose(np.asarray(nll_per_token(logprobs, mask)), [[math.log(2), math.log(4), 0.0]],
                               rtol=1e-6)
    loss, metrics = sft_loss(logprobs, mask)
    np.testing.assert_allclose(float(loss), 1.5 * math.log(2), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["sft/perplexity"]), 2 ** 1.5, rtol=1e-6)
    assert float(metrics["sft/tokens"]) == 2.0
    np.testing.assert_allclose(float(sft_loss(logprobs, mask, "sum-fixed", 4)[0]), 3 * math.log(2) / 4, rtol=1e-6)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_jit_equals_eager(mode):
    logprobs, mask = random_batch(1, 3, 6, 0.7)
    for got, want in zip(jax.tree.leaves(_sft(logprobs, mask, mode)), jax.tree.leaves(sft_loss(logprobs, mask, mode))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_gradient_through_logits_float64():
    # The SFT loss as trainers use it: logits -> chosen-token log-probs -> masked NLL
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 5, 7))
    tokens = rng.integers(0, 7, size=(2, 5))
    mask = rng.random((2, 5)) < 0.7
    with jax.enable_x64(True):
        def loss(x):
            return sft_loss(chunked_token_logprobs(x, tokens, mask=mask, seq_chunk=2, vocab_chunk=3), mask)[0]

        assert loss(jnp.asarray(logits)).dtype == jnp.float64
        check_grads(jax.jit(loss), (jnp.asarray(logits),), order=1, modes=("rev",), atol=1e-7, rtol=1e-7)


def test_nan_and_inf_under_mask_do_not_leak():
    logprobs, mask = random_batch(3, 3, 6, 0.6)
    mask[0, :3] = False
    poison = np.resize(np.array([np.nan, np.inf, -np.inf]), logprobs.shape)
    bad = np.where(mask, logprobs, poison)
    for mode in AGGREGATION_MODES:
        value_and_grad = jax.value_and_grad(lambda lp: sft_loss(lp, mask, mode), has_aux=True)
        (value, metrics), grad = value_and_grad(jnp.asarray(bad))
        (clean, clean_metrics), _ = value_and_grad(jnp.asarray(logprobs))
        assert float(value) == float(clean)
        assert all(float(metrics[k]) == float(clean_metrics[k]) for k in metrics)
        assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~mask] == 0)


def test_bf16_logprobs_give_float32():
    logprobs, mask = random_batch(4, 3, 6, 0.7)
    bf16 = jnp.asarray(logprobs, jnp.bfloat16)
    loss, metrics = sft_loss(bf16, mask)
    assert loss.dtype == jnp.float32 and nll_per_token(bf16, mask).dtype == jnp.float32
    _, want, _ = ref_sft(np.asarray(bf16.astype(jnp.float32), np.float64), mask, "token-mean")
    np.testing.assert_allclose(float(loss), want, **FP32)


def test_vmap_over_leading_axis():
    rng = np.random.default_rng(5)
    logprobs = jnp.asarray(-np.abs(rng.normal(size=(4, 3, 6))), jnp.float32)
    mask = jnp.asarray(rng.random((4, 3, 6)) < 0.6)
    losses, _ = jax.vmap(lambda lp, m: sft_loss(lp, m, "sequence-mean"))(logprobs, mask)
    for i in range(4):
        np.testing.assert_allclose(float(losses[i]), float(_sft(logprobs[i], mask[i], "sequence-mean")[0]), rtol=1e-6)
