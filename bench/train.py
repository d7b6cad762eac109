"""Training throughput and memory on CPU: tiny vs MiniLM-size model, 1 vs 2 ranks, gathered negatives on/off.

Each configuration runs `dr train` in its own process tree (so peak memory does not mix) for a fixed
number of steps and reads the Trainer's own timing (which excludes start-up). The global batch is the
same in every row (8 queries x 4 passages), so 2 ranks process half of it each.

    python -m bench.train                 # both models, ~5 minutes on 2 cores
    python -m bench.train --models tiny   # seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from bench.train_runs import read_train_log, run_with_peak_rss
from tests.helpers import (
    as_flags,
    make_tiny_model,
    make_train_rows,
    minilm_dir,
    subprocess_env,
    torchrun,
    write_jsonl,
)

GLOBAL_QUERIES = 8
GROUP = 4


def model_dir(name: str, work: Path) -> Path:
    if name == "tiny":
        return make_tiny_model(work / "tiny")
    return minilm_dir()


def run_one(
    model: Path, data: Path, work: Path, ranks: int, gather: bool, steps: int, p_max_len: int
) -> dict:
    out = work / f"out-{ranks}-{gather}-{time.time_ns()}"
    flags = as_flags(
        model_name_or_path=model,
        dataset_name=data,
        output_dir=out,
        per_device_train_batch_size=GLOBAL_QUERIES // ranks,
        train_n_passages=GROUP,
        max_steps=steps,
        save_strategy="no",
        logging_steps=steps,
        q_max_len=32,
        p_max_len=p_max_len,
        pooling="mean",
        learning_rate="1e-5",
        negatives_x_device=str(gather).lower(),
        dataloader_num_workers=0,
    )
    launcher = torchrun(ranks) + ["-m", "dr.train"] if ranks > 1 else [sys.executable, "-m", "dr.train"]
    threads = str(max(1, (os.cpu_count() or 2) // ranks))
    _, peak_mib = run_with_peak_rss(launcher + flags, subprocess_env(OMP_NUM_THREADS=threads), str(REPO))
    _, runtime = read_train_log(out)
    return {
        "steps_per_s": steps / runtime,
        "queries_per_s": steps * GLOBAL_QUERIES / runtime,
        # ru_maxrss of children is the largest single process seen so far (per rank, not the sum).
        "peak_rss_mib_per_rank": peak_mib,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["tiny", "minilm"], choices=["tiny", "minilm"])
    parser.add_argument("--steps", type=int, default=0, help="steps per run (default: 40 tiny, 8 MiniLM)")
    parser.add_argument("--p_max_len", type=int, default=128)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_jsonl(work / "train.jsonl", make_train_rows(400, n_negatives=GROUP))
        for name in args.models:
            model = model_dir(name, work)
            steps = args.steps or (40 if name == "tiny" else 8)
            for ranks, gather in [(1, False), (2, False), (2, True)]:
                result = run_one(model, data, work, ranks, gather, steps, args.p_max_len)
                rows.append({"model": name, "ranks": ranks, "gather": gather, "steps": steps, **result})
                print(
                    f"  done {name} ranks={ranks} gather={gather}: {result['steps_per_s']:.2f} steps/s",
                    flush=True,
                )
    base = {r["model"]: r["steps_per_s"] for r in rows if r["ranks"] == 1}
    print(
        f"\nglobal batch {GLOBAL_QUERIES} queries x {GROUP} passages, CPU threads split across ranks, "
        f"{os.cpu_count()} cores\n"
    )
    print("| model | ranks | gathered negatives | steps/s | queries/s | vs 1 rank | peak RSS / rank (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_rss_mib_per_rank']:.0f}"
        print(
            f"| {r['model']} | {r['ranks']} | {'yes' if r['gather'] else 'no'} | {r['steps_per_s']:.2f} | "
            f"{r['queries_per_s']:.1f} | {r['steps_per_s'] / base[r['model']]:.2f} | {peak} |"
        )


if __name__ == "__main__":
    main()
