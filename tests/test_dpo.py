"""DPO: the loss against float64 numpy and the paper's formula in torch, gradients, the train step against
per-sequence log-probs computed by hand, micro-batching, learning on a tiny model, the stage through the CLI,
and log-prob parity with transformers on SmolLM2 and real HH pairs."""

import dataclasses
import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from rlhf_jax import launch
from rlhf_jax import stages as stage_registry
from rlhf_jax.config import PreferenceLoss
from rlhf_jax.losses import PairLogps, SequenceLogps, aggregate, preference_loss, preference_per_pair
from rlhf_jax.models import llama
from rlhf_jax.models.config import tiny_config
from rlhf_jax.registry import get_experiment
from rlhf_jax.trainers.dpo import (loss_keywords, needs_reference, pair_logprobs, preference_loss_sum,
                                   preference_train_step, reference_logprobs)
from rlhf_jax.training.artifacts import load_artifact
from rlhf_jax.stages import common
from rlhf_jax.training.logs import MetricsLogger, read_metrics
from rlhf_jax.training.state import TrainState, make_optimizer

REPO = Path(__file__).resolve().parents[1]
HH_DEV = REPO.parent / "shared" / "data" / "hh-rlhf-harmless" / "dev.jsonl.gz"
FP32 = dict(rtol=1e-5, atol=1e-6)
METRICS = ("dpo/loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")
CASES = [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.3), ("ipo", 0.0), ("hinge", 0.0)]
CONFIG = tiny_config("llama")


def _records(*totals):
    return PairLogps(*(SequenceLogps(t, jnp.ones(jnp.shape(t))) for t in totals))


def _per_pair_dpo(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, loss_type="sigmoid",
                  label_smoothing=0.0, pair_mask=None):
    """The table's DPO-family losses on summed log-probs, as (per-pair [B], metrics)."""
    return preference_per_pair(loss_type, _records(policy_chosen, policy_rejected),
                               _records(reference_chosen, reference_rejected), pair_mask=pair_mask, beta=beta,
                               label_smoothing=label_smoothing)


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, loss_type="sigmoid",
             label_smoothing=0.0, pair_mask=None):
    """`preference_loss` of a DPO-family type, with the stage's name for the loss (`dpo/loss`)."""
    loss, metrics = preference_loss(loss_type, _records(policy_chosen, policy_rejected),
                                    _records(reference_chosen, reference_rejected), pair_mask=pair_mask, beta=beta,
                                    label_smoothing=label_smoothing)
    return loss, {("dpo/loss" if name == "loss" else name): value for name, value in metrics.items()}


# ---------------------------------------------------------------------------------------------
# The loss.


def ref_dpo(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, loss_type,
            label_smoothing, pair_mask):
    """float64 numpy from the definitions; −log σ(x) = log(1 + exp(−x)); means over the masked pairs."""
    keep = np.asarray(pair_mask, bool)
    pc, pr, rc, rr = (np.asarray(x, np.float64)[keep] for x in (policy_chosen, policy_rejected, reference_chosen,
                                                               reference_rejected))
    if pc.size == 0:
        return {name: 0.0 for name in METRICS}
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        per_pair = (1 - label_smoothing) * np.logaddexp(0, -beta * h) + label_smoothing * np.logaddexp(0, beta * h)
    elif loss_type == "ipo":
        per_pair = (h - 1 / (2 * beta)) ** 2
    else:
        per_pair = np.maximum(0.0, 1 - beta * h)
    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    return {"dpo/loss": per_pair.mean(), "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": np.mean(chosen_rewards > rejected_rewards),
            "rewards/margins": np.mean(chosen_rewards - rejected_rewards),
            "logps/chosen": pc.mean(), "logps/rejected": pr.mean()}


def random_logps(seed, size, density=0.7):
    rng = np.random.default_rng(seed)
    logps = [rng.normal(-40, 15, size).astype(np.float32) for _ in range(4)]
    # references near the policy, as in training
    logps[2] = logps[0] + rng.normal(0, 3, size).astype(np.float32)
    logps[3] = logps[1] + rng.normal(0, 3, size).astype(np.float32)
    return logps, rng.random(size) < density


