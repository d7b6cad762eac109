"""`dr search`: exact (or, on request, approximate) inner-product search of query reps over passage shards.

Usage::

    dr search --query_reps q.arrow --passage_reps 'corpus/*.arrow' --depth 100 \\
        --save_ranking_to rank.txt --max_memory 2G
    torchrun --nproc_per_node 4 -m dr.search ...        # shards split over ranks, merged on rank 0

Exact search (default) never holds the corpus in memory. Passage shards are memory-mapped and read in
blocks of at most ``--max_memory`` bytes of float32 vectors. Each block is searched with ``faiss.knn``
(inner product) for its top ``depth + 1`` hits, and the block results are merged into a running top
``depth`` per query. The final ranking is therefore the same as a brute force over the concatenated
corpus, whatever the number of shards, blocks or ranks.

Ties are resolved deterministically, everywhere, by score descending and then docid ascending
(string order), including at the depth cut-off:

* the merge across blocks, shards and ranks sorts on the pair (-score, docid), so no tied candidate is
  dropped arbitrarily;
* inside a block faiss may drop any one of several hits tied at its k-th score. The extra (k+1)-th hit
  shows when that can happen (k-th score == (k+1)-th score); for those queries only, the block is
  rescored with numpy (float32) and the exact top k under (-score, docid) is taken. With real float
  vectors exact ties are rare and this costs nothing; with duplicated passages it costs a matrix-vector
  product per affected (query, block).

``--index_factory`` (e.g. ``IVF4096,Flat``, ``HNSW32``) instead builds one approximate faiss index over all
shards (trained on a sample, filled block by block), optionally saved with ``--save_index`` (faiss file
plus a JSON sidecar holding the docids; nothing is pickled) and reused with ``--load_index``. Its
ranking is only as exact as the index; the final lists are still sorted by (-score, docid).

Output: the run (``--format tevatron`` by default, as Tevatron with ``--save_text``; ``marco``; ``trec``)
written atomically to ``--save_ranking_to``, and ``<run>.config.json`` with the resolved arguments, the
shard list, counts and timings. ``--save_text`` is accepted for Tevatron compatibility: dr always writes
text and never pickles.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import ipc

from dr import distributed as D
from dr.io.atomic import atomic_path, write_json_atomic
from dr.io.paths import expand_home
from dr.io.runs import Run, write_run
from dr.index.shards import ShardError, ShardMeta, iter_shard, read_meta, read_shard

logger = logging.getLogger("dr.search")

_NO_KEY = np.iinfo(np.int64).max  # sort key of an empty result slot: after every real hit
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class SearchError(ValueError):
    """Inputs that cannot be searched together: no shards, mismatched metadata, duplicate docids, ..."""


# --------------------------------------------------------------------------------------------- inputs


def parse_bytes(text: str | int) -> int:
    """Parse a byte count such as ``2G``, ``512M``, ``1.5GiB`` or ``1000000`` (binary units)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise SearchError(f"--max_memory {text!r}: expected a byte count such as 2G, 512M or 1000000")
    value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise SearchError(f"--max_memory {text!r} must be positive")
    return value


def expand_paths(pattern: str, what: str) -> list[str]:
    """Sorted files matching a path or glob; `what` names the flag in the error when nothing matches.

    Tevatron's commands name pickles (`corpus_emb.*.pkl`); `dr encode` writes `.arrow` files in their
    place, so a `.pkl`/`.pickle` pattern that matches nothing is retried with `.arrow` (never unpickled).
    """
    paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    stem, suffix = os.path.splitext(pattern)
    if not paths and suffix in (".pkl", ".pickle"):
        paths = sorted(p for p in glob.glob(stem + ".arrow") if os.path.isfile(p))
        if paths:
            logger.info(
                "%s: %r names pickles; reading the Arrow files dr encode wrote instead: %s.arrow",
                what,
                pattern,
                stem,
            )
    if not paths:
        raise SearchError(f"{what}: no file matches {pattern!r}")
    return paths


