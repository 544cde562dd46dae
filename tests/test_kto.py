"""KTO: the loss against float64 numpy and TRL 1.16's `KTOTrainer._compute_loss` lines in torch (value and
gradient), empty sides, the mismatched rows by hand and against TRL's collator, the step against hand-computed
log-probs, micro-batching, learning on a tiny model, the stage end to end with an exact resume, the config error
and the plan."""

import dataclasses
import functools
import gzip
import json
import math
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from rlhf_jax import launch
from rlhf_jax import stages as stage_registry
from rlhf_jax.config import KTOLoss
from rlhf_jax.data.batching import collate_sft
from rlhf_jax.data.tokenize import Example
from rlhf_jax.losses import aggregate, kto_loss, kto_per_example, kto_reference_point
from rlhf_jax.models import llama
from rlhf_jax.models.config import tiny_config
from rlhf_jax.registry import get_experiment
from rlhf_jax.stages import common
from rlhf_jax.stages.kto import evaluation_metrics, feedback_pairs, host_batch
from rlhf_jax.trainers.kto import kl_rows, kto_eval_step, kto_train_step, reference_logprobs
from rlhf_jax.training.artifacts import load_artifact
from rlhf_jax.training.logs import MetricsLogger, read_metrics
from rlhf_jax.training.state import TrainState, make_optimizer

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless"
FP32 = dict(rtol=1e-5, atol=1e-6)
METRICS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected")
CONFIG = tiny_config("llama")
PAD = CONFIG.pad_token_id


# ---------------------------------------------------------------------------------------------
# The loss.


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def ref_kto(policy, reference, labels, policy_kl, reference_kl, beta, desirable_weight, undesirable_weight, mask):
    """float64 numpy from the paper's eqs. 7-8 as TRL computes them; means over the masked examples (0 if none)."""
    policy, reference, policy_kl, reference_kl = (np.asarray(x, np.float64)
                                                  for x in (policy, reference, policy_kl, reference_kl))
    labels, mask = np.asarray(labels, bool), np.asarray(mask, bool)

    def mean(values, where):
        return float(values[where].mean()) if where.any() else 0.0

    z = max(0.0, mean(policy_kl - reference_kl, mask))
    logratio = policy - reference
    per_example = np.where(labels, desirable_weight * (1 - _sigmoid(beta * (logratio - z))),
                           undesirable_weight * (1 - _sigmoid(beta * (z - logratio))))
    chosen, rejected = mask & labels, mask & ~labels
    out = {"loss": mean(per_example, mask), "kl": z, "rewards/chosen": mean(beta * logratio, chosen),
           "rewards/rejected": mean(beta * logratio, rejected), "logps/chosen": mean(policy, chosen),
           "logps/rejected": mean(policy, rejected),
           "rewards/accuracies": mean(np.where(labels, logratio > z, logratio < z).astype(float), mask)}
    out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def random_inputs(seed, size, density=0.7, desirable=0.5, kl_shift=0.5):
    """Summed log-probs of policy and reference, near each other as in training, labels and a mask."""
    rng = np.random.default_rng(seed)
    policy = rng.normal(-40, 15, size).astype(np.float32)
    reference = (policy + rng.normal(0, 3, size)).astype(np.float32)
    policy_kl = rng.normal(-60, 15, size).astype(np.float32)
    reference_kl = (policy_kl - rng.normal(kl_shift, 3, size)).astype(np.float32)
    return (policy, reference, rng.random(size) < desirable, policy_kl, reference_kl), rng.random(size) < density


