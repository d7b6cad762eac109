"""`dr <command> [flags]`: the one entry point. Dispatch, logging set-up, and error -> exit status.

Every command module exposes `build_parser()` (an argparse parser) and `run(args) -> int | None`;
`run_command` parses with `dr.flags.parse_flags` (so `--config FILE`, booleans and `~` work the same for
every command), runs, and turns the two kinds of failure a user can fix into one line on stderr:
`UsageError` -> exit status 2, `InputError` -> 1 (`dr.errors`). Anything else is a bug and keeps its
traceback. `python -m dr.train|encode|search|convert|evaluate` (Tevatron's spellings) land here too.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

COMMANDS = {
    "train": ("dr.train.cli", "fine-tune a bi-encoder (in-batch + hard negatives, gathered across devices)"),
    "encode": ("dr.encode.cli", "encode a corpus or queries into Arrow embedding shards"),
    "index": ("dr.index.cli", "a faiss index per passage shard, built in parallel (dr search --index_dir)"),
    "quantize": ("dr.index.quantize_cli", "int8 / binary codes of passage shards for dr search --quantize"),
    "search": ("dr.search.cli", "exact, quantized or approximate sharded search -> run file"),
    "bm25": ("dr.bm25.cli", "BM25 (bm25s) run of queries over any corpus dr encode reads; index reused"),
    "rerank": (
        "dr.rerank.cli",
        "rerank a run's top-K with a cross-encoder -> a new run (distributed, resumable)",
    ),
    "fuse": ("dr.fuse.cli", "reciprocal-rank or weighted linear fusion of several runs -> one run"),
    "convert": ("dr.eval.convert_cli", "convert run files between tevatron, MS MARCO and TREC formats"),
    "eval": ("dr.eval.eval_cli", "MRR@10, nDCG@10, recall, MAP of a run against qrels"),
    "mine": ("dr.mine.cli", "hard negatives from a run of the training queries -> a new training file"),
    "score": ("dr.score.cli", "teacher scores (cross- or bi-encoder) on every passage of a training file"),
    "pipeline": (
        "dr.pipeline.cli",
        "train -> encode -> search -> convert -> eval from one config, resumable",
    ),
    "demo": ("dr.demo.cli", "the offline end-to-end demo on an embedded dataset (CPU, a few minutes)"),
}
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _usage() -> str:
    lines = ["usage: dr <command> [flags]   (dr <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


class _Formatter(logging.Formatter):
    """The log format, except for error reports (`report`), which print as the bare one-liner."""

    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage() if getattr(record, "bare", False) else super().format(record)


class _StderrHandler(logging.StreamHandler):
    """Writes each record to whatever `sys.stderr` is at that moment (a redirection, a test's capture)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def setup_logging() -> None:
    """INFO lines of the `dr.*` loggers on stderr, tagged with the rank in a multi-process job (idempotent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tag = f"[rank {os.environ.get('RANK', '0')}/{world}] " if world > 1 else ""
    logger = logging.getLogger("dr")
    logger.setLevel(logging.INFO)
    handler = next((h for h in logger.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        logger.addHandler(handler)
    handler.setFormatter(_Formatter(tag + LOG_FORMAT))


def report(command: str, message: str) -> None:
    """The one-line error format of every command (`dr encode: error: ...`), as an ERROR record of the
    command's logger, so that log capture and handlers see it too."""
    logging.getLogger(f"dr.{command}").error("dr %s: error: %s", command, message, extra={"bare": True})


def run_command(command: str, argv: list[str] | None = None) -> int:
    """Parse `argv` for `command`, run it, and return its exit status (see the module docstring)."""
    from dr.errors import DrError, PeerFailed
    from dr.flags import parse_flags

    module = importlib.import_module(COMMANDS[command][0])
    setup_logging()
    try:
        args = parse_flags(module.build_parser(), argv)
        return int(module.run(args) or 0)
    except DrError as err:
        # Ranks that only saw a peer fail stay quiet unless they are rank 0 (the peer has its own line).
        if not isinstance(err, PeerFailed) or os.environ.get("RANK", "0") == "0":
            report(command, str(err))
        return err.exit_code
    except OSError as err:  # unreadable / unwritable paths named by the flags
        if isinstance(err, BrokenPipeError):
            raise
        report(
            command, f"{err.filename + ': ' if getattr(err, 'filename', None) else ''}{err.strerror or err}"
        )
        return 1


def module_main(command: str) -> int:
    """`python -m dr.<module>`: run `command` with this process's arguments and leave (see exit_status)."""
    from dr.distributed import exit_status

    return exit_status(run_command(command, sys.argv[1:]))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"dr: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    code = run_command(command, rest)
    from dr.distributed import exit_status

    return exit_status(code)


if __name__ == "__main__":
    raise SystemExit(main())
