"""`dr search` / `python -m dr.search`: flags, ranks, and the run file.

Usage::

    dr search --query_reps q.arrow --passage_reps 'corpus/*.arrow' --depth 100 \\
        --save_ranking_to rank.txt --max_memory 2G
    torchrun --nproc_per_node 4 -m dr.search ...        # shards split over ranks, merged on rank 0

Exact search (default; `dr.search.exact`) never holds the corpus in memory; each rank searches its share
of the shards (`dr.search.shard_set.split_shards`) and rank 0 merges the per-rank top-k exactly.
``--index_dir`` searches a sharded faiss index built by `dr index` instead (`dr.search.ann`; ranks split its
shards); ``--index_factory`` builds one first, in this process (rank 0), as `dr index` would.

Output: the run (``--run_format tevatron`` by default, as Tevatron with ``--save_text``; ``marco``;
``trec``) written atomically to ``--save_ranking_to``, and ``<run>.config.json`` with the resolved
arguments, the shard list, counts and timings. ``--save_text`` is accepted for Tevatron compatibility: dr
always writes text and never pickles.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dr import distributed as D
from dr.errors import UsageError
from dr.flags import add_bool
from dr.index.build import build_index
from dr.index.cli import spec_from_args
from dr.index.manifest import read_manifest
from dr.index.quantize import KINDS as QUANTIZE_KINDS
from dr.index.quantize import check_kind
from dr.io.atomic import write_json_atomic
from dr.io.runs import FORMATS, Run, write_run
from dr.io.shards import ShardMeta
from dr.search.ann import search_index_dir
from dr.search.exact import _block_rows, merge_candidates, search_shards
from dr.search.shard_check import VERIFY_MODES, verify_shards
from dr.search.shard_set import (
    SearchError,
    check_query_passage,
    check_unique_docids,
    expand_paths,
    load_queries,
    parse_bytes,
    read_metas,
    split_shards,
)

logger = logging.getLogger("dr.search")


@dataclass
class Outcome:
    """What rank 0 writes: the ranking plus facts for the config sidecar."""

    scores: np.ndarray
    docids: list[list[str]]
    info: dict


def _positive_int(text: str) -> int:
    """An integer >= 1 (argparse type: a bad value is a usage error naming the flag, also in a pipeline)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dr search", description="Search passage embedding shards with query reps."
    )
    p.add_argument("--query_reps", required=True, help="query shard file or glob (quote it)")
    p.add_argument(
        "--passage_reps", default=None, help="passage shard glob (quote it); optional with --load_index"
    )
    p.add_argument("--depth", type=_positive_int, default=100, help="hits per query")
    p.add_argument("--batch_size", type=int, default=-1, help="queries per pass over the corpus; -1 = all")
    add_bool(p, "--save_text", help="accepted for Tevatron compatibility (always text)")
    p.add_argument("--save_ranking_to", required=True, help="run file to write")
    p.add_argument(
        "--run_format", "--format", dest="run_format", default="tevatron", choices=FORMATS, help="run format"
    )
    p.add_argument("--run_tag", default="dr", help="tag column of TREC runs")
    add_bool(p, "--use_gpu", help="faiss-gpu, else torch CUDA, else CPU + warning")
    add_bool(p, "--cpu", help="force CPU (the default)")
    add_bool(p, "--fp16_index", help="GPU only: keep passage vectors in float16")
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
    p.add_argument("--seed", type=int, default=0, help="seed of the --index_factory training sample")
    p.add_argument(
        "--save_index",
        default=None,
        help="keep the --index_factory index in this folder (as dr index writes)",
    )
    p.add_argument(
        "--index_dir", default=None, help="search a sharded index built by dr index (ranks split its shards)"
    )
    p.add_argument("--load_index", default=None, help="= --index_dir (a folder --save_index wrote)")
    p.add_argument(
        "--quantize", default=None, choices=QUANTIZE_KINDS, help="first pass over the codes dr quantize wrote"
    )
    p.add_argument(
        "--rescore",
        type=_positive_int,
        default=None,
        help="with --quantize or an index: rescore the top K*depth exactly from the float shards",
    )
    p.add_argument("--quantized_dir", default=None, help="the codes' folder (default: <shards>/<kind>/)")
    add_bool(p, "--allow_model_mismatch", help="query/passage reps from different models")
    p.add_argument(
        "--verify",
        default="auto",
        choices=VERIFY_MODES,
        help="check shards against their manifest: auto = rows, size and sha256 where recorded; full = "
        "also refuse shards no manifest lists; size = rows and size only; none (see docs/search.md)",
    )
    add_bool(p, "--quiet", help="no progress bar")
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
            _verify(mine, args.verify, "passage", timings)  # each rank hashes only the shards it searches
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
    except (ValueError, OSError) as err:  # every rank must reach the agreement below
        error = err
    D.raise_if_any_failed(error)
    gathered = D.gather_to_main(part)
    scores, docids = merge_candidates(gathered, args.depth) if gathered and len(gathered) > 1 else part
    timings["search_s"] = time.perf_counter() - t0
    info = {
        "passage_shards": [{"path": p, "count": c} for p, c in zip(paths, counts)],
        "num_passages": total,
        "passage_meta": _meta_fields(metas[0]),
        "timings": timings,
    }
    return Outcome(scores, docids, info)


