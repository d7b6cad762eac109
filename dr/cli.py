"""`dr <command> [flags]`: one console script for every stage; each command module owns its `main(argv)`."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("dr.train.cli", "fine-tune a bi-encoder (in-batch + hard negatives, gathered across devices)"),
    "encode": ("dr.index.encode", "encode a corpus or queries into Arrow embedding shards"),
    "search": ("dr.index.search", "exact sharded FAISS search -> run file"),
    "convert": ("dr.eval.convert", "convert run files between tevatron, MS MARCO and TREC formats"),
    "eval": ("dr.eval.evaluate", "MRR@10, nDCG@10, recall, MAP of a run against qrels"),
    "mine": ("dr.eval.mine", "hard negatives from a run of the training queries -> a new training file"),
    "pipeline": ("dr.pipeline", "train -> encode -> search -> convert -> eval from one config, resumable"),
    "demo": ("dr.demo.run", "the offline end-to-end demo on an embedded dataset (CPU, a few minutes)"),
}


def _usage() -> str:
    lines = ["usage: dr <command> [flags]   (dr <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"dr: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    from dr.distributed import exit_status  # after the command's import: `dr --help` stays torch-free

    return exit_status(int(module.main(rest) or 0))


if __name__ == "__main__":
    raise SystemExit(main())
