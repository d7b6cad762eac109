"""Exact inner-product top-k over passage shards, in bounded memory, with an exact merge.

Passage shards are memory-mapped and read in blocks of at most ``max_memory_bytes`` (counted as float32
vectors). Each block's exact top ``depth`` hits are merged into a running top ``depth`` per query. The
final ranking is therefore the same as a brute force over the concatenated corpus, whatever the number
of shards, blocks or ranks.

Ties follow dr's one rule (`dr.ranking`: score descending, then docid descending as strings), including
at the depth cut-off. Docids enter as int64 tie keys (`dr.ranking.docid_keys`, one sort of the corpus's
id column); only hits tied at a cut-off ever need them:

* the merge across blocks, shards and ranks orders on (score, tie key) (`dr.ranking.select_topk`,
  `dr.ranking.grouped_order`), so no tied candidate is dropped arbitrarily;
* the default CPU scorer (``cpu``: numpy's BLAS matmul, `BlockScorer.hits`) keeps every hit scoring at
  least the running k-th score, ties included, and `TopK` selects under the rule itself;
* the other backends (``faiss-cpu``, ``faiss-gpu``, ``torch-cuda``) may drop any one of several hits
  tied at their k-th score. They are asked for k+1 hits, which shows when that can happen (k-th score ==
  (k+1)-th score); for those queries only, the block is rescored with numpy (float32) and the exact top k
  under the rule is taken.

Vectors must be finite. Queries are checked when they are loaded; a passage tile through its first row
of scores: a NaN or inf anywhere in a passage makes each of its scores NaN or inf, so checking one score
per passage costs 1/dim of an `isfinite` pass over the tile. A NaN or inf stops the search with the
file, row and id (`NonFiniteVector`); so does a float32 passage so large that its scores overflow.

Why numpy for the CPU: ``faiss.knn`` ran at ~15 % of the machine's float32 GEMM rate (its wheel bundles
an older OpenBLAS, and its top-k is serial), numpy's matmul + a threshold selection runs close to it.
The block is converted to float32 tile by tile (a few MB, reused), so no block-sized copy is made.
"""

from __future__ import annotations

import itertools
import os
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from dr import distributed as D
from dr.errors import UsageError
from dr.io.shards import iter_shard
from dr.ranking import NO_KEY, docid_keys, grouped_order, order, select_topk
from dr.search.shard_set import id_column, non_finite_error

_TILE_BYTES = 8 << 20  # float32 passage tile converted and scored at once (reused buffer)
_SCORE_BYTES = 32 << 20  # bound on one (queries x tile) float32 score matrix
# float16 elements from which torch's cast pays for importing torch (`BlockScorer._convert`): measured on
# an AVX-512 Xeon, numpy casts ~1.4 s per G elements, torch ~0.33 s per G after a ~1 s import: even at ~1 G
_TORCH_CAST_AFTER = 1 << 30
BACKENDS = ("cpu", "faiss-cpu", "faiss-gpu", "torch-cuda")


class NonFiniteRow(Exception):
    """Raised by the scorers: row `row` of the block being scored holds NaN or inf (`search_shards` names
    the file, row and id)."""

    def __init__(self, row: int) -> None:
        super().__init__(row)
        self.row = row


