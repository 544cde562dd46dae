"""Datasets tokenized once, and a seeded, resumable batch iterator over them.

    dataset = load_dataset(path, "preference", tokenizer, config=TokenizeConfig(max_length=512))
    batches = DataIterator(dataset, batch_size=32, seed=0, num_epochs=2)
    state = batches.get_state()        # a small dict of ints: store it in the checkpoint
    batches.set_state(state)           # resume: the next batch is the one that would have come next

The order of epoch e is a permutation drawn from ``(seed, e)``, so a position (epoch, index into that
order) names the next batch exactly; nothing is re-tokenized per epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rlhf_jax.data import batching
from rlhf_jax.data.records import KINDS, Record
from rlhf_jax.data.sources import read_records
from rlhf_jax.data.tokenize import Example, TokenizeConfig, end_of_turn_id, tokenize_records
from rlhf_jax.data.validation import Report
from rlhf_jax.errors import UserError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TokenizedDataset:
    """Tokenized examples of one ``kind`` with what batching needs: pad id, end-of-turn id, length limits."""

    kind: str
    examples: list[Example]
    pad_id: int
    end_id: int
    config: TokenizeConfig
    report: Report

    def __len__(self) -> int:
        return len(self.examples)

    def lengths(self) -> np.ndarray:
        """[N, S] sequence lengths (S = 1 prompt or response side, 2 for pairs: chosen, rejected)."""
        return np.asarray([[len(e.prompt) + len(r) for r in e.responses] or [len(e.prompt)] for e in self.examples],
                          np.int64)


def tokenize_dataset(records: Sequence[Record], kind: str, tokenizer, config: TokenizeConfig = TokenizeConfig(),
                     report: Report | None = None, strict: bool = False) -> TokenizedDataset:
    """Tokenize parsed ``records``; raises `UserError` if none survive, or under ``strict`` if any was bad."""
    if kind not in KINDS:
        raise UserError(f"unknown record type {kind!r}; expected one of {', '.join(KINDS)}")
    if report is None:
        report = Report(source="records", kind=kind, rows=len(records))
    examples = tokenize_records(records, tokenizer, config, report)
    report.check(strict)
    if report.problems or report.truncated:
        log.warning(report.summary())
    end_id = end_of_turn_id(tokenizer, config.chat_template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
    return TokenizedDataset(kind, examples, int(pad_id), end_id, config, report)


def load_dataset(path: str | Path, kind: str, tokenizer, *, format: str = "auto", split: str | None = None,
                 config: TokenizeConfig = TokenizeConfig(), strict: bool = False) -> TokenizedDataset:
    """Read, validate and tokenize ``path`` as ``kind`` records (see `rlhf_jax.data.records` for the fields)."""
    records, report = read_records(path, kind, format=format, split=split, check=False)
    return tokenize_dataset(records, kind, tokenizer, config, report, strict)


class DataIterator:
    """Batches of a `TokenizedDataset`: seeded shuffle per epoch, length buckets or packing, resumable.

    batch_size: rows of the global batch (packed: rows of ``pack_length`` tokens, each holding several
    sequences, planned for the whole epoch by `batching.plan_packed_batches` with ``pack_lookahead``;
    padding-free: examples, packed into as few rows as hold them). Each of ``process_count``
    processes gets its ``batch_size / process_count`` rows of the same global batch. Without packing the last
    incomplete batch of an epoch is dropped unless ``drop_remainder`` is False; batches never span two epochs.
    ``num_epochs=None`` repeats forever.

    padding_free (SFT data): each batch holds the same ``batch_size`` examples as without it, packed into the
    fewest rows of ``pack_length`` (`batching.pack_whole`), that count rounded up to a multiple of
    ``row_multiple`` and of ``process_count``: the same loss, without computing the padding. A batch has at most
    ``batch_size`` rows, so a run compiles at most ``batch_size / row_multiple`` row counts.
    """

    def __init__(self, dataset: TokenizedDataset, *, batch_size: int, seed: int = 0, num_epochs: int | None = 1,
                 shuffle: bool = True, pack: bool = False, pack_length: int | None = None,
                 buckets: Sequence[int] | None = None, loss_on_prompt: bool = False, drop_remainder: bool = True,
                 process_index: int = 0, process_count: int = 1, padding_free: bool = False, row_multiple: int = 1,
                 pack_lookahead: int = 256):
        if batch_size < 1 or batch_size % process_count or not 0 <= process_index < process_count:
            raise UserError(f"batch_size {batch_size} must be a positive multiple of process_count {process_count}")
        if process_count > 1 and not drop_remainder:
            raise UserError("several processes need equal batches: keep drop_remainder=True")
        if pack and dataset.kind not in ("sft", "preference"):
            raise UserError(f"packing is for sft and preference data, not {dataset.kind}")
        if padding_free and (pack or dataset.kind != "sft"):
            raise UserError(f"padding-free batches are for sft data without packing, not {dataset.kind} data"
                            + (" with packing" if pack else ""))
        if padding_free and (row_multiple < 1 or batch_size % math.lcm(row_multiple, process_count)):
            raise UserError(f"padding-free batches of {batch_size} examples cannot have a row count that is a "
                            f"multiple of {row_multiple} and of {process_count} processes")
        if not pack and drop_remainder and len(dataset) < batch_size:
            raise UserError(f"{dataset.report.source}: {len(dataset)} examples cannot fill one batch of {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.num_epochs = num_epochs
        self.shuffle = shuffle
        self.pack = pack
        if pack and pack_lookahead < batch_size:  # a packed batch holds only sequences from its window
            raise UserError(f"pack_lookahead must be at least the batch's {batch_size} rows, got {pack_lookahead}")
        self.pack_lookahead = pack_lookahead
        self.padding_free = padding_free
        self.row_multiple = math.lcm(row_multiple, process_count)
        self.pack_length = pack_length or dataset.config.max_length
        max_length = dataset.config.max_length if dataset.kind != "prompt" else dataset.config.max_prompt_length
        self.buckets = tuple(buckets) if buckets else batching.default_buckets(max_length)
        if max(self.buckets) < max_length or self.pack_length < dataset.config.max_length:
            raise UserError(f"the largest bucket / packing length must hold max_length={max_length} tokens")
        self.loss_on_prompt = loss_on_prompt
        self.drop_remainder = drop_remainder
        self.process_index, self.process_count = process_index, process_count
        self._lengths = dataset.lengths()
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, np.zeros(0, np.int64)
        self._plans: dict[int, tuple[list[list[int]], dict[int, int]]] = {}

    @property
    def steps_per_epoch(self) -> int | None:
        """Batches per epoch (None when packing: each epoch's order packs into its own count, `num_batches`)."""
        if self.pack:
            return None
        full, rest = divmod(len(self.dataset), self.batch_size)
        return full + (rest > 0 and not self.drop_remainder)

    def num_batches(self) -> int | None:
        """Batches in all ``num_epochs`` epochs (None when it repeats forever); packed: each epoch's plan counted."""
        if self.num_epochs is None:
            return None
        if not self.pack:
            return self.steps_per_epoch * self.num_epochs
        return sum(len(self._epoch_plan(epoch)[0]) for epoch in range(self.num_epochs))

    def get_state(self) -> dict[str, int]:
        """The position of the next batch (plain ints, for the checkpoint)."""
        state = {"seed": self.seed, "epoch": self.epoch, "position": self.position, "size": len(self.dataset),
                 "batch_size": self.batch_size}
        return {**state, "pack_lookahead": self.pack_lookahead} if self.pack else state

    def set_state(self, state: dict) -> None:
        """Continue from a `get_state` result; the dataset and batching must be the ones it was saved with."""
        for key, mine in (("seed", self.seed), ("size", len(self.dataset)), ("batch_size", self.batch_size)):
            if int(state[key]) != mine:
                raise UserError(f"data iterator state was saved with {key}={state[key]}, but this iterator has "
                                f"{key}={mine}; resume with the same data and settings")
        saved = state.get("pack_lookahead")
        if self.pack and saved != self.pack_lookahead:
            how = " (without packing, or by a version that ended a packed batch at the first sequence that did not fit)"
            raise UserError(f"data iterator state was saved with pack_lookahead={saved}{how if saved is None else ''}, "
                            f"but this iterator packs with pack_lookahead={self.pack_lookahead}; resume with the same "
                            "settings")
        epoch, position = int(state["epoch"]), int(state["position"])
        if self.pack and position < len(self.dataset) and position not in self._epoch_plan(epoch)[1]:
            raise UserError(f"data iterator state position={position} is not where a packed batch of epoch {epoch} "
                            "starts; resume with the same data and settings")
        self.epoch, self.position = epoch, position

    def __iter__(self):
        return self

    def _epoch_order(self, epoch: int | None = None) -> np.ndarray:
        epoch = self.epoch if epoch is None else epoch
        if self._order_epoch != epoch:
            n = len(self.dataset)
            self._order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                           else np.arange(n))
            self._order_epoch = epoch
        return self._order

    def _epoch_plan(self, epoch: int) -> tuple[list[list[int]], dict[int, int]]:
        """(epoch ``epoch``'s packed batches as dataset indices, {examples before a batch: that batch's number})."""
        if epoch not in self._plans:
            order = self._epoch_order(epoch)
            plan = batching.plan_packed_batches(self._lengths[order], self.batch_size, self.pack_length,
                                                self.pack_lookahead)
            batches = [order[batch].tolist() for batch in plan]
            starts = np.cumsum([0] + [len(batch) for batch in batches[:-1]]).tolist()
            self._plans = {e: p for e, p in self._plans.items() if e >= self.epoch}  # the past is not revisited
            self._plans[epoch] = batches, dict(zip(starts, range(len(batches))))
        return self._plans[epoch]

    def __next__(self) -> dict[str, np.ndarray]:
        n = len(self.dataset)
        while self.num_epochs is None or self.epoch < self.num_epochs:
            remaining = n - self.position
            if remaining > 0 and (self.pack or remaining >= self.batch_size or not self.drop_remainder):
                return self._packed() if self.pack else self._padded(self._epoch_order())
            self.epoch, self.position = self.epoch + 1, 0
        raise StopIteration

    def _local_rows(self, rows: int) -> slice:
        size = rows // self.process_count
        return slice(self.process_index * size, (self.process_index + 1) * size)

    def _padded(self, order: np.ndarray) -> dict[str, np.ndarray]:
        indices = order[self.position:self.position + self.batch_size]
        self.position += len(indices)
        # every process pads to the length of the whole global batch, so the shapes agree
        length = batching.bucket_length(int(self._lengths[indices].max()), self.buckets)
        local = indices[self._local_rows(len(indices))]
        examples = [self.dataset.examples[i] for i in local]
        pad_id = self.dataset.pad_id
        if self.padding_free:  # every process packs the whole global batch alike, then takes its rows
            whole = batching.pack_whole([self.dataset.examples[i] for i in indices], self.pack_length, pad_id,
                                        self.row_multiple, self.loss_on_prompt)
            rows = self._local_rows(len(whole["tokens"]))
            return {key: value[rows] for key, value in whole.items()}
        if self.dataset.kind == "preference":
            return batching.collate_preference(examples, length, pad_id, local)
        if self.dataset.kind == "prompt":
            return batching.collate_prompts(examples, length, pad_id, local)
        return batching.collate_sft(examples, length, pad_id, local, self.loss_on_prompt)

    def _packed(self) -> dict[str, np.ndarray]:
        batches, starts = self._epoch_plan(self.epoch)
        examples = [self.dataset.examples[i] for i in batches[starts[self.position]]]
        batch, used = batching.pack(examples, self.batch_size, self.pack_length, self.dataset.pad_id,
                                    self.loss_on_prompt)
        assert len(used) == len(examples)  # first fit in the plan's order places them where the plan did
        self.position += len(examples)
        rows = self._local_rows(self.batch_size)
        return {key: value[rows] for key, value in batch.items()}
