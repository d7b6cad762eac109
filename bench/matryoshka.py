"""Benchmark: retrieval quality against vector size, plain vs Matryoshka-trained models (docs/matryoshka.md).

For each model (plain ones, and ones trained with `dr train --matryoshka_dims`; one per seed) the corpus and
the test queries are encoded ONCE at full size, and each smaller size D is derived from those vectors: the
first D coordinates, renormalised when the model normalises (`dr.model.truncation.truncate`, the rule
`dr encode --truncate_dim D` applies to the model's vectors; the derived shards carry the same metadata).
`--verify_rows N` re-encodes the first N passages with `dr encode --truncate_dim` at the smallest D and
checks they match the derived ones (it exits non-zero if they do not), so the shortcut is measured, not
assumed: encoding SciFact once costs ~10 min on 2 cores, four times per model would cost 40.

Each size is searched three ways: exact (float32), binary codes alone (`dr quantize --quantize binary`,
1 bit per dimension), and binary + exact rescoring of the top `--rescore` x depth. Prints a markdown table
per seed and a summary (mean over seeds, ratio to the same model's exact search at full size), writes
`<work>/matryoshka.json` and a PNG: nDCG@10 against the dimension and against the index bytes.

    python -m bench.matryoshka --plain runs/p42 runs/p43 --matryoshka runs/m42 runs/m43      # SciFact
    python -m bench.matryoshka --plain A --matryoshka B --dims 32,16,8 --max_rows 40 --work /tmp/m   # smoke
    python -m bench.matryoshka --merge s42/matryoshka.json s43/matryoshka.json --work both  # seeds run apart

`--merge` summarises earlier runs' `matryoshka.json` rows (seeds renumbered in order) instead of measuring:
seeds trained and benchmarked at different times are averaged as if run together. Runs made with other
settings (dims, depth, rescore, split, lengths, qrels content, max_rows) are refused.

A model is a `dr pipeline` run directory (its `model/` and `embeddings/{corpus,queries}*.arrow` are used)
or a model folder (encoded into `--work`). Every encode, quantize and search is the `dr` command in a
child process; outputs already in `--work` are reused while the model's vectors and the settings are the
same (their content fingerprints are kept in `<work>/<label>/model<i>/source.json`; a retrained model starts
its folder over). The PNG needs
matplotlib (`pip install -e .[bench]`).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SEARCHES = ("exact", "binary", "binary+rescore")


def dr(command: str, *flags: str) -> None:
    """One `dr` command in a child process (its own errors stop the benchmark, with their message)."""
    subprocess.run([sys.executable, "-c", "import sys; from dr.cli import main; sys.exit(main())", command, *flags],
                   check=True, cwd=REPO)  # fmt: skip


def full_size_shards(model: str, work: Path, args: argparse.Namespace) -> tuple[str, Path, Path]:
    """(model folder, corpus shard glob, queries shard glob) at full size: a pipeline run's, or encoded here."""
    run_dir = Path(model)
    corpus = sorted(glob.glob(str(run_dir / "embeddings" / "corpus*.arrow")))
    queries = sorted(glob.glob(str(run_dir / "embeddings" / "queries*.arrow")))
    if (run_dir / "model").is_dir() and corpus and queries and not args.max_rows:
        return (
            str(run_dir / "model"),
            run_dir / "embeddings" / "corpus*.arrow",
            run_dir / "embeddings" / "queries*.arrow",
        )
    out = work / "full"
    common = ["--model_name_or_path", model, "--dataset_name", args.data, "--truncate_dim", "0"]
    common += ["--per_device_eval_batch_size", str(args.batch_size), "--dataloader_num_workers", "0"]
    common += ["--max_rows", str(args.max_rows)] if args.max_rows else []
    jobs = {
        out / "queries": [
            "--encode_is_qry",
            "--dataset_split",
            args.split,
            "--q_max_len",
            str(args.q_max_len),
        ],
        out / "corpus": ["--p_max_len", str(args.p_max_len)],
    }
    for base, extra in jobs.items():
        if not base.with_name(base.name + ".manifest.json").is_file():
            print(f"encoding {base} ...", file=sys.stderr, flush=True)
            dr("encode", *common, *extra, "--encoded_save_path", str(base))
    return model, out / "corpus*.arrow", out / "queries*.arrow"


def write_prefix(sources: list[Path], target: Path, dim: int) -> None:
    """`target` = the rows of the shards `sources`, in order, each vector cut to its first `dim` coordinates
    (renormalised when the model normalises), metadata saying so; written atomically by ShardWriter,
    skipped when present."""
    from dr.io.shards import ShardWriter, iter_shard, read_meta
    from dr.model.truncation import truncate

    if target.is_file():
        return
    metas = [read_meta(source) for source in sources]
    meta = replace(metas[0], count=sum(m.count for m in metas))
    out_meta = meta if dim >= meta.dim else replace(meta, dim=dim, truncate_dim=dim)
    target.parent.mkdir(parents=True, exist_ok=True)
    with ShardWriter(target, out_meta) as writer:
        for source in sources:
            for ids, vectors in iter_shard(source):
                prefix = truncate(
                    torch.from_numpy(np.asarray(vectors, dtype=np.float32)), dim, meta.normalize
                )
                writer.write(ids, prefix.numpy())


