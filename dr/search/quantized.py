"""`dr search --quantize {int8,binary} [--rescore K]`: a first pass over quantized shards, then exact rescoring.

1. First pass: every quantized shard (`dr.index.quantize`, written by `dr quantize`) is streamed in blocks;
   each block's top ``C = min(K * depth, passages)`` per query (``C = depth`` without ``--rescore``) is
   merged into a running top C. Binary: Hamming distance with ``faiss.knn_hamming`` on the packed sign
   bits of the queries and passages, reported as the score ``dim - 2 * hamming`` (the inner product of
   the +-1 sign vectors). int8: the inner product of the float query with the dequantized passage, computed
   as ``(q * scale) . code + q . (offset + 128 * scale)`` by exact search's BLAS-tiled scorer
   (`dr.search.exact.BlockScorer.hits` + `TopK`: codes converted to float32 a few MB at a time; blocks are
   bounded by their code bytes, ``--max_memory``).
2. Rescoring (``--rescore K``): the float vectors of only the candidate rows are read from the float shards
   (gathered from zero-copy views of the memory-mapped files), each candidate is scored ``float query . float passage`` in float64
   and rounded to float32, and the top `depth` are kept under dr's tie rule (`dr.ranking`). When
   ``K * depth`` covers the corpus the result is exact search's. A candidate's float vector holding NaN
   or inf stops the search, naming the float shard and row (`dr quantize` refuses such shards up front).

The first pass keeps its candidates under the same rule: faiss returns an arbitrary one of several hits
tied at its cut-off (Hamming distances tie often), so a block whose cut-off is tied is searched again,
wider, until the tie is past (`dr.ranking.search_past_ties`), and the candidates are cut by (first-pass
score, docid). Without ``--rescore`` the run holds the first-pass scores in that order.

Missing quantized shards are an error naming the `dr quantize` command to run (they are not built on the
fly: the codes are a one-off pass worth keeping, and a search should not write beside the corpus).
Single process: under torchrun the quantized search runs on rank 0 (as ``--index_factory``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from pyarrow import ipc

from dr.index.quantize import (
    Int8Calibration,
    QuantizedShard,
    QuantizeError,
    binary_codes,
    check_kind,
    check_matches,
    code_bytes,
    iter_codes,
    open_quantized,
    quantized_path,
)
from dr.io.shards import ShardMeta
from dr.ranking import NO_KEY, docid_keys, search_past_ties, select_topk
from dr.search.exact import BlockScorer, TopK
from dr.search.shard_set import id_column, non_finite_error

logger = logging.getLogger("dr.search")


@dataclass
class QuantizedResult:
    """A quantized search's ranking and the facts for the run's config sidecar."""

    scores: np.ndarray  # float32 (nq, k)
    docids: list[list[str]]
    info: dict = field(default_factory=dict)


def locate(float_paths: list[str], kind: str, quantized_dir: str | None = None) -> list[str]:
    """The quantized shard of each float shard; a missing one is an error saying how to make it."""
    found = [str(quantized_path(p, kind, quantized_dir)) for p in float_paths]
    missing = [
        (f, q) for f, q in zip(float_paths, found) if not quantized_path(f, kind, quantized_dir).is_file()
    ]
    if missing:
        f, q = missing[0]
        out = f" --output_dir {quantized_dir}" if quantized_dir else ""
        raise QuantizeError(
            f"{q}: no {kind} codes for {f} ({len(missing)} of {len(found)} shards lack them); run "
            f"`dr quantize --passage_reps '<the same glob>' --quantize {kind}{out}` first"
        )
    return found


def open_checked(
    float_paths: list[str], float_metas: list[ShardMeta], quantized_paths: list[str], kind: str
) -> list[tuple[QuantizedShard, ipc.RecordBatchFileReader]]:
    """Open each quantized shard and check it against its float shard; int8 calibrations must agree."""
    opened = []
    for fpath, fmeta, qpath in zip(float_paths, float_metas, quantized_paths):
        shard, reader = open_quantized(qpath)
        check_matches(shard, fpath, fmeta, kind)
        if kind == "int8" and opened and not shard.calibration.same_as(opened[0][0].calibration):
            raise QuantizeError(
                f"{qpath}: int8 calibration differs from {opened[0][0].path}; rerun dr quantize on all shards"
            )
        opened.append((shard, reader))
    return opened


def _first_pass(
    queries: np.ndarray, opened, kind: str, dim: int, c: int, keys: np.ndarray, max_memory_bytes: int
) -> TopK:
    """Top-`c` first-pass candidates of `queries` over every quantized shard, streamed in blocks."""
    if kind == "int8":
        return _int8_first_pass(queries, opened, dim, c, keys, max_memory_bytes)
    import faiss

    qcodes = binary_codes(queries)
    max_rows = max(1, max_memory_bytes // code_bytes(kind, dim))
    top = TopK(len(queries), c)  # its fixed-width merge; keys: tie keys of the global rows
    everyone = np.arange(len(queries))
    offset = 0
    for _, reader in opened:
        for block in iter_codes(reader, code_bytes(kind, dim), max_rows):
            if len(block) == 0:
                continue
            codes = np.ascontiguousarray(block)

            def search(which: np.ndarray, k: int, codes=codes):
                dist, local = faiss.knn_hamming(qcodes[which], codes, k)
                return np.float32(dim) - np.float32(2) * dist.astype(np.float32), local

            # faiss keeps any one of the hits tied at its k-th: widen until the tie is past, cut by the rule
            scores, local = search_past_ties(search, everyone, c, len(block))
            top.add_candidates(scores, local, offset, keys[offset : offset + len(block)])
            offset += len(block)
    return top


def _int8_first_pass(
    queries: np.ndarray, opened, dim: int, c: int, keys: np.ndarray, max_memory_bytes: int
) -> TopK:
    """int8 first pass through exact search's scorer (`BlockScorer.hits` + `TopK`, BLAS-tiled).

    The dequantized score is ``(q * scale) . code + shift[q]`` with ``shift = q . (offset + 128 * scale)``:
    the codes are scored as they are (converted to float32 tile by tile, as float16 shards are), and the
    per-query shift, which moves every candidate of a query alike, is added once at the end, after which
    the candidates are ordered by the rule again (rounding can make two of them tie).
    """
    calibration: Int8Calibration = opened[0][0].calibration
    qscaled = np.ascontiguousarray(queries * calibration.scale, dtype=np.float32)
    shift = (queries @ (calibration.offset + np.float32(128) * calibration.scale)).astype(np.float32)
    max_rows = max(1, max_memory_bytes // dim)  # int8 codes; the scorer's float32 tiles are a few MB
    top = TopK(len(queries), c)
    scorer = BlockScorer("cpu")
    offset = 0
    try:
        for _, reader in opened:
            for block in iter_codes(reader, dim, max_rows):
                top.add_block(qscaled, block, offset, keys[offset : offset + len(block)], scorer)
                offset += len(block)
    finally:
        scorer.close()
    scores, rows = top.result()
    top.scores, top.keys, top.rows = select_topk(
        np.where(rows >= 0, scores + shift[:, None], -np.inf).astype(np.float32), top.keys, rows, c
    )
    return top


class RowReader:
    """Float vectors of chosen global rows, gathered from zero-copy views of the memory-mapped float shards
    (only the pages of the rows asked for are read from disk)."""

    def __init__(self, float_paths: list[str], counts: list[int], ids: pa.ChunkedArray) -> None:
        self.paths = float_paths
        self.ids = ids  # of the concatenated shards: named when a vector is not finite
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._views: dict[int, tuple[np.ndarray, list[np.ndarray]]] = {}

    def _batches(self, i: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """(first row of each record batch, its (rows, dim) view) of float shard `i`, opened once."""
        if i not in self._views:
            reader = ipc.open_file(pa.memory_map(self.paths[i], "r"))
            views, firsts, row = [], [], 0
            for b in range(reader.num_record_batches):
                column = reader.get_batch(b).column(1)
                views.append(column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), -1))
                firsts.append(row)
                row += len(column)
            self._views[i] = (np.array(firsts, dtype=np.int64), views)
        return self._views[i]

    def read(self, rows: np.ndarray, dim: int) -> np.ndarray:
        """float32 (len(rows), dim) for global `rows` (sorted: each shard and batch is visited once).

        Raises:
            NonFiniteVector: a row holds NaN or inf (checked on the gathered rows only).
        """
        out = np.empty((len(rows), dim), dtype=np.float32)
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        for i in np.unique(shard):
            where = np.flatnonzero(shard == i)
            local = rows[where] - self.starts[i]
            firsts, views = self._batches(int(i))
            batch = np.searchsorted(firsts, local, side="right") - 1
            for b in np.unique(batch):
                sel = batch == b
                out[where[sel]] = views[b][local[sel] - firsts[b]]
            bad = np.flatnonzero(~np.isfinite(out[where]).all(axis=1))
            if len(bad):
                row = int(rows[where[bad[0]]])
                raise non_finite_error(
                    self.paths[i], int(row - self.starts[i]), self.ids[row].as_py(), out[where[bad[0]]]
                )
        return out


def exact_scores(
    queries: np.ndarray, rows: np.ndarray, reader: RowReader, max_memory_bytes: int
) -> np.ndarray:
    """Exact float scores (nq, c) of each query's candidate `rows` (global passage rows; -1: none -> -inf).

    Candidate vectors are read from the float shards a group of queries at a time (within
    `max_memory_bytes`). Scores are accumulated in float64 by `einsum` (one summation order for every row,
    so duplicated passages tie exactly) and rounded to float32: the correctly rounded score, which exact
    search's float32 BLAS sums can miss by an ulp or two (tests/search/test_ann_search.py checks both).
    """
    nq, dim = queries.shape
    c = max(1, rows.shape[1])
    scores = np.full(rows.shape, -np.inf, dtype=np.float32)
    step = max(1, max_memory_bytes // (c * dim * 4))  # queries whose candidates' vectors fit at once
    for start in range(0, nq, step):
        part = rows[start : start + step]
        valid = part >= 0
        unique, inverse = np.unique(part[valid], return_inverse=True)
        vectors = reader.read(unique, dim)
        slots = np.zeros(part.shape, dtype=np.int64)
        slots[valid] = inverse
        for j, query in enumerate(queries[start : start + step].astype(np.float64)):  # cache-sized gathers
            scores[start + j] = np.einsum("cd,d->c", vectors[slots[j]], query, dtype=np.float64)
        scores[start : start + step][~valid] = -np.inf
    return scores


def _rescore(
    queries: np.ndarray, top: TopK, reader: RowReader, keys: np.ndarray, k: int, max_memory_bytes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact float scores of each query's candidates; the top `k` under the tie rule (`keys`: tie keys)."""
    scores = exact_scores(queries, top.rows, reader, max_memory_bytes)
    valid = top.rows >= 0
    row_keys = np.where(valid, keys[np.where(valid, top.rows, 0)], NO_KEY)
    best_scores, _, best_rows = select_topk(scores, row_keys, top.rows, k)
    return best_scores, best_rows