def _verify(paths: list[str], mode: str, side: str, timings: dict) -> None:
    """Refuse shards that differ from their manifest (dr/search/shard_check.py); log what it cost."""
    report = verify_shards(paths, mode)
    if report.checked:  # shards without any manifest (plain pyarrow files) pass silently in auto mode
        logger.info("dr search: %s shards: %s", side, report.summary())
        timings[f"verify_{side}_s"] = report.seconds


def _meta_fields(meta: ShardMeta) -> dict:
    """A shard's metadata for the config/sidecar JSON, without the per-shard row count."""
    fields = asdict(meta)
    fields.pop("count")
    return fields


def _approximate(args, query_vecs: np.ndarray, qmeta: ShardMeta) -> Outcome | None:
    """Search an index folder (`dr.search.ann`); with --index_factory, build it first (`dr.index.build`).

    ``--index_factory`` is the one-process case of `dr index`: the same build, into ``--save_index`` (or a
    temporary folder), then the same search as ``--index_dir``. Collective over the ranks of the group
    (--index_dir: they split the shards); rank 0 gets the outcome.
    """
    import tempfile

    timings = {}
    t0 = time.perf_counter()
    folder = args.index_dir or args.load_index
    with tempfile.TemporaryDirectory(prefix="dr-index-") as scratch:
        if args.index_factory:
            spec = spec_from_args(args.passage_reps, args.index_factory, args.train_size, args.seed)
            _verify(spec.paths, args.verify, "passage", timings)
            folder = args.save_index or scratch
            max_rows = _block_rows(spec.dim, parse_bytes(args.max_memory))
            build_index(spec, Path(folder), max_rows, 1, 0)
        manifest = read_manifest(folder)
        meta = manifest.get("passage_meta")
        if meta:
            check_query_passage(qmeta, ShardMeta(**meta, count=0), args.allow_model_mismatch)
        if args.depth > manifest["num_passages"] and D.is_main_process():
            logger.warning(
                "dr search: --depth %d exceeds the %d passages; returning all of them",
                args.depth,
                manifest["num_passages"],
            )
        timings["index_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = search_index_dir(
            folder, query_vecs, args.depth, args.index_params, args.rescore, parse_bytes(args.max_memory)
        )
    if result is None:
        return None
    timings.update(result.info.pop("timings"), search_s=time.perf_counter() - t0)
    return Outcome(result.scores, result.docids, {**result.info, "timings": timings})


