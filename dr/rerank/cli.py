"""`dr rerank`: rescore each query's top-K candidates of a run with a cross-encoder.

Usage::

    dr rerank --model_name_or_path CE --run first_stage.tsv --corpus corpus.jsonl --queries queries.tsv \\
        --depth 100 --save_ranking_to reranked.tsv [--run_format tevatron|trec|marco]
    torchrun --nproc_per_node 4 -m dr.rerank --run_file first_stage.tsv ...   (queries split over the ranks;
        --run_file: torchrun's parser takes --run for an abbreviation of its own --run-path)

Every rank sets up (inputs checked, model, parts folder) and reranks its own queries (`dr.rerank.run`);
all ranks agree after each phase (a collective, so a failing rank cannot leave the others waiting), and
only then does rank 0 write the run and its config.
"""

from __future__ import annotations

import argparse
import os
from functools import partial

from dr.errors import UsageError
from dr.io.runs import FORMATS, RunFormatError, check_tag
from dr.model.precision import BF16_CHOICES

TRUNCATIONS = ("longest_first", "only_second")  # dr.model.cross_encoder's; not imported: it needs torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dr rerank", description="Rerank a run's top-K with a cross-encoder.")
    p.add_argument("--model_name_or_path", required=True, help="the cross-encoder (dr train --model_type "
                   "cross_encoder, or any 1-label AutoModelForSequenceClassification folder)")  # fmt: skip
    p.add_argument("--tokenizer_name", default=None, help="tokenizer, if not the model's own")
    p.add_argument("--run", "--run_file", dest="run", required=True,
                   help="the first-stage run to rerank (spell it --run_file under torchrun, whose own "
                   "--run-path makes --run ambiguous there)")  # fmt: skip
    p.add_argument(
        "--input_run_format",
        default="auto",
        choices=("auto", *FORMATS),
        help="format of --run (auto: detected)",
    )
    p.add_argument("--corpus", required=True, help="passages: file, glob (quote it), folder or BEIR folder")
    p.add_argument("--queries", required=True, help="queries: file, glob, folder or BEIR folder")
    p.add_argument(
        "--query_split", default="test", help="split of a BEIR folder's queries (queries.<split>.tsv)"
    )
    p.add_argument("--depth", type=int, default=100, help="candidates reranked per query: the run's first K")
    p.add_argument("--save_ranking_to", required=True, help="run file to write")
    p.add_argument(
        "--run_format", "--format", dest="run_format", default="tevatron", choices=FORMATS,
        help="format of the written run (marco drops the scores)",
    )  # fmt: skip
    p.add_argument("--run_tag", default="dr-rerank", help="tag column of TREC runs")
    p.add_argument(
        "--batch_size", "--per_device_eval_batch_size", type=int, default=64, help="pairs per forward"
    )
    p.add_argument("--max_length", type=int, default=None,
                   help="max tokens of query + passage (default: the model's dr_cross_encoder.json, else 256)")  # fmt: skip
    p.add_argument("--truncation", default=None, choices=TRUNCATIONS,
                   help="what a too-long pair loses (default: as trained, else longest_first)")  # fmt: skip
    p.add_argument("--bf16", default="auto", type=str.lower, choices=BF16_CHOICES, nargs="?", const="true",
                   help="bf16 autocast: true, false, auto (bf16 where the GPU/CPU has it in hardware)")  # fmt: skip
    p.add_argument(
        "--num_shards", type=int, default=None, help="contiguous shards of the queries (SLURM array)"
    )
    p.add_argument("--shard_index", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="drop existing parts and rerank everything")
    return p


def check_flags(args: argparse.Namespace) -> None:
    for name in ("depth", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_length is not None and args.max_length < 8:
        raise UsageError(f"--max_length must be >= 8, got {args.max_length}")
    if args.run_format == "trec":
        try:
            check_tag(args.run_tag)
        except RunFormatError as err:
            raise UsageError(f"--run_tag: {err}") from None


def run(args: argparse.Namespace) -> int:
    """Every rank sets up and reranks its queries; all agree after each phase; rank 0 then publishes."""
    from dr import distributed as dist
    from dr.rerank.run import publish, rerank_own_part, setup_rank

    check_flags(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dist.run_phases(partial(setup_rank, args), partial(rerank_own_part, args), partial(publish, args))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`dr rerank` for library callers and tests: the exit status (2 bad flags, 1 bad files)."""
    from dr.cli import run_command

    return run_command("rerank", argv)
