"""Build a sharded faiss index in parallel: train once, add each passage shard to its own copy.

The faiss recipe for corpora larger than one machine's RAM, with dr's distributed parts (`dr.row_ranges`):

1. **Train once.** A seeded uniform sample of ``train_size`` rows is drawn across all passage shards (the
   same rows whatever the ranks or array tasks), the index is trained on it and written as the empty
   ``trained.faiss``. The first writer wins (a hard link, which fails when the file exists), so array
   tasks that train at the same time still all use one quantizer; the others read it.
2. **Add per shard.** The parts of `dr.row_ranges` are the passage shards: each rank (torchrun), or each
   SLURM array task (``--num_shards/--shard_index``), adds its shards, one at a time, to a copy of the
   trained index and writes ``shard-<i>.faiss`` (atomically) and then ``shard-<i>.json`` (its record:
   rows, the passage shard's fingerprint, the trained index's sha256; the docids stay in the passage
   shard, which a search reads memory-mapped). A shard is complete when its record agrees with the
   index file and the passage shard; anything else is redone (resume), after removing the temporary
   files that a process killed while writing it left.
3. **Manifest last.** Whoever finds every shard complete writes ``index.json``: factory, seed, training
   sample fingerprint, and per shard its path, rows and fingerprint (the format: `dr.index.manifest`).
   `dr.search.ann` refuses to search an index whose passage shards no longer match it.

Index files depend only on the trained index and the
shard's vectors, so for IVF/PQ factories they are byte-identical however the work was split; HNSW's
parallel insertion is not deterministic (its graphs differ from run to run, their quality does not).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dr import distributed as D
from dr.index.manifest import FORMAT, MANIFEST, shard_fingerprint
from dr.io.atomic import publish_once, remove_stale_temporaries, write_json_atomic
from dr.io.content_hash import ContentHashes
from dr.io.shards import file_sha256, iter_shard
from dr.row_ranges import Part, RowParts, RowPlan, claim_folder
from dr.search.shard_set import SearchError, check_finite

logger = logging.getLogger("dr.index")

TRAINED = "trained.faiss"
IDENTITY = "build.json"


# ---- training ----------------------------------------------------------------------------------------


def training_sample(paths: list[str], counts: list[int], size: int, seed: int, max_rows: int) -> np.ndarray:
    """float32 rows drawn uniformly (seeded, without replacement) from the concatenated shards, in row order."""
    total = sum(counts)
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(total, size), replace=False))
    sample, offset = [], 0
    for path, count in zip(paths, counts):
        local_picks = picks[(picks >= offset) & (picks < offset + count)] - offset
        row = 0
        for ids, vectors in iter_shard(path, max_rows=max_rows):
            local = local_picks[(local_picks >= row) & (local_picks < row + len(vectors))] - row
            if len(local):
                rows = np.asarray(vectors[local], dtype=np.float32)
                check_finite(rows, path, row, None)
                sample.append(rows)
            row += len(vectors)
        offset += count
    dim = sample[0].shape[1] if sample else 0
    return np.ascontiguousarray(np.concatenate(sample)) if sample else np.zeros((0, dim), np.float32)


def new_index(dim: int, factory: str):
    """An empty inner-product faiss index of `factory`; a factory faiss cannot parse is `SearchError`."""
    import faiss

    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise SearchError(f"--index_factory {factory!r}: faiss cannot build it: {err}") from None


def train(sample: np.ndarray, dim: int, factory: str):
    """The trained empty index (faiss's training is seeded: the same sample gives the same index)."""
    index = new_index(dim, factory)
    if not index.is_trained:
        try:
            index.train(sample)
        except RuntimeError as err:
            raise SearchError(
                f"--index_factory {factory!r}: training on {len(sample)} rows failed: {err}"
            ) from None
    return index


def publish_trained(index, path: Path) -> None:
    """Write `index` to `path` unless it exists: the first writer wins (another task may have trained
    first; its quantizer is the one everybody uses), and no temporary file is left."""
    import faiss

    publish_once(path, lambda tmp: faiss.write_index(index, str(tmp)))


# ---- the build ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildSpec:
    """What an index folder is built from (its identity): the shards, the factory and the sample."""

    paths: list[str]
    counts: list[int]
    dim: int
    factory: str
    train_size: int
    seed: int
    passage_meta: dict | None = None  # the shards' encoder metadata, for the query check at search time

    def identity(self) -> dict:
        return {
            "format": FORMAT,
            "factory": self.factory,
            "seed": self.seed,
            "train_size": self.train_size,
            "dim": self.dim,
            "shards": [{"path": p, "fingerprint": shard_fingerprint(p)} for p in self.paths],
        }


def shard_files(folder: Path, i: int) -> tuple[Path, Path]:
    """(index file, record file) of passage shard `i`; the record is written after the index (done marker)."""
    return folder / f"shard-{i:05d}.faiss", folder / f"shard-{i:05d}.json"


def _ids_check(spec: BuildSpec, folder: Path, trained_sha: Callable[[], str]) -> Callable[[Part, Path], str]:
    """`RowParts` check of a shard's index file: its record must agree with it and the passage shard."""

    def check(part: Part, path: Path) -> str:
        record_path = shard_files(folder, part.start)[1]
        try:
            info = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "no readable record (interrupted)"
        expected = {
            "index_bytes": path.stat().st_size,
            "rows": spec.counts[part.start],
            "fingerprint": shard_fingerprint(spec.paths[part.start]),
            "trained_sha256": trained_sha(),
        }
        wrong = [key for key, value in expected.items() if info.get(key) != value]
        return f"record differs in {', '.join(wrong)}" if wrong else ""

    return check


def _threads() -> int:
    """faiss threads of one process: the CPUs shared by the ranks on this machine."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def build_index(
    spec: BuildSpec,
    folder: Path,
    max_rows: int,
    num_shards: int | None = None,
    shard_index: int | None = None,
    overwrite: bool = False,
) -> dict | None:
    """Build this process's shards of the index in `folder`; return the manifest once all are complete.

    Collective under torchrun (every rank calls it). Raises `SearchError` (bad factory, failed training,
    non-finite vectors) or `ConfigConflict` (a folder of another build, without `overwrite`).
    """
    import faiss

    rank, world = group_rank()
    error = None
    try:
        if rank == 0:
            claim_folder(folder, IDENTITY, spec.identity(), overwrite, "another build", "--output_dir")
    except (OSError, ValueError) as err:
        error = err
    D.raise_if_any_failed(error)
    trained_path = folder / TRAINED
    sample_info: dict = {}
    try:
        if rank == 0 and not trained_path.is_file():
            faiss.omp_set_num_threads(
                max(1, _threads() * max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
            )
            sample = training_sample(spec.paths, spec.counts, spec.train_size, spec.seed, max_rows)
            sample_info = {"train_rows": len(sample), "train_sha256": _array_sha(sample)}
            write_json_atomic(folder / "trained.json", sample_info)  # same content from every writer
            publish_trained(train(sample, spec.dim, spec.factory), trained_path)
        elif rank == 0:
            # The quantizer exists: a temporary file of a trainer killed before publishing is a leftover
            # (one still training when it appeared finds it too, and leaves without linking).
            remove_stale_temporaries(folder, TRAINED)
    except (OSError, ValueError) as err:
        error = err
    D.raise_if_any_failed(error)
    faiss.omp_set_num_threads(_threads())
    trained_sha = _cached(lambda: file_sha256(trained_path))
    hashes = ContentHashes()  # one cache of passage-shard SHA-256s for the build (saved after each shard)
    plan = RowPlan(len(spec.paths), *_sharding(num_shards, shard_index), world_size=world, rank=rank)
    parts = RowParts(plan, lambda p: shard_files(folder, p.start)[0], _ids_check(spec, folder, trained_sha))
    try:
        own = plan.own
        for i in range(own.start, own.stop):
            part = Part(own.index, i, i + 1)
            if parts.part_done(part):
                logger.info("dr index: %s is complete; skipped", parts.path(part).name)
                continue
            _add_shard(spec, folder, parts, part, trained_path, trained_sha(), max_rows, hashes)
    except (OSError, ValueError, RuntimeError) as err:
        error = err
    D.raise_if_any_failed(error)
    if rank != 0:
        return None
    everything = RowParts(RowPlan(len(spec.paths)), parts.path_of, parts.check)
    missing = [i for i in range(len(spec.paths)) if not everything.part_done(Part(0, i, i + 1))]
    if missing:
        logger.info("dr index: %d of %d shards still to build (other tasks)", len(missing), len(spec.paths))
        return None
    try:
        return _write_manifest(spec, folder, trained_sha(), hashes)
    finally:
        hashes.save()


def group_rank() -> tuple[int, int]:
    """(rank, world size) of this process's group; (0, 1) without one (also after leaving one)."""
    return (D.get_rank(), D.get_world_size()) if D.is_initialized() else (0, 1)


def _sharding(num_shards: int | None, shard_index: int | None) -> tuple[int, int]:
    from dr.row_ranges import resolve_sharding

    return resolve_sharding(num_shards, shard_index)


def _cached(compute: Callable[[], str]) -> Callable[[], str]:
    value: list[str] = []

    def get() -> str:
        if not value:
            value.append(compute())
        return value[0]

    return get


def _array_sha(array: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _add_shard(
    spec: BuildSpec,
    folder: Path,
    parts: RowParts,
    part: Part,
    trained_path: Path,
    trained_sha: str,
    max_rows: int,
    hashes: ContentHashes,
) -> None:
    """Add passage shard ``part.start`` to a copy of the trained index; write its index, then its record."""
    import faiss

    i = part.start
    path = spec.paths[i]
    index = faiss.read_index(str(trained_path))
    row = 0
    for ids, vectors in iter_shard(path, max_rows=max_rows):
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        check_finite(vectors, path, row, ids)
        index.add(vectors)
        row += len(vectors)
    parts.write_part(part, lambda tmp: faiss.write_index(index, str(tmp)))  # removes its leftovers first
    index_path, record_path = shard_files(folder, i)
    remove_stale_temporaries(folder, record_path.name)  # of a process killed while writing the record
    write_json_atomic(
        record_path,
        {
            "shard": path,
            "rows": row,
            "fingerprint": shard_fingerprint(path, hashes),
            "trained_sha256": trained_sha,
            "index_bytes": index_path.stat().st_size,
        },
    )
    hashes.save()  # the manifest, written later perhaps by another task, finds the hash cached
    logger.info("dr index: %s: %d vectors from %s", index_path.name, row, path)


def _write_manifest(spec: BuildSpec, folder: Path, trained_sha: str, hashes: ContentHashes) -> dict:
    """``index.json``: what the index is, from what; identical whoever writes it (no times, no ranks)."""
    sample = json.loads((folder / "trained.json").read_text(encoding="utf-8"))
    shards = []
    for i, (path, count) in enumerate(zip(spec.paths, spec.counts)):
        index_path, record_path = shard_files(folder, i)
        shards.append(
            {
                "path": path,
                "rows": count,
                "fingerprint": shard_fingerprint(path, hashes),
                "index": index_path.name,
                "record": record_path.name,
                "index_bytes": index_path.stat().st_size,
            }
        )
    manifest = {
        "format": FORMAT,
        "factory": spec.factory,
        "metric": "inner_product",
        "dim": spec.dim,
        "seed": spec.seed,
        "train_size": spec.train_size,
        **sample,
        "trained_sha256": trained_sha,
        "num_passages": sum(spec.counts),
        "passage_meta": spec.passage_meta,
        "shards": shards,
    }
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest
