"""Benchmarks of `dr search` on the CPU. Every mode prints a markdown table; systems alternate (A B A B).

Default: `dr search` (sharded, streaming, bounded memory) vs. one in-RAM faiss IndexFlatIP. Writes N
normalized random float32 vectors as S passage shards plus Q query vectors, then runs, each in its own
subprocess so that peak RSS figures do not mix:

* ``dr search`` over the shard glob with a ``--max_memory`` budget (exact, streamed block by block);
* the usual approach: load every shard into one array, ``IndexFlatIP.add``, ``search`` (exact).

Both write a Tevatron text run; the script checks that the two runs agree (ids; exact ties aside) and
prints wall time and peak RSS (``wait4`` rusage of that child) with the ratios.

``--profile``: where the time of one float16 block goes (old path: float16 -> float32 conversion of the
block, faiss.knn, merge; new path: tile conversion with numpy's and torch's cast, + GEMM, the GEMM alone,
the whole block as `dr search` scores it).

``--scale``: synthetic float16 shards per ``--sizes`` (written once into ``--workdir``, reused): wall time,
GFLOP/s of ``dr search``, numpy's float32 GEMM rate on the same shape (alternating), their ratio, peak RSS;
``--compare_faiss`` adds the previous scorer (backend ``faiss-cpu``) against the default, alternating;
``--compare_cast`` the default scorer with numpy's float16 cast throughout against the default (torch's cast
once the search is large enough), alternating.

``--startup``: a small corpus (SciFact-sized, 5,183 x 384, 300 queries): ``dr search`` end to end vs. a
plain script (pyarrow reads the shard, one faiss IndexFlatIP, search, write the run).

    python -m bench.search                       # 500k x 384, 8 shards, 2,000 queries, depth 100
    python -m bench.search --passages 200000 --max_memory 128M
    python -m bench.search --profile --passages 1000000 --queries 200
    python -m bench.search --scale --sizes 0.5M,1M,2M,4M,8.8M --workdir /data/bench-scale --compare_faiss
    python -m bench.search --startup --repeats 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def write_data(
    folder: Path, passages: int, dim: int, shards: int, queries: int, seed: int = 0, dtype: str = "float32"
) -> None:
    """Normalized random vectors, generated and written chunk by chunk (the parent stays small)."""
    from dr.io.shards import ShardMeta, ShardWriter  # lazily: the --plain_child must not import dr

    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, passages, shards + 1).astype(int)
    for s in range(shards):
        lo, hi = int(bounds[s]), int(bounds[s + 1])
        meta = ShardMeta("bench-random", "cls", True, dim, dtype, 128, "passage", hi - lo)
        with ShardWriter(folder / f"corpus.{s:02d}.arrow", meta) as writer:
            for start in range(lo, hi, 50_000):
                stop = min(hi, start + 50_000)
                writer.write([f"p{i}" for i in range(start, stop)], _unit(rng, stop - start, dim))
    meta = ShardMeta("bench-random", "cls", True, dim, dtype, 32, "query", queries)
    with ShardWriter(folder / "queries.arrow", meta) as writer:
        writer.write([f"q{i}" for i in range(queries)], _unit(rng, queries, dim))


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def monolithic(folder: Path, depth: int, out: Path) -> None:
    """The usual approach: every vector in RAM, one IndexFlatIP (runs in a child process)."""
    import faiss

    from dr.io.runs import Run, write_run
    from dr.io.shards import read_shard

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
    wall, rss, _, _ = measure_full(cmd)
    return wall, rss


def measure_full(cmd: list[str]) -> tuple[float, float, float, str]:
    """Run `cmd`; (wall s, peak RSS MiB, CPU s, stdout) of that child alone (its stderr shown on failure)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # wait4's ru_maxrss of a child of this (large) process starts at this process's RSS at fork time;
    # /usr/bin/time's child starts small, so its %M is the command's own peak
    timer = Path("/usr/bin/time")
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile() as rss,
    ):
        if timer.exists():
            cmd = [str(timer), "-f", "%M", "-o", rss.name, *cmd]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        peak_kib = int(Path(rss.name).read_text().split()[-1]) if timer.exists() else usage.ru_maxrss
    if proc.returncode != 0:
        raise SystemExit(f"benchmark step failed: {' '.join(cmd)}\n{stderr[-2000:]}")
    return wall, peak_kib / 1024, usage.ru_utime + usage.ru_stime, stdout  # KiB on Linux


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