@pytest.mark.parametrize("seed, size, density, desirable, kl_shift", [
    (0, 1, 1.0, 0.5, 0.5), (1, 17, 0.7, 0.5, 0.5), (2, 64, 0.3, 0.3, 2.0), (3, 5, 0.0, 0.5, 0.5),
    (4, 16, 0.8, 0.5, -3.0),  # a negative mean KL: z is clamped to 0
    (5, 12, 0.9, 1.0, 0.5), (6, 12, 0.9, 0.0, 0.5),  # one side empty
])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)])
def test_matches_float64_numpy(seed, size, density, desirable, kl_shift, weights):
    inputs, mask = random_inputs(seed, size, density, desirable, kl_shift)
    for beta in (0.1, 0.5):
        hyper = dict(beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1])
        loss, metrics = kto_loss(*inputs, **hyper, mask=mask)
        expected = ref_kto(*inputs, **hyper, mask=mask)
        assert set(metrics) == set(METRICS)
        np.testing.assert_allclose(float(loss), expected["loss"], rtol=2e-5, atol=1e-6)
        for name in METRICS:
            np.testing.assert_allclose(float(metrics[name]), expected[name], rtol=2e-5, atol=2e-5, err_msg=name)
        # the per-example form, z given: Σ and count of the masked examples
        z = kto_reference_point(inputs[3], inputs[4], mask)
        per_example, _ = kto_per_example(*inputs[:3], z, **hyper, mask=mask)
        total, count = aggregate(per_example, mask)
        assert float(count) == mask.sum() and not np.asarray(per_example)[~mask].any()
        np.testing.assert_allclose(float(total) / max(float(count), 1), expected["loss"], rtol=2e-5, atol=1e-6)


def test_hand_computed():
    # ρ = (−10 + 11, −12 + 11) = (1, −1); mismatched log-ratios (1, 0.5): z = 0.75
    inputs = [jnp.array(x) for x in ([-10.0, -12.0], [-11.0, -11.0], [True, False], [-20.0, -20.0],
                                     [-21.0, -20.5])]
    loss, metrics = kto_loss(*inputs, beta=0.1)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # desirable 1 − σ(0.1 (1 − 0.75)) = σ(−0.025); undesirable 1 − σ(0.1 (0.75 + 1)) = σ(−0.175)
    np.testing.assert_allclose(float(loss), (sigmoid(-0.025) + sigmoid(-0.175)) / 2, **FP32)
    np.testing.assert_allclose(float(loss), 0.47505597, **FP32)
    expected = {"kl": 0.75, "rewards/chosen": 0.1, "rewards/rejected": -0.1, "rewards/margins": 0.2,
                "rewards/accuracies": 1.0, "logps/chosen": -10.0, "logps/rejected": -12.0}
    for name, value in expected.items():
        np.testing.assert_allclose(float(metrics[name]), value, **FP32, err_msg=name)
    weighted, _ = kto_loss(*inputs, beta=0.1, desirable_weight=1.0, undesirable_weight=2.0)
    np.testing.assert_allclose(float(weighted), (sigmoid(-0.025) + 2 * sigmoid(-0.175)) / 2, **FP32)
    # a negative mean mismatched log-ratio is clamped to z = 0: both terms are then 1 − σ(0.1) = σ(−0.1)
    clamped, metrics = kto_loss(*inputs[:3], inputs[4], inputs[3], beta=0.1)
    assert float(metrics["kl"]) == 0.0
    np.testing.assert_allclose(float(clamped), sigmoid(-0.1), **FP32)
    # at π = π_ref every reward is 0 and each example costs λ/2
    at_init, metrics = kto_loss(inputs[1], inputs[1], inputs[2], inputs[4], inputs[4], beta=0.1,
                                desirable_weight=1.0, undesirable_weight=3.0)
    np.testing.assert_allclose(float(at_init), (0.5 + 1.5) / 2, **FP32)
    assert float(metrics["rewards/accuracies"]) == 0.0  # ties count as wrong


