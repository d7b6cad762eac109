"""Length-sorted batches: texts -> token rows -> batches of similar length, longest first, padded.

The one place where encoding-time batching is decided, used by `dr encode` (per window, in DataLoader
workers: `WindowDataset`) and by `dr score` (bi-encoder teacher texts; cross-encoder teacher pairs,
tokenised as pairs and batched by `sort_and_batch`). Sorting by token length keeps padding small; longest
first makes a batch that does not fit in memory fail at once instead of at the end. Each batch carries the
positions of its rows in the input, so the caller puts results back in input order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from dr.io.corpus import TextCorpus
from dr.model.text import pad_rows, tokenize_unpadded

Batch = tuple[np.ndarray, dict[str, Any]]
"""(positions of the batch's rows in the input, padded tensors: input_ids, attention_mask, ...)."""


@dataclass
class BatchSettings:
    """How texts become batches (see `length_sorted_batches`)."""

    max_length: int  # tokens per text, after truncation (EOS included when appended)
    batch_size: int  # texts per batch
    window: int = 0  # rows per window (`WindowDataset` only; 0: not windowed)
    pad_multiple: int | None = 8  # batch width rounded up to a multiple of this (tensor cores)
    sort_by_length: bool = True  # False: batches in input order (benchmarks, comparisons)
    pad_to_max_length: bool = False  # every batch max_length wide (Tevatron v1 behaviour)
    append_eos: bool = False  # see dr.model.text.resolve_append_eos


def sort_and_batch(
    encoded: Mapping[str, Sequence[Sequence[int]]], tokenizer: Any, settings: BatchSettings
) -> list[Batch]:
    """Tokenised rows (a tokenizer's unpadded output: key -> one list per row) -> padded batches, longest
    first when ``settings.sort_by_length`` (stable: equal lengths keep input order)."""
    rows = [{key: encoded[key][i] for key in encoded} for i in range(len(encoded["input_ids"]))]
    order = np.arange(len(rows))
    if settings.sort_by_length:
        order = np.argsort([-len(r["input_ids"]) for r in rows], kind="stable")
    batches = []
    for b in range(0, len(order), settings.batch_size):
        positions = order[b : b + settings.batch_size]
        padded = pad_rows(
            [rows[i] for i in positions],
            tokenizer,
            settings.max_length,
            settings.pad_multiple,
            settings.pad_to_max_length,
        )
        batches.append((positions, padded))
    return batches


def length_sorted_batches(texts: Sequence[str], tokenizer: Any, settings: BatchSettings) -> list[Batch]:
    """Tokenise `texts` (truncation, EOS as `dr train` does: `dr.model.text`), then `sort_and_batch`."""
    if not texts:
        return []
    encoded = tokenize_unpadded(tokenizer, list(texts), settings.max_length, settings.append_eos)
    return sort_and_batch(encoded, tokenizer, settings)


class WindowDataset(TorchDataset):
    """Item w = window w of a row range: its ids and its length-sorted batches.

    Tokenizing, sorting and padding happen here, i.e. in DataLoader worker processes, off the encode loop;
    sorting inside a window (not the whole range) keeps memory bounded and output streaming in order.
    """

    def __init__(
        self, corpus: TextCorpus, start: int, stop: int, tokenizer: Any, settings: BatchSettings
    ) -> None:
        if settings.window < 1:
            raise ValueError(f"a window needs at least one row, got {settings.window}")
        self.corpus, self.start, self.stop = corpus, start, stop
        self.tokenizer, self.settings = tokenizer, settings

    def __len__(self) -> int:
        return math.ceil((self.stop - self.start) / self.settings.window)

    def __getitem__(self, w: int) -> tuple[list[str], list[Batch]]:
        a = self.start + w * self.settings.window
        ids, texts = self.corpus.records(a, min(a + self.settings.window, self.stop))
        return ids, length_sorted_batches(texts, self.tokenizer, self.settings)


def _no_collate(item: Any) -> Any:
    return item


def make_loader(
    corpus: TextCorpus, start: int, stop: int, tokenizer: Any, settings: BatchSettings, workers: int
) -> DataLoader:
    """Windows of rows [start, stop), prepared by `workers` processes (0: in this process)."""
    dataset = WindowDataset(corpus, start, stop, tokenizer, settings)
    extra = {"prefetch_factor": 2, "persistent_workers": False} if workers else {}
    return DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_no_collate, **extra
    )
