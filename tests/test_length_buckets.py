"""Per-micro-batch lengths: rows ordered by length, each micro-batch run at the shortest length that holds its
rows (`training.accumulate`), with the same losses, gradients and metrics as every micro-batch at the batch's
length."""

import dataclasses
import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config import PreferenceLoss
from rlhf_jax.models import llama
from rlhf_jax.models.config import tiny_config
from rlhf_jax.trainers.common import teacher_forced_logprobs, with_loss_index
from rlhf_jax.trainers.dpo import preference_train_step, reference_logprobs
from rlhf_jax.trainers.reward import reward_loss_sum, reward_train_step
from rlhf_jax.trainers.sft import sft_loss_sum, sft_train_step
from rlhf_jax.training.accumulate import (LENGTH_BUCKET, by_length, micro_lengths, order_by_length,
                                          split_microbatches, trim_to_length)
from rlhf_jax.training.state import TrainState, make_optimizer

CONFIG = tiny_config("llama")


def _rows(rng, batch, length, prefix="", shortest=2):
    tokens = rng.integers(3, CONFIG.vocab_size, (batch, length))
    lengths = rng.integers(shortest, length + 1, batch)
    prompt_lengths = rng.integers(1, shortest, batch)
    column = np.arange(length)[None]
    attention = column < lengths[:, None]
    return {f"{prefix}tokens": tokens.astype(np.int32), f"{prefix}attention_mask": attention,
            f"{prefix}loss_mask": attention & (column >= prompt_lengths[:, None])}


def _pairs(seed, pairs=8, length=32):
    rng = np.random.default_rng(seed)
    return {**_rows(rng, pairs, length, "chosen_"), **_rows(rng, pairs, length, "rejected_"),
            "index": np.arange(100, 100 + pairs, dtype=np.int32)}


def _device(batch):
    return {key: jnp.asarray(value) for key, value in batch.items() if key != "index"}


@pytest.mark.parametrize("length, buckets, want", [(256, 4, (64, 128, 192, 256)), (256, 1, (256,)),
                                                   (100, 3, (40, 72, 100)), (16, 8, (8, 16)), (5, 2, (5,))])
def test_micro_lengths_are_fractions_of_the_batch_rounded_up_to_eight(length, buckets, want):
    assert micro_lengths(length, buckets) == want


def test_order_gives_each_microbatch_a_block_of_rows_by_length_and_the_shortest_length_that_holds_it():
    batch = _pairs(0, pairs=8, length=32)
    ordered = order_by_length(batch, num_microbatches=4, buckets=4)
    needed = np.maximum(*(np.max(np.where(batch[f"{side}_attention_mask"], np.arange(1, 33), 1), axis=1)
                          for side in ("chosen", "rejected")))
    order = np.argsort(needed, kind="stable")
    lengths = micro_lengths(32, 4)
    for m in range(4):
        rows = ordered["index"][m::4] - 100  # micro-batch m of the strided split
        np.testing.assert_array_equal(rows, order[2 * m: 2 * m + 2])
        longest = needed[rows].max()
        picked = np.flatnonzero(ordered[LENGTH_BUCKET][m::4][0])
        assert picked.size == 1 and np.all(ordered[LENGTH_BUCKET][m::4] == ordered[LENGTH_BUCKET][m])
        assert lengths[picked[0]] == min(length for length in lengths if length >= longest)
        for key in ("chosen_tokens", "rejected_attention_mask", "chosen_loss_mask"):  # every array moved with its row
            np.testing.assert_array_equal(ordered[key][m::4], batch[key][rows])
    assert not np.any(ordered["chosen_attention_mask"][:, 32:])
    assert order_by_length(batch, 4, 1) is batch
    without_masks = {"tokens": batch["chosen_tokens"]}
    assert order_by_length(without_masks, 4, 4) is without_masks


def test_left_padded_rows_keep_the_whole_length():
    mask = np.ones((4, 16), bool)
    mask[:, :5] = False  # left padding: the last token is at the end
    ordered = order_by_length({"tokens": np.zeros((4, 16), np.int32), "attention_mask": mask}, 2, 4)
    assert np.all(np.argmax(ordered[LENGTH_BUCKET], axis=1) == len(micro_lengths(16, 4)) - 1)


