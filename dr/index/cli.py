"""`dr index` / `python -m dr.index`: build a sharded faiss index of passage shards (`dr.index.build`).

Usage::

    dr index --passage_reps 'emb/corpus*.arrow' --index_factory IVF4096,PQ64 --output_dir emb/ivfpq
    torchrun --nproc_per_node 2 -m dr.index ...                  # ranks split the passage shards
    sbatch --array=0-7 ... dr index ... --num_shards 8           # or array tasks (shard = task id)
    dr search --query_reps q.arrow --index_dir emb/ivfpq --index_params nprobe=64 --rescore 10 ...

Reruns skip complete shards; the manifest (``index.json``) is written once every shard is complete.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from dr import distributed as D
from dr.index.build import BuildSpec, build_index
from dr.search.exact import _block_rows
from dr.search.shard_set import (
    SearchError,
    check_unique_docids,
    expand_paths,
    parse_bytes,
    read_metas,
)

logger = logging.getLogger("dr.index")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dr index", description="Build a sharded faiss index of passage shards.")
    p.add_argument("--passage_reps", required=True, help="passage shard glob (quote it)")
    p.add_argument(
        "--index_factory", required=True, help="any faiss factory: IVF4096,Flat, IVF4096,PQ64, HNSW32"
    )
    p.add_argument(
        "--output_dir", required=True, help="index folder (one index + record file per passage shard)"
    )
    p.add_argument("--train_size", type=int, default=200_000, help="rows sampled across all shards to train")
    p.add_argument("--seed", type=int, default=0, help="seed of the training sample")
    p.add_argument("--num_shards", type=int, default=None, help="split the passage shards over array tasks")
    p.add_argument("--shard_index", type=int, default=None, help="this task's part (default: SLURM task id)")
    p.add_argument("--max_memory", default="1G", help="float32 bytes of one block read at once, e.g. 2G")
    p.add_argument("--overwrite", action="store_true", help="replace a folder built from other inputs")
    return p


def spec_from_args(passage_reps: str, factory: str, train_size: int, seed: int) -> BuildSpec:
    """Read and check the passage shards (metadata, unique docids) into what a build needs."""
    from dataclasses import asdict

    paths = [str(Path(p).resolve()) for p in expand_paths(passage_reps, "--passage_reps")]
    metas = read_metas(paths, "passage")
    check_unique_docids(paths)
    if sum(m.count for m in metas) == 0:
        raise SearchError(f"--passage_reps {passage_reps!r}: the shards hold no passages")
    meta = asdict(metas[0])
    meta.pop("count")
    return BuildSpec(paths, [m.count for m in metas], metas[0].dim, factory, train_size, seed, meta)


def run(args: argparse.Namespace) -> int:
    if args.train_size < 1:
        raise SearchError(f"--train_size must be >= 1, got {args.train_size}")
    t0 = time.perf_counter()
    with D.process_group():
        spec = spec_from_args(args.passage_reps, args.index_factory, args.train_size, args.seed)
        max_rows = _block_rows(spec.dim, parse_bytes(args.max_memory))
        manifest = build_index(
            spec, Path(args.output_dir), max_rows, args.num_shards, args.shard_index, args.overwrite
        )
    if manifest is not None:
        size = sum(s["index_bytes"] for s in manifest["shards"])
        logger.info(
            "dr index: %s: %d shards, %d passages, %.1f MB of index, %.1f s",
            args.output_dir,
            len(manifest["shards"]),
            manifest["num_passages"],
            size / 1e6,
            time.perf_counter() - t0,
        )
    return 0
