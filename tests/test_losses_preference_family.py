"""The preference-loss table (`losses.preference.PREFERENCE_LOSSES`): every loss against a float64 numpy
reference from its paper's formula, hand cases, TRL's own loss functions (CPO/SimPO, ORPO) and TRL 1.16's
DPO formulas (length-normalised IPO, ``sigmoid_norm``, the RPO ``"sft"`` term), masks, empty batches, jit,
gradients, and micro-batch exactness of the NLL term."""

from __future__ import annotations

import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from rlhf_jax.losses import (PREFERENCE_LOSSES, PairLogps, SequenceLogps, aggregate, preference_hyperparameters,
                             preference_loss, preference_per_pair)

FP32 = dict(rtol=2e-5, atol=1e-5)
HYPER = dict(beta=0.2, gamma=0.3, label_smoothing=0.0, length_normalised=False)
# (type, hyperparameters beyond HYPER, nll_coef)
CASES = [
    ("sigmoid", {}, None), ("sigmoid", {"label_smoothing": 0.2}, None), ("sigmoid", {"length_normalised": True}, None),
    ("sigmoid", {}, 0.5),  # RPO: DPO + α·NLL
    ("hinge", {}, None), ("ipo", {}, None), ("ipo", {"length_normalised": True}, None),
    ("simpo", {}, None), ("simpo", {"label_smoothing": 0.1}, None), ("simpo", {}, 0.3),
    ("cpo", {}, None), ("cpo", {}, 0.0), ("orpo", {}, None), ("orpo", {}, 2.0),
]
DEFAULT_NLL = {"cpo": 1.0, "orpo": 1.0}


def random_records(seed: int, size: int, density: float = 0.7):
    """Policy and reference records of `size` pairs (counts 1..40, mean log-probs in (−3, −0.05)), a pair mask."""
    rng = np.random.default_rng(seed)
    counts = [rng.integers(1, 40, size).astype(np.float32) for _ in range(2)]
    policy = [-(rng.uniform(0.05, 3, size) * n).astype(np.float32) for n in counts]
    reference = [(p + rng.normal(0, 2, size)).astype(np.float32) for p in policy]
    reference = [np.minimum(r, -0.01).astype(np.float32) for r in reference]
    return counts, policy, reference, rng.random(size) < density


def as_pairs(counts, totals) -> PairLogps:
    return PairLogps(*(SequenceLogps(jnp.asarray(t), jnp.asarray(n)) for t, n in zip(totals, counts)))


def numpy_reference(loss_type, counts, policy, reference, pair_mask, nll_coef, beta, gamma, label_smoothing,
                    length_normalised):
    """float64 numpy from the papers' formulas: (mean loss, {metric: value}) over the masked pairs."""
    keep = np.asarray(pair_mask, bool)
    nc, nr, pc, pr, rc, rr = (np.asarray(x, np.float64)[keep] for x in (*counts, *policy, *reference))
    if pc.size == 0:
        return 0.0, {}

    def logistic(z):  # −(1 − ε) log σ(z) − ε log σ(−z), with −log σ(z) = log(1 + e^−z)
        return (1 - label_smoothing) * np.logaddexp(0, -z) + label_smoothing * np.logaddexp(0, z)

    if loss_type in ("sigmoid", "hinge", "ipo"):
        scale_c, scale_r = (nc, nr) if length_normalised else (1.0, 1.0)
        h = (pc - rc) / scale_c - (pr - rr) / scale_r
        per_pair = {"sigmoid": lambda: logistic(beta * h), "hinge": lambda: np.maximum(0, 1 - beta * h),
                    "ipo": lambda: (h - 1 / (2 * beta)) ** 2}[loss_type]()
        chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    elif loss_type == "simpo":  # Meng et al. 2024, eq. 6
        per_pair = logistic(beta * (pc / nc - pr / nr) - gamma)
        chosen_rewards, rejected_rewards = beta * pc / nc, beta * pr / nr
    elif loss_type == "cpo":  # Xu et al. 2024, eq. 3
        per_pair = logistic(beta * (pc - pr))
        chosen_rewards, rejected_rewards = beta * pc, beta * pr
    else:  # ORPO, Hong et al. 2024: odds(y) = P / (1 − P) with P = exp(mean log-prob)
        mc, mr = pc / nc, pr / nr
        odds_c, odds_r = np.exp(mc) / (1 - np.exp(mc)), np.exp(mr) / (1 - np.exp(mr))
        log_odds = np.log(odds_c / odds_r)
        per_pair = -beta * -np.logaddexp(0, -log_odds)
        chosen_rewards, rejected_rewards = beta * mc, beta * mr
    metrics = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
               "rewards/accuracies": np.mean(chosen_rewards > rejected_rewards),
               "rewards/margins": np.mean(chosen_rewards - rejected_rewards),
               "logps/chosen": pc.mean(), "logps/rejected": pr.mean()}
    nll_coef = DEFAULT_NLL.get(loss_type, 0.0) if nll_coef is None else nll_coef
    loss = per_pair.mean()
    if nll_coef:
        nll = -pc.sum() / nc.sum()  # token-mean NLL of the chosen responses
        loss += nll_coef * nll
        metrics["nll_loss"] = nll
    if loss_type == "orpo":
        metrics["log_odds_chosen"] = log_odds.mean()
        metrics["log_odds_ratio"] = -np.logaddexp(0, -log_odds).mean()
    return loss, metrics


