"""`python -m bench.run_table --qrels Q --title T RUN [RUN ...]`: score run files with `dr eval` and print one
markdown row per run (`name | m1 / m2 / ...`), writing `<run minus .run>.metrics.json` beside each run — the
table the SciFact / Cranfield benchmark scripts print."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run files (the row's name is the file name without .run)")
    parser.add_argument("--qrels", required=True)
    parser.add_argument("--metrics", nargs="+", default=["nDCG@10", "MRR@10", "R@100"])
    parser.add_argument("--title", default="run", help="the first column's header")
    args = parser.parse_args(argv)

    print(f"| {args.title} | {' / '.join(args.metrics)} |")
    print("|---|---|")
    for run in map(Path, args.runs):
        out = run.with_name(run.name.removesuffix(".run") + ".metrics.json")
        subprocess.run([sys.executable, "-m", "dr.evaluate", "--qrels", args.qrels, "--run", str(run),
                        "--metrics", *args.metrics, "--output", str(out)], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        values = json.loads(out.read_text(encoding="utf-8"))
        print(
            f"| {run.name.removesuffix('.run')} | "
            + " / ".join(f"{values[m]:.4f}" for m in args.metrics)
            + " |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