def trl_kto_loss(policy_logps, reference_logps, labels, KL_logps, ref_KL_logps, beta, desirable_weight,
                 undesirable_weight):
    """TRL 1.16's `KTOTrainer._compute_loss` (trl/trainer/kto_trainer.py, loss_type="kto", one process, the log
    metrics kept), transcribed line by line in float64 torch."""
    F = torch.nn.functional
    bool_labels = torch.as_tensor(labels, dtype=torch.bool)
    num_chosen = bool_labels.sum()
    num_rejected = len(bool_labels) - num_chosen
    chosen_idx = torch.nonzero(bool_labels, as_tuple=False).view(-1)
    rejected_idx = torch.nonzero(~bool_labels, as_tuple=False).view(-1)
    chosen_logps = policy_logps.index_select(0, chosen_idx)
    rejected_logps = policy_logps.index_select(0, rejected_idx)
    ref_chosen_logps = reference_logps.index_select(0, chosen_idx)
    ref_rejected_logps = reference_logps.index_select(0, rejected_idx)
    kl = (KL_logps - ref_KL_logps).mean().detach()
    kl = kl.mean().clamp(min=0)  # accelerator.gather_for_metrics(kl) on one process
    if chosen_logps.shape[0] != 0 or ref_chosen_logps.shape[0] != 0:
        chosen_logratios = chosen_logps - ref_chosen_logps
        chosen_losses = 1 - F.sigmoid(beta * (chosen_logratios - kl))
        chosen_rewards = beta * chosen_logratios.detach()
    else:
        chosen_losses = torch.Tensor([]).double()
        chosen_rewards = torch.Tensor([]).double()
    if rejected_logps.shape[0] != 0 or ref_rejected_logps.shape[0] != 0:
        rejected_logratios = rejected_logps - ref_rejected_logps
        rejected_losses = 1 - F.sigmoid(beta * (kl - rejected_logratios))
        rejected_rewards = beta * rejected_logratios.detach()
    else:
        rejected_losses = torch.Tensor([]).double()
        rejected_rewards = torch.Tensor([]).double()
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    metrics = {"kl": kl.item()}
    if num_chosen > 0:
        metrics["rewards/chosen"] = chosen_rewards.nansum().item() / num_chosen.item()
        metrics["logps/chosen"] = chosen_logps.nansum().item() / num_chosen.item()
    if num_rejected > 0:
        metrics["rewards/rejected"] = rejected_rewards.nansum().item() / num_rejected.item()
        metrics["logps/rejected"] = rejected_logps.nansum().item() / num_rejected.item()
    if num_chosen > 0 and num_rejected > 0:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses.nanmean(), metrics


@pytest.mark.parametrize("desirable", [0.5, 0.2, 1.0, 0.0], ids=["balanced", "few", "no-undesirable",
                                                                 "no-desirable"])
@pytest.mark.parametrize("kl_shift", [0.5, -3.0], ids=["z>0", "z=0"])
def test_matches_trl_value_and_gradient(desirable, kl_shift):
    inputs, _ = random_inputs(7, 32, desirable=desirable, kl_shift=kl_shift)
    policy, reference, labels, policy_kl, reference_kl = inputs
    hyper = dict(beta=0.2, desirable_weight=1.2, undesirable_weight=0.8)
    torch_policy = torch.tensor(policy, dtype=torch.float64, requires_grad=True)
    torch_kl = torch.tensor(policy_kl, dtype=torch.float64, requires_grad=True)
    trl_loss, trl_metrics = trl_kto_loss(torch_policy, torch.tensor(reference, dtype=torch.float64), labels,
                                         torch_kl, torch.tensor(reference_kl, dtype=torch.float64), *hyper.values())
    trl_loss.backward()

    def loss_fn(policy_logps, policy_kl_logps):
        return kto_loss(policy_logps, reference, labels, policy_kl_logps, reference_kl, **hyper)

    (loss, metrics), (grad, kl_grad) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(policy, policy_kl)
    np.testing.assert_allclose(float(loss), trl_loss.item(), rtol=1e-5, atol=1e-6)
    for name, value in trl_metrics.items():
        np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(np.asarray(grad), torch_policy.grad.numpy(), rtol=1e-4, atol=1e-8)
    # z is detached in TRL: no gradient reaches the mismatched rows
    assert torch_kl.grad is None and not np.asarray(kl_grad).any()
    if desirable in (0.0, 1.0):  # TRL logs no margin then; ours is the present side's mean against 0
        side = "chosen" if desirable else "rejected"
        assert float(metrics[f"rewards/{'rejected' if desirable else 'chosen'}"]) == 0.0
        assert float(metrics["rewards/margins"]) == pytest.approx((1 if desirable else -1)
                                                                  * float(metrics[f"rewards/{side}"]))