def _call(loss_type, counts, policy, reference, pair_mask, nll_coef, hyper):
    kind = PREFERENCE_LOSSES[loss_type]
    return preference_loss(loss_type, as_pairs(counts, policy),
                           as_pairs(counts, reference) if kind.needs_reference else None,
                           pair_mask=pair_mask, nll_coef=nll_coef, **hyper)


def test_the_table_says_which_losses_need_a_reference_and_what_they_read():
    assert {name for name, kind in PREFERENCE_LOSSES.items() if kind.needs_reference} == {"sigmoid", "hinge", "ipo"}
    assert preference_hyperparameters("simpo") == ("beta", "gamma", "label_smoothing")
    assert preference_hyperparameters("orpo") == ("beta",)
    with pytest.raises(ValueError, match="needs the reference"):
        preference_per_pair("sigmoid", as_pairs(*random_records(0, 3)[:2]), None, beta=0.1)
    with pytest.raises(ValueError, match="expected one of sigmoid, hinge, ipo, simpo, cpo, orpo"):
        preference_per_pair("robust", as_pairs(*random_records(0, 3)[:2]), beta=0.1)


@pytest.mark.parametrize("loss_type, extra, nll_coef", CASES)
@pytest.mark.parametrize("seed, size, density", [(0, 1, 1.0), (1, 17, 0.7), (2, 64, 0.3), (3, 5, 0.0)])
def test_matches_float64_numpy(loss_type, extra, nll_coef, seed, size, density):
    counts, policy, reference, pair_mask = random_records(seed, size, density)
    hyper = {**HYPER, **extra}
    loss, metrics = _call(loss_type, counts, policy, reference, pair_mask, nll_coef, hyper)
    want_loss, want = numpy_reference(loss_type, counts, policy, reference, pair_mask, nll_coef, **hyper)
    np.testing.assert_allclose(float(loss), want_loss, **FP32)
    np.testing.assert_allclose(float(metrics["loss"]), want_loss, **FP32)
    if pair_mask.any():
        assert set(metrics) - {"loss"} == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(float(metrics[name]), value, **FP32, err_msg=name)
    if not pair_mask.any():  # an empty batch: every figure 0, nothing NaN
        assert all(float(value) == 0.0 for value in metrics.values())


def test_hand_cases():
    # one pair: policy sums (−10 over 5 tokens, −12 over 4), reference (−11, −11)
    counts = [np.array([5.0], np.float32), np.array([4.0], np.float32)]
    policy = [np.array([-10.0], np.float32), np.array([-12.0], np.float32)]
    reference = [np.array([-11.0], np.float32), np.array([-11.0], np.float32)]

    def value(loss_type, nll_coef=None, **hyper):
        return float(_call(loss_type, counts, policy, reference, None, nll_coef, {**HYPER, **hyper})[0])

    # DPO: h = (−10 + 11) − (−12 + 11) = 2; −log σ(0.2·2)
    np.testing.assert_allclose(value("sigmoid"), math.log1p(math.exp(-0.4)), **FP32)
    # normalised: h = 1/5 + 1/4 = 0.45
    np.testing.assert_allclose(value("sigmoid", length_normalised=True), math.log1p(math.exp(-0.09)), **FP32)
    np.testing.assert_allclose(value("ipo"), (2 - 2.5) ** 2, **FP32)
    np.testing.assert_allclose(value("ipo", length_normalised=True), (0.45 - 2.5) ** 2, **FP32)
    np.testing.assert_allclose(value("hinge"), 0.6, **FP32)
    # RPO: + α · (10 / 5) (token-mean NLL of the chosen side)
    np.testing.assert_allclose(value("sigmoid", 0.5), math.log1p(math.exp(-0.4)) + 0.5 * 2.0, **FP32)
    # SimPO: means −2 and −3; −log σ(0.2·1 − 0.3)
    np.testing.assert_allclose(value("simpo"), math.log1p(math.exp(0.1)), **FP32)
    # CPO: −log σ(0.2·2) + 1 · 2
    np.testing.assert_allclose(value("cpo"), math.log1p(math.exp(-0.4)) + 2.0, **FP32)
    # ORPO: log odds = log[(e^−2/(1−e^−2)) / (e^−3/(1−e^−3))]; −0.2 log σ(·) + 2
    log_odds = math.log(math.exp(-2) / (1 - math.exp(-2))) - math.log(math.exp(-3) / (1 - math.exp(-3)))
    np.testing.assert_allclose(value("orpo"), 0.2 * math.log1p(math.exp(-log_odds)) + 2.0, **FP32)


