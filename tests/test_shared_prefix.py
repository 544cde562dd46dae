"""Shared-prefix pair rows (`data.batching.share_prefixes`): each preference pair in one row, its common prefix
once; the reward model's rewards, loss and gradients, and the preference losses' sequence log-probs, loss and
gradients, equal those of the two padded sequences."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.data import Example, TokenizeConfig, TokenizedDataset, collate_preference, pack
from rlhf_jax.data.batching import SHARED_LOSS_KEYS, SHARED_PAIR_KEYS, share_prefixes
from rlhf_jax.data.validation import Report
from rlhf_jax.config import PreferenceLoss
from rlhf_jax.errors import UserError
from rlhf_jax.models import llama
from rlhf_jax.models.config import tiny_config
from rlhf_jax.trainers.dpo import pair_logprobs, preference_loss_sum, preference_train_step
from rlhf_jax.trainers.reward import pair_rewards, reward_loss_sum, reward_train_step
from rlhf_jax.training.state import TrainState, make_optimizer
from updates import assert_same_updates

PAD = 2


def _pairs(rng) -> list[Example]:
    """Pairs with a common prompt; one whose responses begin alike, one where the chosen sequence is the
    rejected one's prefix, one with a one-token prompt."""
    def tokens(n):
        return rng.integers(3, 256, n).astype(np.int32)

    common = tokens(3)
    return [
        Example(prompt=tokens(5), responses=(tokens(4), tokens(6))),
        Example(prompt=tokens(7), responses=(np.concatenate([common, tokens(2)]), np.concatenate([common, tokens(4)]))),
        Example(prompt=tokens(4), responses=(common[:2], common)),
        Example(prompt=tokens(1), responses=(tokens(3), tokens(2))),
    ]


def test_rows_hold_the_common_prefix_once_then_each_rest_with_continuing_positions():
    examples = _pairs(np.random.default_rng(0))
    separate = collate_preference(examples, 16, PAD)
    shared = share_prefixes(separate, length_multiple=8)
    assert set(shared) == set(SHARED_PAIR_KEYS)
    assert shared["shared_tokens"].shape == (4, 16)  # the longest row, pair 1's 12 + 14 - 10 tokens, in 8s
    for row, e in enumerate(examples):
        first, second = (np.concatenate([e.prompt, r]) for r in e.responses)
        common = next((i for i in range(min(len(first), len(second))) if first[i] != second[i]),
                      min(len(first), len(second)))
        prefix = min(common, len(first) - 1, len(second) - 1)
        tokens, positions = shared["shared_tokens"][row], shared["shared_positions"][row]
        segments, marked = shared["shared_segment_ids"][row], shared["shared_prefix"][row]
        chosen_last, rejected_last = shared["chosen_last"][row], shared["rejected_last"][row]
        assert chosen_last == len(first) - 1 and rejected_last == len(first) + len(second) - prefix - 1
        assert marked.sum() == prefix and marked[:prefix].all()
        # each sequence is read back from its own segment (the prefix belongs to segment 1)
        chosen_slots, rejected_slots = segments == 1, segments == 2
        assert tokens[chosen_slots].tolist() == first.tolist()
        assert np.concatenate([tokens[:prefix], tokens[rejected_slots]]).tolist() == second.tolist()
        assert positions[chosen_slots].tolist() == list(range(len(first)))
        assert positions[rejected_slots].tolist() == list(range(prefix, len(second)))
        assert not segments[rejected_last + 1:].any() and not tokens[rejected_last + 1:].any()
    # pair 1's responses begin with the same 3 tokens: they are shared too; pair 2's chosen sequence is the
    # rejected one's prefix: it keeps its last token apart
    assert shared["shared_prefix"][1].sum() == 7 + 3
    assert shared["shared_prefix"][2].sum() == 4 + 2 - 1
    assert shared["shared_prefix"][3].sum() == 1
    # a length fixed in advance (processes holding parts of one batch agree on it): the same rows, padded
    fixed = share_prefixes(separate, length=32)
    assert fixed["shared_tokens"].shape == (4, 32)
    for key, value in shared.items():
        np.testing.assert_array_equal(fixed[key][:, :16] if value.ndim == 2 else fixed[key], value)
    with pytest.raises(ValueError, match="length 15 < the longest shared-prefix row, 16 tokens"):
        share_prefixes(separate, length=15)


def test_packed_pairs_are_refused():
    packed, _ = pack(_pairs(np.random.default_rng(1)), rows=2, length=32, pad_id=PAD)
    with pytest.raises(UserError, match="padded preference batch, not a packed one"):
        share_prefixes(packed)


