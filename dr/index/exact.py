"""Exact inner-product top-k over passage shards, in bounded memory, with an exact merge.

Passage shards are memory-mapped and read in blocks of at most ``max_memory_bytes`` of float32 vectors.
Each block is searched with ``faiss.knn`` (inner product) for its top ``depth + 1`` hits, and the block
results are merged into a running top ``depth`` per query. The final ranking is therefore the same as a
brute force over the concatenated corpus, whatever the number of shards, blocks or ranks.

Ties are resolved deterministically, everywhere, by score descending and then docid ascending
(string order), including at the depth cut-off:

* the merge across blocks, shards and ranks sorts on the pair (-score, docid), so no tied candidate is
  dropped arbitrarily;
* inside a block faiss may drop any one of several hits tied at its k-th score. The extra (k+1)-th hit
  shows when that can happen (k-th score == (k+1)-th score); for those queries only, the block is
  rescored with numpy (float32) and the exact top k under (-score, docid) is taken. With real float
  vectors exact ties are rare and this costs nothing; with duplicated passages it costs a matrix-vector
  product per affected (query, block).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dr import distributed as D
from dr.errors import UsageError
from dr.index.shard_set import id_column
from dr.index.shards import iter_shard

_NO_KEY = np.iinfo(np.int64).max  # sort key of an empty result slot: after every real hit


class BlockScorer:
    """Top-k inner products of a query batch against one block of passages, on the chosen device.

    Backends: ``cpu`` (faiss.knn), ``faiss-gpu`` (a GpuIndexFlatIP per block, fp16 storage optional),
    ``torch-cuda`` (matmul + topk, for machines with CUDA but a CPU-only faiss).
    """

    def __init__(self, backend: str = "cpu", fp16: bool = False) -> None:
        self.backend = backend
        self.fp16 = fp16
        if backend == "faiss-gpu":
            import faiss

            self._resources = faiss.StandardGpuResources()
        if backend == "torch-cuda":
            self._device = D.default_device()

    def topk(self, queries: np.ndarray, block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 (nq, k), block row indices int64 (nq, k)), best first; requires k <= len(block)."""
        import faiss

        if self.backend == "cpu":
            return faiss.knn(queries, block, k, metric=faiss.METRIC_INNER_PRODUCT)
        if self.backend == "faiss-gpu":
            config = faiss.GpuIndexFlatConfig()
            config.useFloat16 = self.fp16
            config.device = D.get_local_rank() % faiss.get_num_gpus()
            index = faiss.GpuIndexFlatIP(self._resources, block.shape[1], config)
            index.add(block)
            return index.search(queries, k)
        import torch

        dtype = torch.float16 if self.fp16 else torch.float32
        q = torch.from_numpy(queries).to(self._device, dtype)
        b = torch.from_numpy(np.ascontiguousarray(block)).to(self._device, dtype)
        scores, idx = torch.topk(q @ b.T, k, dim=1)
        return scores.float().cpu().numpy(), idx.cpu().numpy().astype(np.int64)


