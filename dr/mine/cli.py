"""`dr mine`: hard negatives from a retrieval run -> a new training file (the mine -> retrain loop).

Round 1 trains with BM25 or random negatives; its model encodes the corpus and the *training* queries,
`dr search` ranks the corpus for them, and `dr mine` turns that run into Tevatron-format training rows:

    {"query_id", "query", "positive_passages": [{"docid","title","text"}], "negative_passages": [...]}

Negatives are drawn from the hits ranked in [--ranks A B) (1-based, A included, B excluded), never a
judged-relevant document, optionally only those scoring at least `--margin` below the query's best
positive (hits scored almost like a positive are often unjudged positives). The draw depends only on
(--seed, query id), so the same inputs give the same file. Written atomically.

`--keep_scores` keeps the run's scores as teacher scores for distillation (`dr train --loss kl`): every
passage gets "score" = its score in the run. A positive the run did not retrieve has no run score: it gets
"score": null (the count is logged and saved), which `dr train` with a distillation loss rejects naming
the row; `dr score --teacher_type bi --model_name_or_path <the run's model>` fills every score with that
model's q.p (the same numbers the run has for retrieved passages). Nothing is guessed for it: the max of
the run would invent a teacher signal, the min would claim the model ranked it last.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dr.errors import InputError, UsageError
from dr.io.atomic import atomic_path, write_json_atomic
from dr.io.corpus import load_corpus
from dr.io.keys import stable_hash64
from dr.io.qrels import read_qrels
from dr.io.runs import read_run

logger = logging.getLogger("dr.mine")


class MineError(InputError):
    """The run, queries, qrels and corpus do not fit together; the message names the file and id."""


def choose_negatives(
    hits: list[tuple[str, float]],
    positives: dict[str, int],
    ranks: tuple[int, int],
    n_negatives: int,
    rng: np.random.Generator,
    margin: float | None = None,
) -> list[str]:
    """Docids sampled (without replacement) from hits ranked in [ranks[0], ranks[1]), positives excluded.

    With `margin`, a hit is kept only if its score <= (best positive score in the run) - margin; when no
    positive was retrieved there is nothing to compare with and the margin does not apply.
    """
    relevant = {d for d, rel in positives.items() if rel > 0}
    start, stop = ranks
    candidates = [(d, s) for rank, (d, s) in enumerate(hits, 1) if start <= rank < stop and d not in relevant]
    positive_scores = [s for d, s in hits if d in relevant]
    if margin is not None and positive_scores:
        ceiling = max(positive_scores) - margin
        candidates = [(d, s) for d, s in candidates if s <= ceiling]
    if len(candidates) <= n_negatives:
        return [d for d, _ in candidates]
    picked = rng.choice(len(candidates), size=n_negatives, replace=False)
    return [candidates[i][0] for i in sorted(picked)]  # keep run order: easier to read, same set


def lookup_passages(corpus_path: str, docids: set[str]) -> dict[str, dict[str, str]]:
    """docid -> {"docid","title","text"} for the wanted docids only (vectorised scan of the id column)."""
    corpus = load_corpus(corpus_path, side="passage")
    ids = corpus.ids(0, len(corpus))
    wanted = pa.array(sorted(docids), pa.string())
    rows = pc.indices_nonzero(pc.is_in(ids, value_set=wanted)).to_pylist()
    table = corpus.table.take(rows)
    titles = table.column(corpus.title_field).to_pylist() if corpus.title_field else [""] * len(rows)
    texts = table.column(corpus.text_field).to_pylist()
    return {
        str(docid): {"docid": str(docid), "title": title or "", "text": text}
        for docid, title, text in zip(ids.take(rows).to_pylist(), titles, texts)
    }


def mine(args: argparse.Namespace) -> dict[str, int]:
    """Build the training rows; return counts for the log and the sidecar JSON."""
    run, _ = read_run(args.run, args.run_format)
    if args.margin is not None and not run.scored:
        logger.warning("--margin with an unscored (MS MARCO) run compares synthetic 1/rank scores")
    qrels = read_qrels(args.qrels)
    queries_corpus = load_corpus(args.queries, side="query")
    query_ids, query_texts = queries_corpus.records(0, len(queries_corpus))
    queries = dict(zip(query_ids, query_texts))
    unknown = [qid for qid in run.rankings if qid not in queries]
    if unknown:
        raise MineError(
            f"{args.run}: query id {unknown[0]!r} is not in {args.queries} ({len(unknown)} unknown)"
        )
    if args.keep_scores and not run.scored:
        raise UsageError(
            f"{args.run}: --keep_scores needs a scored run (tevatron or TREC format), not ranks only"
        )
    counts = {"queries_in_run": len(run), "written": 0, "no_positive": 0, "no_negative": 0, "short": 0}
    if args.keep_scores:
        counts["positives_without_score"] = 0
    plans = []
    for qid, hits in run.rankings.items():
        positives = {d: r for d, r in qrels.get(qid, {}).items() if r > 0}
        if not positives:
            counts["no_positive"] += 1
            continue
        rng = np.random.default_rng([args.seed, stable_hash64(qid)])
        negatives = choose_negatives(hits, positives, tuple(args.ranks), args.n_negatives, rng, args.margin)
        if not negatives:
            counts["no_negative"] += 1
            continue
        counts["short"] += len(negatives) < args.n_negatives
        plans.append((qid, sorted(positives), negatives, dict(hits) if args.keep_scores else None))
    needed = {d for _, pos, neg, _ in plans for d in (*pos, *neg)}
    passages = lookup_passages(args.corpus, needed)
    missing = sorted(needed - passages.keys())
    if missing:
        raise MineError(
            f"{args.corpus}: docid {missing[0]!r} (from the run or qrels) is not in the corpus "
            f"({len(missing)} missing)"
        )
    with atomic_path(args.output) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for qid, pos, neg, scores in plans:
            row = {
                "query_id": qid,
                "query": queries[qid],
                "positive_passages": [passages[d] for d in pos],
                "negative_passages": [passages[d] for d in neg],
            }
            if scores is not None:  # the run's scores as teacher scores (module docstring)
                for name in ("positive_passages", "negative_passages"):
                    row[name] = [{**p, "score": scores.get(p["docid"])} for p in row[name]]
                counts["positives_without_score"] += sum(d not in scores for d in pos)
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            counts["written"] += 1
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dr mine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run file of the training queries (any dr run format)")
    parser.add_argument("--run_format", default="auto", choices=["auto", "tevatron", "marco", "trec"])
    parser.add_argument("--queries", required=True, help="training queries: TSV (qid<TAB>text) or JSONL")
    parser.add_argument("--qrels", required=True, help="qrels of the training queries (TREC or MS MARCO TSV)")
    parser.add_argument("--corpus", required=True, help="the corpus the run ranks (JSONL/Parquet/TSV/folder)")
    parser.add_argument("--output", required=True, help="training file to write (JSONL, Tevatron format)")
    parser.add_argument(
        "--ranks",
        type=int,
        nargs=2,
        default=[10, 100],
        metavar=("A", "B"),
        help="sample negatives from hits ranked A <= rank < B (1-based; default 10 100)",
    )
    parser.add_argument(
        "--n_negatives", type=int, default=30, help="negatives per query (fewer if too few hits)"
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=None,
        help="keep hits scoring <= best positive score - MARGIN (needs a scored run)",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--keep_scores",
        action="store_true",
        help="write each passage's run score as its teacher 'score' (for dr train --loss kl|margin_mse); "
        "positives the run did not retrieve get null (fill them with dr score)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.ranks[0] < args.ranks[1]:
        raise UsageError(f"--ranks {args.ranks[0]} {args.ranks[1]}: need 1 <= A < B")
    if args.n_negatives < 1:
        raise UsageError("--n_negatives must be >= 1")
    counts = mine(args)
    write_json_atomic(Path(str(args.output) + ".config.json"), {**vars(args), "counts": counts})
    logger.info(
        "wrote %d training queries to %s (%d in the run; skipped %d without a positive, %d without a negative; "
        "%d with fewer than %d negatives)",
        counts["written"],
        args.output,
        counts["queries_in_run"],
        counts["no_positive"],
        counts["no_negative"],
        counts["short"],
        args.n_negatives,
    )
    if counts.get("positives_without_score"):
        logger.warning(
            "--keep_scores: %d positives are not in the run and have score null; before distilling, fill "
            "them with dr score --teacher_type bi --model_name_or_path <the run's model>",
            counts["positives_without_score"],
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`dr mine` for library callers and tests: the exit status (2 bad flags, 1 bad files)."""
    from dr.cli import run_command

    return run_command("mine", argv)