# ------------------------------------------------------------------------------- --profile: one block


def _unit16(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    """A (rows, dim) float16 block of unit vectors, generated in chunks (no float32 copy of it all)."""
    rng = np.random.default_rng(seed)
    out = np.empty((rows, dim), np.float16)
    for start in range(0, rows, 65536):
        out[start : start + 65536] = _unit(rng, min(65536, rows - start), dim)
    return out


def profile(rows: int, dim: int, nq: int, depth: int) -> None:
    """Time the phases of one float16 block search, old path (faiss.knn) and new (numpy tiles)."""
    import faiss

    from dr.search.exact import BlockScorer, TopK, _tile_rows

    block, queries = _unit16(rows, dim), _unit(np.random.default_rng(1), nq, dim)
    ranks = np.random.default_rng(2).permutation(rows).astype(np.int64)
    flop = 2.0 * rows * nq * dim
    timings: dict[str, float] = {}

    def timed(name: str, fn):
        t0 = time.perf_counter()
        result = fn()
        timings[name] = time.perf_counter() - t0
        return result

    # old path: the whole block to float32, faiss.knn for k+1, merge into the running top k
    block32 = timed("old: float16 -> float32 (whole block)", lambda: np.ascontiguousarray(block, np.float32))
    knn = timed(
        "old: faiss.knn", lambda: faiss.knn(queries, block32, depth + 1, metric=faiss.METRIC_INNER_PRODUCT)
    )
    top = TopK(nq, depth)

    class Done:  # a scorer that hands back the faiss result just computed: times the merge alone
        exact = False

        def topk(self, *_):
            return knn

    timed("old: merge (k+1 check + select_topk)",
          lambda: (top.add_block(queries, block32, 0, ranks, Done()), top.result()))  # fmt: skip
    block32 = None  # released before the new path runs
    # new path: tile conversion alone (numpy's cast, torch's), conversion + GEMM, then the whole block
    # through TopK with the scorer as `dr search` runs it (numpy's cast until torch's pays off)
    tile = _tile_rows(dim)
    buf = np.empty((tile, dim), np.float32)
    scores = np.empty((nq, tile), np.float32)

    def converter(torch_cast: bool) -> BlockScorer:
        scorer = BlockScorer("cpu")
        scorer.torch_cast = torch_cast
        return scorer

    def convert_only(scorer: BlockScorer) -> None:
        for p0 in range(0, rows, tile):
            part = block[p0 : p0 + tile]
            scorer._convert(part, buf[: len(part)])

    def convert_gemm(scorer: BlockScorer) -> None:
        for p0 in range(0, rows, tile):
            part = block[p0 : p0 + tile]
            scorer._convert(part, buf[: len(part)])
            np.matmul(queries, buf[: len(part)].T, out=scores[:, : len(part)])

    def gemm_only() -> None:
        for p0 in range(0, rows, tile):
            n = min(tile, rows - p0)
            np.matmul(queries, buf[:n].T, out=scores[:, :n])

    numpy_cast, torch_cast = converter(False), converter(True)
    torch_cast._convert(block[:tile], buf[: min(tile, rows)])  # imports torch outside the timings
    timed("new: tile conversion, numpy's cast", lambda: convert_only(numpy_cast))
    timed("new: tile conversion, torch's cast", lambda: convert_only(torch_cast))
    timed("new: tile conversion (torch's) + GEMM", lambda: convert_gemm(torch_cast))
    timed("GEMM alone (tiles already float32)", gemm_only)
    numpy_cast.close()
    scorer = BlockScorer("cpu")
    new_top = TopK(nq, depth)
    timed("new: whole block (conversion + GEMM + selection + merge)",
          lambda: (new_top.add_block(queries, block, 0, ranks, scorer), new_top.result()))  # fmt: skip
    scorer.close()
    print(f"one block: {rows:,} x {dim} float16, {nq} queries, depth {depth} ({flop / 1e9:.0f} GFLOP); "
          f"load {os.getloadavg()[0]:.2f}\n")  # fmt: skip
    print("| phase | seconds | GFLOP/s of the block |")
    print("|---|---|---|")
    for name, seconds in timings.items():
        print(f"| {name} | {seconds:.2f} | {flop / seconds / 1e9:.1f} |")
    old = sum(v for k, v in timings.items() if k.startswith("old"))
    new = timings["new: whole block (conversion + GEMM + selection + merge)"]
    print(f"| old total | {old:.2f} | {flop / old / 1e9:.1f} |")
    gemm = timings["GEMM alone (tiles already float32)"]
    print(f"| new: whole block / GEMM alone | {gemm / new:.2f} | |")
    rest = new - timings["new: tile conversion (torch's) + GEMM"]
    print(f"| new: selection + merge (whole block - conversion - GEMM) | {rest:.2f} | |")
    print(f"\nold / new: {old / new:.2f}x")


# ------------------------------------------------------------------------- --scale: the size curve


def _size(text: str) -> int:
    """0.5M, 8.8M, 250k, 1000 -> rows."""
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000}.get(text[-1:], 1)
    return round(float(text.rstrip("KM")) * scale)


