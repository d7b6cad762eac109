"""Approximate search: one faiss index (``--index_factory``, e.g. ``IVF4096,Flat`` or ``HNSW32``) over all
shards, trained on a sample and filled block by block; saved as a faiss file plus a JSON sidecar holding
the docids (nothing is pickled) and reused with ``--load_index``. Its ranking is only as exact as the
index; the final lists are still sorted by (-score, docid).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dr.search.shard_set import SearchError
from dr.io.shards import iter_shard, read_meta
from dr.io.atomic import atomic_path, write_json_atomic


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
