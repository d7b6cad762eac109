"""Approximate search over a sharded faiss index (`dr.index.build`), merged exactly, optionally rescored.

1. The index folder's manifest is checked against the passage shards it was built from: a shard that
   changed (or is gone) is refused (`dr.index.manifest.StaleIndex`), before anything is searched.
2. Each rank searches its share of the shard indexes (`dr.search.shard_set.split_shards`), one at a time,
   memory-mapped (``faiss.IO_FLAG_MMAP``: the pages of the lists probed are read, not the whole index).
   IVF shards share one coarse quantizer (all are copies of one trained index), so the lists each query
   probes are found once per query batch and every shard only scans them (`CoarseAssignment`).
   Per shard, the top ``C`` hits follow dr's tie rule (`dr.ranking`), also at the cut-off: where a hit
   ties the C-th, the index is asked for more (`dr.ranking.search_past_ties`). ``C = depth``, or
   ``rescore * depth`` with ``--rescore``.
3. The per-shard lists are merged into one top ``C`` per query under the rule (the same on every layout of
   ranks), gathered on rank 0 and merged again.
4. ``--rescore K``: the float vectors of the candidates are read from the passage shards and scored
   exactly (float64 sums rounded to float32); the top ``depth`` are kept under the rule. A candidate found
   by the index thus gets its exact score, which exact search's float32 BLAS sums may miss in the last
   bit (docs/search.md: different blockings differ there too).

The index may return fewer than ``depth`` hits for a query (an IVF index probing too few lists, an HNSW
graph with a small efSearch): how many queries, and the fewest hits, are logged and recorded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from dr import distributed as D
from dr.index.build import group_rank
from dr.index.manifest import check_fresh, read_manifest
from dr.ranking import NO_KEY, docid_keys, search_past_ties, select_topk
from dr.search.shard_set import SearchError, id_column, split_shards

logger = logging.getLogger("dr.search")


@dataclass
class AnnResult:
    """A ranking (k = min(depth, passages) columns; short lists padded with -inf) and facts for the config."""

    scores: np.ndarray
    docids: list[list[str]]
    info: dict = field(default_factory=dict)


@dataclass
class Candidates:
    """Top hits per query: scores (-inf where empty), global passage rows (-1) and docids ("")."""

    scores: np.ndarray
    rows: np.ndarray
    docids: np.ndarray  # object (nq, width)

    @classmethod
    def empty(cls, nq: int) -> Candidates:
        return cls(
            np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64), np.zeros((nq, 0), dtype=object)
        )


def merge(parts: list[Candidates], k: int) -> Candidates:
    """The top `k` per query of several candidate lists, under the tie rule (docids meet within a row)."""
    scores = np.concatenate([p.scores for p in parts], axis=1)
    rows = np.concatenate([p.rows for p in parts], axis=1)
    docids = np.concatenate([p.docids for p in parts], axis=1)
    nq, width = scores.shape
    keys = docid_keys(docids.ravel().tolist()).reshape(nq, width) if width else np.zeros((nq, 0), np.int64)
    keys[rows < 0] = NO_KEY
    slots = np.broadcast_to(np.arange(width), (nq, width))
    top_scores, _, cols = select_topk(scores, keys, slots, min(k, width))
    return Candidates(top_scores, np.take_along_axis(rows, cols, 1), np.take_along_axis(docids, cols, 1))


Searcher = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


class CoarseAssignment:
    """Which inverted lists each query of a batch probes, found once and shared by every IVF shard.

    The shard indexes of a folder are copies of one trained index (the manifest's ``trained_sha256``), so
    their coarse quantizers are equal and a query probes the same lists in every shard. faiss's
    ``index.search`` would search the quantizer again for each shard: at 1M x 768 in 8 shards of IVF4096
    that was 0.17-0.19 s of each shard's ~0.2 s. Here the quantizer is searched once per batch and each
    shard runs ``search_preassigned`` with those lists and coarse distances (what ``index.search`` does
    inside, the assignment aside), so the hits are the same.

    Indexes that are not IVF (HNSW, flat) keep ``index.search``. An IVF behind vector transforms (OPQ,
    PCA) gets the transformed batch, also computed once.
    """

    def __init__(self, queries: np.ndarray):
        self.queries = queries
        self._batch: tuple | None = None  # (nprobe, transformed queries, coarse distances, list ids)

    def searcher(self, index) -> Searcher:
        """``search(queries, k) -> (scores, rows)`` for `index`, reusing the batch's assignment."""
        ivf, transforms = _ivf_behind(index)
        if ivf is None:
            return index.search

        def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            nprobe = min(ivf.nprobe, ivf.nlist)  # as faiss clamps it
            if queries is self.queries:  # the batch: assign once (search_past_ties passes subsets anew)
                if self._batch is None or self._batch[0] != nprobe:
                    self._batch = (nprobe, *_assign(ivf, transforms, queries, nprobe))
                _, x, coarse, lists = self._batch
            else:
                x, coarse, lists = _assign(ivf, transforms, queries, nprobe)
            return ivf.search_preassigned(x, k, lists, coarse)

        return search


def _ivf_behind(index) -> tuple[object | None, list]:
    """(the IVF index, the transforms applied before it) of `index`; (None, []) when it is not IVF."""
    import faiss

    transforms = []
    if isinstance(index, faiss.IndexPreTransform):
        transforms = [faiss.downcast_VectorTransform(index.chain.at(i)) for i in range(index.chain.size())]
        index = faiss.downcast_index(index.index)
    return (index, transforms) if isinstance(index, faiss.IndexIVF) else (None, [])


def _assign(ivf, transforms: list, queries: np.ndarray, nprobe: int) -> tuple[np.ndarray, ...]:
    """(queries after the transforms, coarse distances (nq, nprobe), list ids (nq, nprobe))."""
    x = queries
    for transform in transforms:
        x = transform.apply(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    coarse, lists = ivf.quantizer.search(x, nprobe)
    return x, coarse, lists


def search_one(
    index, keys, queries: np.ndarray, k: int, search: Searcher | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top `k` of one faiss index under the tie rule: (scores (nq, k) float32, rows (nq, k)); empty: -inf, -1.

    `keys`: tie keys of the index's rows (`docid_keys` of its docids), or a function from an array of
    rows to their keys (only the rows faiss returned need one: no sort of a whole shard's docids).
    `search`: how to search it (default ``index.search``; `CoarseAssignment.searcher` for shared lists).
    """
    k = min(k, index.ntotal)
    if k == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    scores, rows = search_past_ties(search or index.search, queries, k, index.ntotal)
    valid = rows >= 0
    scores = np.where(valid, scores, -np.inf).astype(np.float32)
    safe = np.where(valid, rows, 0)
    row_keys = np.where(valid, keys(safe) if callable(keys) else keys[safe], NO_KEY)
    scores, _, rows = select_topk(scores, row_keys, rows, k)
    return scores, rows


def search_index(index, docids: list[str], query_vecs: np.ndarray, depth: int, batch_size: int = -1):
    """Search one in-memory faiss index: (scores (nq, k), docid lists), in rule order (short lists cut)."""
    queries = np.ascontiguousarray(query_vecs, dtype=np.float32)
    keys = docid_keys(docids)
    step = len(queries) if batch_size <= 0 else batch_size
    out_scores, out_ids = [], []
    for start in range(0, len(queries), step):
        scores, rows = search_one(index, keys, queries[start : start + step], depth)
        out_scores.append(scores)
        out_ids.extend([docids[r] for r in row if r >= 0] for row in rows)
    k = min(depth, index.ntotal)
    return (np.concatenate(out_scores) if out_scores else np.zeros((0, k), np.float32)), out_ids


def open_shard_index(path: Path, params: str | None):
    """A shard's index, memory-mapped and read-only, with the search `params` (``nprobe=64``) applied."""
    import faiss

    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as err:
        raise SearchError(f"{path}: unreadable faiss index: {err}") from None
    if params:
        try:
            faiss.ParameterSpace().set_index_parameters(index, params)
        except RuntimeError as err:
            raise SearchError(f"--index_params {params!r}: {err}") from None
    return index


def _shard_candidates(
    folder: Path, shard: dict, offset: int, queries: np.ndarray, c: int, params, assignment: CoarseAssignment
) -> Candidates:
    """One shard's top `c` per query, its rows made global (`offset`: the shard's first row).

    Docids come from the passage shard's id column, memory-mapped (`check_fresh` has made sure it is the
    shard the index was built from), and only for the rows found: a search does not parse or sort a
    whole shard's docids.
    """
    index = open_shard_index(folder / shard["index"], params)
    ids = id_column(shard["path"])
    if len(ids) != index.ntotal:
        raise SearchError(
            f"{shard['path']}: {len(ids)} docids for {index.ntotal} vectors in {shard['index']}"
        )

    def docids_at(rows: np.ndarray) -> np.ndarray:
        return ids.take(pa.array(rows.ravel())).to_numpy(zero_copy_only=False).reshape(rows.shape)

    scores, rows = search_one(
        index,
        lambda rows: docid_keys(docids_at(rows).ravel()).reshape(rows.shape),
        queries,
        c,
        assignment.searcher(index),
    )
    del index
    found = (
        np.where(rows >= 0, docids_at(np.maximum(rows, 0)), "") if rows.size else np.zeros(rows.shape, object)
    )
    return Candidates(scores, np.where(rows >= 0, rows + offset, -1), found.astype(object))


def rescore(
    queries: np.ndarray, cand: Candidates, paths: list[str], counts: list[int], k: int, max_memory_bytes: int
) -> Candidates:
    """Exact scores of each query's candidates (float vectors read from the shards); the top `k` by the rule."""
    from dr.search.quantized import RowReader, exact_scores

    ids = pa.chunked_array([c for p in paths for c in id_column(p).chunks], type=pa.string())
    scores = exact_scores(queries, cand.rows, RowReader(paths, counts, ids), max_memory_bytes)
    return merge([Candidates(scores, cand.rows, cand.docids)], k)


def search_index_dir(
    folder: str,
    query_vecs: np.ndarray,
    depth: int,
    params: str | None = None,
    rescore_factor: int | None = None,
    max_memory_bytes: int = 2**30,
) -> AnnResult | None:
    """Search an index folder (collective under torchrun: ranks split its shards); rank 0 gets the result."""
    folder_path = Path(folder)
    manifest = read_manifest(folder_path)
    shards = manifest["shards"]
    check_fresh(shards)
    counts = [s["rows"] for s in shards]
    total = sum(counts)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    k = min(depth, total)
    c = min(depth * rescore_factor, total) if rescore_factor else k
    queries = np.ascontiguousarray(query_vecs, dtype=np.float32)
    rank, world = group_rank()
    mine = split_shards([s["path"] for s in shards], counts, world)[rank]
    t0 = time.perf_counter()
    error, part = None, Candidates.empty(len(queries))
    assignment = CoarseAssignment(queries)  # every shard is a copy of the one trained index
    try:
        for i in mine:
            found = _shard_candidates(folder_path, shards[i], int(offsets[i]), queries, c, params, assignment)
            part = merge([part, found], c)
    except (ValueError, OSError) as err:  # every rank must reach the agreement below
        error = err
    D.raise_if_any_failed(error)
    gathered = D.gather_to_main(part)
    if rank != 0:
        return None
    cand = merge(gathered, c) if len(gathered) > 1 else part
    timings = {"first_pass_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    if rescore_factor:
        cand = rescore(queries, cand, [s["path"] for s in shards], counts, k, max_memory_bytes)
        timings["rescore_s"] = time.perf_counter() - t0
    hits = (cand.rows[:, :k] >= 0).sum(axis=1)
    short = int((hits < k).sum())
    if short:
        logger.warning(
            "dr search: %d of %d queries got fewer than %d hits (fewest: %d) from the index; search more of "
            "it (--index_params nprobe=... / efSearch=...)",
            short,
            len(queries),
            k,
            int(hits.min()),
        )
    docids = [list(row[:n]) for row, n in zip(cand.docids[:, :k], hits)]
    info = {
        "index_dir": str(folder_path),
        "index_factory": manifest["factory"],
        "index_params": params,
        "rescore": rescore_factor,
        "candidates_per_query": c,
        "index_bytes": sum(s["index_bytes"] for s in shards),
        "queries_short_of_depth": short,
        "fewest_hits": int(hits.min()) if len(hits) else 0,
        "num_passages": total,
        "passage_shards": [{"path": s["path"], "count": s["rows"]} for s in shards],
        "timings": timings,
    }
    return AnnResult(cand.scores[:, :k], docids, info)
