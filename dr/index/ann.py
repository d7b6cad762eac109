"""Approximate search: one faiss index (``--index_factory``, e.g. ``IVF4096,Flat`` or ``HNSW32``) over all
shards, trained on a sample and filled block by block; saved as a faiss file plus a JSON sidecar holding
the docids (nothing is pickled) and reused with ``--load_index``. Its ranking is only as exact as the
index; the final lists follow dr's tie rule (`dr.ranking`), also at the depth cut-off: where hits tie with
the `depth`-th, the index is asked for more until the tie is past (a flat index so keeps exactly the
documents exact search keeps). Vectors with NaN or inf are refused while the index is built.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dr.io.atomic import atomic_path, write_json_atomic
from dr.io.shards import iter_shard, read_meta
from dr.ranking import NO_KEY, docid_keys, search_past_ties, select_topk
from dr.search.shard_set import SearchError, check_finite


def build_index(
    shard_paths: list[str], dim: int, factory: str, max_rows: int, train_size: int, seed: int = 0
):
    """A faiss index (inner product) over all shards: trained on a random sample, filled block by block.

    Rows are added in shard order, so faiss's sequential ids are the rows of the concatenated shards.

    Raises:
        NonFiniteVector: a vector holds NaN or inf (checked on each block as it is converted to float32).
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
        row = 0
        for ids, vectors in iter_shard(path, max_rows=max_rows):
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
            check_finite(vectors, path, row, ids)
            index.add(vectors)
            row += len(vectors)
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
    """Search a faiss index; returns the same (scores, docids) shape as `search_shards`, in rule order."""
    query_vecs = np.ascontiguousarray(query_vecs, dtype=np.float32)
    k = min(depth, index.ntotal)
    keys = docid_keys(docids)
    step = len(query_vecs) if batch_size <= 0 else batch_size
    all_scores, all_ids = [], []
    for start in range(0, len(query_vecs), step):
        scores, rows = search_past_ties(index.search, query_vecs[start : start + step], k, index.ntotal)
        valid = rows >= 0
        scores = np.where(valid, scores, -np.inf).astype(np.float32)
        row_keys = np.where(valid, keys[np.where(valid, rows, 0)], NO_KEY)
        scores, _, rows = select_topk(scores, row_keys, rows, k)
        all_scores.append(scores)
        all_ids.extend([docids[r] for r in row if r >= 0] for row in rows)
    scores = np.concatenate(all_scores) if all_scores else np.zeros((0, k), dtype=np.float32)
    return scores, all_ids
