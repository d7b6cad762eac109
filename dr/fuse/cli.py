"""`dr fuse`: fuse several runs of the same queries into one run (RRF or weighted linear).

Usage::

    dr fuse --runs dense.txt bm25.txt --method rrf --depth 100 --save_ranking_to fused.txt
    dr fuse --runs dense.txt bm25.trec --method linear --weights 0.7 0.3 --normalize minmax \\
        --depth 100 --save_ranking_to fused.trec --run_format trec

Input runs may be in any dr run format, each detected from its content as `dr eval` detects it, or named
with ``--run_formats`` (one format for every run, or one per run). The rules for documents and queries
that only some runs have are in `dr.fuse.fusion` and docs/fusion.md. Output: the run, written atomically,
and ``<run>.config.json`` (the resolved arguments, each input's format and size, counts).
"""

from __future__ import annotations

import argparse
import logging

from dr.errors import UsageError
from dr.fuse.fusion import DEFAULT_RRF_K, METHODS, NORMALIZATIONS, fuse
from dr.io.atomic import write_json_atomic
from dr.io.runs import FORMATS, RunFormatError, check_tag, read_run, write_run

logger = logging.getLogger("dr.fuse")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dr fuse", description="Fuse several runs of the same queries into one.")
    p.add_argument("--runs", nargs="+", required=True, help="run files (2 or more), any dr run format")
    p.add_argument(
        "--run_formats",
        nargs="+",
        default=["auto"],
        choices=("auto", *FORMATS),
        help="format of the runs: one for all or one per run (default: detected from each file's content)",
    )
    p.add_argument("--method", default="rrf", choices=METHODS, help="rrf (ranks) or linear (scores)")
    p.add_argument("--rrf_k", type=float, default=DEFAULT_RRF_K, help="RRF: score = sum w / (k + rank)")
    p.add_argument(
        "--weights", nargs="+", type=float, default=None, help="one weight per run (default 1 each)"
    )
    p.add_argument(
        "--normalize",
        default=None,
        choices=NORMALIZATIONS,
        help="linear: per-query score normalization (default minmax); not used by rrf",
    )
    p.add_argument("--depth", type=int, default=100, help="hits per query in the fused run")
    p.add_argument("--save_ranking_to", required=True, help="run file to write")
    p.add_argument(
        "--run_format",
        "--format",
        dest="run_format",
        default="tevatron",
        choices=FORMATS,
        help="output format",
    )
    p.add_argument("--run_tag", default="dr-fuse", help="tag column of TREC output")
    return p


def run(args: argparse.Namespace) -> int:
    """Read the runs, fuse them, write the fused run and its config sidecar."""
    formats = list(args.run_formats)
    if len(formats) == 1:
        formats *= len(args.runs)
    if len(formats) != len(args.runs):
        raise UsageError(
            f"--run_formats: {len(formats)} formats for {len(args.runs)} runs; give 1 or one per run"
        )
    if args.normalize is not None and args.method != "linear":
        raise UsageError("--normalize applies to --method linear only")
    normalization = args.normalize or "minmax"
    if args.run_format == "trec":
        try:
            check_tag(args.run_tag)
        except RunFormatError as err:
            raise UsageError(f"--run_tag: {err}") from None
    if args.weights is not None and len(args.weights) != len(args.runs):  # before reading large files
        raise UsageError(
            f"--weights: {len(args.weights)} weights for {len(args.runs)} runs; give one per run"
        )
    runs, inputs = [], []
    for path, fmt in zip(args.runs, formats):
        run_, used = read_run(path, fmt, flag="--run_formats")
        runs.append(run_)
        inputs.append({"path": path, "format": used, "queries": len(run_), "hits": run_.num_hits()})
    fused, report = fuse(
        runs, args.method, args.depth, args.weights, args.rrf_k, normalization, names=args.runs
    )
    if report.partial_queries:
        logger.warning(
            "%d of %d queries are missing from some runs; each is fused from the runs that have it",
            report.partial_queries,
            report.num_queries,
        )
    write_run(args.save_ranking_to, fused, args.run_format, args.run_tag)
    config = {
        "args": {**vars(args), "normalize": normalization if args.method == "linear" else None},
        "inputs": inputs,
        "num_queries": report.num_queries,
        "num_partial_queries": report.partial_queries,
        "num_hits": fused.num_hits(),
    }
    write_json_atomic(args.save_ranking_to + ".config.json", config)
    logger.info(
        "%d runs, %d queries -> %s (%s)", len(runs), report.num_queries, args.save_ranking_to, args.method
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`dr fuse` for library callers and tests: the exit status (2 bad flags, 1 bad files)."""
    from dr.cli import run_command

    return run_command("fuse", argv)