def quantized_search(
    query_vecs: np.ndarray,
    float_paths: list[str],
    float_metas: list[ShardMeta],
    quantized_paths: list[str],
    kind: str,
    depth: int,
    rescore: int | None = None,
    max_memory_bytes: int = 2**30,
    batch_size: int = -1,
) -> QuantizedResult:
    """Search the quantized shards, then (with `rescore`) rescore the top ``rescore * depth`` exactly.

    Float shards are assumed validated (`read_metas`, `check_unique_docids`); the quantized shards are
    checked against them here. Returns k = min(depth, passages) hits per query (module docstring).
    """
    dim = float_metas[0].dim
    check_kind(kind, dim)
    opened = open_checked(float_paths, float_metas, quantized_paths, kind)
    queries = np.ascontiguousarray(query_vecs, dtype=np.float32)
    nq = len(queries)
    counts = [m.count for m in float_metas]
    total = sum(counts)
    ids = pa.chunked_array([c for p in float_paths for c in id_column(p).chunks], type=pa.string())
    keys = docid_keys(ids)
    k = min(depth, total)
    c = min(depth * rescore if rescore else depth, total)
    reader = RowReader(float_paths, counts, ids)
    step = nq if batch_size is None or batch_size <= 0 else batch_size
    scores = np.empty((nq, k), dtype=np.float32)
    rows = np.empty((nq, k), dtype=np.int64)
    timings = {"first_pass_s": 0.0, "rescore_s": 0.0}
    for start in range(0, nq, step):
        batch = queries[start : start + step]
        t0 = time.perf_counter()
        top = _first_pass(batch, opened, kind, dim, c, keys, max_memory_bytes)
        timings["first_pass_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        if rescore:
            scores[start : start + step], rows[start : start + step] = _rescore(
                batch, top, reader, keys, k, max_memory_bytes
            )
        else:
            scores[start : start + step], rows[start : start + step] = top.scores[:, :k], top.rows[:, :k]
        timings["rescore_s"] += time.perf_counter() - t0
    docids = ids.take(pa.array(np.maximum(rows, 0).ravel())).to_pylist()
    ranked = [[d for d, r in zip(docids[i * k : (i + 1) * k], rows[i]) if r >= 0] for i in range(nq)]
    info = {
        "quantize": kind,
        "rescore": rescore,
        "candidates_per_query": c,
        "first_pass_bytes": total * code_bytes(kind, dim),
        "float32_bytes": total * dim * 4,
        "quantized_shards": quantized_paths,
        "timings": timings,
    }
    return QuantizedResult(scores, ranked, info)