def read_metas(paths: list[str], side: str) -> list[ShardMeta]:
    """Read and cross-check shard metadata: all on `side` and mutually compatible (model, dim, dtype, ...)."""
    metas = [read_meta(path) for path in paths]
    for path, meta in zip(paths, metas):
        if meta.side != side:
            raise SearchError(f"{path}: a {meta.side} shard where {side} reps are expected")
        diff = metas[0].compatible_with(meta)
        if diff:
            fields = ", ".join(f"{f}={getattr(meta, f)!r} vs {getattr(metas[0], f)!r}" for f in diff)
            raise SearchError(f"{path}: metadata differs from {paths[0]}: {fields}")
    return metas


def check_query_passage(qmeta: ShardMeta, pmeta: ShardMeta, allow_model_mismatch: bool = False) -> None:
    """Query and passage reps must live in the same space: same dim, and (unless allowed) same encoder."""
    if qmeta.dim != pmeta.dim:
        raise SearchError(f"query reps have dim {qmeta.dim} but passage reps have dim {pmeta.dim}")
    diff = [f for f in ("model", "pooling", "normalize") if getattr(qmeta, f) != getattr(pmeta, f)]
    if diff and not allow_model_mismatch:
        fields = ", ".join(f"{f}: query {getattr(qmeta, f)!r} vs passage {getattr(pmeta, f)!r}" for f in diff)
        raise SearchError(
            f"query and passage reps come from different encoders ({fields}); "
            f"pass --allow_model_mismatch if this is intended"
        )


def load_queries(paths: list[str]) -> tuple[list[str], np.ndarray, ShardMeta]:
    """All query reps of one or more query shards: (ids, float32 (n, dim), meta); ids must be unique."""
    metas = read_metas(paths, "query")
    ids: list[str] = []
    blocks = []
    for path in paths:
        shard_ids, vectors, _ = read_shard(path)
        ids.extend(shard_ids)
        blocks.append(np.asarray(vectors, dtype=np.float32))
    if not ids:
        raise SearchError(f"no query reps in {', '.join(paths)} (empty query file)")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(q for q in ids if q in seen or seen.add(q))
        raise SearchError(f"query id {dup!r} occurs more than once in {', '.join(paths)}")
    return ids, np.ascontiguousarray(np.concatenate(blocks)), metas[0]


def id_column(path: str) -> pa.ChunkedArray:
    """The id column of a shard, memory-mapped (the vectors are not read)."""
    try:
        return ipc.open_file(pa.memory_map(path, "r")).read_all().column("id")
    except (pa.ArrowInvalid, OSError, KeyError) as err:
        raise ShardError(f"{path}: cannot read the id column: {err}") from err


def check_unique_docids(paths: list[str]) -> None:
    """Fail if a docid occurs twice, naming the docid and the shard file(s) that hold it."""
    columns = [id_column(path) for path in paths]
    chunks = [chunk for column in columns for chunk in column.chunks]
    if not chunks:
        return
    counts = pc.value_counts(pa.chunked_array(chunks, type=pa.string()))
    dups = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(dups) == 0:
        return
    docid = dups.field("values")[0].as_py()
    holders = [path for path, column in zip(paths, columns) if pc.any(pc.equal(column, docid)).as_py()]
    where = f"shards {holders[0]} and {holders[1]}" if len(holders) > 1 else f"shard {holders[0]} (twice)"
    raise SearchError(f"docid {docid!r} occurs in {where}; docids must be unique across the corpus")


