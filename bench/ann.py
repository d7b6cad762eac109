"""`python -m bench.ann`: exact search vs sharded approximate search (`dr index` + `dr search --index_dir`)
vs a plain single-process faiss script building the same factory (what users do today).

Usage::

    python -m bench.ann --passages 20000 --work /tmp/bench-ann                        # smoke (a minute)
    python -m bench.ann --passages 1000000 --shards 8 --nlist 4096 --nprobes 16,64,256 --work /tmp/ann-1m
    python -m bench.ann --corpus 'runs/x/embeddings/corpus*.arrow' --queries runs/x/embeddings/queries.arrow \
        --qrels ../shared/data/scifact/qrels.test.trec --nlist 64 --nprobes 2,8,16 --work /tmp/ann-scifact

Synthetic corpus (default): `bench.quantize.write_synthetic` (low intrinsic dimension, float16 shards).
Real vectors (`--corpus/--queries`, e.g. a `dr pipeline` run's embeddings) and `--qrels`: nDCG@10 of every
setting next to exact search's, and its ratio.

Per factory the index is built three ways with the same seed: 1 process, 2 torchrun ranks, 2 array tasks
(`--num_shards 2 --shard_index i`, one after the other here); a search of each must give byte-identical run
files (the `same run` column). Then each `--nprobes` (IVF) / `--ef_search` (HNSW) setting is searched:
recall@depth against exact, queries/s (the command's own search timings, without start-up: exact search's
`search_s`, ANN's first pass + rescoring), peak RSS of the search process, index bytes. The plain faiss
script builds the same factory on all vectors in RAM and searches at the first setting. Each index folder
is searched once, untimed, before its timed searches: the shards are memory-mapped, and a first search
would otherwise time reading them from disk (the plain script's index is in RAM). `--reuse_builds` keeps
folders built before with the same flags, and the build seconds measured then (`<work>/builds.json`). Printed as one
table, written as `<work>/ann.json` and `<work>/ann.png` (recall against queries/s; needs matplotlib).
Every command runs as a subprocess, so its peak RSS (`ru_maxrss`) is its own; a torchrun build reports the
launcher's, not its workers'.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLAIN_FAISS = r"""
import sys, time, numpy as np, faiss
from dr.search.shard_set import expand_paths, load_queries
from dr.io.shards import iter_shard
passages, queries, factory, params, depth, train_size, out = sys.argv[1:8]
paths = expand_paths(passages, "passages")
ids, blocks = [], []
for p in paths:
    for block_ids, v in iter_shard(p, max_rows=1 << 20):
        ids += block_ids
        blocks.append(np.asarray(v, np.float32))