def test_trimmed_loss_index_gives_the_same_logprobs():
    params = llama.init_params(CONFIG, jax.random.key(0))
    rng = np.random.default_rng(1)
    batch = _rows(rng, 4, 24, shortest=3)
    batch = {key: value[:, :24] for key, value in batch.items()}
    for key in ("attention_mask", "loss_mask"):
        batch[key][:, 16:] = False  # every row fits 16 columns
    indexed = _device(with_loss_index(batch))
    full = np.asarray(teacher_forced_logprobs(CONFIG, params, indexed, index=indexed["loss_index"]))
    trimmed = trim_to_length(indexed, 16)
    assert trimmed["tokens"].shape == (4, 16) and trimmed["loss_index"].shape == indexed["loss_index"].shape
    short = np.asarray(teacher_forced_logprobs(CONFIG, params, trimmed, index=trimmed["loss_index"]))
    np.testing.assert_allclose(short, full[:, :16], rtol=1e-6, atol=1e-7)
    assert np.all(full[:, 16:] == 0)



def test_a_trimmed_microbatch_runs_the_head_at_no_more_slots_than_its_positions():
    """A batch's index is sized by its longest micro-batch; a micro-batch cut to a shorter length computes the
    LM head at rows·length slots at most, with the same log-probs."""
    params = llama.init_params(CONFIG, jax.random.key(0))
    batch = _rows(np.random.default_rng(4), 2, 64, shortest=3)
    for key in ("attention_mask", "loss_mask"):
        batch[key][:, 8:] = False  # both rows fit 8 columns
    batch["loss_mask"][:, 1:8] = batch["attention_mask"][:, 1:8]
    indexed = _device(with_loss_index(batch))
    trimmed = trim_to_length(indexed, 8)
    assert trimmed["loss_index"].size == 64 > 2 * 8  # 14 positions, a bucket of 64
    full = np.asarray(teacher_forced_logprobs(CONFIG, params, indexed))
    short = np.asarray(teacher_forced_logprobs(CONFIG, params, trimmed, index=trimmed["loss_index"]))
    np.testing.assert_allclose(short, full[:, :8], rtol=1e-6, atol=1e-7)
    assert np.all(short[:, 0] == 0) and np.all(short[:, 1:] != 0)

    def head_rows(jaxpr):  # the leading size of every product with the vocabulary as its last axis
        rows = []
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.shape[-1] == CONFIG.vocab_size:
                rows.append(int(np.prod(eqn.outvars[0].aval.shape[:-1])))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                rows += head_rows(sub)
        return rows

    jaxpr = jax.make_jaxpr(lambda p, b: teacher_forced_logprobs(CONFIG, p, b, index=b["loss_index"]))(params, trimmed)
    assert head_rows(jaxpr.jaxpr) == [2 * 8]

def _summed_gradients(loss_sum_fn, params, batch, num_microbatches):
    """Σ over micro-batches of (loss sum, count, gradient), each micro-batch through `by_length`."""
    grad_fn = jax.value_and_grad(loss_sum_fn, has_aux=True)
    micro = split_microbatches(batch, num_microbatches)
    total = None
    for m in range(num_microbatches):
        (loss_sum, (count, _)), grads = by_length(lambda rows: grad_fn(params, rows),
                                                  jax.tree.map(lambda x, m=m: x[m], micro))
        part = (loss_sum, count, grads)
        total = part if total is None else jax.tree.map(jnp.add, total, part)
    return total


@pytest.mark.parametrize("kind", ["sft", "reward"])
def test_gradients_at_per_microbatch_lengths_equal_the_padded_batch_in_float64(kind):
    with jax.enable_x64(True):
        config = tiny_config("llama", dtype="float64", param_dtype="float64")
        params = llama.init_params(config, jax.random.key(0))
        if kind == "sft":
            batch = _rows(np.random.default_rng(2), 8, 32)
            loss_sum_fn = functools.partial(sft_loss_sum, config)
            prepare = lambda b, m: with_loss_index(b, m)  # noqa: E731
        else:
            params = llama.init_scalar_model(config, params, jax.random.key(1))
            batch = {key: value for key, value in _pairs(2).items() if key != "index"}
            loss_sum_fn = functools.partial(reward_loss_sum, config, 0.01)
            prepare = lambda b, m: b  # noqa: E731
        plain = _summed_gradients(loss_sum_fn, params, _device(prepare(batch, 4)), 4)
        ordered = order_by_length(batch, 4, 4)
        assert len(set(np.argmax(ordered[LENGTH_BUCKET], axis=1))) > 1  # the micro-batches run at several lengths
        bucketed = _summed_gradients(loss_sum_fn, params, _device(prepare(ordered, 4)), 4)
        assert bucketed[1] == plain[1]  # the token (pair) count
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves((bucketed[0], bucketed[2])))
        for ours, want in zip(jax.tree.leaves((bucketed[0], bucketed[2])), jax.tree.leaves((plain[0], plain[2]))):
            np.testing.assert_allclose(np.asarray(ours), np.asarray(want), rtol=1e-11, atol=1e-13)