def split_shards(paths: list[str], counts: list[int], world: int) -> list[list[int]]:
    """Assign shard indices to `world` ranks, balancing rows (largest shard to the least loaded rank)."""
    loads = [0] * world
    parts: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(paths)), key=lambda i: (-counts[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        parts[rank].append(i)
        loads[rank] += counts[i]
    return [sorted(part) for part in parts]


# ------------------------------------------------------------------------------------------- scoring


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
        raise SearchError(f"depth must be >= 1, got {depth}")
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


# ------------------------------------------------------------------------------- approximate indexes


def build_index(
    shard_paths: list[str], dim: int, factory: str, max_rows: int, train_size: int, seed: int = 0
):
    """A faiss index (inner product) over all shards: trained on a random sample, filled block by block.

    Rows are added in shard order, so faiss's sequential ids are the rows of the concatenated shards.
    """
    import faiss

    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise SearchError(f"--index_factory {factory!r}: faiss cannot build it: {err}") from None
    total = sum(read_meta(p).count for p in shard_paths)
    if not index.is_trained:
        picks = np.sort(np.random.default_rng(seed).choice(total, size=min(total, train_size), replace=False))
        sample, offset = [], 0
        for path in shard_paths:
            for _, vectors in iter_shard(path, max_rows=max_rows):
                local = picks[(picks >= offset) & (picks < offset + len(vectors))] - offset
                sample.append(np.asarray(vectors[local], dtype=np.float32))
                offset += len(vectors)
        try:
            index.train(np.ascontiguousarray(np.concatenate(sample)))
        except RuntimeError as err:
            raise SearchError(
                f"--index_factory {factory!r}: training on {len(picks)} rows failed: {err}"
            ) from None
    for path in shard_paths:
        for _, vectors in iter_shard(path, max_rows=max_rows):
            index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def save_index(index, path: str, docids: list[str], info: dict) -> None:
    """Write the faiss index and its JSON sidecar ``<path>.json`` (docids in faiss id order), atomically."""
    import faiss

    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))
    write_json_atomic(path + ".json", {**info, "count": len(docids), "docids": docids})


def load_index(path: str):
    """Read a saved index and its sidecar: (index, docids, info)."""
    import faiss

    sidecar = Path(path + ".json")
    if not Path(path).is_file() or not sidecar.is_file():
        raise SearchError(f"--load_index {path}: need both {path} and {sidecar}")
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
        index = faiss.read_index(path)
    except (json.JSONDecodeError, RuntimeError) as err:
        raise SearchError(f"--load_index {path}: unreadable: {err}") from None
    docids = info.pop("docids", None)
    if not isinstance(docids, list) or len(docids) != index.ntotal:
        raise SearchError(f"{sidecar}: docid list does not match the index ({index.ntotal} vectors)")
    return index, docids, info


def search_index(index, docids: list[str], query_vecs: np.ndarray, depth: int, batch_size: int = -1):
    """Search a faiss index; returns the same (scores, docids) shape as `search_shards`."""
    query_vecs = np.ascontiguousarray(query_vecs, dtype=np.float32)
    k = min(depth, index.ntotal)
    step = len(query_vecs) if batch_size <= 0 else batch_size
    all_scores, all_ids = [], []
    for start in range(0, len(query_vecs), step):
        scores, rows = index.search(query_vecs[start : start + step], k)
        for srow, rrow in zip(scores, rows):
            hits = sorted(((-float(s), docids[r]) for s, r in zip(srow, rrow) if r >= 0))
            all_scores.append([-s for s, _ in hits] + [-np.inf] * (k - len(hits)))
            all_ids.append([d for _, d in hits])
    return np.array(all_scores, dtype=np.float32).reshape(len(query_vecs), k), all_ids


# ------------------------------------------------------------------------------------------------ CLI