def test_gradient_float64_jit_and_nothing_leaks_from_masked_examples():
    inputs, mask = random_inputs(11, 9)
    hyper = dict(beta=0.3, desirable_weight=1.0, undesirable_weight=1.5)
    with jax.enable_x64(True):
        floats = [jnp.asarray(inputs[i], jnp.float64) for i in (0, 1, 3, 4)]
        check_grads(jax.jit(lambda p, r, pk, rk: kto_loss(p, r, inputs[2], pk, rk, **hyper, mask=mask)[0]),
                    tuple(floats), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)
    eager = kto_loss(*inputs, **hyper, mask=mask)
    jitted = jax.jit(lambda *x: kto_loss(*x, **hyper, mask=mask))(*inputs)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **FP32), eager, jitted)
    poisoned = [np.where(mask, x, np.nan).astype(np.float32) if i != 2 else x for i, x in enumerate(inputs)]
    poisoned[0] = np.where(mask, inputs[0], np.inf).astype(np.float32)
    value, grads = jax.value_and_grad(lambda p: kto_loss(p, *poisoned[1:], **hyper, mask=mask)[0])(poisoned[0])
    np.testing.assert_allclose(float(value), float(eager[0]), **FP32)
    assert np.isfinite(np.asarray(grads)).all() and not np.asarray(grads)[~mask].any()


# ---------------------------------------------------------------------------------------------
# The mismatched rows.


def unpaired_batch(prompts, responses, labels, length):
    examples = [Example(np.asarray(p, np.int32), (np.asarray(r, np.int32),), label=bool(label))
                for p, r, label in zip(prompts, responses, labels)]
    return collate_sft(examples, length, PAD)