def _step_outputs(step, params, batches):
    """(update, metrics) of one step on each batch; plain SGD at rate 1 without clipping: the update is the
    gradient (Adam's first update is about its sign, which float32 rounding flips where it is near 0)."""
    outputs = []
    for batch in batches:
        state = TrainState.create(params, make_optimizer("sgd", 1.0, b1=0.0, grad_clip=None), jax.random.key(0))
        state, metrics = step(state, batch)
        outputs.append((jax.tree.map(jnp.subtract, state.params, params), metrics))
    return outputs


def _assert_same(outputs):
    (plain_update, plain), (ours_update, ours) = outputs
    for name in plain:
        np.testing.assert_allclose(ours[name], plain[name], rtol=1e-5, atol=1e-6, err_msg=name)
    scale = max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(plain_update))
    assert scale > 1e-3  # a real update
    for ours, want in zip(jax.tree.leaves(ours_update), jax.tree.leaves(plain_update)):
        np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-6 * scale)


def test_sft_and_reward_steps_at_per_microbatch_lengths_equal_the_padded_steps():
    params = llama.init_params(CONFIG, jax.random.key(0))
    batch = _rows(np.random.default_rng(3), 8, 32)
    step = jax.jit(functools.partial(sft_train_step, CONFIG, 4))
    _assert_same(_step_outputs(step, params, [_device(with_loss_index(batch, 4)),
                                              _device(with_loss_index(order_by_length(batch, 4, 4), 4))]))
    model = llama.init_scalar_model(CONFIG, params, jax.random.key(1))
    pairs = {key: value for key, value in _pairs(3).items() if key != "index"}
    step = jax.jit(functools.partial(reward_train_step, CONFIG, 0.0, 4))
    _assert_same(_step_outputs(step, model, [_device(pairs), _device(order_by_length(pairs, 4, 4))]))


def test_dpo_step_and_reference_pass_at_per_microbatch_lengths_equal_the_padded_ones():
    params = llama.init_params(CONFIG, jax.random.key(0))
    reference = llama.init_params(CONFIG, jax.random.key(1))
    batch = _pairs(4)
    ordered = order_by_length(batch, 4, 4)
    plain, ours = (_device(with_loss_index(b, 4)) for b in (batch, ordered))
    reference_pass = jax.jit(functools.partial(reference_logprobs, CONFIG), static_argnums=2)
    plain = {**plain, **reference_pass(reference, plain, 4)}
    ours = {**ours, **reference_pass(reference, ours, 4)}
    # the reference's log-probs moved with their rows
    where = np.argsort(ordered["index"])
    for key in ("reference_chosen_logps", "reference_rejected_logps"):
        np.testing.assert_allclose(np.asarray(ours[key])[where], plain[key], rtol=1e-5, err_msg=key)
    step = jax.jit(functools.partial(preference_train_step, CONFIG, PreferenceLoss(), 4))
    _assert_same(_step_outputs(step, params, [plain, ours]))