@pytest.mark.parametrize("loss_type, label_smoothing", CASES)
@pytest.mark.parametrize("seed, size, density", [(0, 1, 1.0), (1, 17, 0.7), (2, 64, 0.3), (3, 5, 0.0)])
def test_matches_float64_numpy(loss_type, label_smoothing, seed, size, density):
    logps, pair_mask = random_logps(seed, size, density)
    for beta in (0.1, 0.5):
        loss, metrics = dpo_loss(*logps, beta, loss_type, label_smoothing, pair_mask)
        expected = ref_dpo(*logps, beta, loss_type, label_smoothing, pair_mask)
        assert set(metrics) == set(METRICS)
        np.testing.assert_allclose(float(loss), expected["dpo/loss"], rtol=2e-5, atol=1e-5)
        for name in METRICS:
            np.testing.assert_allclose(float(metrics[name]), expected[name], rtol=2e-5, atol=1e-5, err_msg=name)
        per_pair, _ = _per_pair_dpo(*logps, beta, loss_type, label_smoothing, pair_mask)
        total, count = aggregate(per_pair, pair_mask)
        assert float(count) == pair_mask.sum()
        np.testing.assert_allclose(float(total) / max(float(count), 1), expected["dpo/loss"], rtol=2e-5, atol=1e-5)


def test_hand_computed():
    # policy log-probs (−10, −12), reference (−11, −11): chosen log-ratio +1, rejected −1, h = 2
    logps = [jnp.array([-10.0]), jnp.array([-12.0]), jnp.array([-11.0]), jnp.array([-11.0])]
    loss, metrics = dpo_loss(*logps, 0.1)
    np.testing.assert_allclose(float(loss), math.log1p(math.exp(-0.2)), **FP32)  # −log σ(0.2) = 0.598139
    np.testing.assert_allclose(float(loss), 0.5981388693815918, **FP32)
    expected = {"rewards/chosen": 0.1, "rewards/rejected": -0.1, "rewards/accuracies": 1.0,
                "rewards/margins": 0.2, "logps/chosen": -10.0, "logps/rejected": -12.0}
    for name, value in expected.items():
        np.testing.assert_allclose(float(metrics[name]), value, **FP32)
    smoothed, _ = dpo_loss(*logps, 0.1, "sigmoid", 0.25)
    np.testing.assert_allclose(float(smoothed), 0.75 * math.log1p(math.exp(-0.2)) + 0.25 * math.log1p(math.exp(0.2)),
                               **FP32)
    np.testing.assert_allclose(float(dpo_loss(*logps, 0.1, "ipo")[0]), (2 - 5) ** 2, **FP32)  # (h − 1/2β)²
    np.testing.assert_allclose(float(dpo_loss(*logps, 0.1, "hinge")[0]), 0.8, **FP32)  # max(0, 1 − βh)
    np.testing.assert_allclose(float(dpo_loss(*logps, 10.0, "hinge")[0]), 0.0, **FP32)


