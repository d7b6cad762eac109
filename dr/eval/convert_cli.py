"""`dr convert` / `python -m dr.convert`: rewrite a run file in another format (tevatron, MS MARCO, TREC).

Usage::

    dr convert --input rank.txt --output rank.txt.marco            # tevatron -> MS MARCO (by suffix)
    dr convert --input run.marco --output run.trec --run_tag mine   # MS MARCO -> TREC, scores = 1/rank

The target format is `--to`, else inferred from the output suffix (``.marco``/``.tsv`` -> marco,
``.trec`` -> trec, ``.tevatron`` -> tevatron), else marco, as Tevatron's ``convert_result_to_marco``.
Ids and ranks survive every conversion; see `dr.io.runs` for the ordering and score conventions.
The input format is detected only where the content leaves no doubt; a 3-column file of positive
integers (MS MARCO ranks or Tevatron integer scores?) needs `--from` (exit status 2 without it).
"""

from __future__ import annotations

import argparse
import logging

from dr.errors import UsageError
from dr.io.runs import DEFAULT_TAG, FORMATS, RunFormatError, check_tag, format_for_suffix, read_run, write_run

logger = logging.getLogger("dr.convert")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dr convert", description="Convert a run file between formats.")
    parser.add_argument("--input", required=True, help="run file to read")
    parser.add_argument("--output", required=True, help="run file to write (atomically)")
    parser.add_argument(
        "--input_run_format",
        "--from",
        dest="src_format",
        default="auto",
        choices=("auto", *FORMATS),
        help="format of --input (default: detected from its content where it is unambiguous)",
    )
    parser.add_argument(
        "--run_format",
        "--to",
        dest="dst_format",
        default=None,
        choices=FORMATS,
        help="format of --output (default: by its suffix)",
    )
    parser.add_argument("--run_tag", default=DEFAULT_TAG, help="tag column of TREC output")
    return parser


def run(args: argparse.Namespace) -> int:
    dst = args.dst_format or format_for_suffix(args.output)
    if dst == "trec":
        try:
            check_tag(args.run_tag)
        except RunFormatError as err:
            raise UsageError(f"--run_tag: {err}") from None
    run_, src = read_run(args.input, args.src_format, flag="--from")
    write_run(args.output, run_, dst, tag=args.run_tag)
    logger.info("%d queries, %d hits: %s -> %s (%s)", len(run_), run_.num_hits(), src, dst, args.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`dr convert` for library callers and tests: the exit status (2 bad flags, 1 bad files)."""
    from dr.cli import run_command

    return run_command("convert", argv)
