"""`dr eval` / `python -m dr.evaluate`: score a run against qrels (see `dr.eval.metrics` for semantics).

Usage::

    dr eval --qrels qrels.dev.trec --run rank.txt --metrics MRR@10 R@1000 --output metrics.json
"""

from __future__ import annotations

import argparse

from dr.console import echo
from dr.eval.metrics import ACCEPTED_METRICS, DEFAULT_METRICS, check_metrics, evaluate, format_table
from dr.io.atomic import write_json_atomic
from dr.io.qrels import read_qrels
from dr.io.runs import FORMATS, read_run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dr eval", description="Evaluate a run against qrels.")
    parser.add_argument(
        "--qrels", required=True, help="TREC qrels (qid iter docid rel) or MS MARCO qrels TSV"
    )
    parser.add_argument("--run", required=True, help="run file (tevatron, marco or trec; detected)")
    parser.add_argument("--run_format", default="auto", choices=("auto", *FORMATS))
    parser.add_argument(
        "--metrics", nargs="+", default=list(DEFAULT_METRICS), help=f"any of: {ACCEPTED_METRICS}"
    )
    parser.add_argument("--output", default=None, help="write the metrics as JSON here (atomically)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Evaluate, write the JSON (if asked), print the table."""
    check_metrics(args.metrics)  # a bad flag is reported before any file is read
    qrels = read_qrels(args.qrels)
    run_, _ = read_run(args.run, args.run_format)
    results = evaluate(qrels, run_, args.metrics)
    if args.output:
        write_json_atomic(args.output, results)
    echo(format_table(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`dr eval` for library callers and tests: the exit status (2 bad flags, 1 bad files)."""
    from dr.cli import run_command

    return run_command("eval", argv)