def _threads() -> int:
    """Threads for the tile conversion: as many as BLAS may use (OPENBLAS/OMP_NUM_THREADS, else CPUs).

    torchrun sets OMP_NUM_THREADS=1 per rank, so ranks sharing a machine do not oversubscribe it.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return min(cpus, int(value))
    return max(1, cpus)


class BlockScorer:
    """Top-k inner products of a query batch against one block of passages, on the chosen device.

    Backends: ``cpu`` (default: numpy matmul over float32 tiles + exact threshold selection, `hits`), ``faiss-cpu`` (faiss.knn, kept for comparison), ``faiss-gpu`` (a GpuIndexFlatIP per
    block, fp16 storage optional), ``torch-cuda`` (matmul + topk, for machines with CUDA but a CPU-only
    faiss). Only ``cpu`` takes a block in its stored dtype; the others need a float32 block (`topk`).
    """

    def __init__(self, backend: str = "cpu", fp16: bool = False, planned_elements: int = 0) -> None:
        """`planned_elements`: how many passage elements the caller will score (rows x dim x query passes),
        when it knows; a float16 search at least `_TORCH_CAST_AFTER` large is cast by torch from its first
        tile, any other once the elements cast so far reach that count."""
        if backend not in BACKENDS:
            raise UsageError(f"search backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.backend = backend
        self.fp16 = fp16
        self.exact = backend == "cpu"  # hits (any float dtype, exact) rather than topk (float32, k+1 check)
        self._pool: ThreadPoolExecutor | None = None
        self._buffers: dict[str, np.ndarray] = {}
        # float16 tiles: cast by torch once set (None: decided by `_use_torch_cast`; False: numpy only)
        self.torch_cast: bool | None = None
        self._planned_elements = planned_elements
        self._cast_elements = 0
        if backend == "faiss-gpu":
            import faiss

            self._resources = faiss.StandardGpuResources()
        if backend == "torch-cuda":
            self._device = D.default_device()

    def topk(self, queries: np.ndarray, block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 (nq, k), block row indices int64 (nq, k)), best first; requires k <= len(block).

        Any one of several hits tied at the k-th score may be returned (see `TopK.add_block`).
        """
        if self.backend in ("cpu", "faiss-cpu"):
            import faiss

            return faiss.knn(queries, block, k, metric=faiss.METRIC_INNER_PRODUCT)
        if self.backend == "faiss-gpu":
            import faiss

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

    def hits(
        self, queries: np.ndarray, block: np.ndarray, k: int, thr: np.ndarray
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Every (query, score, block row) with score >= thr[query], tile by tile (``cpu`` backend).

        `block` may be float16 or float32 (a read-only view into the mapped shard is fine); it is
        converted to float32 one tile at a time into a reused buffer, and scored against tiles of queries
        so that one score matrix stays within `_SCORE_BYTES`. `thr` (nq,) belongs to the caller, who may
        raise it between tiles (after a merge). While a query has no threshold yet (-inf), a tile of at
        least `k` rows raises it to that tile's k-th score: the final k-th score can only be higher, so
        nothing that can still enter the top k (ties included) is skipped.

        Raises:
            NonFiniteRow: a passage row holds NaN or inf (each tile is checked as it is converted).
        """
        nq, dim = queries.shape
        n = len(block)
        if n == 0 or nq == 0:
            return
        tiles = -(-n // _tile_rows(dim))
        tile = -(-n // tiles)  # equal tiles: a block of 8192 rows is not cut into 2730 + 2730 + 2730 + 2
        qstep = min(nq, max(1, _SCORE_BYTES // (4 * tile)))
        tile_buf = self._buffer("tile", tile * dim) if block.dtype != np.float32 else None
        score_buf = self._buffer("score", qstep * tile)
        mask_buf = self._buffer("mask", -(-qstep * tile // 8) * 8, bool)  # whole uint64 words: `_hits`
        for p0 in range(0, n, tile):
            part = block[p0 : p0 + tile]
            t = len(part)
            if tile_buf is None:  # float32: scored in place
                tile32 = np.ascontiguousarray(part)
            else:
                tile32 = tile_buf[: t * dim].reshape(t, dim)
                self._convert(part, tile32)
            for q0 in range(0, nq, qstep):
                q1 = min(nq, q0 + qstep)
                scores = score_buf[: (q1 - q0) * t].reshape(q1 - q0, t)
                np.matmul(queries[q0:q1], tile32.T, out=scores)
                if q0 == 0:
                    # A NaN or inf anywhere in a passage makes every one of its scores NaN or inf (NaN
                    # propagates through the dot product; inf * 0 is NaN), and the queries are finite
                    # (checked on load): one row of scores checks the whole tile at 1/dim of the cost
                    # of `isfinite` over the tile itself.
                    bad = np.flatnonzero(~np.isfinite(scores[0]))
                    if len(bad):
                        raise NonFiniteRow(p0 + _first_non_finite(tile32, int(bad[0])))
                th = thr[q0:q1]
                if t >= k and np.isneginf(th).any():
                    np.maximum(th, np.partition(scores, t - k, axis=1)[:, t - k], out=th)
                flat = _hits(scores, th, mask_buf)
                if len(flat):
                    yield flat // t + q0, scores.ravel()[flat], flat % t + p0

    def _buffer(self, name: str, size: int, dtype=np.float32) -> np.ndarray:
        """A scratch array of at least `size` elements, kept for the next block (no allocation per tile)."""
        buf = self._buffers.get(name)
        if buf is None or buf.size < size:
            buf = self._buffers[name] = np.zeros(size, dtype=dtype)
        return buf

    def _convert(self, src: np.ndarray, dst: np.ndarray) -> None:
        """dst[:] = src as float32; float16 by torch in a search large enough to pay for importing it.

        numpy's float16 -> float32 cast is scalar code (~0.7 G elements/s per core measured on an AVX-512
        Xeon); torch's uses the CPU's conversion instructions (F16C / AVX-512, ~3 G elements/s on one
        thread), which took a 1M x 768 block's cast from 1.1 s to 0.26 s there, next to a 1.4 s GEMM. But
        importing torch costs ~1 s, more than a small corpus's whole cast: see `_use_torch_cast`.
        """
        if src.dtype == np.float16 and self._use_torch_cast(src.size):
            _torch_cast(src, dst)
            return
        parts = _threads() if src.size >= 1 << 18 else 1
        if parts == 1:
            np.copyto(dst, src)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(parts, thread_name_prefix="dr-search-convert")
        bounds = np.linspace(0, len(src), parts + 1).astype(int)
        jobs = [
            self._pool.submit(np.copyto, dst[a:b], src[a:b]) for a, b in itertools.pairwise(bounds) if b > a
        ]
        for job in jobs:  # wait for every job before the buffers are reused
            job.result()

    def _use_torch_cast(self, size: int) -> bool:
        """Whether to cast this float16 tile with torch: torch is loaded already, or the planned search or
        the casts so far (counted here) reach `_TORCH_CAST_AFTER` elements."""
        self._cast_elements += size
        if self.torch_cast is None:
            large = max(self._planned_elements, self._cast_elements) >= _TORCH_CAST_AFTER
            if not large and "torch" not in sys.modules:
                return False
            try:
                import torch  # noqa: F401  (imported here: `dr search` does not need torch otherwise)
            except ImportError:  # pragma: no cover - torch is a dependency of dr; numpy's cast still works
                self.torch_cast = False
            else:
                self.torch_cast = True
        return self.torch_cast

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _first_non_finite(rows: np.ndarray, fallback: int = 0) -> int:
    """Index of the first row of `rows` holding NaN or inf (the error path only); `fallback` when every
    value is finite (a float32 row so large that its scores overflow)."""
    bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    return int(bad[0]) if len(bad) else fallback


def _torch_cast(src: np.ndarray, dst: np.ndarray) -> None:
    """dst[:] = src (float16 -> float32) by torch on one thread.

    One thread: torch's OpenMP workers would keep spinning after the cast and slow the BLAS threads of the
    GEMM that follows (measured: 2 torch threads made the whole block slower than numpy's cast); one
    thread of vector conversion is already a fifth of the GEMM's time.
    """
    import torch

    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():  # a mapped shard's view is read-only; torch only reads it here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            torch.from_numpy(dst).copy_(torch.from_numpy(src))
    finally:
        if threads != 1:
            torch.set_num_threads(threads)


def _tile_rows(dim: int) -> int:
    return max(1, _TILE_BYTES // (4 * dim))


def _hits(scores: np.ndarray, thr: np.ndarray, mask_buf: np.ndarray) -> np.ndarray:
    """Flat indices of `scores` >= the row's threshold, ascending.

    Hits are sparse after the first tiles; scanning the boolean mask as uint64 words (8 flags each) and
    looking inside the non-zero words only is ~2x cheaper than `np.flatnonzero` over every flag.
    """
    size = scores.size
    words = -(-size // 8)
    np.greater_equal(scores, thr[:, None], out=mask_buf[:size].reshape(scores.shape))
    mask_buf[size : words * 8] = False  # padding of the last word
    nonzero = np.flatnonzero(mask_buf[: words * 8].view(np.uint64))
    inside = (nonzero[:, None] * 8 + np.arange(8)).ravel()
    return inside[mask_buf[inside]]


def _exact_block_row(
    query: np.ndarray, block: np.ndarray, keys: np.ndarray, k: int
) -> tuple[np.ndarray, ...]:
    """Exact top k of one query over one block under the tie rule (`keys`: tie keys), scored by numpy."""
    scores = block @ query
    threshold = np.partition(scores, len(scores) - k)[len(scores) - k]
    cand = np.flatnonzero(scores >= threshold)
    best = cand[order(scores[cand], keys[cand])[:k]]
    return scores[best], best


class TopK:
    """Running exact top-k per query, merged block by block under the tie rule (`dr.ranking`).

    With the ``cpu`` scorer, candidates (every score >= the query's threshold `thr`, ties included) are
    collected across blocks and merged only when they outnumber the top k itself, so blocks as small as
    a shard's record batches cost no merge each; `result()` merges what is left.
    """

    def __init__(self, nq: int, k: int) -> None:
        self.k = k
        self.scores = np.full((nq, k), -np.inf, dtype=np.float32)
        self.keys = np.full((nq, k), NO_KEY, dtype=np.int64)  # docid tie keys (`docid_keys`)
        self.rows = np.full((nq, k), -1, dtype=np.int64)  # global row in the searched shard list
        self.thr = np.full(nq, -np.inf, dtype=np.float32)  # nothing below can enter (rises only)
        self._pending: list[tuple[np.ndarray, ...]] = []  # (query, score, key, row) candidates
        self._npending = 0

    def add_block(
        self, queries: np.ndarray, block: np.ndarray, offset: int, keys: np.ndarray, scorer: BlockScorer
    ):
        """Search `block` (global rows offset..offset+len) and merge; `keys` are its rows' tie keys.

        Raises:
            NonFiniteRow: a row of `block` holds NaN or inf (its index in the block).
        """
        if scorer.exact:
            for q, s, col in scorer.hits(queries, block, self.k, self.thr):
                self._pending.append((q, s, keys[col], col + offset))
                self._npending += len(q)
                if self._npending > self.scores.size:  # amortized: a merge sorts at most 2x what it keeps
                    self._merge()
            return
        block = np.ascontiguousarray(block, np.float32)
        if not np.isfinite(block).all():
            raise NonFiniteRow(_first_non_finite(block))
        scores, idx = self._block_topk(queries, block, keys, scorer)
        self.add_candidates(scores, idx, offset, keys)

    def add_candidates(self, scores: np.ndarray, local: np.ndarray, offset: int, keys: np.ndarray) -> None:
        """Merge one block's fixed-width candidates: (nq, c) `scores` at block rows `local` (-1: none).

        `keys` are the tie keys of the block's rows (a slice of the global keys is fine), so a
        candidate's key is ``keys[local]`` and its global row ``local + offset``.
        """
        valid = local >= 0
        keys = np.where(valid, keys[np.where(valid, local, 0)], NO_KEY)
        rows = np.where(valid, local + offset, -1)
        scores = np.where(valid, scores, -np.inf).astype(np.float32)
        self.scores, self.keys, self.rows = select_topk(
            np.concatenate([self.scores, scores], axis=1),
            np.concatenate([self.keys, keys], axis=1),
            np.concatenate([self.rows, rows], axis=1),
            self.k,
        )

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores (nq, k), global rows (nq, k)) after the last block, best first; unfilled: (-inf, -1)."""
        self._merge()
        return self.scores, self.rows

    def _merge(self) -> None:
        """Replace the top k by the exact top k of itself + the pending candidates, under the tie rule."""
        if not self._pending:
            return
        nq, k = self.scores.shape
        held = self.rows.ravel() >= 0
        parts = [(np.repeat(np.arange(nq), k)[held], self.scores.ravel()[held],
                  self.keys.ravel()[held], self.rows.ravel()[held]), *self._pending]  # fmt: skip
        q, s, key, row = (np.concatenate(column) for column in zip(*parts))
        ranked = grouped_order(q, s, key)
        q, s, key, row = q[ranked], s[ranked], key[ranked], row[ranked]
        starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])
        pos = np.arange(len(q)) - np.repeat(starts, np.diff(np.r_[starts, len(q)]))
        keep = pos < k
        q, pos = q[keep], pos[keep]
        self.scores.fill(-np.inf)
        self.keys.fill(NO_KEY)
        self.rows.fill(-1)
        self.scores[q, pos], self.keys[q, pos], self.rows[q, pos] = s[keep], key[keep], row[keep]
        np.maximum(self.thr, self.scores[:, -1], out=self.thr)
        self._pending, self._npending = [], 0

    def _block_topk(
        self, queries: np.ndarray, block: np.ndarray, keys: np.ndarray, scorer: BlockScorer
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top k of a float32 block from a backend that returns an arbitrary one of tied k-th hits."""
        kk = min(self.k + 1, len(block))
        scores, idx = scorer.topk(queries, block, kk)
        scores, idx = np.array(scores, dtype=np.float32), np.array(idx, dtype=np.int64)
        if kk > self.k:
            # the backend drops an arbitrary one of several hits tied at its k-th score: rescore those.
            for q in np.flatnonzero(scores[:, self.k - 1] == scores[:, self.k]):
                scores[q, : self.k], idx[q, : self.k] = _exact_block_row(queries[q], block, keys, self.k)
            scores, idx = scores[:, : self.k], idx[:, : self.k]
        return scores, idx


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

    Shard metadata is assumed validated (`read_metas`, `check_unique_docids`). Blocks hold at most
    `max_memory_bytes` / (4 * dim) rows (float32-sized, whatever the stored dtype), one at a time; each
    query batch streams over all shards. `backend`: see `BlockScorer`.

    Returns:
        (scores float32 (nq, k), docids: nq lists of k docids), k = min(depth, rows in the shards), each
        row in the order of `dr.ranking`.

    Raises:
        NonFiniteVector: a passage vector holds NaN or inf (file, row and id named).
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
    keys = docid_keys(ids)
    pa.default_memory_pool().release_unused()  # the sort's scratch: keep peak RSS to one block + fixed
    step = nq if batch_size is None or batch_size <= 0 else batch_size
    scorer = BlockScorer(backend, fp16, planned_elements=-(-nq // step) * len(ids) * dim)
    max_rows = _block_rows(dim, max_memory_bytes)
    out_scores = np.empty((nq, k), dtype=np.float32)
    out_rows = np.empty((nq, k), dtype=np.int64)
    bar = tqdm(total=nq * len(ids), unit="score", unit_scale=True, desc="dr search", disable=not progress)
    for start in range(0, nq, step):
        queries = query_vecs[start : start + step]
        top = TopK(len(queries), k)
        offset = 0
        for path in shard_paths:
            first = offset  # the shard's first global row
            # `block` is a view into the mapped shard: any float32 copy lives inside add_block only
            for _, block in iter_shard(path, max_rows=max_rows, ids=False, drop_pages=True):
                try:
                    top.add_block(queries, block, offset, keys[offset : offset + len(block)], scorer)
                except NonFiniteRow as bad:
                    scorer.close()
                    row = offset + bad.row
                    raise non_finite_error(path, row - first, ids[row].as_py(), block[bad.row]) from None
                offset += len(block)
                bar.update(len(queries) * len(block))
        out_scores[start : start + step], out_rows[start : start + step] = top.result()
    bar.close()
    scorer.close()
    docids = ids.take(pa.array(out_rows.ravel())).to_pylist()
    return out_scores, [docids[i * k : (i + 1) * k] for i in range(nq)]


def merge_candidates(
    parts: list[tuple[np.ndarray, list[list[str]]]], depth: int
) -> tuple[np.ndarray, list[list[str]]]:
    """Merge per-rank top-k lists exactly into one top-`depth` per query, under the tie rule."""
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
    keys = docid_keys(docids.ravel().tolist()).reshape(nq, width)  # docids meet only within a row
    slots = np.broadcast_to(np.arange(width), (nq, width))
    top_scores, _, top_cols = select_topk(scores, keys, slots, k)
    merged = np.take_along_axis(docids, top_cols, axis=1)
    return top_scores, [list(row) for row in merged]