def scale_corpus(workdir: Path, rows: int, dim: int, nq: int, shard_rows: int) -> Path:
    """float16 shards of `rows` unit vectors (<= `shard_rows` each) + `nq` queries, written once, reused."""
    folder = workdir / f"scale-{rows}x{dim}-q{nq}"
    done = folder / "done.json"
    if not done.exists():
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        write_data(folder, rows, dim, max(1, -(-rows // shard_rows)), nq, seed=rows, dtype="float16")
        done.write_text(json.dumps({"rows": rows, "dim": dim, "queries": nq}))
        print(f"wrote {folder} in {time.perf_counter() - t0:.0f}s", flush=True)
    return folder


def gemm_child(rows: int, nq: int, dim: int) -> float:
    """Seconds numpy takes for the (nq x dim) @ (dim x rows) float32 GEMM, in 64k-row chunks (in RAM)."""
    rng = np.random.default_rng(0)
    chunk = min(rows, 65536)
    block = _unit(rng, chunk, dim)
    queries = _unit(rng, nq, dim)
    out = np.empty((nq, chunk), np.float32)
    np.matmul(queries, block.T, out=out)  # warm-up (threads, pages)
    t0 = time.perf_counter()
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        np.matmul(queries, block[:n].T, out=out[:, :n])
    return time.perf_counter() - t0


def search_child(folder: Path, backend: str, depth: int, max_memory: str) -> float:
    """Seconds `search_shards` takes with `backend` over the folder's shards (ids are checked by the caller)."""
    label = backend
    from dr.search import exact
    from dr.search.exact import search_shards
    from dr.search.shard_set import load_queries, parse_bytes

    if (
        backend == "cpu-numpy-cast"
    ):  # the default scorer with numpy's float16 cast throughout (before torch's)
        backend, exact._TORCH_CAST_AFTER = "cpu", 1 << 62

    _, queries, _ = load_queries([str(folder / "queries.arrow")])
    paths = sorted(str(p) for p in folder.glob("corpus.*.arrow"))
    t0 = time.perf_counter()
    _, docids = search_shards(queries, paths, depth, parse_bytes(max_memory), -1, backend)
    seconds = time.perf_counter() - t0
    (folder / f"ids-{label}.json").write_text(json.dumps(docids))
    return seconds


def scale(args: argparse.Namespace) -> None:
    """Per size: dr search (end to end) and the GEMM of the same shape, alternating; then the table."""
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dr-bench-scale-"))
    py = sys.executable
    rows_out = []
    for rows in [_size(s) for s in args.sizes.split(",")]:
        folder = scale_corpus(workdir, rows, args.dim, args.queries, args.shard_rows)
        flop = 2.0 * rows * args.queries * args.dim
        dr_cmd = [py, "-m", "dr.search", "--query_reps", str(folder / "queries.arrow"),
                  "--passage_reps", str(folder / "corpus.*.arrow"), "--depth", str(args.depth),
                  "--max_memory", args.max_memory, "--save_ranking_to", str(folder / "dr.txt"), "--quiet",
                  "--verify", "none"]  # fmt: skip
        gemm_cmd = [py, "-m", "bench.search", "--gemm_child", f"{rows},{args.queries},{args.dim}"]
        runs: dict[str, list] = {"dr": [], "gemm": [], "faiss-cpu": [], "cpu": [], "cpu-numpy-cast": []}
        pairs = [("faiss-cpu", "cpu")] if args.compare_faiss else []
        pairs += [("cpu-numpy-cast", "cpu")] if args.compare_cast else []
        for _ in range(args.repeats):
            wall, rss, cpu, _ = measure_full(dr_cmd)
            info = json.loads((folder / "dr.txt.config.json").read_text())["timings"]
            runs["dr"].append((wall, info["search_s"], rss, cpu))
            runs["gemm"].append(float(measure_full(gemm_cmd)[3]))
            for backend in (b for pair in pairs for b in pair):
                child = [py, "-m", "bench.search", "--search_child", str(folder), "--backend", backend,
                         "--depth", str(args.depth), "--max_memory", args.max_memory]  # fmt: skip
                runs[backend].append(float(measure_full(child)[3]))
        wall, search_s, rss, cpu = (statistics.median(v) for v in zip(*runs["dr"]))
        gemm = statistics.median(runs["gemm"])
        row = {"rows": rows, "wall": wall, "search": search_s, "cpu": cpu, "rss": rss,
               "dr_gflops": flop / search_s / 1e9, "gemm_gflops": flop / gemm / 1e9}  # fmt: skip
        for old, new in pairs:
            ids = [json.loads((folder / f"ids-{b}.json").read_text()) for b in (old, new)]
            row[old] = statistics.median(runs[old])
            row["new"] = statistics.median(runs[new])
            row[f"same_ids-{old}"] = sum(a == b for a, b in zip(*ids))
        rows_out.append(row)
        print(f"{rows:,} rows done (load {os.getloadavg()[0]:.2f})", flush=True)
    print(f"\n{args.queries} queries x {args.dim} dims, float16 shards of <= {args.shard_rows:,} rows, depth "
          f"{args.depth}, --max_memory {args.max_memory}, median of {args.repeats}; load "
          f"{os.getloadavg()[0]:.2f}\n")  # fmt: skip
    print(
        "| passages | dr wall s | dr search s | dr CPU s | dr GFLOP/s | numpy GEMM GFLOP/s | dr / GEMM | dr peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['rows']:,} | {r['wall']:.1f} | {r['search']:.1f} | {r['cpu']:.1f} | {r['dr_gflops']:.1f} | "
              f"{r['gemm_gflops']:.1f} | {r['dr_gflops'] / r['gemm_gflops']:.2f} | {r['rss']:.0f} |")  # fmt: skip
    for old, title in (("faiss-cpu", "faiss-cpu (old)"), ("cpu-numpy-cast", "cpu, numpy's float16 cast")):
        if old not in rows_out[0]:
            continue
        print(f"\n| passages | {title} s | cpu (default) s | {old} / default | identical id lists |")
        print("|---|---|---|---|---|")
        for r in rows_out:
            print(f"| {r['rows']:,} | {r[old]:.2f} | {r['new']:.2f} | {r[old] / r['new']:.2f} | "
                  f"{r[f'same_ids-{old}']}/{args.queries} |")  # fmt: skip


# ------------------------------------------------------------------- --startup: a small corpus


def plain_child(folder: Path, depth: int, out: Path) -> None:
    """The plain script: pyarrow reads the shard(s), one faiss IndexFlatIP, search, write the run."""
    import faiss
    import pyarrow as pa
    from pyarrow import ipc

    def read(path: Path) -> tuple[list[str], np.ndarray]:
        table = ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        vectors = table.column("embedding").combine_chunks().flatten().to_numpy()
        return table.column("id").to_pylist(), vectors.reshape(table.num_rows, -1).astype(np.float32)

    ids: list[str] = []
    index = None
    for path in sorted(folder.glob("corpus.*.arrow")):
        shard_ids, vectors = read(path)
        index = index or faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        ids.extend(shard_ids)
    qids, queries = read(folder / "queries.arrow")
    scores, rows = index.search(queries, depth)
    with open(out, "w") as f:
        for q, srow, rrow in zip(qids, scores, rows):
            f.writelines(f"{q}\t{ids[r]}\t{s}\n" for s, r in zip(srow, rrow))


def startup(args: argparse.Namespace) -> None:
    """`dr search` end to end vs. the plain script on a small corpus, alternating; median and ratio."""
    py = sys.executable
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp)
        write_data(folder, args.passages, args.dim, args.shards, args.queries)
        dr_cmd = [py, "-m", "dr.search", "--query_reps", str(folder / "queries.arrow"),
                  "--passage_reps", str(folder / "corpus.*.arrow"), "--depth", str(args.depth),
                  "--save_ranking_to", str(folder / "dr.txt"), "--quiet"]  # fmt: skip
        plain_cmd = [py, "-m", "bench.search", "--plain_child", str(folder), "--depth", str(args.depth)]
        imports = [py, "-c", "import dr.search.cli, faiss"]
        times: dict[str, list[float]] = {"dr search": [], "plain pyarrow + IndexFlatIP script": [],
                                         "(python + dr search imports only)": []}  # fmt: skip
        for _ in range(args.repeats):
            for name, cmd in zip(times, (dr_cmd, plain_cmd, imports)):
                times[name].append(measure(cmd)[0])
        total, same, _ = compare(folder / "dr.txt", folder / "plain.txt")
    print(f"\n{args.passages:,} x {args.dim} float32 passages in {args.shards} shard(s), {args.queries} queries, "
          f"depth {args.depth}; median of {args.repeats}, alternating; load {os.getloadavg()[0]:.2f}\n")  # fmt: skip
    print("| command | median wall s | min | max |")
    print("|---|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")
    ratio = statistics.median(times["dr search"]) / statistics.median(
        times["plain pyarrow + IndexFlatIP script"]
    )
    print(f"\ndr / plain: {ratio:.2f}x (target <= 1.5x); identical top-{args.depth} id lists: {same}/{total}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passages", type=int, default=500_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--queries", type=int, default=2_000)
    p.add_argument("--depth", type=int, default=100)
    p.add_argument("--max_memory", default="256M", help="dr search --max_memory")
    p.add_argument("--workdir", default=None, help="keep data here (default: a temporary folder)")
    p.add_argument("--profile", action="store_true", help="phases of one float16 block (--passages rows)")
    p.add_argument("--scale", action="store_true", help="time, GFLOP/s, GEMM rate, peak RSS per --sizes")
    p.add_argument("--sizes", default="0.5M,1M,2M,4M,8.8M", help="--scale: corpus sizes (rows)")
    p.add_argument("--shard_rows", type=int, default=1_100_000, help="--scale: rows per shard at most")
    p.add_argument("--compare_faiss", action="store_true", help="--scale: also old (faiss-cpu) vs new scorer")
    p.add_argument("--compare_cast", action="store_true",
                   help="--scale: also the default scorer with numpy's float16 cast throughout vs torch's")  # fmt: skip
    p.add_argument("--startup", action="store_true", help="dr search vs a plain faiss script, small corpus")
    p.add_argument("--repeats", type=int, default=None, help="--scale / --startup repetitions (alternating)")
    p.add_argument("--monolithic_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--gemm_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--search_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--backend", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--plain_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.monolithic_child:
        monolithic(Path(args.monolithic_child), args.depth, Path(args.monolithic_child) / "mono.txt")
        return 0
    if args.gemm_child:
        print(gemm_child(*(int(v) for v in args.gemm_child.split(","))))
        return 0
    if args.search_child:
        print(search_child(Path(args.search_child), args.backend, args.depth, args.max_memory))
        return 0
    if args.plain_child:
        plain_child(Path(args.plain_child), args.depth, Path(args.plain_child) / "plain.txt")
        return 0
    given = set(sys.argv[1:] if argv is None else argv)
    if args.profile:
        passages = args.passages if "--passages" in given else 1_000_000
        profile(passages, args.dim if "--dim" in given else 768, args.queries if "--queries" in given else 200,
                args.depth)  # fmt: skip
        return 0
    if args.scale:
        args.dim = args.dim if "--dim" in given else 768
        args.queries = args.queries if "--queries" in given else 200
        args.max_memory = args.max_memory if "--max_memory" in given else "1G"
        args.repeats = args.repeats or 1
        scale(args)
        return 0
    if args.startup:
        args.passages = args.passages if "--passages" in given else 5_183
        args.dim = args.dim if "--dim" in given else 384
        args.queries = args.queries if "--queries" in given else 300
        args.shards = args.shards if "--shards" in given else 1
        args.repeats = args.repeats or 5
        startup(args)
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
        base_cmd = [sys.executable, "-c", "import dr.search.cli, faiss"]
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