def derive(corpus_glob: Path, queries_glob: Path, out: Path, dim: int) -> None:
    """Corpus shards (corpus.NNNNN.arrow, one per source shard) and one queries.arrow of size `dim` in `out`."""
    for i, shard in enumerate(sorted(glob.glob(str(corpus_glob)))):
        write_prefix([Path(shard)], out / f"corpus.{i:05d}.arrow", dim)
    write_prefix([Path(p) for p in sorted(glob.glob(str(queries_glob)))], out / "queries.arrow", dim)


def verify(model: str, out: Path, dim: int, args: argparse.Namespace) -> float:
    """Max |difference| between `dr encode --truncate_dim dim` of the first rows and the derived vectors."""
    from dr.io.shards import read_shard

    base = out / f"verify-{dim}"
    if not base.with_name(base.name + ".manifest.json").is_file():
        dr("encode", "--model_name_or_path", model, "--dataset_name", args.data, "--truncate_dim", str(dim),
           "--p_max_len", str(args.p_max_len), "--max_rows", str(args.verify_rows),
           "--per_device_eval_batch_size", str(args.batch_size), "--dataloader_num_workers", "0",
           "--encoded_save_path", str(base))  # fmt: skip
    ids, encoded, meta = read_shard(base.with_name(base.name + ".arrow"))
    derived = {}
    for shard in sorted(glob.glob(str(out / str(dim) / "corpus.*.arrow"))):
        shard_ids, vectors, derived_meta = read_shard(shard)
        if (derived_meta.dim, derived_meta.truncate_dim) != (meta.dim, meta.truncate_dim):
            raise SystemExit(f"derived {shard}: dim/truncate_dim differ from dr encode's ({meta})")
        derived.update(zip(shard_ids, vectors.astype(np.float32)))
    shared = [(i, v) for i, v in zip(ids, encoded) if i in derived]
    if not shared:
        raise SystemExit(f"verify: none of the {len(ids)} re-encoded passages is among the derived ones")
    return float(max(np.abs(derived[i] - v.astype(np.float32)).max() for i, v in shared))


def search(out: Path, kind: str, args: argparse.Namespace) -> Path:
    """The run file of one search of `out`'s shards (`kind`: one of SEARCHES)."""
    run = out / f"run.{kind}.txt"
    if run.is_file():
        return run
    corpus = str(out / "corpus.*.arrow")
    flags = ["--query_reps", str(out / "queries.arrow"), "--passage_reps", corpus, "--depth", str(args.depth)]
    flags += ["--save_ranking_to", str(run), "--quiet"]
    if kind != "exact":
        if not (out / "binary").is_dir():
            dr("quantize", "--passage_reps", corpus, "--quantize", "binary")
        flags += ["--quantize", "binary"]
        if kind == "binary+rescore":
            flags += ["--rescore", str(args.rescore)]
    dr("search", *flags)
    return run


def ndcg10(run: Path, qrels: Path) -> float:
    """nDCG@10 of a run over the queries of the qrels (`dr.eval.metrics`, as `dr eval`)."""
    from dr.eval.metrics import evaluate
    from dr.io.qrels import read_qrels
    from dr.io.runs import read_run

    ranking, _ = read_run(str(run))
    return float(evaluate(read_qrels(str(qrels)), ranking, ["nDCG@10"])["nDCG@10"])


def index_bytes(out: Path, kind: str) -> int:
    """Bytes of the first-pass index: float32 vectors for exact search, 1 bit per dimension for binary."""
    from dr.io.shards import read_meta

    metas = [read_meta(p) for p in glob.glob(str(out / "corpus.*.arrow"))]
    rows, dim = sum(m.count for m in metas), metas[0].dim
    return rows * dim * 4 if kind == "exact" else rows * dim // 8


def source_key(model: str, args: argparse.Namespace) -> dict:
    """What a model's work folder is made from: the content fingerprints of a run directory's embeddings
    and model, or of a model folder and the data it is encoded from here, and the settings of the encodes
    and searches. A change (a retrained model, another depth) empties the folder: nothing derived from the
    old vectors is reused as new."""
    from dr.io.content_hash import ContentHashes
    from dr.pipeline.fingerprint import path_fingerprint

    hashes = ContentHashes()
    run_dir = Path(model)
    if (run_dir / "model").is_dir() and not args.max_rows:
        paths = [run_dir / "model", *sorted((run_dir / "embeddings").glob("*.arrow"))]
    else:
        paths = [run_dir, Path(args.data)]
    key = {str(p.resolve()): path_fingerprint(p, hashes) for p in paths}
    hashes.save()
    settings = (
        "split",
        "depth",
        "rescore",
        "q_max_len",
        "p_max_len",
        "batch_size",
        "max_rows",
        "verify_rows",
    )
    return {"inputs": key, "settings": {name: getattr(args, name) for name in settings}}