def test_kl_rows_by_hand():
    batch = unpaired_batch([[11, 12, 13], [14, 15], [16]], [[21, 22], [23], [24, 25, 26, 27]], [1, 0, 1], 6)
    rows = kl_rows(batch["tokens"], batch["attention_mask"], batch["loss_mask"], pad_id=0)
    # row b: prompt b, then row b − 1's response (row 0 takes row 2's), cut at 6 tokens
    np.testing.assert_array_equal(rows["kl_tokens"], [[11, 12, 13, 24, 25, 26], [14, 15, 21, 22, 0, 0],
                                                      [16, 23, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows["kl_attention_mask"], [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0],
                                                              [1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows["kl_loss_mask"], [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0],
                                                         [0, 1, 0, 0, 0, 0]])
    # masks come from lengths: a prompt token equal to the pad id changes nothing
    batch = unpaired_batch([[PAD, 12, 13], [14, PAD]], [[21, PAD], [23]], [1, 0], 5)
    rows = kl_rows(batch["tokens"], batch["attention_mask"], batch["loss_mask"], pad_id=PAD)
    np.testing.assert_array_equal(rows["kl_tokens"], [[PAD, 12, 13, 23, PAD], [14, PAD, 21, PAD, PAD]])
    np.testing.assert_array_equal(rows["kl_attention_mask"], [[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(rows["kl_loss_mask"], [[0, 0, 0, 1, 0], [0, 0, 1, 1, 0]])


@pytest.mark.parametrize("seed", range(4))
def test_kl_rows_are_trls_collated_kl_sequences(seed):
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    rng = np.random.default_rng(seed)
    size = int(rng.integers(2, 7))
    prompts = [list(rng.integers(3, 200, rng.integers(1, 7))) for _ in range(size)]
    responses = [list(rng.integers(3, 200, rng.integers(1, 7))) for _ in range(size)]
    length = max(len(p) + len(r) for p, r in zip(prompts, responses)) + int(rng.integers(0, 3))
    batch = unpaired_batch(prompts, responses, rng.random(size) < 0.5, length)
    ours = kl_rows(batch["tokens"], batch["attention_mask"], batch["loss_mask"], pad_id=0)
    # TRL: completions cycled by +1 within the batch (`add_kl_completion_ids`), then collated and cut at max_length
    kl_completions = [responses[-1]] + responses[:-1]
    theirs = DataCollatorForUnpairedPreference(pad_token_id=0, max_length=length)(
        [{"prompt_ids": p, "completion_ids": r, "KL_completion_ids": k, "label": True}
         for p, r, k in zip(prompts, responses, kl_completions)])
    width = theirs["KL_input_ids"].shape[1]
    for key, name in (("kl_tokens", "KL_input_ids"), ("kl_attention_mask", "KL_attention_mask"),
                      ("kl_loss_mask", "KL_completion_mask")):
        np.testing.assert_array_equal(ours[key][:, :width], theirs[name].numpy().astype(ours[key].dtype), key)
        assert not ours[key][:, width:].any()


# ---------------------------------------------------------------------------------------------
# The train step on a tiny model.


def random_unpaired(seed, batch=4, length=10):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, CONFIG.vocab_size, rng.integers(2, 4)) for _ in range(batch)]
    responses = [rng.integers(3, CONFIG.vocab_size, rng.integers(2, length - 3)) for _ in range(batch)]
    labels = np.arange(batch) % 2 == 0
    return unpaired_batch(prompts, responses, labels, length)


_forward = jax.jit(lambda params, tokens, attention_mask: llama.forward(CONFIG, params, tokens,
                                                                       attention_mask=attention_mask))


def hand_sequence_logps(params, tokens, attention_mask, loss_mask):
    """Σ_{t ∈ loss_mask} log softmax(logits[t − 1])[tokens[t]] from the full logits, float64 numpy."""
    logits = np.asarray(_forward(params, tokens, attention_mask).logits, np.float64)
    logprobs = logits - logits.max(-1, keepdims=True)
    logprobs -= np.log(np.exp(logprobs).sum(-1, keepdims=True))
    picked = np.take_along_axis(logprobs[:, :-1], np.asarray(tokens)[:, 1:, None], -1)[..., 0]
    return np.where(np.asarray(loss_mask)[:, 1:], picked, 0.0).sum(axis=1)


@pytest.fixture(scope="module")
def policy_and_reference():
    init = jax.jit(functools.partial(llama.init_params, CONFIG))
    return init(jax.random.key(0)), init(jax.random.key(1))


def with_reference(reference, batch, micro=1):
    batch = host_batch(batch, PAD, micro)
    return {**batch, **jax.jit(functools.partial(reference_logprobs, CONFIG, num_microbatches=micro))(reference,
                                                                                                       batch)}


def test_step_metrics_equal_the_loss_of_hand_computed_logps(policy_and_reference):
    policy, reference = policy_and_reference
    batch = with_reference(reference, random_unpaired(1, batch=4))
    assert "loss_index" in batch and "kl_loss_index" in batch  # the LM head runs at the loss positions only
    hand = {(name, kind): hand_sequence_logps(params, batch[f"{kind}tokens"], batch[f"{kind}attention_mask"],
                                              batch[f"{kind}loss_mask"])
            for name, params in (("policy", policy), ("reference", reference)) for kind in ("", "kl_")}
    np.testing.assert_allclose(batch["reference_logps"], hand["reference", ""], rtol=1e-5)
    np.testing.assert_allclose(batch["reference_kl_logps"], hand["reference", "kl_"], rtol=1e-5)
    loss = KTOLoss(beta=0.5, desirable_weight=1.3, undesirable_weight=0.9)
    expected = ref_kto(hand["policy", ""], hand["reference", ""], batch["labels"], hand["policy", "kl_"],
                       hand["reference", "kl_"], 0.5, 1.3, 0.9, np.ones(4, bool))
    assert expected["kl"] > 0  # two random models: z is not clamped here
    tx = make_optimizer("adamw", 1e-2, grad_clip=None)
    state, metrics = jax.jit(functools.partial(kto_train_step, CONFIG, loss, 1))(
        TrainState.create(jax.tree.map(jnp.copy, policy), tx, jax.random.key(0)), batch)
    assert int(state.step) == 1
    for name in METRICS:
        np.testing.assert_allclose(float(metrics["kto/loss" if name == "loss" else name]), expected[name],
                                   rtol=1e-4, atol=1e-5, err_msg=name)
    assert np.isfinite(float(metrics["optim/grad_norm"])) and float(metrics["optim/grad_norm"]) > 0


def test_micro_batched_step_equals_the_single_batch_step(policy_and_reference):
    policy, reference = policy_and_reference
    # plain SGD with learning rate 1: the update is the gradient itself
    tx = make_optimizer("sgd", 1.0, b1=0.0, grad_clip=None)
    loss = KTOLoss(beta=0.3, desirable_weight=1.2)
    results = {}
    for micro in (1, 2, 4):
        batch = with_reference(reference, random_unpaired(4, batch=8), micro)
        step = jax.jit(functools.partial(kto_train_step, CONFIG, loss, micro))
        results[micro] = step(TrainState.create(jax.tree.map(jnp.copy, policy), tx, jax.random.key(0)), batch)
    state_1, metrics_1 = results[1]
    assert float(metrics_1["kl"]) > 0
    for micro in (2, 4):
        state_m, metrics_m = results[micro]
        for name in metrics_1:
            np.testing.assert_allclose(float(metrics_m[name]), float(metrics_1[name]), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{micro} {name}")
        for a, b, start in zip(jax.tree.leaves(state_m.params), jax.tree.leaves(state_1.params),
                               jax.tree.leaves(policy)):
            update_m, update_1 = np.asarray(a) - np.asarray(start), np.asarray(b) - np.asarray(start)
            np.testing.assert_allclose(update_m, update_1, rtol=1e-4, atol=5e-7)


def test_a_few_steps_raise_the_desirable_rewards_above_the_undesirable(policy_and_reference):
    policy, _ = policy_and_reference
    batch = with_reference(policy, random_unpaired(4, batch=8, length=12))  # the reference: the starting policy
    step = jax.jit(functools.partial(kto_train_step, CONFIG, KTOLoss(beta=0.1), 1), donate_argnums=0)
    state = TrainState.create(jax.tree.map(jnp.copy, policy), make_optimizer("adamw", 3e-3, grad_clip=None),
                              jax.random.key(0))
    history = []
    for _ in range(15):
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    assert history[0]["kto/loss"] == pytest.approx(0.5, rel=1e-6) and history[0]["kl"] == 0.0
    # the final params' own metrics (a step's metrics are those before its update)
    matched, mismatched = jax.jit(functools.partial(kto_eval_step, CONFIG))(state.params, batch)
    loss, final = kto_loss(matched, batch["reference_logps"], batch["labels"], mismatched,
                           batch["reference_kl_logps"], beta=0.1)
    assert float(loss) < 0.45 and float(final["rewards/accuracies"]) == 1.0
    assert float(final["rewards/chosen"]) > 0 > float(final["rewards/rejected"])
    assert float(final["rewards/margins"]) > 0.5


def test_lora_step_trains_the_adapters_against_the_base_as_reference(policy_and_reference):
    from rlhf_jax.config import LoRAConfig
    from rlhf_jax.models.lora import merged_params, trainable_params
    from rlhf_jax.stages.common import bind_base

    policy, _ = policy_and_reference
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("self_attn/q_proj", "self_attn/v_proj"))
    batch = with_reference(policy, random_unpaired(5, batch=4), 2)  # the reference: the base itself
    adapters = trainable_params(policy, lora, jax.random.key(3))
    step = jax.jit(bind_base(functools.partial(kto_train_step, CONFIG, KTOLoss(), 2), lora))
    state = TrainState.create(adapters, make_optimizer("adamw", 1e-2, grad_clip=None), jax.random.key(0))
    state, first = step(policy, state, batch)
    assert first["kto/loss"] == pytest.approx(0.5, rel=1e-6) and float(first["kl"]) == 0.0  # b = 0: π = base
    state, second = step(policy, state, batch)
    assert float(second["kto/loss"]) < 0.5 and float(second["rewards/margins"]) > 0
    merged = merged_params(policy, state.params, lora)  # the adapters moved the targeted projections only
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(policy), jax.tree.leaves(merged))]
    assert any(changed) and not all(changed)


# ---------------------------------------------------------------------------------------------
# The stage.
# ---------------------------------------------------------------------------------------------
# The stage.


class Killed(Exception):
    pass


def _run_stage(experiment, name, run_dir):
    stage = experiment.stage(name)
    stage_dir = Path(run_dir) / name
    stage_dir.mkdir(parents=True, exist_ok=True)
    stage_registry.load_runner(stage.kind)(experiment, stage, stage_dir,
                                           stage_registry.make_resolver(experiment, Path(run_dir)))
    return stage_dir


def _small_hh(path: Path, source: Path, rows: int) -> str:
    with gzip.open(source, "rt") as lines:
        path.write_text("".join(line for _, line in zip(range(rows), lines)))
    return str(path)


@pytest.fixture
def small_tiny_kto(tmp_path):
    """tiny_kto on 12 HH training pairs (24 examples, 6 steps of 4) and 4 dev pairs, checkpoints every 2 steps."""
    experiment = get_experiment("tiny_kto")
    data = dataclasses.replace(experiment.data, path=_small_hh(tmp_path / "train.jsonl", HH / "train.jsonl.gz", 12),
                               eval_path=_small_hh(tmp_path / "dev.jsonl", HH / "dev.jsonl.gz", 4), max_examples=None)
    return dataclasses.replace(experiment, data=data, stages=(dataclasses.replace(experiment.stage("kto"),
                                                                                  max_steps=6),),
                               checkpoint=dataclasses.replace(experiment.checkpoint, every_steps=2))


@pytest.mark.slow
def test_tiny_kto_stage_reports_before_and_after_and_resumes_exactly_after_a_kill(small_tiny_kto, tmp_path,
                                                                                   monkeypatch):
    class KillingLogger(MetricsLogger):
        def log(self, step, metrics):
            values = super().log(step, metrics)
            if step == 5:
                raise Killed(f"killed after step {step}")
            return values

    full = _run_stage(small_tiny_kto, "kto", tmp_path / "full")
    records = read_metrics(full)
    assert [r["step"] for r in records] == list(range(7))  # step 0: the held-out examples before training
    assert records[1]["kto/loss"] == pytest.approx(0.5, rel=1e-6) and records[1]["kl"] == 0.0  # π = π_ref
    assert all(np.isfinite(r["kto/loss"]) and np.isfinite(r["rewards/margins"]) for r in records[1:])
    summary = json.loads((full / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["eval_start/examples"] == summary["eval/examples"] == 8
    assert summary["eval_start/pairs"] == summary["eval/pairs"] == 4
    assert summary["eval_start/kto/loss"] == pytest.approx(0.5) and summary["eval_start/kl"] == 0.0
    assert summary["eval_start/rewards/accuracies"] == summary["eval_start/rewards/paired_accuracies"] == 0.0
    assert summary["eval/kto/loss"] == records[-1]["eval/kto/loss"] and summary["eval/kl"] >= 0
    assert 0 <= summary["eval/rewards/paired_accuracies"] <= 1 and "train/rewards/margins" in summary
    artifact = load_artifact(full / "model")
    assert artifact.kind == "lm" and artifact.metadata["stage"] == "kto" and "eval/kto/loss" in artifact.metadata

    monkeypatch.setattr(common, "MetricsLogger", KillingLogger)
    with pytest.raises(Killed):
        _run_stage(small_tiny_kto, "kto", tmp_path / "resumed")
    monkeypatch.setattr(common, "MetricsLogger", MetricsLogger)
    resumed = _run_stage(small_tiny_kto, "kto", tmp_path / "resumed")  # restarts from the step-4 checkpoint
    for a, b in zip(jax.tree.leaves(artifact.params), jax.tree.leaves(load_artifact(resumed / "model").params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["step"] for r in read_metrics(resumed)] == list(range(7))  # step 5 re-run, logged once
    assert [r["kto/loss"] for r in read_metrics(resumed)[-2:]] == [r["kto/loss"] for r in records[-2:]]
    assert json.loads((resumed / "summary.json").read_text()) == summary


def test_paired_accuracy_reads_each_pair_rows_two_examples():
    examples = [Example(np.zeros(1, np.int32), (np.zeros(1, np.int32),), label=label, origin=origin)
                for label, origin in ((True, "f:1"), (False, "f:1"), (True, "f:2"), (True, "f:3"), (False, "f:4"),
                                      (True, "f:5"), (False, "f:5"))]
    pairs = feedback_pairs(SimpleNamespace(examples=examples))
    np.testing.assert_array_equal(pairs, [0, 5])
    labels = np.asarray([e.label for e in examples])
    reference = (np.full(7, -10.0), np.full(7, -20.0))
    policy = (np.asarray([-9.0, -11.0, -9.0, -9.0, -9.0, -10.5, -10.0]), np.full(7, -20.0))
    metrics = evaluation_metrics(policy, reference, labels, pairs, KTOLoss(beta=0.1))
    assert metrics["eval/pairs"] == 2 and metrics["eval/examples"] == 7
    assert metrics["eval/rewards/paired_accuracies"] == 0.5  # pair 0: 1 > −1; pair 5: −0.5 < 0
    assert metrics["eval/kl"] == 0.0 and metrics["eval/rewards/accuracies"] == pytest.approx(4 / 7)


def test_batch_size_1_is_a_config_error(capsys):
    for override in ("stages.kto.batch_size=1", "data.batch_size=1"):
        status = launch.main(["experiment=tiny_kto", override, "--print-config"])
        out, err = capsys.readouterr()
        assert status == 2 and out == "" and len(err.splitlines()) == 1
        key = override.split("=")[0]
        assert f"{key}: got 1, expected at least 2 examples per step for KTO stage 'kto'" in err


def test_a_later_stage_may_start_from_the_kto_stage():
    from rlhf_jax.config import GenerateStage, validate

    experiment = get_experiment("tiny_kto")
    validate(dataclasses.replace(experiment, stages=(*experiment.stages, GenerateStage(
        name="samples", model="stage:kto", prompts="prompts.jsonl"))))


@pytest.mark.parametrize("rank", [0, 4])
def test_plan_holds_a_reference_and_compiles_both_programs(rank):
    from rlhf_jax.config import apply_overrides, validate
    from rlhf_jax.models import load
    from rlhf_jax.models.lora import nbytes
    from rlhf_jax.plan import plan_experiment

    experiment = apply_overrides(get_experiment("tiny_kto"), ["mesh.data=1", f"stages.kto.lora.rank={rank}"])
    validate(experiment)
    (plan,) = plan_experiment(experiment, 1, ("kto",))
    params = nbytes(load("tiny:smollm2")[1])
    assert plan.kind == "kto" and not plan.note
    assert set(plan.programs) == {"reference log-probs", "kto train step"}
    assert all(temp > 0 for temp, _ in plan.programs.values())
    if rank:  # the reference is the base itself: no bytes of its own
        assert plan.frozen_bases == params and plan.frozen_roles == 0 and 0 < plan.trained_params < params / 20
    else:
        assert plan.trained_params == plan.frozen_roles == params
