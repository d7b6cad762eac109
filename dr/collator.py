"""Tokenisation and padding of training groups (the only place training text becomes tensors)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TrainCollator:
    """Tokenise a list of (query, passages) items into padded query and passage batches."""

    tokenizer: Any
    q_max_len: int
    p_max_len: int
    pad_to_multiple_of: int | None = 8

    def _tokenize(self, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
        return dict(
            self.tokenizer(
                texts,
                max_length=max_len,
                truncation=True,
                padding=True,
                pad_to_multiple_of=self.pad_to_multiple_of,
                return_tensors="pt",
            )
        )

    def __call__(self, items: list[tuple[str, list[str]]]) -> dict[str, dict[str, torch.Tensor]]:
        queries = [query for query, _ in items]
        passages = [p for _, group in items for p in group]  # grouped per query, positive first
        return {
            "query": self._tokenize(queries, self.q_max_len),
            "passage": self._tokenize(passages, self.p_max_len),
        }