@dataclass
class Outcome:
    """What rank 0 writes: the ranking plus facts for the config sidecar."""

    scores: np.ndarray
    docids: list[list[str]]
    info: dict


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dr search", description="Search passage embedding shards with query reps."
    )
    p.add_argument("--query_reps", required=True, help="query shard file or glob (quote it)")
    p.add_argument(
        "--passage_reps", default=None, help="passage shard glob (quote it); optional with --load_index"
    )
    p.add_argument("--depth", type=int, default=100, help="hits per query")
    p.add_argument("--batch_size", type=int, default=-1, help="queries per pass over the corpus; -1 = all")
    p.add_argument(
        "--save_text", action="store_true", help="accepted for Tevatron compatibility (always text)"
    )
    p.add_argument("--save_ranking_to", required=True, help="run file to write")
    p.add_argument("--format", default="tevatron", choices=("tevatron", "trec", "marco"), help="run format")
    p.add_argument("--run_tag", default="dr", help="tag column of TREC runs")
    device = p.add_mutually_exclusive_group()
    device.add_argument(
        "--use_gpu", action="store_true", help="faiss-gpu, else torch CUDA, else CPU + warning"
    )
    device.add_argument("--cpu", action="store_true", help="force CPU (the default)")
    p.add_argument("--fp16_index", action="store_true", help="GPU only: keep passage vectors in float16")
    p.add_argument(
        "--max_memory", default="1G", help="passage vector bytes (float32) resident at once, e.g. 2G"
    )
    p.add_argument(
        "--index_factory", default=None, help="approximate faiss index, e.g. IVF4096,Flat or HNSW32"
    )
    p.add_argument(
        "--index_params", default=None, help="faiss search parameters, e.g. nprobe=64 or efSearch=128"
    )
    p.add_argument("--train_size", type=int, default=200_000, help="rows sampled to train --index_factory")
    p.add_argument(
        "--save_index", default=None, help="write the --index_factory index here (+ .json sidecar)"
    )
    p.add_argument("--load_index", default=None, help="search a saved index instead of the shards")
    p.add_argument(
        "--allow_model_mismatch", action="store_true", help="query/passage reps from different models"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def choose_backend(use_gpu: bool) -> str:
    """cpu unless --use_gpu and a GPU is usable (faiss-gpu first, then torch CUDA)."""
    if not use_gpu:
        return "cpu"
    import faiss

    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        return "faiss-gpu"
    import torch

    if torch.cuda.is_available():
        return "torch-cuda"
    logger.warning("dr search: --use_gpu but no GPU is available; searching on the CPU")
    return "cpu"


def _agree(error: str | None) -> None:
    """Raise on every rank if any rank failed, so no rank waits forever in a collective."""
    if D.get_world_size() > 1 and D.is_initialized():
        import torch.distributed as dist

        errors: list[str | None] = [None] * D.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise SearchError(error)


def _exact(args, query_vecs: np.ndarray, qmeta: ShardMeta, backend: str) -> Outcome:
    """Validate the shards, search this rank's share, gather and merge on rank 0."""
    timings = {}
    t0 = time.perf_counter()
    paths = expand_paths(args.passage_reps, "--passage_reps")
    metas = read_metas(paths, "passage")
    check_query_passage(qmeta, metas[0], args.allow_model_mismatch)
    check_unique_docids(paths)
    counts = [m.count for m in metas]
    total = sum(counts)
    if total == 0:
        raise SearchError(f"--passage_reps {args.passage_reps!r}: the shards hold no passages")
    if args.depth > total and D.is_main_process():
        logger.warning(
            "dr search: --depth %d exceeds the %d passages; returning all of them", args.depth, total
        )
    timings["validate_s"] = time.perf_counter() - t0
    world, rank = D.get_world_size(), D.get_rank()
    mine = [paths[i] for i in split_shards(paths, counts, world)[rank]]
    t0 = time.perf_counter()
    error, part = None, (np.zeros((len(query_vecs), 0), np.float32), [[] for _ in query_vecs])
    try:
        if mine:
            part = search_shards(
                query_vecs,
                mine,
                args.depth,
                parse_bytes(args.max_memory),
                args.batch_size,
                backend,
                args.fp16_index,
                progress=D.is_main_process() and not args.quiet,
            )
    except (ValueError, OSError) as err:
        error = f"rank {rank}: {err}"
    _agree(error)
    scores, docids = part
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world if rank == 0 else None
        dist.gather_object(part, gathered, dst=0)
        if rank == 0:
            scores, docids = merge_candidates(gathered, args.depth)
    timings["search_s"] = time.perf_counter() - t0
    info = {
        "passage_shards": [{"path": p, "count": c} for p, c in zip(paths, counts)],
        "num_passages": total,
        "passage_meta": _meta_fields(metas[0]),
        "timings": timings,
    }
    return Outcome(scores, docids, info)


def _meta_fields(meta: ShardMeta) -> dict:
    """A shard's metadata for the config/sidecar JSON, without the per-shard row count."""
    fields = asdict(meta)
    fields.pop("count")
    return fields


def _approximate(args, query_vecs: np.ndarray, qmeta: ShardMeta) -> Outcome:
    """Build (or load) one faiss index over all shards and search it (rank 0 only)."""
    import faiss

    timings = {}
    t0 = time.perf_counter()
    if args.load_index:
        index, docids, info = load_index(args.load_index)
        check_query_passage(qmeta, ShardMeta(**info["passage_meta"], count=0), args.allow_model_mismatch)
    else:
        paths = expand_paths(args.passage_reps, "--passage_reps")
        metas = read_metas(paths, "passage")
        check_query_passage(qmeta, metas[0], args.allow_model_mismatch)
        check_unique_docids(paths)
        max_rows = _block_rows(qmeta.dim, parse_bytes(args.max_memory))
        index = build_index(paths, qmeta.dim, args.index_factory, max_rows, args.train_size)
        docids = [d for p in paths for d in id_column(p).to_pylist()]
        info = {
            "index_factory": args.index_factory,
            "passage_meta": _meta_fields(metas[0]),
            "passage_shards": paths,
        }
        if args.save_index:
            save_index(index, args.save_index, docids, info)
    timings["index_s"] = time.perf_counter() - t0
    if args.index_params:
        try:
            faiss.ParameterSpace().set_index_parameters(index, args.index_params)
        except RuntimeError as err:
            raise SearchError(f"--index_params {args.index_params!r}: {err}") from None
    if args.depth > index.ntotal:
        logger.warning(
            "dr search: --depth %d exceeds the %d passages; returning all of them", args.depth, index.ntotal
        )
    t0 = time.perf_counter()
    scores, ranked = search_index(index, docids, query_vecs, args.depth, args.batch_size)
    timings["search_s"] = time.perf_counter() - t0
    return Outcome(scores, ranked, {**info, "num_passages": index.ntotal, "timings": timings})


def _to_run(query_ids: list[str], scores: np.ndarray, docids: list[list[str]]) -> Run:
    """A `Run` with each float32 score as its shortest decimal (as Tevatron prints float32 scores)."""
    flat = pc.cast(pc.cast(pa.array(scores.ravel(), pa.float32()), pa.string()), pa.float64()).to_numpy()
    k = scores.shape[1]
    return Run(
        {
            q: list(zip(ids, flat[i * k : i * k + len(ids)].tolist()))
            for i, (q, ids) in enumerate(zip(query_ids, docids))
        }
    )


def run_search(args: argparse.Namespace) -> None:
    """The whole `dr search` command once the process group (if any) is up."""
    t_start = time.perf_counter()
    if args.passage_reps is None and not args.load_index:
        raise SearchError("--passage_reps is required unless --load_index is given")
    if (args.save_index or args.load_index) and not (args.index_factory or args.load_index):
        raise SearchError("--save_index needs --index_factory")
    if args.depth < 1:
        raise SearchError(f"--depth must be >= 1, got {args.depth}")
    parse_bytes(args.max_memory)
    backend = choose_backend(args.use_gpu)
    query_ids, query_vecs, qmeta = load_queries(expand_paths(args.query_reps, "--query_reps"))
    approximate = bool(args.index_factory or args.load_index)
    if approximate and D.get_world_size() > 1 and D.is_main_process():
        logger.warning("dr search: --index_factory/--load_index run on rank 0 only")
    if approximate:
        outcome = _approximate(args, query_vecs, qmeta) if D.is_main_process() else None
    else:
        outcome = _exact(args, query_vecs, qmeta, backend)
    if not D.is_main_process():
        return
    t0 = time.perf_counter()
    write_run(
        args.save_ranking_to, _to_run(query_ids, outcome.scores, outcome.docids), args.format, args.run_tag
    )
    outcome.info["timings"]["write_s"] = time.perf_counter() - t0
    outcome.info["timings"]["total_s"] = time.perf_counter() - t_start
    config = {
        "args": vars(args),
        "backend": backend,
        "world_size": D.get_world_size(),
        "query_shards": expand_paths(args.query_reps, "--query_reps"),
        "num_queries": len(query_ids),
        "query_meta": _meta_fields(qmeta),
        **outcome.info,
    }
    write_json_atomic(args.save_ranking_to + ".config.json", config)
    print(
        f"dr search: {len(query_ids)} queries x depth {outcome.scores.shape[1]} -> {args.save_ranking_to}",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    """Run `dr search`; return the exit status (0 ok, 2 bad input)."""
    args = expand_home(build_parser().parse_args(argv))
    ok = False
    try:
        D.init_process_group()
        run_search(args)
        ok = True
    except (ValueError, OSError) as err:
        if D.is_main_process():
            print(f"dr search: error: {err}", file=sys.stderr)
    finally:
        D.close_process_group(ok)
    return 0 if ok else 2


if __name__ == "__main__":
    raise SystemExit(D.exit_status(main()))
