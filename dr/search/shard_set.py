"""The shards a search reads: globs to files, metadata read and cross-checked, unique docids, the split of
shards over ranks, and the query reps. Everything is checked before any scoring starts; torch-free.
"""

from __future__ import annotations

import glob
import logging
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import ipc

from dr.errors import InputError, UsageError
from dr.io.shards import ENCODER_FIELDS, ShardError, ShardMeta, id_strings, read_meta, read_shard

logger = logging.getLogger("dr.search")


class SearchError(InputError):
    """Inputs that cannot be searched together: no shards, mismatched metadata, duplicate docids, ..."""


class NonFiniteVector(SearchError):
    """A vector holding NaN or +-inf: it would score NaN (dropped at random) or +-inf (ranked first/last)."""


def non_finite_error(path: str, row: int, docid: str | None, vector: np.ndarray) -> NonFiniteVector:
    """The one message for a non-finite vector: file, row (0-based, in the file), id and the bad position.

    `vector` is the row as read; only its first non-finite value is named.
    """
    bad = np.flatnonzero(~np.isfinite(np.asarray(vector, dtype=np.float32)))
    if not len(bad):  # finite, but so large that its float32 scores overflow to inf
        return NonFiniteVector(
            f"{path}: row {row} (id {docid!r}) holds values so large (max |x| "
            f"{float(np.abs(vector).max()):.3g}) that its scores overflow float32; re-encode this shard"
        )
    col = int(bad[0])
    return NonFiniteVector(
        f"{path}: row {row} (id {docid!r}) holds {float(vector[col])} at position {col} of {len(vector)}; "
        f"vectors with NaN or inf are refused (re-encode this shard)"
    )


def check_finite(vectors: np.ndarray, path: str, first_row: int = 0, ids=None) -> None:
    """Refuse NaN/+-inf in `vectors`, rows ``first_row...`` of `path` (`NonFiniteVector`).

    `ids`: the block's ids (any indexable of str), or None where the caller has not read them. The check
    is one `np.isfinite` pass, in slices of ~4M values (its mask stays small next to a 1 GB block);
    callers run it on blocks they convert or read anyway, not as an extra pass over the data.
    """
    step = max(1, (4 << 20) // max(1, vectors.shape[1] if vectors.ndim == 2 else 1))
    for start in range(0, len(vectors), step):
        finite = np.isfinite(vectors[start : start + step])
        if not finite.all():
            row = start + int(np.flatnonzero(~finite.reshape(len(finite), -1).all(axis=1))[0])
            docid = None if ids is None else str(ids[row])
            raise non_finite_error(path, first_row + row, docid, vectors[row])


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(text: str | int) -> int:
    """Parse a byte count such as ``2G``, ``512M``, ``1.5GiB`` or ``1000000`` (binary units)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise UsageError(f"--max_memory {text!r}: expected a byte count such as 2G, 512M or 1000000")
    value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise UsageError(f"--max_memory {text!r} must be positive")
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
        diff = meta.differences(metas[0])
        if diff:
            hint = (
                _MIXED_DIMS if (meta.dim, meta.truncate_dim) != (metas[0].dim, metas[0].truncate_dim) else ""
            )
            raise SearchError(f"{path}: metadata differs from {paths[0]}: {', '.join(diff)}{hint}")
    return metas


# Said wherever vectors of two sizes meet: the usual cause is a `dr encode --truncate_dim` on some shards only.
_MIXED_DIMS = (
    "; vectors of different dimensions cannot be searched together (encode every shard, and the queries, "
    "with the same --truncate_dim)"
)


def _dims(meta: ShardMeta) -> str:
    """'dim 64 (truncated)' or 'dim 384'."""
    return f"dim {meta.dim}" + (" (truncated, --truncate_dim)" if meta.truncate_dim is not None else "")


def check_query_passage(qmeta: ShardMeta, pmeta: ShardMeta, allow_model_mismatch: bool = False) -> None:
    """Query and passage reps must live in the same space: same dim, and (unless allowed) same encoder."""
    if qmeta.dim != pmeta.dim:
        raise SearchError(f"query reps have {_dims(qmeta)} but passage reps have {_dims(pmeta)}{_MIXED_DIMS}")
    diff = qmeta.differences(pmeta, ENCODER_FIELDS, ("query", "passage"))
    if diff and not allow_model_mismatch:
        raise SearchError(
            f"query and passage reps come from different encoders ({', '.join(diff)}); "
            f"pass --allow_model_mismatch if this is intended"
        )


def load_queries(paths: list[str]) -> tuple[list[str], np.ndarray, ShardMeta]:
    """All query reps of one or more query shards: (ids, float32 (n, dim), meta); ids must be unique."""
    metas = read_metas(paths, "query")
    ids: list[str] = []
    blocks = []
    for path in paths:
        shard_ids, vectors, _ = read_shard(path)
        vectors = np.asarray(vectors, dtype=np.float32)
        check_finite(vectors, path, 0, shard_ids)  # a NaN query would score NaN against every passage
        ids.extend(shard_ids)
        blocks.append(vectors)
    if not ids:
        raise SearchError(f"no query reps in {', '.join(paths)} (empty query file)")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(q for q in ids if q in seen or seen.add(q))
        raise SearchError(f"query id {dup!r} occurs more than once in {', '.join(paths)}")
    return ids, np.ascontiguousarray(np.concatenate(blocks)), metas[0]


def id_column(path: str) -> pa.ChunkedArray:
    """The id column of a shard as `string` (large_string ids are cast), memory-mapped (vectors not read)."""
    try:
        return id_strings(ipc.open_file(pa.memory_map(path, "r")).read_all().column("id"))
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
        del counts, dups
        pa.default_memory_pool().release_unused()  # the hash table (~0.9 GB at 8.8M ids) goes back now
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
