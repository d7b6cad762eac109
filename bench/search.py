"""Benchmark: `dr search` (sharded, streaming, bounded memory) vs. one in-RAM faiss IndexFlatIP.

Writes N normalized random float32 vectors as S passage shards plus Q query vectors, then runs, each in
its own subprocess so that peak RSS figures do not mix:

* ``dr search`` over the shard glob with a ``--max_memory`` budget (exact, streamed block by block);
* the usual approach: load every shard into one array, ``IndexFlatIP.add``, ``search`` (exact).

Both write a Tevatron text run; the script checks that the two runs agree (ids; exact ties aside) and
prints wall time and peak RSS (``wait4`` rusage of that child) with the ratios.

    python -m bench.search                       # 500k x 384, 8 shards, 2,000 queries, depth 100
    python -m bench.search --passages 200000 --max_memory 128M
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from dr.index.shards import ShardMeta, ShardWriter


def write_data(folder: Path, passages: int, dim: int, shards: int, queries: int, seed: int = 0) -> None:
    """Normalized random vectors, generated and written chunk by chunk (the parent stays small)."""
    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, passages, shards + 1).astype(int)
    for s in range(shards):
        lo, hi = int(bounds[s]), int(bounds[s + 1])
        meta = ShardMeta("bench-random", "cls", True, dim, "float32", 128, "passage", hi - lo)
        with ShardWriter(folder / f"corpus.{s:02d}.arrow", meta) as writer:
            for start in range(lo, hi, 50_000):
                stop = min(hi, start + 50_000)
                writer.write([f"p{i}" for i in range(start, stop)], _unit(rng, stop - start, dim))
    meta = ShardMeta("bench-random", "cls", True, dim, "float32", 32, "query", queries)
    with ShardWriter(folder / "queries.arrow", meta) as writer:
        writer.write([f"q{i}" for i in range(queries)], _unit(rng, queries, dim))


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def monolithic(folder: Path, depth: int, out: Path) -> None:
    """The usual approach: every vector in RAM, one IndexFlatIP (runs in a child process)."""
    import faiss

    from dr.index.shards import read_shard
    from dr.io.runs import Run, write_run

    ids: list[str] = []
    index = None
    for path in sorted(folder.glob("corpus.*.arrow")):  # shard by shard: peak = index + one shard
        shard_ids, vectors, meta = read_shard(path)
        if index is None:
            index = faiss.IndexFlatIP(meta.dim)
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        ids.extend(shard_ids)
    qids, queries, _ = read_shard(folder / "queries.arrow")
    scores, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), depth)
    run = Run(
        {q: [(ids[r], float(s)) for s, r in zip(srow, rrow)] for q, srow, rrow in zip(qids, scores, rows)}
    )
    write_run(out, run, "tevatron")


def measure(cmd: list[str]) -> tuple[float, float]:
    """Run `cmd`; return (wall seconds, peak RSS in MiB) of that child alone."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark step failed: {' '.join(cmd)}\n{stderr[-2000:]}")
    return wall, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def compare(dr_run: Path, mono_run: Path) -> tuple[int, int, int]:
    """(queries, identical id lists, score lists equal within 1e-5: differences only among near-ties)."""
    from dr.io.runs import read_run

    a, _ = read_run(dr_run, "tevatron")
    b, _ = read_run(mono_run, "tevatron")
    same = sum([d for d, _ in a.rankings[q]] == [d for d, _ in hits] for q, hits in b.rankings.items())
    close = sum(
        np.allclose([s for _, s in a.rankings[q]], [s for _, s in hits], rtol=0, atol=1e-5)
        for q, hits in b.rankings.items()
    )
    return len(b), same, close


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passages", type=int, default=500_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--queries", type=int, default=2_000)
    p.add_argument("--depth", type=int, default=100)
    p.add_argument("--max_memory", default="256M", help="dr search --max_memory")
    p.add_argument("--workdir", default=None, help="keep data here (default: a temporary folder)")
    p.add_argument("--monolithic_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.monolithic_child:
        monolithic(Path(args.monolithic_child), args.depth, Path(args.monolithic_child) / "mono.txt")
        return 0
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        write_data(folder, args.passages, args.dim, args.shards, args.queries)
        print(
            f"data: {args.passages:,} x {args.dim} float32 in {args.shards} shards, {args.queries:,} queries "
            f"({time.perf_counter() - t0:.1f}s to write)"
        )
        dr_cmd = [sys.executable, "-m", "dr.search", "--query_reps", str(folder / "queries.arrow"),
                  "--passage_reps", str(folder / "corpus.*.arrow"), "--depth", str(args.depth),
                  "--max_memory", args.max_memory, "--save_ranking_to", str(folder / "dr.txt"), "--quiet"]  # fmt: skip
        mono_cmd = [sys.executable, str(Path(__file__).resolve()), "--monolithic_child", str(folder),
                    "--depth", str(args.depth)]  # fmt: skip
        base_cmd = [sys.executable, "-c", "import dr.index.search_cli, faiss"]
        results = {
            f"dr search (--max_memory {args.max_memory})": measure(dr_cmd),
            "monolithic IndexFlatIP": measure(mono_cmd),
            "(python + imports only)": measure(base_cmd),
        }
        total, same, close = compare(folder / "dr.txt", folder / "mono.txt")
    (dr_t, dr_m), (mono_t, mono_m), _ = results.values()
    print(f"{'variant':<36} {'wall s':>8} {'peak RSS MiB':>13}")
    for name, (wall, rss) in results.items():
        print(f"{name:<36} {wall:>8.1f} {rss:>13.0f}")
    print(f"{'ratio dr / monolithic':<36} {dr_t / mono_t:>8.2f} {dr_m / mono_m:>13.2f}")
    print(
        f"identical top-{args.depth} id lists: {same}/{total} queries; score lists equal within 1e-5: {close}/{total}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
