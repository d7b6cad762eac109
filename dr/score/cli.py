"""`dr score` / `python -m dr.score.cli`: flags, the process group, publishing the scored file.

Every rank sets up (input, teacher, parts folder) and scores its own rows (`dr.score.run`); all ranks
agree after each phase (a collective, so a failing rank cannot leave the others waiting), and only then
does rank 0 write the output and its manifest.
"""

from __future__ import annotations

import argparse
import os
from functools import partial

from dr.flags import add_bool
from dr.model.precision import BF16_CHOICES
from dr.score.run import ScoreUsageError, publish, score_own_part, setup_rank


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dr score", description="Teacher scores on every passage of a training file."
    )
    parser.add_argument(
        "--model_name_or_path", required=True, help="the teacher (a local folder or hub name)"
    )
    parser.add_argument("--teacher_type", required=True, choices=["cross", "bi"])
    parser.add_argument(
        "--dataset_name", "--train_file", "--input", required=True, help="Tevatron-format training JSONL"
    )
    parser.add_argument("--output", required=True, help="the scored training file to write (JSONL)")
    parser.add_argument("--tokenizer_name", default=None, help="tokenizer, if not the teacher's own")
    parser.add_argument(
        "--batch_size",
        "--per_device_eval_batch_size",
        type=int,
        default=64,
        help="pairs per forward pass (cross-encoder); texts per forward pass (bi-encoder)",
    )
    parser.add_argument("--max_length", type=int, default=None,
                        help="cross: max tokens of query + passage (default: the model's dr_cross_encoder.json, else 512)")  # fmt: skip
    parser.add_argument(
        "--truncation",
        default=None,
        choices=["longest_first", "only_second"],
        help="cross: what to cut when a pair is too long (only_second: the passage only); default: as the "
        "model was trained (dr_cross_encoder.json), else longest_first",
    )
    parser.add_argument("--q_max_len", "--query_max_len", type=int, default=None, help="bi: query max tokens")
    parser.add_argument(
        "--p_max_len", "--passage_max_len", type=int, default=None, help="bi: passage max tokens"
    )
    parser.add_argument(
        "--pooling", default=None, choices=["cls", "mean", "last"], help="bi: override pooling"
    )
    parser.add_argument(
        "--normalize", default=None, type=lambda v: v.lower() in ("1", "true", "yes"), nargs="?", const=True
    )
    add_bool(parser, "--ignore_st_config", help="bi: do not read a sentence-transformers folder's settings")
    parser.add_argument(
        "--num_shards", "--encode_num_shard", type=int, default=None, help="contiguous shards (SLURM array)"
    )
    parser.add_argument("--shard_index", "--encode_shard_index", type=int, default=None)
    parser.add_argument("--bf16", default="false", type=str.lower, choices=BF16_CHOICES, nargs="?", const="true",
                        help="bf16 autocast: false (default: teacher scores in float32), true, auto (bf16 where "
                        "the GPU/CPU has it in hardware)")  # fmt: skip
    parser.add_argument("--window_rows", type=int, default=256, help="rows read and written at a time")
    parser.add_argument("--overwrite", action="store_true", help="drop existing parts and rescore everything")
    return parser


def run(args: argparse.Namespace) -> int:
    """Every rank sets up and scores its part; all agree after each phase; rank 0 then publishes."""
    from dr import distributed as dist

    for name in ("batch_size", "max_length", "window_rows"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ScoreUsageError(f"--{name} must be >= 1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dist.run_phases(partial(setup_rank, args), partial(score_own_part, args), partial(publish, args))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`dr score` for library callers and tests: the exit status (2 bad flags, 1 bad files)."""
    from dr.cli import run_command

    return run_command("score", argv)


if __name__ == "__main__":
    from dr.cli import module_main

    raise SystemExit(module_main("score"))
