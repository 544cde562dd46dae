"""Padding-free SFT batches (`data.batching.pack_whole`, `stages.<sft>.padding_free`): each batch's examples
packed into the fewest rows that hold them; the same examples per step and the same loss and gradients as the
padded rows."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest

from rlhf_jax.data import DataIterator, Example, collate_sft
from rlhf_jax.data.batching import pack_whole, plan_packing
from rlhf_jax.errors import UserError
from rlhf_jax.models import llama
from rlhf_jax.models.config import tiny_config
from rlhf_jax.stages.common import device_batch, loss_batch
from rlhf_jax.stages.sft import SFT_KEYS
from rlhf_jax.trainers.sft import sft_loss_sum, sft_train_step
from rlhf_jax.training.state import TrainState, make_optimizer
from test_data_loader import synthetic
from updates import assert_same_updates

PAD = 2


def _examples(rng, n=7, length=16) -> list[Example]:
    def tokens(count):
        return rng.integers(3, 256, count).astype(np.int32)

    sizes = rng.integers(2, length + 1, n)
    return [Example(prompt=tokens(p), responses=(tokens(s - p),))
            for s, p in zip(sizes, rng.integers(1, np.maximum(sizes - 1, 2)))]


def _segments(batch) -> list[tuple[list[int], list[bool]]]:
    """Each packed sequence's (tokens, loss mask), read back from the rows."""
    found = []
    for row in range(len(batch["tokens"])):
        ids = batch["segment_ids"][row]
        for segment in range(1, int(ids.max(initial=0)) + 1):
            where = ids == segment
            found.append((batch["tokens"][row, where].tolist(), batch["loss_mask"][row, where].tolist()))
    return found


@pytest.mark.parametrize("row_multiple", [1, 2, 4])
def test_every_example_once_in_the_fewest_rows_first_fit_decreasing_finds(row_multiple):
    rng = np.random.default_rng(0)
    examples = _examples(rng, n=8)
    batch = pack_whole(examples, 16, PAD, row_multiple=row_multiple)
    padded = collate_sft(examples, 16, PAD)
    want = sorted((padded["tokens"][i, m].tolist(), padded["loss_mask"][i, m].tolist())
                  for i, m in enumerate(padded["attention_mask"]))
    assert sorted(_segments(batch)) == want  # every example, once, with its own loss mask
    sizes = sorted((len(e.prompt) + len(e.responses[0]) for e in examples), reverse=True)
    needed = max(plan_packing([[s] for s in sizes], len(sizes), 16)) + 1
    assert len(batch["tokens"]) == row_multiple * -(-needed // row_multiple)
    assert needed < len(examples)  # the rows hold fewer than one example each: padding was saved
    for row, ids in enumerate(batch["segment_ids"]):  # positions restart at 0 in each segment
        for segment in range(1, int(ids.max(initial=0)) + 1):
            np.testing.assert_array_equal(batch["positions"][row, ids == segment], np.arange((ids == segment).sum()))


def test_an_example_longer_than_a_row_is_refused():
    examples = [Example(prompt=np.arange(3, 10, dtype=np.int32), responses=(np.arange(3, 20, dtype=np.int32),))]
    with pytest.raises(UserError, match="24 tokens does not fit a row of 16"):
        pack_whole(examples, 16, PAD)


def test_loss_and_gradients_equal_the_padded_rows_in_float64():
    examples = _examples(np.random.default_rng(1), n=6)
    padded, free = collate_sft(examples, 16, PAD), pack_whole(examples, 16, PAD)
    assert len(free["tokens"]) < len(padded["tokens"])
    with jax.enable_x64(True):
        config = dataclasses.replace(tiny_config("llama"), dtype="float64", param_dtype="float64")
        params = llama.init_params(config, jax.random.key(0))

        def mean_loss(params, batch):
            total, (count, _) = sft_loss_sum(config, params, batch)
            return total / count

        value_and_grad = jax.jit(jax.value_and_grad(mean_loss))
        # the reference: the padded rows with the LM head at every position (no loss index)
        want, want_grads = value_and_grad(params, device_batch(padded, SFT_KEYS))
        for batch in (loss_batch(padded, SFT_KEYS), loss_batch(free, SFT_KEYS)):
            got, got_grads = value_and_grad(params, batch)
            np.testing.assert_allclose(float(got), float(want), rtol=1e-12)
            for ours, reference in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
                scale = float(np.abs(np.asarray(reference)).max())
                np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=1e-10, atol=1e-12 * scale)


def test_a_micro_batched_train_step_gives_the_padded_rows_update():
    examples = _examples(np.random.default_rng(2), n=8)
    padded, free = collate_sft(examples, 16, PAD), pack_whole(examples, 16, PAD, row_multiple=2)
    config = tiny_config("llama")
    start = TrainState.create(llama.init_params(config, jax.random.key(0)), make_optimizer("sgd", 0.1, b1=0.0),
                              jax.random.key(0))
    step = jax.jit(functools.partial(sft_train_step, config, 2))
    (want_state, want), (got_state, got) = (step(start, loss_batch(batch, SFT_KEYS, 2)) for batch in (padded, free))
    np.testing.assert_allclose(float(got["sft/loss"]), float(want["sft/loss"]), rtol=1e-6)
    assert_same_updates(start.params, got_state.params, want_state.params)