def _quantized(args, query_vecs: np.ndarray, qmeta: ShardMeta) -> Outcome:
    """A first pass over quantized shards, then exact rescoring (`dr.search.quantized`); rank 0 only."""
    from dr.search.quantized import locate, quantized_search

    timings = {}
    t0 = time.perf_counter()
    paths = expand_paths(args.passage_reps, "--passage_reps")
    metas = read_metas(paths, "passage")
    check_query_passage(qmeta, metas[0], args.allow_model_mismatch)
    check_kind(args.quantize, metas[0].dim)
    check_unique_docids(paths)
    quantized_paths = locate(paths, args.quantize, args.quantized_dir)
    _verify(paths, args.verify, "passage", timings)
    _verify(quantized_paths, args.verify, "quantized", timings)
    total = sum(m.count for m in metas)
    if args.depth > total:
        logger.warning("dr search: --depth %d exceeds the %d passages; returning all", args.depth, total)
    timings["validate_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = quantized_search(
        query_vecs, paths, metas, quantized_paths, args.quantize, args.depth, args.rescore,
        parse_bytes(args.max_memory), args.batch_size,
    )  # fmt: skip
    timings.update(result.info.pop("timings"), search_s=time.perf_counter() - t0)
    info = {
        "passage_shards": [{"path": p, "count": m.count} for p, m in zip(paths, metas)],
        "num_passages": total,
        "passage_meta": _meta_fields(metas[0]),
        **result.info,
        "timings": timings,
    }
    return Outcome(result.scores, result.docids, info)


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
    index_dir = args.index_dir or args.load_index
    if args.passage_reps is None and not index_dir:
        raise UsageError("--passage_reps is required unless --index_dir is given")
    if args.save_index and not args.index_factory:
        raise UsageError("--save_index needs --index_factory")
    if args.index_factory and index_dir:
        raise UsageError(
            "--index_factory builds an index; --index_dir/--load_index search a built one: not both"
        )
    if args.depth < 1:
        raise UsageError(f"--depth must be >= 1, got {args.depth}")
    if args.rescore is not None and not (args.quantize or args.index_factory or index_dir):
        raise UsageError("--rescore needs --quantize int8|binary, --index_factory or --index_dir")
    if args.quantize and (args.index_factory or index_dir or args.use_gpu):
        raise UsageError(
            "--quantize runs on the CPU without an index: drop --index_factory/--index_dir/--use_gpu"
        )
    parse_bytes(args.max_memory)
    backend = choose_backend(args.use_gpu)
    query_paths = expand_paths(args.query_reps, "--query_reps")
    _verify(query_paths, args.verify, "query", {})
    query_ids, query_vecs, qmeta = load_queries(query_paths)
    approximate = bool(args.index_factory or index_dir)
    if (args.index_factory or args.quantize) and D.get_world_size() > 1:
        # Built on rank 0 (dr index builds in parallel). The other ranks have nothing to do: all leave the
        # group now, without a barrier, so none waits in a collective while rank 0 builds.
        if D.is_main_process():
            logger.warning(
                "dr search: --index_factory/--quantize run on rank 0 only (use dr index + --index_dir)"
            )
        D.leave_process_group()
    if approximate:
        outcome = _approximate(args, query_vecs, qmeta) if D.get_rank() == 0 or index_dir else None
    elif args.quantize:
        outcome = _quantized(args, query_vecs, qmeta) if D.get_rank() == 0 else None
    else:
        outcome = _exact(args, query_vecs, qmeta, backend)
    if D.get_rank() != 0:
        return
    t0 = time.perf_counter()
    write_run(
        args.save_ranking_to,
        _to_run(query_ids, outcome.scores, outcome.docids),
        args.run_format,
        args.run_tag,
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
    logger.info("%d queries x depth %d -> %s", len(query_ids), outcome.scores.shape[1], args.save_ranking_to)


def run(args: argparse.Namespace) -> int:
    """`dr search` under the launcher's process group (if any)."""
    if args.use_gpu and args.cpu:
        raise UsageError("--use_gpu and --cpu are mutually exclusive")
    with D.process_group():
        run_search(args)
    return 0
