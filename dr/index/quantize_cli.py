"""`dr quantize`: write int8 or binary codes of float passage shards beside them (`dr.index.quantize`).

Usage::

    dr quantize --passage_reps 'emb/corpus*.arrow' --quantize binary      # -> emb/binary/*.arrow
    dr search --query_reps emb/queries.arrow --passage_reps 'emb/corpus*.arrow' \\
        --quantize binary --rescore 10 --depth 100 --save_ranking_to run.txt

Single process; reruns keep the shards that are up to date.
"""

from __future__ import annotations

import argparse
import logging

from dr.index.quantize import KINDS, quantize_shards
from dr.search.shard_set import expand_paths, parse_bytes

logger = logging.getLogger("dr.quantize")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dr quantize",
        description="Write int8 or binary codes of float passage shards for dr search --quantize.",
    )
    p.add_argument("--passage_reps", required=True, help="float passage shard glob (quote it)")
    p.add_argument("--quantize", required=True, choices=KINDS, help="int8 (1 byte/dim) or binary (1 bit/dim)")
    p.add_argument(
        "--output_dir", default=None, help="folder for the codes (default: <shard folder>/<kind>/ per shard)"
    )
    p.add_argument("--max_memory", default="1G", help="float32 bytes of one block read at once, e.g. 2G")
    return p


def run(args: argparse.Namespace) -> int:
    max_memory = parse_bytes(args.max_memory)
    paths = expand_paths(args.passage_reps, "--passage_reps")
    outputs = quantize_shards(paths, args.quantize, args.output_dir, max_memory)
    logger.info("%d %s shard(s): %s", len(outputs), args.quantize, sorted({str(o.parent) for o in outputs}))
    return 0