def _examples_of(batch) -> list[tuple[int, ...]]:
    return sorted(tuple(tokens) for tokens, _ in _segments(batch)) if "segment_ids" in batch else sorted(
        tuple(row[mask]) for row, mask in zip(batch["tokens"].tolist(), batch["attention_mask"]))


def test_the_iterator_steps_through_the_padded_iterator_s_examples_and_resumes_exactly():
    dataset = synthetic("sft", 50)
    settings = dict(batch_size=8, seed=3, num_epochs=2)
    padded = list(DataIterator(dataset, **settings))
    free = list(DataIterator(dataset, padding_free=True, row_multiple=2, **settings))
    assert len(free) == len(padded)
    for a, b in zip(free, padded):
        assert sorted(map(tuple, (t for t, _ in _segments(a)))) == sorted(
            tuple(row[:int(mask.sum())]) for row, mask in zip(b["tokens"].tolist(), b["attention_mask"]))
        assert len(a["tokens"]) % 2 == 0 and len(a["tokens"]) <= 8
    assert sum(len(b["tokens"]) for b in free) < sum(len(b["tokens"]) for b in padded)

    stopped = DataIterator(dataset, padding_free=True, row_multiple=2, **settings)
    for _ in range(4):
        next(stopped)
    resumed = DataIterator(dataset, padding_free=True, row_multiple=2, **settings)
    resumed.set_state(json.loads(json.dumps(stopped.get_state())))
    rest = list(resumed)
    assert len(rest) == len(free) - 4
    for a, b in zip(rest, free[4:]):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_processes_take_their_rows_of_one_global_padding_free_batch():
    dataset = synthetic("sft", 40)
    alone = next(DataIterator(dataset, batch_size=8, seed=5, padding_free=True))
    assert len(alone["tokens"]) % 2 == 1  # one process needs an odd row count for this batch...
    parts = [next(DataIterator(dataset, batch_size=8, seed=5, padding_free=True, process_index=i, process_count=2))
             for i in range(2)]
    # ...two round it up to one they split evenly, each packing the whole global batch alike
    whole = next(DataIterator(dataset, batch_size=8, seed=5, padding_free=True, row_multiple=2))
    assert len(whole["tokens"]) == len(alone["tokens"]) + 1
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key], err_msg=key)


@pytest.mark.parametrize("kind, settings, message", [
    ("preference", {}, "padding-free batches are for sft data without packing, not preference data"),
    ("sft", {"pack": True}, "not sft data with packing"),
    ("sft", {"row_multiple": 3}, "multiple of 3"),
])
def test_the_iterator_refuses_what_it_cannot_pack(kind, settings, message):
    with pytest.raises(UserError, match=message):
        DataIterator(synthetic(kind, 20), batch_size=8, padding_free=True, **settings)


def test_padding_free_with_packing_is_a_one_line_config_error():
    from experiments.tiny import tiny_sft
    from rlhf_jax.config import SFTStage, validate
    from rlhf_jax.errors import ConfigError

    config = dataclasses.replace(tiny_sft(), stages=(SFTStage(name="sft", packing=True, padding_free=True),))
    with pytest.raises(ConfigError, match="stages.sft.padding_free.*packing already fills"):
        validate(config)


@pytest.mark.slow  # two tiny SFT stages through the launcher, ~30 s
def test_the_sft_stage_padding_free_trains_as_the_padded_one(tmp_path):
    from experiments.tiny import tiny_sft
    from rlhf_jax.config import SFTStage
    from stage_runs import logged_records

    from rlhf_jax.stages import sft

    base = tiny_sft()  # rows long enough to hold several HH examples: padding-free saves rows
    base = dataclasses.replace(base, name="sft", optimizer=dataclasses.replace(base.optimizer, micro_batches=2),
                               data=dataclasses.replace(base.data, max_prompt_length=96, max_length=256, batch_size=8))
    configs = {free: dataclasses.replace(base, stages=(SFTStage(name="sft", max_steps=3, padding_free=free),))
               for free in (False, True)}
    iterator = sft._setup(configs[True], configs[True].stages[0], lambda source: source, None).iterator
    rows = [len(next(iterator)["tokens"]) for _ in range(3)]
    assert all(r % 2 == 0 for r in rows) and sum(rows) < 3 * 8, rows  # whole micro-batches, fewer rows
    logged = {free: logged_records(config, tmp_path / str(free)) for free, config in configs.items()}
    assert [r["step"] for r in logged[True]] == [r["step"] for r in logged[False]] == [1, 2, 3]
    np.testing.assert_allclose(logged[True][0]["sft/loss"], logged[False][0]["sft/loss"], rtol=1e-6)
    for ours, padded in zip(logged[True], logged[False]):
        np.testing.assert_allclose(ours["sft/loss"], padded["sft/loss"], rtol=1e-5)