def paper_dpo_torch(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, loss_type,
                    label_smoothing):
    """The losses as the papers write them (and TRL's `DPOTrainer.dpo_loss`), float64 torch."""
    pi_logratios = policy_chosen - policy_rejected
    ref_logratios = reference_chosen - reference_rejected
    logits = pi_logratios - ref_logratios
    if loss_type == "sigmoid":  # Rafailov et al. eq. 7; conservative DPO (Mitchell 2023)
        losses = (-torch.nn.functional.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - torch.nn.functional.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "ipo":  # Azar et al. eq. 17
        losses = (logits - 1 / (2 * beta)) ** 2
    else:  # SLiC
        losses = torch.relu(1 - beta * logits)
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return losses.mean(), chosen_rewards, rejected_rewards


@pytest.mark.parametrize("loss_type, label_smoothing", CASES)
def test_matches_the_papers_formula_in_torch_value_and_gradient(loss_type, label_smoothing):
    logps, _ = random_logps(7, 32)
    beta = 0.2
    torch_logps = [torch.tensor(x, dtype=torch.float64, requires_grad=i < 2) for i, x in enumerate(logps)]
    torch_loss, chosen_rewards, rejected_rewards = paper_dpo_torch(*torch_logps, beta, loss_type, label_smoothing)
    torch_loss.backward()

    def loss_fn(policy_chosen, policy_rejected):
        return dpo_loss(policy_chosen, policy_rejected, logps[2], logps[3], beta, loss_type, label_smoothing)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(logps[0], logps[1])
    np.testing.assert_allclose(float(loss), torch_loss.item(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(metrics["rewards/chosen"]), chosen_rewards.mean().item(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(metrics["rewards/rejected"]), rejected_rewards.mean().item(), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(float(metrics["rewards/accuracies"]),
                               (chosen_rewards > rejected_rewards).double().mean().item())
    for ours, theirs in zip(grads, torch_logps[:2]):
        np.testing.assert_allclose(np.asarray(ours), theirs.grad.numpy(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss_type, label_smoothing", CASES)
def test_gradient_float64(loss_type, label_smoothing):
    logps, pair_mask = random_logps(11, 9)
    with jax.enable_x64(True):
        logps = [jnp.asarray(x, jnp.float64) for x in logps]
        check_grads(jax.jit(lambda *x: dpo_loss(*x, 0.3, loss_type, label_smoothing, pair_mask)[0]), tuple(logps),
                    order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_jit_equals_eager_and_masked_pairs_do_not_leak():
    logps, pair_mask = random_logps(5, 12)
    eager = dpo_loss(*logps, 0.1, "sigmoid", 0.1, pair_mask)
    jitted = jax.jit(lambda *x: dpo_loss(*x, 0.1, "sigmoid", 0.1, pair_mask))(*logps)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **FP32), eager, jitted)
    poisoned = [np.where(pair_mask, x, np.nan).astype(np.float32) for x in logps]
    poisoned[0] = np.where(pair_mask, logps[0], np.inf).astype(np.float32)
    value, grads = jax.value_and_grad(lambda p: dpo_loss(p, *poisoned[1:], 0.1, "sigmoid", 0.1, pair_mask)[0])(
        poisoned[0])
    np.testing.assert_allclose(float(value), float(eager[0]), **FP32)
    assert np.isfinite(np.asarray(grads)).all() and not np.asarray(grads)[~pair_mask].any()


def test_bad_loss_type_and_a_field_the_loss_does_not_read_are_refused():
    logps, _ = random_logps(0, 3)
    with pytest.raises(ValueError, match="expected one of"):
        dpo_loss(*logps, 0.1, "robust")
    with pytest.raises(ValueError, match="loss.label_smoothing=0.1 is not read by the 'ipo' loss"):
        loss_keywords(PreferenceLoss(type="ipo", label_smoothing=0.1))
    assert loss_keywords(PreferenceLoss(type="simpo", beta=2.0)) == {"beta": 2.0, "gamma": 0.5, "label_smoothing": 0.0}


def test_label_smoothing_with_ipo_is_a_config_error(capsys):
    status = launch.main(["experiment=tiny_dpo", "stages.dpo.loss.type=ipo", "stages.dpo.loss.label_smoothing=0.1",
                          "--print-config"])
    out, err = capsys.readouterr()
    assert status == 2 and out == "" and len(err.splitlines()) == 1
    assert ("stages.dpo.loss.label_smoothing: got 0.1, expected 0.0 with type=ipo (only sigmoid, simpo, cpo read "
            "it)") in err


# ---------------------------------------------------------------------------------------------
# The train step on a tiny model.


def pair_batch(seed, batch=2, length=8, vocab=CONFIG.vocab_size):
    """Right-padded pairs with a shared prompt of 2-3 tokens and responses of different lengths."""
    rng = np.random.default_rng(seed)
    out = {}
    prompt_lengths = rng.integers(2, 4, batch)
    for side in ("chosen", "rejected"):
        tokens = rng.integers(3, vocab, (batch, length)).astype(np.int32)
        lengths = rng.integers(prompt_lengths + 2, length + 1)
        positions = np.arange(length)[None]
        attention_mask = positions < lengths[:, None]
        out[f"{side}_tokens"] = np.where(attention_mask, tokens, CONFIG.pad_token_id).astype(np.int32)
        out[f"{side}_attention_mask"] = attention_mask
        out[f"{side}_loss_mask"] = attention_mask & (positions >= prompt_lengths[:, None])
    out["rejected_tokens"][:, :3] = out["chosen_tokens"][:, :3]  # the same prompt on both sides
    return out


_forward = jax.jit(lambda params, tokens, attention_mask: llama.forward(CONFIG, params, tokens,
                                                                       attention_mask=attention_mask))


def hand_sequence_logps(params, tokens, attention_mask, loss_mask):
    """Σ_{t ∈ loss_mask} log softmax(logits[t − 1])[tokens[t]] from the full logits, float64 numpy."""
    logits = np.asarray(_forward(params, tokens, attention_mask).logits, np.float64)
    logprobs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    total = np.zeros(tokens.shape[0])
    for row in range(tokens.shape[0]):
        for t in range(1, tokens.shape[1]):
            if loss_mask[row, t]:
                total[row] += logprobs[row, t - 1, tokens[row, t]]
    return total


@pytest.fixture(scope="module")
def policy_and_reference():
    init = jax.jit(functools.partial(llama.init_params, CONFIG))
    return init(jax.random.key(0)), init(jax.random.key(1))


def _state(params, learning_rate=1e-2):
    tx = make_optimizer("adamw", learning_rate, grad_clip=None)
    return TrainState.create(jax.tree.map(jnp.copy, params), tx, jax.random.key(0))


def with_reference(reference, batch):
    return {**batch, **jax.jit(functools.partial(reference_logprobs, CONFIG))(reference, batch)}


def test_sequence_logprobs_sum_the_response_tokens(policy_and_reference):
    policy, _ = policy_and_reference
    batch = pair_batch(0, batch=3)
    chosen, rejected = jax.jit(functools.partial(pair_logprobs, CONFIG))(policy, batch)
    for side, ours in (("chosen", chosen), ("rejected", rejected)):
        expected = hand_sequence_logps(policy, batch[f"{side}_tokens"], batch[f"{side}_attention_mask"],
                                       batch[f"{side}_loss_mask"])
        np.testing.assert_allclose(np.asarray(ours.total), expected, rtol=1e-5)
        # the count: predicted response tokens (the first token of a row is never predicted)
        np.testing.assert_array_equal(np.asarray(ours.count), batch[f"{side}_loss_mask"][:, 1:].sum(axis=1))


def test_step_loss_equals_the_loss_from_hand_computed_logps(policy_and_reference):
    policy, reference = policy_and_reference
    batch = pair_batch(1, batch=2)
    hand = [hand_sequence_logps(params, batch[f"{side}_tokens"], batch[f"{side}_attention_mask"],
                                batch[f"{side}_loss_mask"]) for params in (policy, reference)
            for side in ("chosen", "rejected")]
    batch = with_reference(reference, batch)
    np.testing.assert_allclose(batch["reference_chosen_logps"], hand[2], rtol=1e-5)
    np.testing.assert_allclose(batch["reference_rejected_logps"], hand[3], rtol=1e-5)
    for loss_type, label_smoothing in (("sigmoid", 0.2), ("hinge", 0.0)):
        expected = ref_dpo(*hand, 0.5, loss_type, label_smoothing, np.ones(2, bool))
        loss = PreferenceLoss(type=loss_type, beta=0.5, label_smoothing=label_smoothing)
        step = jax.jit(functools.partial(preference_train_step, CONFIG, loss, 1))
        state, metrics = step(_state(policy), batch)
        assert int(state.step) == 1
        for name in METRICS:
            np.testing.assert_allclose(float(metrics[name]), expected[name], rtol=1e-4, atol=1e-5,
                                       err_msg=f"{loss_type} {name}")
        assert np.isfinite(float(metrics["optim/grad_norm"])) and float(metrics["optim/grad_norm"]) > 0
    for loss_type in ("sigmoid", "ipo", "hinge"):
        expected = ref_dpo(*hand, 0.5, loss_type, 0.0, np.ones(2, bool))
        hand_reference = {"reference_chosen_logps": hand[2].astype(np.float32),
                          "reference_rejected_logps": hand[3].astype(np.float32)}
        loss_sum, (count, _) = jax.jit(functools.partial(preference_loss_sum, CONFIG,
                                                         PreferenceLoss(type=loss_type, beta=0.5)))(
            policy, {**batch, **hand_reference})
        np.testing.assert_allclose(float(loss_sum) / float(count), expected["dpo/loss"], rtol=1e-4, atol=1e-5)


def test_micro_batched_step_equals_the_single_batch_step(policy_and_reference):
    policy, reference = policy_and_reference
    batch = with_reference(reference, pair_batch(2, batch=4))
    # plain SGD with learning rate 1: the update is the gradient itself (Adam's first step, ≈ lr·sign(g),
    # would turn float32 rounding in near-zero gradients into visible differences)
    tx = make_optimizer("sgd", 1.0, b1=0.0, grad_clip=None)
    results = {}
    for micro in (1, 4):
        step = jax.jit(functools.partial(preference_train_step, CONFIG, PreferenceLoss(label_smoothing=0.1), micro))
        results[micro] = step(TrainState.create(jax.tree.map(jnp.copy, policy), tx, jax.random.key(0)), batch)
    (state_1, metrics_1) = results[1]
    for micro in (4,):
        state_m, metrics_m = results[micro]
        for name in METRICS + ("optim/grad_norm",):
            np.testing.assert_allclose(float(metrics_m[name]), float(metrics_1[name]), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{micro} {name}")
        for a, b, start in zip(jax.tree.leaves(state_m.params), jax.tree.leaves(state_1.params),
                               jax.tree.leaves(policy)):
            update_m, update_1 = np.asarray(a) - np.asarray(start), np.asarray(b) - np.asarray(start)
            # atol: float32 rounding of params near 1 (the norms) after the update
            np.testing.assert_allclose(update_m, update_1, rtol=1e-4, atol=5e-7)


def test_at_init_the_loss_is_log_2_and_the_rewards_are_0(policy_and_reference):
    policy, _ = policy_and_reference
    batch = with_reference(policy, pair_batch(3, batch=4))
    _, metrics = jax.jit(functools.partial(preference_train_step, CONFIG, PreferenceLoss(), 2))(_state(policy), batch)
    np.testing.assert_allclose(float(metrics["dpo/loss"]), math.log(2), rtol=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(float(metrics[name])) < 1e-6, name
    np.testing.assert_allclose(float(metrics["logps/chosen"]), float(np.mean(batch["reference_chosen_logps"])),
                               rtol=1e-6)


@pytest.mark.parametrize("loss", [PreferenceLoss(), PreferenceLoss(type="ipo", length_normalised=True),
                                  PreferenceLoss(type="simpo", beta=2.0), PreferenceLoss(type="cpo"),
                                  PreferenceLoss(type="orpo"), PreferenceLoss(nll_coef=0.5)],
                         ids=["dpo", "ipo_norm", "simpo", "cpo", "orpo", "rpo"])
def test_a_few_steps_raise_the_reward_accuracy_on_the_training_pairs(policy_and_reference, loss):
    policy, _ = policy_and_reference
    batch = pair_batch(4, batch=8, length=12)
    if needs_reference(loss):
        batch = with_reference(policy, batch)
    step = jax.jit(functools.partial(preference_train_step, CONFIG, loss, 1), donate_argnums=0)
    state = _state(policy, learning_rate=3e-3)
    history = []
    for _ in range(20):  # CPO, whose NLL term dominates its summed-log-prob margin, is the slowest to separate
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    # after training: the final params' own metrics (the step's metrics are those before its update)
    _, (_, final) = jax.jit(functools.partial(preference_loss_sum, CONFIG, loss))(state.params, batch)
    final = {name: float(metric.value()) for name, metric in final.items()}
    assert final["rewards/accuracies"] == 1.0, final
    assert final["rewards/chosen"] > history[0]["rewards/chosen"] and final["rewards/margins"] > 0
    losses = [float(m["dpo/loss"]) for m in history]
    assert losses[-1] < losses[0]
    if loss == PreferenceLoss():  # DPO from the reference itself: log 2 at first, then below half of it
        assert losses[0] == pytest.approx(math.log(2), rel=1e-5)
        reference = (batch["reference_chosen_logps"], batch["reference_rejected_logps"])
        chosen, rejected = jax.jit(functools.partial(pair_logprobs, CONFIG))(state.params, batch)
        loss_value, metrics = dpo_loss(chosen.total, rejected.total, *reference, 0.1)
        assert float(loss_value) < 0.5 * math.log(2) and float(metrics["rewards/margins"]) > 1.0
        assert float(metrics["rewards/chosen"]) > 0 > float(metrics["rewards/rejected"])


# ---------------------------------------------------------------------------------------------
# The stage, through the command line.


@pytest.mark.slow
def test_tiny_dpo_through_the_cli_then_relaunch_skips_it(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "rlhf_jax.launch", "experiment=tiny_dpo", f"run_dir={run_dir}"]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    stage_dir = run_dir / "dpo"
    assert (stage_dir / "DONE").is_file()
    records = read_metrics(stage_dir)
    assert [r["step"] for r in records] == list(range(0, 9))  # step 0: the held-out pairs before training
    for name in METRICS + ("optim/grad_norm",):
        assert all(np.isfinite(r[name]) for r in records[1:]), name
    assert records[1]["dpo/loss"] == pytest.approx(math.log(2), rel=1e-5)  # the policy starts as the reference
    assert records[0]["eval/dpo/loss"] == pytest.approx(math.log(2), rel=1e-5)
    summary = json.loads((stage_dir / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["eval/pairs"] == summary["eval_start/pairs"] == 16
    assert summary["eval_start/rewards/accuracies"] == 0.0  # every implicit reward is 0: ties count as wrong
    assert summary["eval/dpo/loss"] == records[-1]["eval/dpo/loss"]  # the last step's evaluation
    assert 0 <= summary["eval/rewards/accuracies"] <= 1 and np.isfinite(summary["eval/dpo/loss"])
    artifact = load_artifact(stage_dir / "model")
    assert artifact.kind == "lm" and artifact.tokenizer is not None
    assert artifact.metadata["stage"] == "dpo" and "eval/rewards/accuracies" in artifact.metadata
    # the policy moved away from its starting weights
    start = llama.init_params(artifact.config, jax.random.key(0))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(artifact.params)))
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "stage dpo (dpo): already done" in second.stdout


class Killed(Exception):
    pass


def _run_stage(experiment, name, run_dir):
    stage = experiment.stage(name)
    stage_dir = Path(run_dir) / name
    stage_dir.mkdir(parents=True, exist_ok=True)
    stage_registry.load_runner(stage.kind)(experiment, stage, stage_dir,
                                           stage_registry.make_resolver(experiment, Path(run_dir)))
    return stage_dir


@pytest.mark.slow
def test_dpo_killed_mid_run_resumes_exactly(tmp_path, monkeypatch):
    class KillingLogger(MetricsLogger):
        def log(self, step, metrics):
            values = super().log(step, metrics)
            if step == 5:
                raise Killed(f"killed after step {step}")
            return values

    experiment = get_experiment("tiny_dpo")
    stage = dataclasses.replace(experiment.stage("dpo"), max_steps=6)
    experiment = dataclasses.replace(experiment, stages=(stage,),
                                     checkpoint=dataclasses.replace(experiment.checkpoint, every_steps=2))
    full = _run_stage(experiment, "dpo", tmp_path / "full")
    monkeypatch.setattr(common, "MetricsLogger", KillingLogger)
    with pytest.raises(Killed):
        _run_stage(experiment, "dpo", tmp_path / "resumed")
    monkeypatch.setattr(common, "MetricsLogger", MetricsLogger)
    resumed = _run_stage(experiment, "dpo", tmp_path / "resumed")  # restarts from the step-4 checkpoint
    for a, b in zip(jax.tree.leaves(load_artifact(full / "model").params),
                    jax.tree.leaves(load_artifact(resumed / "model").params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["step"] for r in read_metrics(resumed)] == [0, 1, 2, 3, 4, 5, 6]  # step 5 re-run, logged once
    assert [r["dpo/loss"] for r in read_metrics(resumed)[-2:]] == [r["dpo/loss"] for r in read_metrics(full)[-2:]]
    assert read_metrics(resumed)[0]["eval/dpo/loss"] == read_metrics(full)[0]["eval/dpo/loss"]


def test_precomputed_reference_trains_as_the_per_batch_reference(tmp_path):
    experiment = get_experiment("tiny_dpo")
    stage = dataclasses.replace(experiment.stage("dpo"), max_steps=4)
    runs = {}
    for precompute in (False, True):
        experiment = dataclasses.replace(
            experiment, stages=(dataclasses.replace(stage, precompute_reference=precompute),),
            optimizer=dataclasses.replace(experiment.optimizer, micro_batches=2))
        runs[precompute] = read_metrics(_run_stage(experiment, "dpo", tmp_path / str(precompute)))[1:]  # steps
    assert len(runs[True]) == len(runs[False]) == 4
    for per_batch, looked_up in zip(runs[False], runs[True]):
        for name in ("dpo/loss", "rewards/chosen", "rewards/margins", "logps/rejected"):
            np.testing.assert_allclose(looked_up[name], per_batch[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("name", ["tiny_simpo", "tiny_orpo"])
def test_reference_free_stages_load_no_reference_and_report_before_and_after(tmp_path, monkeypatch, name):
    from rlhf_jax.stages import dpo as dpo_stage

    def no_reference(*args, **kwargs):
        raise AssertionError("a reference-free loss computed reference log-probs")

    monkeypatch.setattr(dpo_stage, "reference_logprobs", no_reference)
    assert dpo_stage.programs(get_experiment(name), get_experiment(name).stages[0], None).reference_pass is None
    experiment = get_experiment(name)
    stage_name = experiment.stages[0].name
    stage_dir = _run_stage(experiment, stage_name, tmp_path)
    summary = json.loads((stage_dir / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["eval/pairs"] == summary["eval_start/pairs"] == 16
    # the log-prob rewards: β · mean log-prob per token, before any update the policy's own preference
    assert summary["eval_start/rewards/accuracies"] == summary["eval_start/logps/accuracies"]
    records = read_metrics(stage_dir)
    assert all(np.isfinite(r["dpo/loss"]) for r in records[1:]) and records[-1]["dpo/loss"] < records[1]["dpo/loss"]
    if name == "tiny_orpo":
        assert summary["eval/nll_loss"] < summary["eval_start/nll_loss"]  # ORPO's NLL term trains the chosen side
        assert "eval/log_odds_ratio" in summary


def test_a_reference_free_loss_with_a_reference_is_a_config_error(capsys):
    status = launch.main(["experiment=tiny_simpo", "stages.simpo.reference=tiny:smollm2", "--print-config"])
    _, err = capsys.readouterr()
    assert status == 2 and "stages.simpo.reference: got 'tiny:smollm2', expected None with loss.type=simpo" in err


def test_a_loss_added_to_the_table_alone_is_selectable_checked_and_trained(tmp_path, monkeypatch, capsys):
    # docs/losses.md's example: one per-pair function and one table entry, nothing in the config
    from rlhf_jax.config import apply_overrides
    from rlhf_jax.losses.preference import PREFERENCE_LOSSES, PairTerms, PreferenceLossKind

    def norm_hinge(policy, reference, beta):
        chosen, rejected = policy.chosen.mean(), policy.rejected.mean()
        return PairTerms(jax.nn.relu(1 - beta * (chosen - rejected)), beta * chosen, beta * rejected)

    monkeypatch.setitem(PREFERENCE_LOSSES, "norm_hinge", PreferenceLossKind(norm_hinge, needs_reference=False))
    select = ["experiment=tiny_simpo", "stages.simpo.loss.type=norm_hinge", "stages.simpo.loss.beta=1.0"]
    assert launch.main([*select, "stages.simpo.loss.gamma=0.5", "--print-config"]) == 0  # gamma at its default
    capsys.readouterr()
    assert launch.main([*select, "stages.simpo.loss.gamma=1.0", "--print-config"]) == 2
    assert "stages.simpo.loss.gamma: got 1.0, expected 0.5 with type=norm_hinge (only simpo read it)" in \
        capsys.readouterr().err
    assert launch.main(["experiment=tiny_simpo", "stages.simpo.loss.type=norm_hing", "--print-config"]) == 2
    assert ("stages.simpo.loss.type: got 'norm_hing', expected one of sigmoid, hinge, ipo, simpo, cpo, orpo, "
            "norm_hinge (did you mean 'norm_hinge'?)") in capsys.readouterr().err
    experiment = apply_overrides(get_experiment("tiny_simpo"), select[1:] + ["stages.simpo.max_steps=4"])
    stage_dir = _run_stage(experiment, "simpo", tmp_path)
    records = read_metrics(stage_dir)[1:]
    summary = json.loads((stage_dir / "summary.json").read_text())
    assert len(records) == 4 and summary["eval/dpo/loss"] != summary["eval_start/dpo/loss"]  # the steps moved it
    # each step computed norm_hinge: the tiny random model's margins all stay near 0, far below the hinge's 1, so
    # the mean loss is 1 minus the mean margin
    for record in [*records, {key.removeprefix("eval/"): value for key, value in summary.items()}]:
        assert abs(record["rewards/margins"]) < 0.1
        np.testing.assert_allclose(record["dpo/loss"], 1 - record["rewards/margins"], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# SmolLM2 on real HH pairs.


@pytest.mark.slow
def test_smollm2_on_real_pairs_log_2_at_init_and_logps_match_transformers(smollm2, smollm2_path):
    import transformers

    from rlhf_jax.data import DataIterator, load_dataset
    from rlhf_jax.data.tokenize import TokenizeConfig
    config, params, tokenizer = smollm2
    dataset = load_dataset(HH_DEV, "preference", tokenizer, format="hh",
                           config=TokenizeConfig(max_length=128, max_prompt_length=96))
    dataset = dataclasses.replace(dataset, examples=dataset.examples[:4])
    batch = next(iter(DataIterator(dataset, batch_size=4, shuffle=False)))
    batch = {k: v for k, v in batch.items() if k != "index"}
    assert batch["chosen_loss_mask"].any(axis=1).all() and batch["rejected_loss_mask"].any(axis=1).all()
    # pad = EOS on SmolLM2: at least one row is padded, and masks come from lengths
    assert not batch["chosen_attention_mask"].all() or not batch["rejected_attention_mask"].all()

    chosen, rejected = jax.jit(functools.partial(pair_logprobs, config))(params, batch)
    references = jax.jit(functools.partial(reference_logprobs, config))(params, batch)
    loss_sum, (count, _) = jax.jit(functools.partial(preference_loss_sum, config, PreferenceLoss()))(
        params, {**batch, **references})
    np.testing.assert_allclose(float(loss_sum) / float(count), math.log(2), rtol=1e-6)

    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32).eval()
    for side, ours in (("chosen", chosen), ("rejected", rejected)):
        tokens, mask, loss_mask = (batch[f"{side}_{key}"] for key in ("tokens", "attention_mask", "loss_mask"))
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(tokens.astype(np.int64)),
                           attention_mask=torch.as_tensor(mask.astype(np.int64))).logits.double()
        token_logps = torch.log_softmax(logits[:, :-1], -1).gather(
            -1, torch.as_tensor(tokens[:, 1:].astype(np.int64))[..., None])[..., 0].numpy()
        expected = np.where(loss_mask[:, 1:], token_logps, 0.0).sum(axis=1)
        np.testing.assert_allclose(np.asarray(ours.total), expected, rtol=1e-4)
