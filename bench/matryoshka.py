"""Benchmark: retrieval quality against vector size, plain vs Matryoshka-trained models (docs/matryoshka.md).

For each model (a plain one and one trained with `dr train --matryoshka_dims`) and each dimension D, the
corpus and the test queries are encoded with `dr encode --truncate_dim D`, then searched three ways:
exact (float32), binary codes alone (`dr quantize --quantize binary`, 1 bit per dimension), and binary +
exact rescoring of the top `--rescore` x depth; each run is scored with nDCG@10 against the qrels.
Prints a markdown table (model, dim, search, index bytes, nDCG@10, and the ratio to the same model's
exact search at full size) and writes a PNG: nDCG@10 against the dimension, and against the index bytes.

    python -m bench.matryoshka --plain runs/plain --matryoshka runs/mrl            # SciFact, 384..64
    python -m bench.matryoshka --plain A --matryoshka B --dims 32,16,8 --max_rows 40 --work /tmp/m   # smoke

Every encode, quantize and search is the `dr` command in a child process; outputs already in `--work` are
reused (delete the folder to start over). The PNG needs matplotlib (`pip install -e .[bench]`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEARCHES = ("exact", "binary", "binary+rescore")


def dr(command: str, *flags: str) -> None:
    """One `dr` command in a child process (its own errors stop the benchmark, with their message)."""
    subprocess.run([sys.executable, "-c", "import sys; from dr.cli import main; sys.exit(main())", command, *flags],
                   check=True, cwd=REPO)  # fmt: skip


def encode(model: str, data: Path, out: Path, dim: int, args: argparse.Namespace) -> None:
    """Corpus and test queries at `dim` dimensions (`dr encode --truncate_dim`), unless already there."""
    common = ["--model_name_or_path", model, "--dataset_name", str(data), "--truncate_dim", str(dim)]
    common += ["--per_device_eval_batch_size", str(args.batch_size), "--dataloader_num_workers", "0"]
    if args.max_rows:
        common += ["--max_rows", str(args.max_rows)]
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


def search(out: Path, kind: str, args: argparse.Namespace) -> Path:
    """The run file of one search of `out`'s shards (`kind`: one of SEARCHES)."""
    run = out / f"run.{kind}.txt"
    if run.is_file():
        return run
    corpus = str(out / "corpus*.arrow")
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
    manifest = json.loads((out / "corpus.manifest.json").read_text(encoding="utf-8"))
    rows, dim = int(manifest["rows"]), int(manifest["dim"])
    return rows * dim * 4 if kind == "exact" else rows * dim // 8


def measure(models: dict[str, str], dims: list[int], args: argparse.Namespace) -> list[dict]:
    """One row per (model, dim, search): index bytes and nDCG@10."""
    rows = []
    for label, model in models.items():
        for dim in dims:
            out = Path(args.work) / label / str(dim)
            encode(model, Path(args.data), out, dim, args)
            for kind in SEARCHES:
                score = ndcg10(search(out, kind, args), Path(args.qrels))
                rows.append(
                    {
                        "model": label,
                        "dim": dim,
                        "search": kind,
                        "bytes": index_bytes(out, kind),
                        "ndcg": score,
                    }
                )
        full = next(
            r["ndcg"]
            for r in rows
            if r["model"] == label and r["dim"] == max(dims) and r["search"] == "exact"
        )
        for r in rows:
            if r["model"] == label:
                r["ratio"] = r["ndcg"] / full if full else float("nan")
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: the ratio is to the same model's exact search at the largest dimension."""
    lines = [
        "| model | dim | search | index bytes | nDCG@10 | vs exact at full dim |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dim']} | {r['search']} | {r['bytes']:,} | {r['ndcg']:.4f} | {r['ratio']:.3f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Two panels: nDCG@10 against the dimension, and against the index bytes (log scale)."""
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
            by_dim.plot([r["dim"] for r in line], [r["ndcg"] for r in line], **look)
            by_bytes.plot([r["bytes"] for r in line], [r["ndcg"] for r in line], **look)
    dims = sorted({r["dim"] for r in rows})
    by_dim.set(
        xlabel="dimensions kept (--truncate_dim)",
        ylabel="nDCG@10",
        xscale="log",
        title="quality vs dimension",
    )
    by_dim.set_xticks(dims, labels=[str(d) for d in dims])
    by_dim.minorticks_off()
    by_bytes.set(
        xlabel="first-pass index bytes", ylabel="nDCG@10", xscale="log", title="quality vs index size"
    )
    by_dim.legend(fontsize=7)
    for axis in (by_dim, by_bytes):
        axis.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plain", required=True, help="model folder trained without --matryoshka_dims")
    parser.add_argument("--matryoshka", required=True, help="model folder trained with --matryoshka_dims")
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
    parser.add_argument("--work", default="bench-matryoshka", help="encodings, codes and runs (reused)")
    parser.add_argument("--png", default=None, help="default: <work>/matryoshka.png")
    args = parser.parse_args(argv)
    args.qrels = args.qrels or str(Path(args.data) / f"qrels.{args.split}.trec")
    dims = sorted((int(d) for d in args.dims.split(",")), reverse=True)
    if any(d % 8 for d in dims):
        parser.error(f"--dims {args.dims}: binary codes need dimensions divisible by 8")
    rows = measure({"plain": args.plain, "matryoshka": args.matryoshka}, dims, args)
    print(table(rows))
    png = Path(args.png or Path(args.work) / "matryoshka.png")
    try:
        plot(rows, png)
    except ImportError:
        print("matplotlib is not installed (pip install -e .[bench]): no plot written", file=sys.stderr)
        return 1
    print(f"plot: {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
