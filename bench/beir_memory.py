"""Memory of BEIR-folder training data: peak RSS of building `dr train`'s dataset from a BEIR folder.

Writes (once) a synthetic BEIR folder: N passages of ~60 words (`corpus.jsonl`), Q training queries
(`queries.train.tsv`) with 1-3 relevant passages each (`qrels.train.trec`). Then, each in its own
subprocess so that figures do not mix, it loads the training groups (`load_train_groups`, what `dr train`
does before the model), wraps them in `TrainGroups` and reads G groups of 8 passages. Per run it prints
the time, the peak RSS (the kernel's high-water mark, which counts the memory-mapped Arrow cache pages
touched), the peak anonymous RSS (sampled every 5 ms: the memory that is the process's own) and the
Arrow pool at the end. The first run converts the JSONL into the `datasets` Arrow cache (kept in
FOLDER/.hf_cache); it is reported apart, as "cold".

    python -m bench.beir_memory --passages 1000000                      # this tree, folder /tmp/beir1m
    python -m bench.beir_memory --passages 1000000 --compare /work/main # A B A B against another tree
    python -m bench.beir_memory --passages 20000 --folder /tmp/beir20k  # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = 60  # per passage
GROUP = 8  # passages per training group


def write_folder(folder: Path, passages: int, queries: int, seed: int = 0) -> None:
    """The synthetic BEIR folder, written in chunks (the parent stays small); skipped if already there."""
    import numpy as np

    stamp = folder / ".bench_beir_memory.json"
    wanted = {"passages": passages, "queries": queries, "seed": seed, "words": WORDS}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i:04d}" for i in range(5000)])
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as f:
        for start in range(0, passages, 50_000):
            n = min(50_000, passages - start)
            words = vocab[rng.integers(len(vocab), size=(n, WORDS))]
            f.writelines(
                json.dumps({"_id": f"d{start + i}", "title": f"title {start + i}", "text": " ".join(row)})
                + "\n"
                for i, row in enumerate(words)
            )
    with (
        open(folder / "queries.train.tsv", "w", encoding="utf-8") as fq,
        open(folder / "qrels.train.trec", "w", encoding="utf-8") as fr,
    ):
        for q in range(queries):
            fq.write(f"q{q}\t{' '.join(vocab[rng.integers(len(vocab), size=8)])}\n")
            judged = rng.choice(passages, size=int(rng.integers(1, 4)), replace=False)
            fr.writelines(f"q{q} 0 d{d} 1\n" for d in judged)
    stamp.write_text(json.dumps(wanted))


def _anon_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def child(folder: str, groups: int) -> None:
    """Build the training dataset and read `groups` groups; print one JSON line of measurements."""
    peak_anon = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak_anon[0] = max(peak_anon[0], _anon_kib())

    threading.Thread(target=sample, daemon=True).start()
    import pyarrow as pa

    from dr.train.groups import TrainGroups, load_train_groups

    if not folder:  # the imports alone: the floor every row stands on
        done.set()
        print(
            json.dumps(
                {
                    "dr": "imports only",
                    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "peak_anon_mib": max(peak_anon[0], _anon_kib()) / 1024,
                }
            )
        )
        return
    start = time.perf_counter()
    source = load_train_groups(folder, split="train", group_size=GROUP)
    dataset = TrainGroups(source, GROUP, seed=42)
    built = time.perf_counter()
    n = min(groups, len(dataset))
    checksum = 0
    for i in range(n):
        item = dataset[(0, i)]
        checksum += sum(len(p) for p in item.passages)
    end = time.perf_counter()
    done.set()
    peak_anon[0] = max(peak_anon[0], _anon_kib())
    print(
        json.dumps(
            {
                "dr": str(Path(sys.modules["dr"].__file__).parent),
                "queries": len(dataset),
                "build_s": built - start,
                "groups_s": end - built,
                "groups": n,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_anon_mib": peak_anon[0] / 1024,
                "arrow_pool_mib": pa.total_allocated_bytes() / 2**20,
                "checksum": checksum,
            }
        )
    )


def run_child(tree: Path, folder: Path | None, groups: int, cache: Path) -> dict:
    """One measurement in a fresh interpreter importing `dr` from `tree` (no folder: the imports only)."""
    env = dict(os.environ, PYTHONPATH=str(tree), HF_DATASETS_CACHE=str(cache))
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        str(folder or ""),
        "--groups",
        str(groups),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tree), check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the run with {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--passages", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=0, help="training queries (default: passages / 20)")
    parser.add_argument("--folder", type=Path, default=None, help="default: /tmp/beir<N>")
    parser.add_argument("--groups", type=int, default=1000, help="training groups read after building")
    parser.add_argument("--compare", type=Path, default=None, help="another tree to alternate with (A B A B)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.groups)
        return
    folder = args.folder or Path(
        f"/tmp/beir{args.passages // 1_000_000}m"
        if args.passages % 1_000_000 == 0
        else f"/tmp/beir{args.passages}"
    )
    t0 = time.perf_counter()
    write_folder(folder, args.passages, args.queries or max(args.passages // 20, 10))
    print(
        f"folder {folder}: {args.passages:,} passages (written/checked in {time.perf_counter() - t0:.0f} s); "
        f"load {os.getloadavg()[0]:.2f}"
    )
    trees = {"this tree": REPO} | ({"compare": args.compare.resolve()} if args.compare else {})
    cache = folder / ".hf_cache"
    cold = run_child(REPO, folder, args.groups, cache)
    print(
        f"first run (converts the JSONL to the Arrow cache unless cached): build {cold['build_s']:.1f} s, "
        f"peak RSS {cold['peak_rss_mib']:.0f} MiB, peak anon {cold['peak_anon_mib']:.0f} MiB"
    )
    results: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            results[name].append(run_child(tree, folder, args.groups, cache))
    checksums = {r["checksum"] for rs in results.values() for r in rs}
    print(
        f"{'tree':<12} {'build s':>8} {'groups s':>9} {'peak RSS MiB':>13} {'peak anon MiB':>14} "
        f"{'Arrow pool MiB':>15}  (load {os.getloadavg()[0]:.2f}; {args.groups} groups of {GROUP})"
    )
    for name, runs in results.items():
        for r in runs:
            print(
                f"{name:<12} {r['build_s']:>8.1f} {r['groups_s']:>9.2f} {r['peak_rss_mib']:>13.0f} "
                f"{r['peak_anon_mib']:>14.0f} {r['arrow_pool_mib']:>15.1f}  {r['dr']}"
            )
    floor = run_child(REPO, None, 0, cache)
    print(
        f"{'imports only':<12} {'':>8} {'':>9} {floor['peak_rss_mib']:>13.0f} {floor['peak_anon_mib']:>14.0f}"
    )
    print("same groups in every run" if len(checksums) == 1 else f"GROUPS DIFFER: checksums {checksums}")


if __name__ == "__main__":
    main()