def _trl_self(**fields):
    return types.SimpleNamespace(accelerator=types.SimpleNamespace(device="cpu"), **fields)


@pytest.mark.parametrize("loss_type", ["simpo", "cpo"])
def test_matches_trl_cpo_trainer_loss(loss_type):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.cpo import CPOTrainer

    counts, policy, _, _ = random_records(5, 32, 1.0)
    beta, gamma, smoothing = 2.0, 0.5, 0.1
    # TRL's CPO averages the log-probs per token for SimPO and sums them otherwise; its NLL is separate
    scores = [p / n for p, n in zip(policy, counts)] if loss_type == "simpo" else policy
    tensors = [torch.tensor(s, dtype=torch.float64, requires_grad=True) for s in scores]
    trl = _trl_self(alpha=0.0, beta=beta, label_smoothing=smoothing, simpo_gamma=gamma,
                    loss_type="simpo" if loss_type == "simpo" else "sigmoid")
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trl, *tensors)
    losses.mean().backward()

    def ours(chosen_total, rejected_total):
        pairs = PairLogps(SequenceLogps(chosen_total, jnp.asarray(counts[0])),
                          SequenceLogps(rejected_total, jnp.asarray(counts[1])))
        return preference_loss(loss_type, pairs, nll_coef=0.0, beta=beta, gamma=gamma, label_smoothing=smoothing)

    (loss, metrics), grads = jax.value_and_grad(ours, argnums=(0, 1), has_aux=True)(*map(jnp.asarray, policy))
    np.testing.assert_allclose(float(loss), losses.mean().item(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["rewards/chosen"]), chosen_rewards.mean().item(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["rewards/rejected"]), rejected_rewards.mean().item(), rtol=1e-5)
    # d/d(total) = d/d(score) / n for SimPO (the score is the mean)
    for ours_grad, theirs, n in zip(grads, tensors, counts):
        expected = theirs.grad.numpy() / (n if loss_type == "simpo" else 1.0)
        np.testing.assert_allclose(np.asarray(ours_grad), expected, rtol=1e-4, atol=1e-7)


def test_matches_trl_orpo_odds_ratio_loss():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.orpo import ORPOTrainer

    counts, policy, _, _ = random_records(6, 32, 1.0)
    means = [torch.tensor(p / n, dtype=torch.float32) for p, n in zip(policy, counts)]
    losses, chosen_rewards, _, ratio, log_odds = ORPOTrainer.odds_ratio_loss(_trl_self(beta=0.1), *means)
    loss, metrics = preference_loss("orpo", as_pairs(counts, policy), nll_coef=0.0, beta=0.1)
    np.testing.assert_allclose(float(loss), -losses.mean().item(), rtol=1e-5)  # TRL subtracts it from the NLL
    np.testing.assert_allclose(float(metrics["log_odds_ratio"]), ratio.item(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["log_odds_chosen"]), log_odds.item(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["rewards/chosen"]), chosen_rewards.mean().item(), rtol=1e-5)


def trl_dpo_formulas(loss_type, policy, reference, counts, beta):
    """TRL 1.16 `DPOTrainer._compute_loss` for ipo (per-token), sigmoid_norm and sft, float64 torch."""
    chosen_scores, rejected_scores = policy[0] - reference[0], policy[1] - reference[1]
    if loss_type == "sft":
        return -policy[0].sum() / counts[0].sum()  # −chosen_per_token_logps[chosen_mask].mean()
    delta = chosen_scores / counts[0].clamp(min=1.0) - rejected_scores / counts[1].clamp(min=1.0)
    if loss_type == "ipo":
        return ((delta - 1 / (2 * beta)) ** 2).mean()
    return -torch.nn.functional.logsigmoid(beta * delta).mean()  # sigmoid_norm