def _lm(config):
    weights = np.random.default_rng(3)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(("norm" in jax.tree_util.keystr(path)) + weights.normal(0, 0.2, leaf.shape),
                                       leaf.dtype),
        llama.abstract_params(config))


def _model(config):
    return llama.init_scalar_model(config, _lm(config), jax.random.key(1))


@pytest.mark.parametrize("variant", ["llama", "sliding window"])
def test_rewards_loss_and_gradients_equal_the_padded_pairs_in_float64(variant):
    examples = _pairs(np.random.default_rng(2))
    separate = collate_preference(examples, 16, PAD)
    shared = share_prefixes(separate, length_multiple=8)
    config = tiny_config("llama")
    if variant == "sliding window":  # the window counts positions, which continue from the prefix
        config = dataclasses.replace(config, family="mistral", sliding_window=4)
    with jax.enable_x64(True):
        config = dataclasses.replace(config, dtype="float64", param_dtype="float64")
        model = _model(config)
        on = lambda batch, keys: {k: jnp.asarray(v) for k, v in batch.items() if k in keys}  # noqa: E731
        padded = on(separate, {f"{s}_{k}" for s in ("chosen", "rejected") for k in ("tokens", "attention_mask")})
        rows = on(shared, SHARED_PAIR_KEYS)
        want = jax.jit(functools.partial(pair_rewards, config))(model, padded)
        got = jax.jit(functools.partial(pair_rewards, config))(model, rows)
        for ours, reference in zip(got, want):
            np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=1e-12, atol=1e-12)
        assert np.ptp(np.asarray(want[0])) > 1e-3  # the pairs' rewards differ: a real comparison

        loss = functools.partial(reward_loss_sum, config, 0.1)
        grad = jax.jit(jax.grad(lambda m, b: loss(m, b)[0]))
        for ours, reference in zip(jax.tree.leaves(grad(model, rows)), jax.tree.leaves(grad(model, padded))):
            scale = float(np.abs(np.asarray(reference)).max())
            np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=1e-10, atol=1e-12 * scale)


def test_a_train_step_in_micro_batches_gives_the_padded_pairs_update():
    examples = _pairs(np.random.default_rng(4))
    separate = collate_preference(examples, 16, PAD)
    shared = {k: jnp.asarray(v) for k, v in share_prefixes(separate, length_multiple=8).items()}
    padded = {k: jnp.asarray(v) for k, v in separate.items() if not k.endswith(("loss_mask", "index"))}
    config = tiny_config("llama")
    model = _model(config)
    # centering gives the head's bias a gradient (Bradley-Terry alone moves both rewards alike: its bias
    # gradient is zero, and float32 noise around it is all there would be to compare)
    step = jax.jit(functools.partial(reward_train_step, config, 0.1, 2))
    _assert_same_sgd_step(step, model, padded, shared, ("rm/loss", "rm/accuracy", "rm/margin", "rm/chosen_reward"))


def _assert_same_sgd_step(step, params, padded, shared, keys):
    """One `step` from `params` on the padded pairs and on their shared-prefix rows: the same metrics `keys` and
    the same update. Plain SGD: the update is the gradient itself (Adam's first step, g / |g|, turns float32
    noise on a near-zero gradient into a full-size update)."""
    start = TrainState.create(params, make_optimizer("sgd", 0.1, b1=0.0), jax.random.key(0))
    (want_state, want), (got_state, got) = (step(start, batch) for batch in (padded, shared))
    for key in keys:
        np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-5, atol=1e-6)
    assert_same_updates(start.params, got_state.params, want_state.params)


def _pair_dataset(examples) -> TokenizedDataset:
    return TokenizedDataset("preference", list(examples), pad_id=PAD, end_id=PAD,
                            config=TokenizeConfig(max_length=16, max_prompt_length=8),
                            report=Report("pairs", "preference", rows=len(examples), valid=len(examples)))