def fresh_work(work: Path, key: dict) -> None:
    """Keep `work` only when its source.json equals `key`; otherwise start it over."""
    marker = work / "source.json"
    try:
        same = json.loads(marker.read_text(encoding="utf-8")) == json.loads(json.dumps(key))
    except (OSError, ValueError):
        same = False
    if same:
        return
    if work.exists():
        print(f"{work}: made from other vectors or settings; starting it over", file=sys.stderr)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    marker.write_text(json.dumps(key, indent=1), encoding="utf-8")


def measure(models: dict[str, list[str]], dims: list[int], args: argparse.Namespace) -> list[dict]:
    """One row per (model, seed index, dim, search): index bytes and nDCG@10."""
    rows = []
    for label, runs in models.items():
        for seed, model in enumerate(runs):
            work = Path(args.work) / label / f"model{seed}"
            fresh_work(work, source_key(model, args))
            folder, corpus, queries = full_size_shards(model, work, args)
            for dim in dims:
                derive(corpus, queries, work / str(dim), dim)
                for kind in SEARCHES:
                    score = ndcg10(search(work / str(dim), kind, args), Path(args.qrels))
                    rows.append({"model": label, "seed": seed, "source": model, "dim": dim, "search": kind,
                                 "bytes": index_bytes(work / str(dim), kind), "ndcg": score})  # fmt: skip
            if args.verify_rows:
                diff = verify(folder, work, min(dims), args)
                print(f"{label} {model}: dr encode --truncate_dim {min(dims)} vs derived, first "
                      f"{args.verify_rows} passages: max |diff| {diff:.2e}", file=sys.stderr)  # fmt: skip
                if diff > args.verify_tolerance:
                    raise SystemExit(
                        f"derived prefixes differ from dr encode's by {diff:.2e} > {args.verify_tolerance}"
                    )
            full = next(r["ndcg"] for r in rows if (r["model"], r["seed"], r["dim"], r["search"])
                        == (label, seed, max(dims), "exact"))  # fmt: skip
            for r in rows:
                if (r["model"], r["seed"]) == (label, seed):
                    r["ratio"] = r["ndcg"] / full if full else float("nan")
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Mean over seeds of each (model, dim, search), with the per-seed values."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["dim"], r["search"]), []).append(r)
    return [{"model": m, "dim": d, "search": s, "bytes": g[0]["bytes"],
             "ndcg": statistics.mean(r["ndcg"] for r in g), "ratio": statistics.mean(r["ratio"] for r in g),
             "seeds": [r["ndcg"] for r in g]} for (m, d, s), g in groups.items()]  # fmt: skip