def test_the_stages_plan_the_batch_they_run():
    from experiments.tiny import tiny_dpo, tiny_sft
    from rlhf_jax.config import RewardStage
    from rlhf_jax.stages import dpo as dpo_stage, reward as reward_stage, sft as sft_stage
    from rlhf_jax.stages.common import length_order

    optimizer = dataclasses.replace(tiny_sft().optimizer, micro_batches=2, length_buckets=4)
    for module, base in ((sft_stage, tiny_sft()), (dpo_stage, tiny_dpo()),
                         (reward_stage, dataclasses.replace(tiny_sft(), stages=(RewardStage(name="rm"),)))):
        experiment = dataclasses.replace(base, optimizer=optimizer)
        (stage,) = experiment.stages
        shapes = module.programs(experiment, stage, CONFIG).batch(4, 32)
        assert shapes[LENGTH_BUCKET][0] == (4, 4)
        assert LENGTH_BUCKET in length_order(experiment, stage)(
            {key: np.ones(shape, dtype) for key, (shape, dtype) in shapes.items() if key != LENGTH_BUCKET})
        shared = dataclasses.replace(stage, shared_prefix=True) if hasattr(stage, "shared_prefix") else None
        if shared is not None:  # shared-prefix rows too: ordered by the lengths of the rows they make
            assert module.programs(experiment, shared, CONFIG).batch(4, 32)[LENGTH_BUCKET][0] == (4, 4)
            assert LENGTH_BUCKET in length_order(experiment, shared)(_prompted_pairs(0, pairs=4))


@pytest.mark.slow  # ten tiny stages through the launcher, ~150 s
def test_the_stages_with_per_microbatch_lengths_train_as_the_padded_ones(tmp_path):
    from experiments.tiny import tiny_dpo, tiny_sft
    from rlhf_jax.config import RewardStage
    from stage_runs import logged_records

    # The reward head's bias has no gradient under the Bradley-Terry loss alone (it cancels in r_c - r_r): its
    # gradient is float32 rounding, which Adam scales to a step of about the learning rate, in a direction the
    # rounding picks. Two programs that round differently then move the bias (and every reward, by the same
    # amount) apart while the margins, losses and stds agree to 1e-7. The centering term gives the bias a real
    # gradient, so the runs must agree on the rewards too.
    runs = {"sft": (tiny_sft(), "sft/loss"), "rm": (dataclasses.replace(
        tiny_sft(), stages=(RewardStage(name="rm", center_rewards_coef=0.01),)), "rm/loss"),
        "dpo": (tiny_dpo(), "dpo/loss")}
    runs.update({f"{name}_shared": (base, key) for name, (base, key) in runs.items() if name != "sft"})
    for name, (base, key) in runs.items():
        (stage,) = base.stages
        # DPO: the reference's log-probs of every pair looked up by example index, which moves with its row
        settings = dict(max_steps=3, **({"precompute_reference": True} if name.startswith("dpo") else {}),
                        **({"shared_prefix": True} if name.endswith("_shared") else {}))
        logged = {buckets: [r for r in logged_records(dataclasses.replace(
            base, stages=(dataclasses.replace(stage, **settings),),
            optimizer=dataclasses.replace(base.optimizer, micro_batches=2, length_buckets=buckets)),
            tmp_path / f"{name}{buckets}") if key in r] for buckets in (1, 4)}
        assert [r["step"] for r in logged[4]] == [r["step"] for r in logged[1]] == [1, 2, 3], name
        for ours, padded in zip(logged[4], logged[1]):
            for metric in padded:
                if metric.split("/")[0] in ("sft", "rm", "dpo", "logps"):
                    # the reward model's margin r_c - r_r carries the rounding of both rewards: its error
                    # scales with their size, not with the margin's, which is near 0 at the start
                    sides = ("chosen_reward", "rejected_reward", "chosen_reward_std", "rejected_reward_std")
                    scale = sum(abs(padded[f"rm/{side}"]) for side in sides) if metric == "rm/margin" else 0.0
                    np.testing.assert_allclose(ours[metric], padded[metric], rtol=1e-4,
                                               atol=max(1e-6, 1e-4 * scale), err_msg=f"{name} {metric}")


def _prompted_pairs(seed, pairs=8, length=32):
    """Pairs whose two sides begin with the same prompt (so a shared-prefix row holds it once)."""
    batch = _pairs(seed, pairs, length)
    rng = np.random.default_rng(seed + 100)
    for row in range(pairs):
        held = min(batch["chosen_attention_mask"][row].sum(), batch["rejected_attention_mask"][row].sum())
        prompt = int(rng.integers(0, held))  # both sides keep a token of their own
        batch["rejected_tokens"][row, :prompt] = batch["chosen_tokens"][row, :prompt]
    return batch