def test_whole_set_passes_score_shared_prefix_rows_as_the_padded_pairs_in_float64():
    """The stages' whole-set passes (the reward model's evaluation, the DPO family's evaluation and its
    `precompute_reference` table) over shared-prefix rows: the padded pairs' numbers, in order, a short last
    batch included."""
    from rlhf_jax.stages import dpo as dpo_stage, reward as reward_stage

    rng = np.random.default_rng(8)
    dataset = _pair_dataset(_pairs(rng) + _pairs(rng)[:3])  # 7 pairs in batches of 3: the last holds one
    with jax.enable_x64(True):
        config = dataclasses.replace(tiny_config("llama"), dtype="float64", param_dtype="float64")
        model = _model(config)
        padded, shared = (reward_stage.pair_rewards(config, model, dataset, 3, shared_prefix=flag)
                          for flag in (False, True))
        for ours, theirs in zip(shared, padded):
            assert ours.shape == (7,)
            np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
        assert np.ptp(padded[0]) > 1e-3
        padded, shared = (dpo_stage.sequence_logprobs_over(config, _lm(config), dataset, 3,
                                                           shared_prefix=flag) for flag in (False, True))
        for ours, theirs in zip(shared, padded):
            np.testing.assert_allclose(ours.total, theirs.total, rtol=1e-12)
            np.testing.assert_array_equal(ours.count, theirs.count)
        assert padded.chosen.count.tolist() == [len(e.responses[0]) for e in dataset.examples]


@pytest.mark.slow  # two tiny reward stages through the launcher, ~30 s
def test_the_reward_stage_with_shared_prefixes_trains_as_the_padded_one(tmp_path):
    from experiments.tiny import tiny_sft
    from rlhf_jax.config import RewardStage
    from stage_runs import logged_records

    logged = {shared: logged_records(dataclasses.replace(
        tiny_sft(), name="rm", stages=(RewardStage(name="rm", max_steps=3, shared_prefix=shared),)),
        tmp_path / str(shared)) for shared in (False, True)}
    assert [r["step"] for r in logged[True]] == [r["step"] for r in logged[False]] == [1, 2, 3]
    # the first step's loss is from the same weights; the later ones follow updates that agree to float32
    # reordering (measured: 8.5e-8, 1.3e-6, 8e-7 relative)
    np.testing.assert_allclose(logged[True][0]["rm/loss"], logged[False][0]["rm/loss"], rtol=1e-6)
    for ours, padded in zip(logged[True], logged[False]):
        np.testing.assert_allclose(ours["rm/loss"], padded["rm/loss"], rtol=1e-5)
        assert ours["rm/accuracy"] == padded["rm/accuracy"]


# -- the preference losses: log-probs from loss entries ---------------------------------------------------------

def test_loss_entries_name_each_marked_token_and_the_slot_that_predicts_it():
    examples = _pairs(np.random.default_rng(5))
    separate = collate_preference(examples, 16, PAD)
    shared = share_prefixes(separate, length_multiple=8, loss_entries=True)
    assert set(shared) == set(SHARED_PAIR_KEYS) | set(SHARED_LOSS_KEYS)
    assert set(share_prefixes(separate, length_multiple=8)) == set(SHARED_PAIR_KEYS)  # the reward model's
    slots, tokens, sides = (shared[key] for key in SHARED_LOSS_KEYS)
    assert slots.shape == (4, 32)  # the longest row's 6 + 8 entries in buckets (64), at most 2 × 16
    for row, e in enumerate(examples):
        for side, response in zip((1, 2), e.responses):
            sequence = np.concatenate([e.prompt, response])
            mine = sides[row] == side
            # the response's tokens in order, each predicted from a slot holding the token before it
            assert tokens[row][mine].tolist() == response.tolist()
            before = len(e.prompt) - 1 + np.arange(len(response))
            assert shared["shared_tokens"][row][slots[row][mine]].tolist() == sequence[before].tolist()
            # ... at that token's position in this sequence
            assert shared["shared_positions"][row][slots[row][mine]].tolist() == before.tolist()
            # and in this sequence's part of the row: the prefix or its own segment
            segment = shared["shared_segment_ids"][row][slots[row][mine]]
            in_prefix = shared["shared_prefix"][row][slots[row][mine]]
            assert (in_prefix | (segment == side)).all()
        assert not tokens[row][sides[row] == 0].any() and not slots[row][sides[row] == 0].any()
    # pair 1's responses begin with the same 3 tokens: each side lists those tokens from the same prefix slots
    first, second = (slots[1][sides[1] == side][:3] for side in (1, 2))
    np.testing.assert_array_equal(first, second)
    assert shared["shared_prefix"][1][first].all()
    # a length fixed in advance: as many entries as slots
    assert share_prefixes(separate, length=32, loss_entries=True)["shared_loss_slots"].shape == (4, 32)