@pytest.mark.parametrize("ours, theirs, nll_coef", [("ipo", "ipo", 0.0), ("sigmoid", "sigmoid_norm", 0.0)])
def test_length_normalised_losses_match_trl_dpo(ours, theirs, nll_coef):
    counts, policy, reference, _ = random_records(8, 16, 1.0)
    beta = 0.3
    torch_args = [[torch.tensor(x, dtype=torch.float64) for x in group] for group in (policy, reference, counts)]
    want = trl_dpo_formulas(theirs, *torch_args, beta).item()
    loss, _ = preference_loss(ours, as_pairs(counts, policy), as_pairs(counts, reference), nll_coef=nll_coef,
                              beta=beta, length_normalised=True)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_rpo_is_trl_sigmoid_plus_weighted_sft_term():
    counts, policy, reference, _ = random_records(9, 16, 1.0)
    beta, alpha = 0.1, 0.7
    torch_args = [[torch.tensor(x, dtype=torch.float64) for x in group] for group in (policy, reference, counts)]
    logits = beta * ((torch_args[0][0] - torch_args[1][0]) - (torch_args[0][1] - torch_args[1][1]))
    want = -torch.nn.functional.logsigmoid(logits).mean() + alpha * trl_dpo_formulas("sft", *torch_args, beta)
    loss, metrics = preference_loss("sigmoid", as_pairs(counts, policy), as_pairs(counts, reference), nll_coef=alpha,
                                    beta=beta)
    np.testing.assert_allclose(float(loss), want.item(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["nll_loss"]), trl_dpo_formulas("sft", *torch_args, beta).item(),
                               rtol=1e-5)


@pytest.mark.parametrize("loss_type", list(PREFERENCE_LOSSES))
def test_micro_batches_with_the_global_token_count_sum_to_the_whole_batch(loss_type):
    counts, policy, reference, pair_mask = random_records(10, 12, 0.8)
    needs = PREFERENCE_LOSSES[loss_type].needs_reference
    whole, _ = preference_per_pair(loss_type, as_pairs(counts, policy), as_pairs(counts, reference) if needs else None,
                                   pair_mask=pair_mask, nll_coef=0.4, **HYPER)
    whole_sum, whole_count = aggregate(whole, pair_mask)
    tokens_per_pair = counts[0][pair_mask].sum() / pair_mask.sum()
    total, count = 0.0, 0.0
    for rows in (slice(0, 5), slice(5, 12)):
        part = [[x[rows] for x in group] for group in (counts, policy, reference)]
        per_pair, _ = preference_per_pair(loss_type, as_pairs(part[0], part[1]),
                                          as_pairs(part[0], part[2]) if needs else None, pair_mask=pair_mask[rows],
                                          nll_coef=0.4, chosen_tokens_per_pair=tokens_per_pair, **HYPER)
        part_sum, part_count = aggregate(per_pair, pair_mask[rows])
        total, count = total + float(part_sum), count + float(part_count)
    np.testing.assert_allclose(total, float(whole_sum), rtol=1e-5)
    assert count == float(whole_count) == pair_mask.sum()


@pytest.mark.parametrize("loss_type", list(PREFERENCE_LOSSES))
def test_jit_equals_eager_and_masked_pairs_do_not_leak(loss_type):
    counts, policy, reference, pair_mask = random_records(12, 9, 0.6)
    poisoned = [np.where(pair_mask, p, np.nan).astype(np.float32) for p in policy]
    needs = PREFERENCE_LOSSES[loss_type].needs_reference

    def loss(chosen, rejected):
        pairs = PairLogps(SequenceLogps(chosen, jnp.asarray(counts[0])), SequenceLogps(rejected, jnp.asarray(counts[1])))
        return preference_loss(loss_type, pairs, as_pairs(counts, reference) if needs else None, pair_mask=pair_mask,
                               nll_coef=0.3, **HYPER)[0]

    eager = loss(*map(jnp.asarray, policy))
    np.testing.assert_allclose(float(jax.jit(loss)(*map(jnp.asarray, policy))), float(eager), rtol=1e-6)
    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(*map(jnp.asarray, poisoned))
    np.testing.assert_allclose(float(value), float(eager), rtol=1e-6)
    for grad in grads:
        assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad)[~pair_mask] == 0)


@pytest.mark.parametrize("loss_type", list(PREFERENCE_LOSSES))
def test_gradient_float64(loss_type):
    counts, policy, reference, pair_mask = random_records(13, 7, 0.7)
    needs = PREFERENCE_LOSSES[loss_type].needs_reference
    with jax.enable_x64(True):
        counts64 = [jnp.asarray(n, jnp.float64) for n in counts]
        reference64 = PairLogps(*(SequenceLogps(jnp.asarray(r, jnp.float64), n) for r, n in zip(reference, counts64)))

        def loss(chosen, rejected):
            pairs = PairLogps(SequenceLogps(chosen, counts64[0]), SequenceLogps(rejected, counts64[1]))
            value, _ = preference_loss(loss_type, pairs, reference64 if needs else None, pair_mask=pair_mask,
                                       nll_coef=0.3, **HYPER)
            assert value.dtype == jnp.float64
            return value

        check_grads(jax.jit(loss), tuple(jnp.asarray(p, jnp.float64) for p in policy), order=1, modes=("rev",),
                    atol=1e-6, rtol=1e-6)
