"""The one tie rule of dr: how hits are ordered, everywhere a ranking is made, written or read.

**The rule.** Hits are ordered by score descending, then by docid *descending* among exactly equal
scores. Docids compare as strings, by the bytes of their UTF-8 encoding (the same order as Python's
``str`` comparison, Arrow's string sort and C's ``strcmp``); an id that looks like a number is still a
string, so of ``"9"`` and ``"10"`` tied, ``"9"`` ranks first. Shards store ids as strings only
(`dr.io.shards`), so no integer order ever enters.

**Why descending.** trec_eval re-sorts each query of a run by score descending and breaks ties by docno in
decreasing ``strcmp`` order; pytrec_eval and ir_measures wrap it, so published numbers use that order
whatever order a TREC file lists. Ranking with the same rule everywhere makes a run's formats agree: a
Tevatron or TREC file re-sorted by trec_eval, and an MS MARCO file (ranks only, no scores) written in this
order, evaluate to the same numbers in `dr eval`, trec_eval and the official MS MARCO script
(tests/test_ranking.py checks it against pytrec_eval).

Users of the rule (each calls this module, none re-implements it): exact, quantized and ANN search (the
cut-off at ``depth`` and the merges across blocks, shards and ranks), run files (`dr.io.runs`: reading,
writing, `dr convert`) and `dr eval` (`dr.eval.metrics`). New commands that rank (fuse, rerank) should use
`sort_hits` / `top_hits` for (docid, score) lists, and `docid_keys` + `select_topk` / `grouped_order` for
arrays; `search_past_ties` wraps a faiss-style top-k search so that no hit tied at its cut-off is lost.

**Two forms.** Pure Python: `hit_key` orders (docid, score) pairs, larger is better. numpy: docids become
int64 *tie keys* (`docid_keys`: 0 for the docid that wins every tie), and arrays are ordered by
(score descending, key ascending); a key is only a stand-in for the docid, so keys of one ranking must
come from one `docid_keys` call over every docid that can meet in it.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

import numpy as np

Hit = tuple[str, float]  # (docid, score)

NO_KEY = np.iinfo(np.int64).max  # tie key of an empty result slot: after every real hit


# ------------------------------------------------------------------------------------------ pure Python


def hit_key(hit: Hit) -> tuple[float, str]:
    """Sort key of a (docid, score) hit under the rule: larger is better (sort with ``reverse=True``)."""
    return hit[1], hit[0]


def sort_hits(hits: Iterable[Hit]) -> list[Hit]:
    """`hits` best first: score descending, then docid descending (strings, UTF-8 byte order)."""
    return sorted(hits, key=hit_key, reverse=True)


def top_hits(hits: Iterable[Hit], k: int) -> list[Hit]:
    """The first `k` of ``sort_hits(hits)``, without sorting them all (a heap of k)."""
    return heapq.nlargest(k, hits, key=hit_key)


# ------------------------------------------------------------------------------------------------ numpy


def docid_keys(ids) -> np.ndarray:
    """int64 tie key of every docid: its position in the rule's docid order (descending strings).

    `ids`: a sequence of str, or a pyarrow string / large_string (chunked) array. Key 0 is the docid that
    wins every tie; equal docids (which dr refuses elsewhere) get distinct keys in input order.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if not isinstance(ids, (pa.Array, pa.ChunkedArray)):
        ids = pa.array(list(ids), type=pa.string())
    keys = np.empty(len(ids), dtype=np.int64)
    if len(ids):
        order = pc.sort_indices(ids, sort_keys=[("", "descending")]).to_numpy()  # byte-wise, stable
        keys[order] = np.arange(len(ids), dtype=np.int64)
    return keys


def order(scores: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Indices that put 1-D `scores` (with their tie `keys`) in rule order, best first."""
    return np.lexsort((keys, -scores))


def select_topk(
    scores: np.ndarray, keys: np.ndarray, values: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of (n, m) arrays, the first `k` columns in rule order: (scores, keys, values), best first.

    Unfilled slots should hold (-inf, `NO_KEY`) so they sort after every real hit.
    """
    idx = np.lexsort((keys, -scores), axis=1)[:, :k]
    return tuple(np.take_along_axis(a, idx, axis=1) for a in (scores, keys, values))


def grouped_order(groups: np.ndarray, scores: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Indices that sort flat hits by group (e.g. query) ascending, then in rule order within a group."""
    return np.lexsort((keys, -scores, groups))


def search_past_ties(
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], queries: np.ndarray, k: int, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top `k` of a searcher that keeps an arbitrary one of several hits tied at its last place, widened
    until every hit tied with the k-th is in, so `select_topk` can then cut under the rule.

    `search(queries, width)` returns (scores (m, width), rows (m, width)) best first, rows -1 for empty
    slots (faiss's ``index.search``, ``faiss.knn``); `n` is how many rows it searches. Asking for k+1 shows
    when a tie can hide a hit (last score == k-th score); those queries are searched again with twice the
    width until the last hit scores below the k-th or all `n` rows are returned. Returns (scores, rows) of
    at least min(k, n) columns (empty slots: -inf, -1).
    """
    width = min(k + 1, n)
    scores, rows = search(queries, width)
    scores, rows = np.asarray(scores), np.asarray(rows).astype(np.int64)
    tied = _tied_past(scores, rows, k, n)
    while tied.any():
        width = min(2 * width, n)
        more_scores, more_rows = search(np.ascontiguousarray(queries[tied]), width)
        pad = width - scores.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        scores[tied], rows[tied] = more_scores, more_rows
        tied[tied] = _tied_past(np.asarray(more_scores), np.asarray(more_rows), k, n)
    return scores, rows


def _tied_past(scores: np.ndarray, rows: np.ndarray, k: int, n: int) -> np.ndarray:
    """Per query: fewer than `n` hits came back and the last one ties the k-th (a tied hit may be missing)."""
    width = scores.shape[1]
    if width <= k or width >= n:
        return np.zeros(len(scores), dtype=bool)
    return (rows[:, -1] >= 0) & (scores[:, -1] == scores[:, k - 1])