vecs = np.concatenate(blocks)
t0 = time.perf_counter()
index = faiss.index_factory(vecs.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
rng = np.random.default_rng(0)
index.train(vecs[np.sort(rng.choice(len(vecs), min(len(vecs), int(train_size)), replace=False))])
index.add(vecs)
build = time.perf_counter() - t0
if params != "-":
    faiss.ParameterSpace().set_index_parameters(index, params)
qids, q, _ = load_queries(expand_paths(queries, "queries"))
t0 = time.perf_counter()
D, I = index.search(q, int(depth))
search = time.perf_counter() - t0
with open(out, "w") as f:
    for qid, row, scores in zip(qids, I, D):
        f.writelines(f"{qid}\t{ids[i]}\t{s:.6f}\n" for i, s in zip(row, scores) if i >= 0)
print(build, search)
"""

# name -> (factory template, parameter name, rescore factor tried besides none)
FACTORIES = {
    "ivfflat": ("IVF{nlist},Flat", "nprobe", None),
    "ivfpq": ("IVF{nlist},PQ{m}", "nprobe", 10),
    "hnsw": ("HNSW32", "efSearch", None),
}


def run_child(cmd: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of one subprocess (its own ``ru_maxrss``, from `os.wait4`)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status):
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err.read()[-3000:]}")
    return time.perf_counter() - t0, usage.ru_maxrss * 1024


def dr(*args: str) -> list[str]:
    return [sys.executable, "-m", "dr.cli", *args]


def torchrun(n: int, module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "-m",
            module, *args]  # fmt: skip


def run_sets(run: Path) -> dict[str, set[str]]:
    got: dict[str, set[str]] = {}
    for line in run.read_text().splitlines():
        q, d = line.split("\t")[:2]
        got.setdefault(q, set()).add(d)
    return got


def recall(run: Path, exact: dict[str, set[str]]) -> float:
    got = run_sets(run)
    return sum(len(got.get(q, set()) & ids) / len(ids) for q, ids in exact.items()) / len(exact)


def ndcg10(run: Path, qrels: str | None) -> float | None:
    """nDCG@10 with `dr.eval.metrics` (as `dr eval`), or None without qrels."""
    if not qrels:
        return None
    from dr.eval.metrics import evaluate
    from dr.io.qrels import read_qrels
    from dr.io.runs import read_run

    ranking, _ = read_run(str(run))
    return float(evaluate(read_qrels(qrels), ranking, ["nDCG@10"])["nDCG@10"])


def search_seconds(run: Path) -> float:
    """The search's own time from its `.config.json` (no start-up, no shard hashing)."""
    timings = json.loads(Path(str(run) + ".config.json").read_text())["timings"]
    if "search_s" in timings:
        return timings["search_s"]
    return timings["first_pass_s"] + timings.get("rescore_s", 0.0)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_three_ways(
    passages: str,
    factory: str,
    work: Path,
    name: str,
    train_size: int,
    one_build: bool = False,
    reuse: bool = False,
) -> dict:
    """Index folders built by 1 process, 2 torchrun ranks and 2 array tasks (only the first with
    `one_build`); their build seconds.

    `reuse`: a complete folder built before with the same flags is kept, with the build seconds measured
    then (``<work>/builds.json``), so a change to search alone is benchmarked without minutes of rebuilding.
    """
    flags = ["--passage_reps", passages, "--index_factory", factory, "--train_size", str(train_size)]
    record = work / "builds.json"
    known = json.loads(record.read_text()) if record.is_file() else {}
    out = {}
    for how in ("1proc", "2ranks", "2tasks")[: 1 if one_build else 3]:
        folder = work / f"{name}-{how}"
        earlier = known.get(folder.name, {})
        if reuse and earlier.get("flags") == flags and (folder / "index.json").is_file():
            print(f"bench.ann: reusing {folder} (built in {earlier['seconds']:.0f} s)", file=sys.stderr)
            out[how] = (folder, earlier["seconds"])
            continue
        shutil.rmtree(folder, ignore_errors=True)
        base = [*flags, "--output_dir", str(folder)]
        if how == "1proc":
            seconds, _ = run_child(dr("index", *base))
        elif how == "2ranks":
            seconds, _ = run_child(torchrun(2, "dr.index", *base))
        else:
            seconds = sum(run_child(dr("index", *base, "--num_shards", "2", "--shard_index", str(i)))[0]
                          for i in range(2))  # fmt: skip
        out[how] = (folder, seconds)
        known[folder.name] = {"flags": flags, "seconds": seconds}
        record.write_text(json.dumps(known, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--passages", type=int, default=20_000, help="synthetic corpus size")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--queries", type=int, default=200, help="synthetic queries")
    p.add_argument("--shards", type=int, default=4, help="synthetic passage shards")
    p.add_argument("--corpus", default=None, help="real passage shard glob instead of the synthetic corpus")
    p.add_argument("--query_reps", default=None, help="real query shard (with --corpus)")
    p.add_argument("--qrels", default=None, help="qrels of the real queries: adds nDCG@10")
    p.add_argument("--depth", type=int, default=100)
    p.add_argument("--nlist", type=int, default=64)
    p.add_argument("--nprobes", default="8", help="IVF settings searched, comma-separated")
    p.add_argument("--ef_search", default="256", help="HNSW settings searched, comma-separated")
    p.add_argument("--pq_m", type=int, default=64)
    p.add_argument("--train_size", type=int, default=50_000)
    p.add_argument("--factories", default="ivfflat,ivfpq,hnsw")
    p.add_argument("--no_plain", action="store_true", help="skip the plain faiss script")
    p.add_argument("--one_build", action="store_true", help="build with 1 process only (quality runs)")
    p.add_argument("--reuse_builds", action="store_true",
                   help="keep index folders built before with the same flags (and their build seconds)")  # fmt: skip
    p.add_argument("--work", default="/tmp/bench-ann")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.corpus:
        if not args.query_reps:
            p.error("--corpus needs --query_reps")
        passages, queries = args.corpus, args.query_reps
    else:
        from bench.quantize import write_synthetic

        passages, queries = write_synthetic(work, args.passages, args.dim, args.queries, args.shards)
    common = ["--query_reps", queries, "--depth", str(args.depth), "--quiet"]
    exact_run = work / "exact.txt"
    _, rss = run_child(dr("search", *common, "--passage_reps", passages, "--verify", "none",
                          "--save_ranking_to", str(exact_run)))  # fmt: skip
    exact = run_sets(exact_run)
    nq = len(exact)
    exact_ndcg = ndcg10(exact_run, args.qrels)
    rows = [{"method": "exact (dr search)", "recall": 1.0, "qps": nq / search_seconds(exact_run),
             "peak_rss": rss, "ndcg10": exact_ndcg}]  # fmt: skip
    for name in args.factories.split(","):
        template, param, rescore = FACTORIES[name]
        factory = template.format(nlist=args.nlist, m=args.pq_m)
        settings = (args.ef_search if param == "efSearch" else args.nprobes).split(",")
        builds = build_three_ways(
            passages, factory, work, name, args.train_size, args.one_build, args.reuse_builds
        )
        folder = builds["1proc"][0]
        for index_dir, _ in builds.values():  # untimed: every timed search then finds the page cache warm
            run_child(dr("search", *common, "--index_dir", str(index_dir), "--index_params",
                         f"{param}={settings[0]}", "--save_ranking_to", str(work / "warm-up.txt")))  # fmt: skip
        size = sum(f.stat().st_size for f in folder.glob("*.faiss"))
        for i, value in enumerate(settings):
            params = f"{param}={value}"
            for k in (None, rescore) if rescore else (None,):
                tag = f"{name}-{param}{value}{'-r' + str(k) if k else ''}"
                extra = ["--index_params", params, *(["--rescore", str(k)] if k else [])]
                runs = {}
                for how, (index_dir, _) in builds.items():
                    if how != "1proc" and i > 0:
                        continue  # identity across builds: checked at the first setting
                    runs[how] = work / f"{tag}.{how}.txt"
                    _, rss_search = run_child(dr("search", *common, "--index_dir", str(index_dir), *extra,
                                                 "--save_ranking_to", str(runs[how])))  # fmt: skip
                    if how == "1proc":
                        rss_1 = rss_search
                same = len({sha256(r) for r in runs.values()}) == 1 if len(runs) > 1 else None
                ndcg = ndcg10(runs["1proc"], args.qrels)
                rows.append({"method": f"dr {factory} {params}" + (f" +rescore {k}" if k else ""),
                             "recall": recall(runs["1proc"], exact), "qps": nq / search_seconds(runs["1proc"]),
                             "build_1_s": builds["1proc"][1], "build_2_s": builds.get("2ranks", (0, None))[1],
                             "build_tasks_s": builds.get("2tasks", (0, None))[1], "index_bytes": size, "peak_rss": rss_1,
                             "same_run": same, "ndcg10": ndcg, "factory": name})  # fmt: skip
        if not args.no_plain:
            script, out = work / "plain_faiss.py", work / f"plain-{name}.txt"
            script.write_text(PLAIN_FAISS)
            first = f"{param}={settings[0]}"
            cmd = [sys.executable, str(script), passages, queries, factory, first, str(args.depth),
                   str(args.train_size), str(out)]  # fmt: skip
            with tempfile.TemporaryFile("w+") as log:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.DEVNULL)
                _, status, usage = os.wait4(proc.pid, 0)
                if os.waitstatus_to_exitcode(status):
                    raise SystemExit(f"plain faiss script failed: {' '.join(cmd)}")
                log.seek(0)
                build_s, search_s = (float(x) for x in log.read().split()[-2:])
            rows.append({"method": f"plain faiss {factory} {first}", "recall": recall(out, exact),
                         "qps": nq / search_s, "build_1_s": build_s, "peak_rss": usage.ru_maxrss * 1024,
                         "ndcg10": ndcg10(out, args.qrels) if args.qrels else None})  # fmt: skip
    print_table(rows, args.depth, exact_ndcg)
    (work / "ann.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    plot(rows, args.depth, work / "ann.png")
    return 0


def print_table(rows: list[dict], depth: int, exact_ndcg: float | None) -> None:
    """One markdown table; the nDCG columns only with qrels."""
    cols = [("method", "method"), ("recall", f"R@{depth} vs exact"), ("qps", "q/s"), ("build_1_s", "build 1 proc s"),
            ("build_2_s", "build 2 ranks s"), ("build_tasks_s", "build 2 tasks s"), ("same_run", "same run"),
            ("index_bytes", "index MB"), ("peak_rss", "search RSS MB")]  # fmt: skip
    if exact_ndcg is not None:
        cols += [("ndcg10", "nDCG@10"), ("ndcg_ratio", "/ exact")]
    print("| " + " | ".join(c[1] for c in cols) + " |")
    print("|" + "---|" * len(cols))
    fmt = {"recall": ".4f", "qps": ".1f", "build_1_s": ".1f", "build_2_s": ".1f", "build_tasks_s": ".1f",
           "ndcg10": ".4f", "ndcg_ratio": ".4f"}  # fmt: skip
    for r in rows:
        if exact_ndcg and r.get("ndcg10") is not None:
            r["ndcg_ratio"] = r["ndcg10"] / exact_ndcg
        cells = []
        for key, _ in cols:
            v = r.get(key)
            if v is None:
                cells.append("-")
            elif key in ("index_bytes", "peak_rss"):
                cells.append(f"{v / 2**20:.0f}")
            elif key == "same_run":
                cells.append("yes" if v else "NO")
            else:
                cells.append(format(v, fmt.get(key, "")))
        print("| " + " | ".join(cells) + " |")


def plot(rows: list[dict], depth: int, path: Path) -> None:
    """Recall@depth against queries/s (log x): one line per factory through its settings, exact and plain
    faiss as single points."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install -e .[bench]): no plot", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("factory"):
            lines.setdefault(r["method"].split(" ")[1] + (" +rescore" if "rescore" in r["method"] else ""),
                             []).append(r)  # fmt: skip
        else:
            ax.scatter(r["qps"], r["recall"], marker="*" if r["method"].startswith("exact") else "x", s=60,
                       label=r["method"], zorder=3)  # fmt: skip
    for label, points in lines.items():
        ax.plot([r["qps"] for r in points], [r["recall"] for r in points], marker="o", label=f"dr {label}")
    ax.set(xscale="log", xlabel="queries/s (search time only)", ylabel=f"recall@{depth} vs exact",
           title="dr sharded ANN: recall against speed")  # fmt: skip
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