def _preference_batches(examples, reference=None):
    """(the padded pairs with their loss masks, the same pairs in shared-prefix rows), as jnp arrays."""
    separate = collate_preference(examples, 16, PAD)
    padded = {k: jnp.asarray(v) for k, v in separate.items() if k != "index"}
    shared = {k: jnp.asarray(v) for k, v in share_prefixes(separate, length_multiple=8, loss_entries=True).items()}
    if reference is not None:
        padded, shared = ({**batch, **reference} for batch in (padded, shared))
    return padded, shared


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo"])
def test_preference_logprobs_loss_and_gradients_equal_the_padded_pairs_in_float64(loss_type):
    examples = _pairs(np.random.default_rng(6))
    with jax.enable_x64(True):
        config = dataclasses.replace(tiny_config("llama"), dtype="float64", param_dtype="float64")
        params = _lm(config)
        reference = {"reference_chosen_logps": jnp.asarray([-30.0, -25.0, -12.0, -9.0]),
                     "reference_rejected_logps": jnp.asarray([-31.0, -24.0, -14.0, -8.0])}
        padded, shared = _preference_batches(examples, reference)
        want = jax.jit(functools.partial(pair_logprobs, config))(params, padded)
        got = jax.jit(functools.partial(pair_logprobs, config))(params, shared)
        for ours, theirs in zip(got, want):
            np.testing.assert_allclose(np.asarray(ours.total), np.asarray(theirs.total), rtol=1e-12)
            np.testing.assert_array_equal(np.asarray(ours.count), np.asarray(theirs.count))
        assert np.asarray(want.chosen.count).tolist() == [len(e.responses[0]) for e in examples]

        loss = PreferenceLoss(type=loss_type, beta=0.5)
        value = jax.jit(jax.value_and_grad(lambda p, b: preference_loss_sum(config, loss, p, b)[0]))
        (got_loss, got_grads), (want_loss, want_grads) = value(params, shared), value(params, padded)
        np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-12)
        for ours, theirs in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
            scale = float(np.abs(np.asarray(theirs)).max())
            assert scale > 0
            np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-10, atol=1e-12 * scale)


def test_a_dpo_train_step_in_micro_batches_gives_the_padded_pairs_update():
    examples = _pairs(np.random.default_rng(7))
    config = tiny_config("llama")
    params = _lm(config)
    reference = {"reference_chosen_logps": jnp.asarray([-40.0, -35.0, -20.0, -18.0]),
                 "reference_rejected_logps": jnp.asarray([-41.0, -33.0, -22.0, -17.0])}
    padded, shared = _preference_batches(examples, reference)
    loss = PreferenceLoss(beta=0.1, nll_coef=0.5)  # the NLL term reads the whole batch's chosen token count
    step = jax.jit(functools.partial(preference_train_step, config, loss, 2))
    _assert_same_sgd_step(step, params, padded, shared, ("dpo/loss", "logps/chosen", "logps/rejected",
                                                         "rewards/margins"))


@pytest.mark.slow  # three tiny DPO stages through the launcher, ~60 s
def test_the_dpo_stage_with_shared_prefixes_trains_as_the_padded_one(tmp_path):
    from experiments.tiny import tiny_dpo
    from stage_runs import logged_records

    base = tiny_dpo()
    (stage,) = base.stages
    runs = {"padded": dict(shared_prefix=False), "shared": dict(shared_prefix=True),
            # the reference's log-probs of every training pair in one pass over shared-prefix rows
            "shared, precomputed": dict(shared_prefix=True, precompute_reference=True)}
    logged = {name: logged_records(dataclasses.replace(
        base, stages=(dataclasses.replace(stage, max_steps=3, **settings),)), tmp_path / str(number))
        for number, (name, settings) in enumerate(runs.items())}
    train = {name: [r for r in records if "dpo/loss" in r] for name, records in logged.items()}
    evals = {name: [r for r in records if "eval/dpo/loss" in r] for name, records in logged.items()}
    for name in ("shared", "shared, precomputed"):
        assert [r["step"] for r in train[name]] == [r["step"] for r in train["padded"]] == [1, 2, 3]
        for ours, padded in zip(train[name], train["padded"]):
            for key in ("dpo/loss", "logps/chosen", "logps/rejected"):
                np.testing.assert_allclose(ours[key], padded[key], rtol=1e-5)
            # the margins start at 0 (the policy is the reference): float32 noise of 1e-6 at step 1, then 0.01-0.1
            np.testing.assert_allclose(ours["rewards/margins"], padded["rewards/margins"], rtol=1e-4, atol=1e-5)
        # the held-out evaluation scores the shared-prefix rows (the reference's log-probs too): the same numbers
        assert evals[name] and len(evals[name]) == len(evals["padded"])
        for ours, padded in zip(evals[name], evals["padded"]):
            np.testing.assert_allclose(ours["eval/dpo/loss"], padded["eval/dpo/loss"], rtol=1e-4)
