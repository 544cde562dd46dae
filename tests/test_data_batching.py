"""Batching: padding and buckets, loss masks after truncation, packing (log-prob parity on a tiny model),
pairs kept together, micro-batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.data import (
    Example,
    bucket_length,
    collate_preference,
    collate_prompts,
    collate_sft,
    default_buckets,
    micro_batch_size,
    pack,
    plan_packed_batches,
    split_micro_batches,
    truncate,
)
from rlhf_jax.errors import UserError

PAD = 2


def example(rng, prompt_length, *response_lengths, label=None) -> Example:
    """Random tokens in [3, 256) (the tiny model's vocabulary), so no token equals PAD by accident."""
    return Example(prompt=rng.integers(3, 256, prompt_length).astype(np.int32),
                   responses=tuple(rng.integers(3, 256, n).astype(np.int32) for n in response_lengths), label=label)


def test_buckets():
    assert default_buckets(512) == (64, 128, 256, 512)
    assert default_buckets(600) == (64, 128, 256, 512, 600)
    assert [bucket_length(n, (64, 128, 600)) for n in (1, 64, 65, 599, 600)] == [64, 64, 128, 600, 600]
    with pytest.raises(AssertionError):
        bucket_length(601, (64, 600))


def test_sft_batch_right_padded_with_response_loss_mask():
    rng = np.random.default_rng(0)
    examples = [example(rng, 3, 4), example(rng, 5, 1), example(rng, 2, 6, label=None)]
    batch = collate_sft(examples, 10, PAD, indices=[7, 8, 9])
    assert set(batch) == {"tokens", "attention_mask", "loss_mask", "index"}
    assert batch["tokens"].dtype == np.int32 and batch["loss_mask"].dtype == bool and batch["tokens"].shape == (3, 10)
    assert batch["index"].tolist() == [7, 8, 9]
    for row, e in enumerate(examples):
        n_prompt, n = len(e.prompt), len(e.prompt) + len(e.responses[0])
        assert batch["tokens"][row, :n].tolist() == e.prompt.tolist() + e.responses[0].tolist()
        assert (batch["tokens"][row, n:] == PAD).all()
        assert batch["attention_mask"][row].tolist() == [True] * n + [False] * (10 - n)
        assert batch["loss_mask"][row].tolist() == [False] * n_prompt + [True] * (n - n_prompt) + [False] * (10 - n)
    on_prompt = collate_sft(examples, 10, PAD, loss_on_prompt=True)
    assert (on_prompt["loss_mask"] == (batch["attention_mask"] & (np.arange(10) > 0))).all()


def test_response_ending_in_pad_token_stays_in_the_loss():
    # pad = EOS = 2 (SmolLM2): masks come from lengths, so the real EOS is still trained on
    e = Example(prompt=np.array([5, 6], np.int32), responses=(np.array([7, PAD], np.int32),))
    batch = collate_sft([e], 6, PAD)
    assert batch["loss_mask"][0].tolist() == [False, False, True, True, False, False]


def test_unpaired_batches_carry_labels():
    rng = np.random.default_rng(1)
    batch = collate_sft([example(rng, 2, 3, label=True), example(rng, 2, 2, label=False)], 8, PAD)
    assert batch["labels"].tolist() == [True, False] and batch["labels"].dtype == bool


def test_truncation_keeps_prompt_end_response_start_and_mask_counts_kept_response():
    prompt, chosen, rejected = list(range(100, 130)), list(range(200, 240)), list(range(300, 305))
    kept_prompt, (kept_chosen, kept_rejected), cut = truncate(prompt, [chosen, rejected], 16, 40)
    assert kept_prompt == prompt[-16:] and kept_chosen == chosen[:24] and kept_rejected == rejected and cut
    assert truncate([1, 2], [[3]], 16, 40) == ([1, 2], [[3]], False)
    e = Example(prompt=np.asarray(kept_prompt, np.int32),
                responses=(np.asarray(kept_chosen, np.int32), np.asarray(kept_rejected, np.int32)))
    batch = collate_preference([e], 40, PAD)
    assert batch["chosen_loss_mask"].sum() == 24 and batch["rejected_loss_mask"].sum() == 5
    assert batch["chosen_tokens"][0][batch["chosen_loss_mask"][0]].tolist() == kept_chosen


def test_preference_batch_keeps_pairs_in_the_same_row():
    rng = np.random.default_rng(2)
    examples = [example(rng, 4, 3, 6), example(rng, 2, 5, 1)]
    batch = collate_preference(examples, 16, PAD, indices=[0, 1])
    assert set(batch) == {f"{side}_{key}" for side in ("chosen", "rejected")
                          for key in ("tokens", "attention_mask", "loss_mask")} | {"index"}
    for row, e in enumerate(examples):
        for side, response in zip(("chosen", "rejected"), e.responses):
            assert batch[f"{side}_tokens"].shape == (2, 16)
            assert batch[f"{side}_tokens"][row, :len(e.prompt)].tolist() == e.prompt.tolist()
            assert batch[f"{side}_tokens"][row][batch[f"{side}_loss_mask"][row]].tolist() == response.tolist()


def test_prompt_batch_left_padded():
    rng = np.random.default_rng(3)
    examples = [example(rng, 3), example(rng, 6)]
    batch = collate_prompts(examples, 8, PAD, indices=[4, 5])
    assert batch["prompt_mask"].tolist() == [[False] * 5 + [True] * 3, [False] * 2 + [True] * 6]
    assert batch["prompt_tokens"][0, 5:].tolist() == examples[0].prompt.tolist()
    assert (batch["prompt_tokens"][0, :5] == PAD).all()


def test_packing_segments_positions_and_masks():
    rng = np.random.default_rng(4)
    examples = [example(rng, 3, 4), example(rng, 2, 2), example(rng, 5, 5), example(rng, 4, 9), example(rng, 1, 1)]
    batch, used = pack(examples, rows=2, length=12, pad_id=PAD)
    # first fit: 7 and 4 -> row 0 (11 of 12); 10 -> row 1; 13 fits nowhere and is passed over; 2 -> row 1
    assert used == [0, 1, 2, 4]
    assert batch["segment_ids"].tolist() == [[1] * 7 + [2] * 4 + [0], [1] * 10 + [2] * 2]
    assert batch["positions"].tolist() == [list(range(7)) + list(range(4)) + [0], list(range(10)) + [0, 1]]
    assert (batch["attention_mask"] == (batch["segment_ids"] > 0)).all()
    assert batch["loss_mask"].sum() == 4 + 2 + 5 + 1
    assert batch["loss_mask"][0].tolist() == [False] * 3 + [True] * 4 + [False] * 2 + [True] * 2 + [False]
    on_prompt, _ = pack(examples[:2], rows=1, length=12, pad_id=PAD, loss_on_prompt=True)
    # the first token of every segment has nothing before it in its segment: never in the loss
    assert on_prompt["loss_mask"][0].tolist() == [False] + [True] * 6 + [False] + [True] * 3 + [False]


def _reference_packed_batches(lengths, rows, length, lookahead):
    """plan_packed_batches written plainly: a queue of pending items; each batch scans the queue's first
    `lookahead`, first fit, and puts what fit nowhere back at the queue's front."""
    pending, batches = list(range(len(lengths))), []
    while pending:
        free, placed, passed = [[length] * len(lengths[0]) for _ in range(rows)], [], []
        for item in pending[:lookahead]:
            row = next((r for r in range(rows) if all(f >= n for f, n in zip(free[r], lengths[item]))), None)
            if row is None:
                passed.append(item)
            else:
                free[row] = [f - n for f, n in zip(free[row], lengths[item])]
                placed.append(item)
        batches.append(placed)
        pending = passed + pending[lookahead:]
    return batches


@pytest.mark.parametrize("sides", [1, 2])
def test_packed_batches_pass_over_what_fits_nowhere(sides):
    rng = np.random.default_rng(sides)
    lengths = rng.integers(1, 33, (300, sides)).tolist()
    for rows, lookahead in ((1, 1), (3, 5), (4, 40), (8, 1000)):
        batches = plan_packed_batches(lengths, rows, 32, lookahead)
        assert batches == _reference_packed_batches(lengths, rows, 32, lookahead)
        assert sorted(sum(batches, [])) == list(range(300))
    # the first item that fits nowhere no longer ends the batch: the short ones behind it fill the gaps
    assert plan_packed_batches([[20], [20], [5], [12]], 1, 32, 8) == [[0, 2], [1, 3]]
    assert plan_packed_batches([[20], [20], [5], [12]], 1, 32, 1) == [[0], [1], [2], [3]]
    assert plan_packed_batches([], 2, 32, 8) == [] and pack([], 2, 32, PAD)[1] == []
    with pytest.raises(UserError, match="a sequence of 40 tokens does not fit a packed row of 32"):
        plan_packed_batches([[4], [40]], 2, 32, 8)


def test_packed_pairs_share_row_and_segment():
    rng = np.random.default_rng(5)
    examples = [example(rng, 3, 2, 8), example(rng, 2, 6, 1), example(rng, 4, 4, 4)]
    batch, used = pack(examples, rows=2, length=14, pad_id=PAD)
    assert used == [0, 1, 2]
    for side, key in ((0, "chosen"), (1, "rejected")):
        segments = batch[f"{key}_segment_ids"]
        placed = {}
        for row in range(2):
            for segment in range(1, segments[row].max() + 1):
                tokens = batch[f"{key}_tokens"][row][segments[row] == segment]
                k = next(i for i, e in enumerate(examples)
                         if np.array_equal(tokens, np.concatenate([e.prompt, e.responses[side]])))
                placed[k] = (row, segment)
        if side == 0:
            chosen_places = placed
    assert placed == chosen_places and len(placed) == 3


def test_pack_refuses_unpaired_and_prompts():
    rng = np.random.default_rng(6)
    with pytest.raises(UserError, match="not unpaired feedback"):
        pack([example(rng, 2, 2, label=True)], 1, 8, PAD)
    with pytest.raises(UserError, match="not packed"):
        pack([example(rng, 2)], 1, 8, PAD)


def _sequence_logprobs(logits, tokens, loss_mask, segment_ids):
    """Σ log p(token_t | ...) over loss-masked t, per (row, segment): dict {(row, segment): float}."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    token_logp = np.asarray(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0])
    mask, segments = np.asarray(loss_mask)[:, 1:], np.asarray(segment_ids)[:, 1:]
    sums = {}
    for row in range(tokens.shape[0]):
        for segment in np.unique(segments[row][segments[row] > 0]):
            where = mask[row] & (segments[row] == segment)
            sums[(row, int(segment))] = float(np.where(where, token_logp[row], 0.0).sum())
    return sums


def test_packed_batch_gives_the_same_sequence_logprobs_as_unpacked():
    import functools

    from rlhf_jax.models import llama
    from rlhf_jax.models.config import tiny_config

    config = tiny_config("llama")
    # random weights filled from numpy into the params' shapes: no compiled init, same model
    weights = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(("norm" in jax.tree_util.keystr(path)) + weights.normal(0, 0.1, leaf.shape),
                                       leaf.dtype),
        llama.abstract_params(config))
    forward = jax.jit(functools.partial(llama.forward, config))
    rng = np.random.default_rng(7)
    examples = [example(rng, p, r) for p, r in ((5, 7), (3, 4), (8, 2), (2, 9), (6, 6), (4, 3))]
    packed, used = pack(examples, rows=6, length=32, pad_id=PAD)
    assert used == list(range(6)) and packed["segment_ids"].max() >= 3 and not packed["segment_ids"][2:].any()
    # the model derives the same positions from the segments (padding positions are unused)
    derived = llama.default_positions(jnp.asarray(packed["attention_mask"]), jnp.asarray(packed["segment_ids"]))
    real = packed["segment_ids"] > 0
    assert (np.asarray(derived)[real] == packed["positions"][real]).all()
    out = forward(params, jnp.asarray(packed["tokens"]), positions=jnp.asarray(packed["positions"]),
                  segment_ids=jnp.asarray(packed["segment_ids"]))
    packed_sums = _sequence_logprobs(out.logits, jnp.asarray(packed["tokens"]), packed["loss_mask"],
                                     packed["segment_ids"])

    padded = collate_sft(examples, 32, PAD)
    out = forward(params, jnp.asarray(padded["tokens"]), attention_mask=jnp.asarray(padded["attention_mask"]))
    unpacked = _sequence_logprobs(out.logits, jnp.asarray(padded["tokens"]), padded["loss_mask"],
                                  padded["attention_mask"].astype(np.int32))
    # match each packed segment to its example by its tokens
    for (row, segment), value in packed_sums.items():
        tokens = packed["tokens"][row][packed["segment_ids"][row] == segment]
        k = next(i for i, e in enumerate(examples)
                 if np.array_equal(tokens, np.concatenate([e.prompt, e.responses[0]])))
        np.testing.assert_allclose(value, unpacked[(k, 1)], rtol=1e-5, atol=1e-5)
    assert len(packed_sums) == 6 and all(v < 0 for v in packed_sums.values())


def test_micro_batches_and_layout():
    batch = {"tokens": np.arange(24).reshape(8, 3), "index": np.arange(8)}
    micro = split_micro_batches(batch, num_micro_batches=2, num_devices=2)
    assert micro["tokens"].shape == (2, 4, 3) and micro["index"].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert micro_batch_size(32, num_micro_batches=4, num_devices=4) == 2
    with pytest.raises(UserError, match="does not split into 3 micro-batches"):
        split_micro_batches(batch, num_micro_batches=3)
    with pytest.raises(UserError, match="use a multiple of 16"):
        micro_batch_size(24, num_micro_batches=2, num_devices=8)