def table(rows: list[dict]) -> str:
    """Markdown: mean nDCG@10 over seeds (each seed's value after it); the ratio is to the same model's
    exact search at the largest dimension, averaged over seeds."""
    lines = [
        "| model | dim | search | index bytes | nDCG@10 (mean) | per seed | vs exact at full dim |",
        "|---|---:|---|---:|---:|---|---:|",
    ]
    for r in rows:
        seeds = " / ".join(f"{v:.4f}" for v in r["seeds"])
        lines.append(f"| {r['model']} | {r['dim']} | {r['search']} | {r['bytes']:,} | {r['ndcg']:.4f} | {seeds} "
                     f"| {r['ratio']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Two panels: mean nDCG@10 against the dimension, and against the index bytes (log scale); each seed
    is a faint dot around its mean."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (by_dim, by_bytes) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"exact": ("-", "o"), "binary": (":", "v"), "binary+rescore": ("--", "s")}  # line, marker
    colours = {"plain": "tab:blue", "matryoshka": "tab:red"}
    for label in dict.fromkeys(r["model"] for r in rows):
        for kind in SEARCHES:
            line = sorted(
                (r for r in rows if r["model"] == label and r["search"] == kind), key=lambda r: r["dim"]
            )
            style, marker = styles[kind]
            look = {
                "linestyle": style,
                "marker": marker,
                "color": colours.get(label),
                "label": f"{label}, {kind}",
            }
            for axis, x in ((by_dim, "dim"), (by_bytes, "bytes")):
                axis.plot([r[x] for r in line], [r["ndcg"] for r in line], **look)
                for r in line:
                    axis.scatter(
                        [r[x]] * len(r["seeds"]), r["seeds"], s=8, alpha=0.35, color=colours.get(label)
                    )
    dims = sorted({r["dim"] for r in rows})
    by_dim.set(xlabel="dimensions kept (--truncate_dim)", ylabel="nDCG@10 (mean of seeds)", xscale="log",
               title="quality vs dimension")  # fmt: skip
    by_dim.set_xticks(dims, labels=[str(d) for d in dims])
    by_dim.minorticks_off()
    by_bytes.set(xlabel="first-pass index bytes", ylabel="nDCG@10 (mean of seeds)", xscale="log",
                 title="quality vs index size")  # fmt: skip
    by_dim.legend(fontsize=7)
    for axis in (by_dim, by_bytes):
        axis.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


MERGE_SETTINGS = ("dims", "depth", "rescore", "split", "q_max_len", "p_max_len", "max_rows")


def merged_rows(paths: list[str]) -> list[dict]:
    """The rows of earlier runs' matryoshka.json, each model's seeds renumbered across the files; exits
    naming the file when one was made with other settings (see MERGE_SETTINGS) or other qrels."""
    rows: list[dict] = []
    seeds_before: dict[str, int] = {}
    reference: tuple[str, dict] | None = None
    for path in paths:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        qrels = hashlib.sha256(Path(data["args"]["qrels"]).read_bytes()).hexdigest()
        settings = {**{key: data["args"].get(key) for key in MERGE_SETTINGS}, "qrels sha256": qrels}
        if reference is None:
            reference = (path, settings)
        elif settings != reference[1]:
            other = {k: v for k, v in settings.items() if reference[1].get(k) != v}
            raise SystemExit(f"{path}: made with {other}, {reference[0]} with "
                             f"{ {k: reference[1][k] for k in other} }: not comparable")  # fmt: skip
        seeds_here: dict[str, int] = {}
        for row in data["rows"]:
            seed = seeds_before.get(row["model"], 0) + row["seed"]
            rows.append({**row, "seed": seed, "results": path})
            seeds_here[row["model"]] = max(seeds_here.get(row["model"], 0), row["seed"] + 1)
        for model, count in seeds_here.items():
            seeds_before[model] = seeds_before.get(model, 0) + count
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plain", nargs="+", help="run dirs or model folders, one per seed")
    parser.add_argument("--matryoshka", nargs="+", help="the same, trained with --matryoshka_dims")
    parser.add_argument(
        "--merge", nargs="+", default=None, help="summarise these matryoshka.json files instead of measuring"
    )
    parser.add_argument(
        "--data", default=str(REPO.parent / "shared" / "data" / "scifact"), help="BEIR folder"
    )
    parser.add_argument("--split", default="test", help="query split (queries.<split>.tsv)")
    parser.add_argument("--qrels", default=None, help="default: <data>/qrels.<split>.trec")
    parser.add_argument("--dims", default="384,256,128,64", help="comma-separated, each divisible by 8")
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--rescore", type=int, default=10, help="binary + rescore: exact scores of K x depth")
    parser.add_argument("--q_max_len", type=int, default=64)
    parser.add_argument("--p_max_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument(
        "--max_rows", type=int, default=None, help="first N corpus and query rows (smoke tests)"
    )
    parser.add_argument(
        "--verify_rows",
        type=int,
        default=64,
        help="re-encode this many passages with --truncate_dim to check the derived prefixes (0: skip)",
    )
    parser.add_argument(
        "--verify_tolerance",
        type=float,
        default=2e-3,
        help="max |diff| allowed (float16 shards round to ~1e-3; float32 ones agree to ~1e-6)",
    )
    parser.add_argument("--work", default="bench-matryoshka", help="derived shards, codes and runs (reused)")
    parser.add_argument("--png", default=None, help="default: <work>/matryoshka.png")
    args = parser.parse_args(argv)
    args.qrels = args.qrels or str(Path(args.data) / f"qrels.{args.split}.trec")
    dims = sorted((int(d) for d in args.dims.split(",")), reverse=True)
    if any(d % 8 for d in dims):
        parser.error(f"--dims {args.dims}: binary codes need dimensions divisible by 8")
    if args.merge:
        rows = merged_rows(args.merge)
    elif args.plain and args.matryoshka:
        rows = measure({"plain": args.plain, "matryoshka": args.matryoshka}, dims, args)
    else:
        parser.error("give --plain and --matryoshka (one model per seed each), or --merge")
    means = summary(rows)
    print(table(means))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "matryoshka.json").write_text(
        json.dumps({"args": vars(args), "rows": rows, "summary": means}, indent=1)
    )
    png = Path(args.png or work / "matryoshka.png")
    try:
        plot(means, png)
    except ImportError:
        print("matplotlib is not installed (pip install -e .[bench]): no plot written", file=sys.stderr)
        return 1
    print(f"plot: {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
