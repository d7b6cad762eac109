"""Top-k BM25 hits per query under dr's one tie rule, over a `dr.bm25.index.Bm25Index`.

bm25s' own ``retrieve`` cuts each query's scores with ``argpartition``, which keeps an arbitrary one of
several documents tied at the k-th place, and it returns k hits even when fewer documents share a term
with the query (padding with score 0). Here each query's scores over the whole corpus are computed by
bm25s (``get_scores_from_ids``, what ``retrieve`` computes too), and the cut is dr's: only documents that
share a term with the query (score > 0, as Lucene / pyserini return them), every document tied with the
k-th kept until the tie rule (`dr.ranking`: score descending, then docid descending) has ordered them.
Queries run in a thread pool (numpy releases the GIL in the sparse sums).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dr.bm25.index import Bm25Index, Bm25Settings
from dr.ranking import docid_keys, order


def top_rows(scores: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """Rows of the best `k` positive `scores` in rule order (`keys`: `docid_keys` of the rows' docids)."""
    rows = np.flatnonzero(scores > 0)
    if len(rows) > k:
        kept = scores[rows]
        kth = np.partition(kept, len(kept) - k)[len(kept) - k]  # the k-th largest score
        rows = rows[kept >= kth]  # every row tied with it stays until the rule has ordered them
    return rows[order(scores[rows], keys[rows])][:k]


def search(
    index: Bm25Index, queries: list[str], settings: Bm25Settings, depth: int, threads: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query (in order): (rows, scores) of its top `depth` hits, best first; empty when no word of the
    query is in the index. `threads` 0 = one per CPU core."""
    retriever = index.retriever
    keys = docid_keys(index.docids)
    tokens = settings.tokenize(queries, as_ids=False)

    def one(words: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = retriever.get_tokens_ids(words)
        if not ids:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        scores = retriever.get_scores_from_ids(ids)
        rows = top_rows(scores, keys, depth)
        return rows, scores[rows]

    workers = threads or os.cpu_count() or 1
    if workers == 1:
        return [one(words) for words in tokens]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, tokens))