def test_shared_prefix_pairs_are_ordered_by_the_length_of_their_rows():
    from experiments.tiny import tiny_dpo
    from rlhf_jax.data.batching import share_prefixes, shared_row_lengths
    from rlhf_jax.stages.common import SHARED_LENGTH_MULTIPLE, length_order, shared_pairs

    batch = _prompted_pairs(5, length=48)
    needed, length = shared_row_lengths(batch, 16)
    rows = share_prefixes(batch, 16)
    assert rows["shared_tokens"].shape[1] == length
    np.testing.assert_array_equal(needed, np.sum(rows["shared_segment_ids"] > 0, axis=1))
    assert needed.max() < 2 * 48 - 2 and np.any(needed < batch["chosen_attention_mask"].sum(1)
                                                  + batch["rejected_attention_mask"].sum(1))  # prompts held once
    experiment = dataclasses.replace(tiny_dpo(), optimizer=dataclasses.replace(
        tiny_dpo().optimizer, micro_batches=4, length_buckets=4))
    stage = dataclasses.replace(experiment.stages[0], shared_prefix=True)
    ordered = length_order(experiment, stage)(batch)
    shared = shared_pairs(ordered, loss_entries=True)
    np.testing.assert_array_equal(shared[LENGTH_BUCKET], ordered[LENGTH_BUCKET])
    full = shared["shared_tokens"].shape[1]
    assert full == -(-needed.max() // SHARED_LENGTH_MULTIPLE) * SHARED_LENGTH_MULTIPLE
    lengths = micro_lengths(full, 4)
    row_needed = np.sum(shared["shared_segment_ids"] > 0, axis=1)
    for m in range(4):  # each micro-batch: a block of rows by length, at the shortest length that holds them
        picked = lengths[int(np.argmax(shared[LENGTH_BUCKET][m]))]
        assert picked == min(length for length in lengths if length >= row_needed[m::4].max())
        assert not np.any(shared["shared_segment_ids"][m::4, picked:])
        cut = trim_to_length({key: value[m::4] for key, value in shared.items()}, picked)  # as `by_length` runs it
        for key, value in cut.items():  # the rows' [B, L] arrays cut; loss entries, last slots and lengths whole
            want = shared[key][m::4]
            np.testing.assert_array_equal(value, want[:, :picked] if key.startswith("shared_") and
                                          "_loss_" not in key else want, err_msg=key)
    np.testing.assert_array_equal(np.sort(row_needed), np.sort(needed))
    assert np.all(np.diff([row_needed[m::4].max() for m in range(4)]) >= 0)


@pytest.mark.parametrize("kind", ["reward", "dpo"])
def test_shared_prefix_steps_at_per_microbatch_lengths_equal_the_whole_rows(kind):
    from experiments.tiny import tiny_dpo
    from rlhf_jax.stages.common import length_order, shared_pairs

    experiment = dataclasses.replace(tiny_dpo(), optimizer=dataclasses.replace(
        tiny_dpo().optimizer, micro_batches=4, length_buckets=4))
    stage = dataclasses.replace(experiment.stages[0], shared_prefix=True)
    batch = _prompted_pairs(6, length=40)
    plain, ordered = batch, length_order(experiment, stage)(batch)
    plain, ours = (shared_pairs(b, loss_entries=kind == "dpo") for b in (plain, ordered))
    assert len(set(np.argmax(ours[LENGTH_BUCKET], axis=1))) > 1  # the micro-batches run at several lengths
    plain, ours = _device(plain), _device(ours)
    params = llama.init_params(CONFIG, jax.random.key(0))
    if kind == "reward":
        model = llama.init_scalar_model(CONFIG, params, jax.random.key(1))
        step = jax.jit(functools.partial(reward_train_step, CONFIG, 0.0, 4))
        _assert_same(_step_outputs(step, model, [plain, ours]))
        return
    reference = llama.init_params(CONFIG, jax.random.key(1))
    reference_pass = jax.jit(functools.partial(reference_logprobs, CONFIG), static_argnums=2)
    plain = {**plain, **reference_pass(reference, plain, 4)}
    ours = {**ours, **reference_pass(reference, ours, 4)}
    where = np.argsort(ordered["index"])  # the reference's log-probs moved with their rows
    for key in ("reference_chosen_logps", "reference_rejected_logps"):
        np.testing.assert_allclose(np.asarray(ours[key])[where], plain[key], rtol=1e-5, err_msg=key)
    step = jax.jit(functools.partial(preference_train_step, CONFIG, PreferenceLoss(), 4))
    _assert_same(_step_outputs(step, params, [plain, ours]))
