"""`dr convert`: rewrite a run file in another format (tevatron, MS MARCO, TREC).

Usage::

    dr convert --input rank.txt --output rank.txt.marco            # tevatron -> MS MARCO (by suffix)
    dr convert --input run.marco --output run.trec --run_tag mine   # MS MARCO -> TREC, scores = 1/rank

The target format is `--to`, else inferred from the output suffix (``.marco``/``.tsv`` -> marco,
``.trec`` -> trec, ``.tevatron`` -> tevatron), else marco, as Tevatron's ``convert_result_to_marco``.
Ids and ranks survive every conversion; see `dr.runfile` for the ordering and score conventions.
"""

from __future__ import annotations

import argparse
import sys

from dr.io.paths import expand_home
from dr.io.runs import DEFAULT_TAG, FORMATS, format_for_suffix, read_run, write_run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dr convert", description="Convert a run file between formats.")
    parser.add_argument("--input", required=True, help="run file to read")
    parser.add_argument("--output", required=True, help="run file to write (atomically)")
    parser.add_argument("--from", dest="src_format", default="auto", choices=("auto", *FORMATS))
    parser.add_argument(
        "--to", dest="dst_format", default=None, choices=FORMATS, help="default: by output suffix"
    )
    parser.add_argument("--run_tag", default=DEFAULT_TAG, help="tag column of TREC output")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `dr convert`; return the exit status (0 ok, 2 bad input)."""
    args = expand_home(build_parser().parse_args(argv))
    dst = args.dst_format or format_for_suffix(args.output)
    try:
        run, src = read_run(args.input, args.src_format)
        write_run(args.output, run, dst, tag=args.run_tag)
    except (ValueError, OSError) as err:
        print(f"dr convert: error: {err}", file=sys.stderr)
        return 2
    print(
        f"dr convert: {len(run)} queries, {run.num_hits()} hits: {src} -> {dst} ({args.output})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
