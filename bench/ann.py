"""`python -m bench.ann`: exact search vs sharded approximate search (`dr index` + `dr search --index_dir`)
vs a plain single-process faiss script building the same factory, on synthetic clustered vectors.

Usage::

    python -m bench.ann --passages 20000 --work /tmp/bench-ann            # a smoke run (seconds)
    python -m bench.ann --passages 8800000 --nlist 16384 --work /scratch/ann --factories ivfflat,ivfpq,hnsw

Per configuration: recall@depth against exact search, queries/s, build time (1 and 2 ranks), index bytes
and peak RSS of each process (``ru_maxrss`` of the children), printed as one table and written as JSON +
a PNG of recall vs queries/s (matplotlib). The corpus is `bench.quantize.write_synthetic` (low intrinsic
dimension, float16 shards). Every command runs as a subprocess, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.quantize import write_synthetic

PLAIN_FAISS = r"""
import sys, time, numpy as np, faiss
from dr.search.shard_set import expand_paths, load_queries
from dr.io.shards import iter_shard
passages, queries, factory, params, depth, train_size = sys.argv[1:7]
paths = expand_paths(passages, "passages")
vecs = np.concatenate([np.asarray(v, np.float32) for p in paths for _, v in iter_shard(p, max_rows=1 << 20)])
t0 = time.perf_counter()
index = faiss.index_factory(vecs.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
rng = np.random.default_rng(0)
index.train(vecs[np.sort(rng.choice(len(vecs), min(len(vecs), int(train_size)), replace=False))])
index.add(vecs)
build = time.perf_counter() - t0
if params != "-":
    faiss.ParameterSpace().set_index_parameters(index, params)
_, q, _ = load_queries(expand_paths(queries, "queries"))
t0 = time.perf_counter()
index.search(q, int(depth))
print(build, time.perf_counter() - t0)
"""

FACTORIES = {
    "ivfflat": ("IVF{nlist},Flat", "nprobe={nprobe}", None),
    "ivfpq": ("IVF{nlist},PQ{m}", "nprobe={nprobe}", 10),
    "hnsw": ("HNSW32", "efSearch=256", None),
}


def _run(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """(seconds, peak RSS bytes, stdout) of one subprocess (its own ``ru_maxrss``, from `os.wait4`)."""
    import tempfile

    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err.read()[-3000:]}")
        # torchrun: the launcher's own peak; its workers' peaks are in their RUSAGE_CHILDREN, not here
        return seconds, usage.ru_maxrss * 1024, out.read()


def _dr(*args: str) -> list[str]:
    return [sys.executable, "-m", "dr.cli", *args]


def _torchrun(n: int, module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "-m", module, *args]


def _recall(run: Path, exact: dict[str, set[str]]) -> float:
    got: dict[str, set[str]] = {}
    for line in run.read_text().splitlines():
        q, d, _ = line.split("\t")
        got.setdefault(q, set()).add(d)
    return sum(len(got.get(q, set()) & ids) / len(ids) for q, ids in exact.items()) / len(exact)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--passages", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--depth", type=int, default=100)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--nlist", type=int, default=64)
    p.add_argument("--nprobe", type=int, default=8)
    p.add_argument("--pq_m", type=int, default=64)
    p.add_argument("--train_size", type=int, default=50_000)
    p.add_argument("--factories", default="ivfflat,ivfpq,hnsw")
    p.add_argument("--work", default="/tmp/bench-ann")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    passages, queries = write_synthetic(work, args.passages, args.dim, args.queries, args.shards)
    common = ["--query_reps", queries, "--depth", str(args.depth), "--quiet"]
    seconds, rss, _ = _run(
        _dr("search", *common, "--passage_reps", passages, "--save_ranking_to", str(work / "exact.txt"))
    )
    exact: dict[str, set[str]] = {}
    for line in (work / "exact.txt").read_text().splitlines():
        q, d, _ = line.split("\t")
        exact.setdefault(q, set()).add(d)
    rows = [{"method": "exact", "recall": 1.0, "qps": args.queries / seconds, "peak_rss": rss}]
    for name in args.factories.split(","):
        template, params_t, rescore = FACTORIES[name]
        factory = template.format(nlist=args.nlist, m=args.pq_m)
        params = params_t.format(nprobe=args.nprobe)
        builds = {}
        for ranks in (1, 2):
            out = work / f"{name}-{ranks}"
            shutil.rmtree(out, ignore_errors=True)
            flags = ["--passage_reps", passages, "--index_factory", factory, "--output_dir", str(out),
                     "--train_size", str(args.train_size)]  # fmt: skip
            cmd = _dr("index", *flags) if ranks == 1 else _torchrun(2, "dr.index", *flags)
            builds[ranks], _, _ = _run(cmd)
        size = sum(f.stat().st_size for f in (work / f"{name}-1").glob("*.faiss"))
        for k in (None, rescore) if rescore else (None,):
            run = work / f"{name}{'-r' + str(k) if k else ''}.txt"
            extra = ["--rescore", str(k)] if k else []
            cmd = _dr("search", *common, "--index_dir", str(work / f"{name}-1"), "--index_params", params,
                      "--save_ranking_to", str(run), *extra)  # fmt: skip
            seconds, rss_search, _ = _run(cmd)
            config = json.loads(Path(str(run) + ".config.json").read_text())
            search_s = config["timings"]["search_s"]
            rows.append({
                "method": f"dr {factory}" + (f" +rescore {k}" if k else ""), "recall": _recall(run, exact),
                "qps": args.queries / search_s, "build_1_s": builds[1], "build_2_s": builds[2],
                "index_bytes": size, "peak_rss": rss_search,
            })  # fmt: skip
        script = work / "plain_faiss.py"
        script.write_text(PLAIN_FAISS)
        _, rss_plain, out = _run([sys.executable, str(script), passages, queries, factory, params,
                                  str(args.depth), str(args.train_size)])  # fmt: skip
        build_s, search_s = (float(x) for x in out.split()[-2:])
        rows.append({"method": f"plain faiss {factory}", "qps": args.queries / search_s, "build_1_s": build_s,
                     "peak_rss": rss_plain})  # fmt: skip
    print(
        f"{'method':<34} {'R@' + str(args.depth):>7} {'q/s':>9} {'build1 s':>9} {'build2 s':>9} {'index MB':>9} {'RSS MB':>8}"
    )
    for r in rows:

        def f(key, scale=1.0, spec=".2f", r=r):
            return format(r[key] / scale, spec) if r.get(key) is not None else "-"

        print(f"{r['method']:<34} {f('recall', 1, '.4f'):>7} {f('qps', 1, '.1f'):>9} {f('build_1_s'):>9} "
              f"{f('build_2_s'):>9} {f('index_bytes', 1e6, '.1f'):>9} {f('peak_rss', 2**20, '.0f'):>8}")  # fmt: skip
    (work / "ann.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rows:
            if r.get("recall") is not None:
                ax.scatter(r["qps"], r["recall"], label=r["method"])
        ax.set_xscale("log")
        ax.set_xlabel("queries/s")
        ax.set_ylabel(f"recall@{args.depth} vs exact")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(work / "ann.png", dpi=120)
        print(f"plot: {work / 'ann.png'}")
    except ImportError:
        print("matplotlib is not installed: no plot")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
