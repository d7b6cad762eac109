"""Training groups -> tensors: tokens (through `dr.model.text`, as `dr encode` does) + docid keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dr.io.keys import stable_hash64
from dr.model.text import tokenize
from dr.train.groups import TrainItem

NO_ID = -1  # padding in `positive_keys`; never produced by `id_key`


def id_key(docid: str) -> int:
    """A stable non-negative 63-bit integer for a docid (Python's hash() differs between processes)."""
    return stable_hash64(docid) >> 1


@dataclass
class TrainCollator:
    """Tokenise TrainItems into padded query and passage batches, plus integer docid keys.

    Output: {"query": tokens (B, Lq), "passage": tokens (B*n, Lp) grouped per query, positive first,
    "passage_keys": (B*n,) int64, "positive_keys": (B, P) int64 padded with -1}; with `teacher_scores`
    also "teacher_scores": (B, n) float32, each row in the order of the group's passages (positive first).
    """

    tokenizer: Any
    q_max_len: int
    p_max_len: int
    pad_to_multiple_of: int | None = 8
    append_eos: bool = False  # see dr.model.text.resolve_append_eos
    teacher_scores: bool = False  # emit the items' teacher scores (a distillation loss is configured)

    def _tokenize(self, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
        return tokenize(self.tokenizer, texts, max_len, self.append_eos, self.pad_to_multiple_of)

    def __call__(self, items: list[TrainItem]) -> dict[str, Any]:
        queries = [item.query for item in items]
        passages = [p for item in items for p in item.passages]
        width = max(len(item.positive_ids) for item in items)
        positive_keys = torch.full((len(items), width), NO_ID, dtype=torch.long)
        for row, item in enumerate(items):
            positive_keys[row, : len(item.positive_ids)] = torch.tensor(
                [id_key(d) for d in item.positive_ids]
            )
        batch = {
            "query": self._tokenize(queries, self.q_max_len),
            "passage": self._tokenize(passages, self.p_max_len),
            "passage_keys": torch.tensor(
                [id_key(d) for item in items for d in item.passage_ids], dtype=torch.long
            ),
            "positive_keys": positive_keys,
        }
        if self.teacher_scores:
            batch["teacher_scores"] = teacher_scores_tensor(items)
        return batch


def teacher_scores_tensor(items: list[TrainItem]) -> torch.Tensor:
    """(B, n) float32 teacher scores of the batch's groups, aligned with their passages (distillation)."""
    if any(item.teacher_scores is None for item in items):
        raise ValueError("a training group has no teacher scores (validation should have caught it)")
    return torch.tensor([item.teacher_scores for item in items], dtype=torch.float32)