def select_topk(scores: np.ndarray, keys: np.ndarray, values: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """Per row, the first `k` columns under the order (score desc, key asc); returns (scores, keys, values)."""
    order = np.lexsort((keys, -scores), axis=1)[:, :k]
    return tuple(np.take_along_axis(a, order, axis=1) for a in (scores, keys, values))


def _exact_block_row(
    query: np.ndarray, block: np.ndarray, ranks: np.ndarray, k: int
) -> tuple[np.ndarray, ...]:
    """Exact top k of one query over one block under (score desc, docid rank asc), scored by numpy."""
    scores = block @ query
    threshold = np.partition(scores, len(scores) - k)[len(scores) - k]
    cand = np.flatnonzero(scores >= threshold)
    order = np.lexsort((ranks[cand], -scores[cand]))[:k]
    return scores[cand[order]], cand[order]


class TopK:
    """Running exact top-k per query, merged block by block under (score desc, docid asc)."""

    def __init__(self, nq: int, k: int) -> None:
        self.k = k
        self.scores = np.full((nq, k), -np.inf, dtype=np.float32)
        self.keys = np.full((nq, k), _NO_KEY, dtype=np.int64)  # docid sort rank: the tie-break
        self.rows = np.full((nq, k), -1, dtype=np.int64)  # global row in the searched shard list

    def add_block(
        self, queries: np.ndarray, block: np.ndarray, offset: int, ranks: np.ndarray, scorer: BlockScorer
    ):
        """Search `block` (global rows offset..offset+len) and merge; `ranks` are its rows' docid ranks."""
        n = len(block)
        kk = min(self.k + 1, n)
        scores, idx = scorer.topk(queries, block, kk)
        scores, idx = np.array(scores, dtype=np.float32), np.array(idx, dtype=np.int64)
        if kk > self.k:
            # faiss drops an arbitrary one of several hits tied at its k-th score: rescore those queries.
            for q in np.flatnonzero(scores[:, self.k - 1] == scores[:, self.k]):
                scores[q, : self.k], idx[q, : self.k] = _exact_block_row(queries[q], block, ranks, self.k)
            scores, idx = scores[:, : self.k], idx[:, : self.k]
        valid = idx >= 0
        keys = np.where(valid, ranks[np.where(valid, idx, 0)], _NO_KEY)
        rows = np.where(valid, idx + offset, -1)
        scores = np.where(valid, scores, -np.inf).astype(np.float32)
        self.scores, self.keys, self.rows = select_topk(
            np.concatenate([self.scores, scores], axis=1),
            np.concatenate([self.keys, keys], axis=1),
            np.concatenate([self.rows, rows], axis=1),
            self.k,
        )


def docid_ranks(ids: pa.ChunkedArray) -> np.ndarray:
    """Position of every docid in ascending string order: an int64 tie-break key per row."""
    ranks = np.empty(len(ids), dtype=np.int64)
    if len(ids):
        order = pc.sort_indices(ids).to_numpy()
        ranks[order] = np.arange(len(ids), dtype=np.int64)
    return ranks


def _block_rows(dim: int, max_memory_bytes: int) -> int:
    return max(1, max_memory_bytes // (dim * 4))


def search_shards(
    query_vecs: np.ndarray,
    shard_paths: list[str],
    depth: int,
    max_memory_bytes: int = 2**30,
    batch_size: int = -1,
    backend: str = "cpu",
    fp16: bool = False,
    progress: bool = False,
) -> tuple[np.ndarray, list[list[str]]]:
    """Exact top-`depth` inner-product search of `query_vecs` over passage shards.

    Shard metadata is assumed validated (`read_metas`, `check_unique_docids`). At most `max_memory_bytes`
    of float32 passage vectors are resident at once; each query batch streams over all shards.

    Returns:
        (scores float32 (nq, k), docids: nq lists of k docids), k = min(depth, rows in the shards), each
        row sorted by score descending then docid ascending.
    """
    from tqdm import tqdm

    if depth < 1:
        raise UsageError(f"depth must be >= 1, got {depth}")
    query_vecs = np.ascontiguousarray(query_vecs, dtype=np.float32)
    nq, dim = query_vecs.shape
    ids = pa.chunked_array([c for p in shard_paths for c in id_column(p).chunks], type=pa.string())
    k = min(depth, len(ids))
    if k == 0:
        return np.zeros((nq, 0), dtype=np.float32), [[] for _ in range(nq)]
    ranks = docid_ranks(ids)
    scorer = BlockScorer(backend, fp16)
    step = nq if batch_size is None or batch_size <= 0 else batch_size
    max_rows = _block_rows(dim, max_memory_bytes)
    out_scores = np.empty((nq, k), dtype=np.float32)
    out_rows = np.empty((nq, k), dtype=np.int64)
    bar = tqdm(total=nq * len(ids), unit="score", unit_scale=True, desc="dr search", disable=not progress)
    for start in range(0, nq, step):
        queries = query_vecs[start : start + step]
        top = TopK(len(queries), k)
        offset = 0
        for path in shard_paths:
            for _, vectors in iter_shard(path, max_rows=max_rows):
                block = np.ascontiguousarray(vectors, dtype=np.float32)
                top.add_block(queries, block, offset, ranks[offset : offset + len(block)], scorer)
                offset += len(block)
                bar.update(len(queries) * len(block))
        out_scores[start : start + step], out_rows[start : start + step] = top.scores, top.rows
    bar.close()
    docids = ids.take(pa.array(out_rows.ravel())).to_pylist()
    return out_scores, [docids[i * k : (i + 1) * k] for i in range(nq)]


def merge_candidates(
    parts: list[tuple[np.ndarray, list[list[str]]]], depth: int
) -> tuple[np.ndarray, list[list[str]]]:
    """Merge per-rank top-k lists exactly into one top-`depth` per query, under (score desc, docid asc)."""
    nq = len(parts[0][1])
    width = sum(scores.shape[1] for scores, _ in parts)
    scores = np.full((nq, width), -np.inf, dtype=np.float32)
    docids = np.full((nq, width), "", dtype=object)
    col = 0
    for part_scores, part_ids in parts:
        w = part_scores.shape[1]
        scores[:, col : col + w] = part_scores
        docids[:, col : col + w] = np.array(part_ids, dtype=object).reshape(nq, w)
        col += w
    k = min(depth, width)
    _, inverse = np.unique(docids.ravel().astype(str), return_inverse=True)
    slots = np.broadcast_to(np.arange(width), (nq, width))
    top_scores, _, top_cols = select_topk(scores, inverse.reshape(nq, width).astype(np.int64), slots, k)
    merged = np.take_along_axis(docids, top_cols, axis=1)
    return top_scores, [list(row) for row in merged]
