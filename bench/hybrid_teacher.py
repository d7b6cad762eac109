"""A hybrid teacher for distillation on CPU: a bi-encoder's scores fused with BM25 (bench, not the package).

`dr score --teacher_type bi` gives every (query, passage) of a training file the teacher's inner product.
Dense and lexical rankers make different mistakes, so their fusion ranks better than either (on SciFact:
BM25 nDCG@10 0.665, a fine-tuned MiniLM ~0.68; see bench/RESULTS.md for the hybrid's own number). This
script turns a `dr score` output into a hybrid-scored one:

    fused(p) = dense(p) + w * std(dense) * (bm25(p) - mean(bm25)) / std(bm25)

over each query's own passages. The BM25 part is standardized and put on the dense scores' scale, so the
fused scores keep the dense teacher's range and `--distil_temperature` means the same thing for both
teachers. BM25 is bm25s over the whole corpus (its IDF), English stopwords, title + text, as `dr demo bm25`.

    python -m bench.hybrid_teacher dense --input M.jsonl --query_reps Q.arrow --passage_reps "C.*arrow" \
        --output S.jsonl   # = `dr score --teacher_type bi` with the model that wrote Q and C, from its vectors
    python -m bench.hybrid_teacher train --scored S.jsonl --corpus corpus.jsonl --output H.jsonl
    python -m bench.hybrid_teacher run --run dense.trec --queries Q.tsv --corpus corpus.jsonl \
        --qrels qrels.test.trec --output hybrid.trec      # the same fusion on a test run: the teacher's quality
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import numpy as np

from dr.demo.cli import bm25_index, read_texts
from dr.io.atomic import atomic_path


def fuse(dense: np.ndarray, lexical: np.ndarray, weight: float) -> np.ndarray:
    """Dense scores plus the standardized lexical scores at the dense scores' spread (see module doc)."""
    spread = dense.std()
    lexical_std = lexical.std()
    if spread == 0 or lexical_std == 0:
        return dense.astype(np.float64)
    return dense + weight * spread * (lexical - lexical.mean()) / lexical_std


class LexicalScorer:
    """BM25 score of a query against any corpus passage, with the corpus-wide statistics."""

    def __init__(self, corpus: str) -> None:
        docids, texts = read_texts(corpus, "passage")
        self.row = {docid: i for i, docid in enumerate(docids)}
        self.index = bm25_index(texts)

    def scores(self, query: str, docids: Sequence[str]) -> np.ndarray:
        import bm25s

        tokens = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]
        everything = self.index.get_scores(tokens)
        return np.array([everything[self.row[d]] for d in docids], dtype=np.float64)


def read_vectors(pattern: str) -> dict[str, np.ndarray]:
    """id -> float32 vector of every row of the Arrow shards matching `pattern` (small corpora only)."""
    import glob

    from dr.io.shards import read_shard

    vectors: dict[str, np.ndarray] = {}
    for path in sorted(glob.glob(pattern)):
        ids, matrix, _ = read_shard(path)
        vectors.update(zip(ids, matrix.astype(np.float32)))
    return vectors


def score_from_vectors(source: str, query_reps: str, passage_reps: str, output: str) -> None:
    """Teacher score q.p for every (query, passage) of a training file, from already encoded vectors.

    The same numbers as `dr score --teacher_type bi` with the model (and lengths) that wrote the shards,
    without encoding every pair again (12.9k SciFact pairs: ~45 min on 2 CPU cores without AVX-512).
    """
    queries, passages = read_vectors(query_reps), read_vectors(passage_reps)
    with (
        open(source, encoding="utf-8") as src,
        atomic_path(output) as tmp,
        open(tmp, "w", encoding="utf-8") as dst,
    ):
        for line in src:
            row = json.loads(line)
            q = queries[str(row["query_id"])]
            for passage in row["positive_passages"] + row["negative_passages"]:
                passage["score"] = float(q @ passages[str(passage["docid"])])
            dst.write(json.dumps(row, ensure_ascii=False) + "\n")


def fuse_training_file(scored: str, corpus: str, output: str, weight: float) -> None:
    """Rewrite every passage's `score` in a `dr score` output as the hybrid score; atomic output."""
    lexical = LexicalScorer(corpus)
    with (
        open(scored, encoding="utf-8") as src,
        atomic_path(output) as tmp,
        open(tmp, "w", encoding="utf-8") as dst,
    ):
        for line in src:
            row = json.loads(line)
            passages = row["positive_passages"] + row["negative_passages"]
            dense = np.array([p["score"] for p in passages], dtype=np.float64)
            fused = fuse(dense, lexical.scores(row["query"], [p["docid"] for p in passages]), weight)
            for passage, value in zip(passages, fused):
                passage["score"] = float(value)
            dst.write(json.dumps(row, ensure_ascii=False) + "\n")


def fuse_run(run_path: str, queries: str, corpus: str, qrels: str, output: str, weight: float) -> dict:
    """The same fusion over each query's retrieved list; writes a TREC run and returns its metrics."""
    from dr.eval.metrics import evaluate
    from dr.io.qrels import read_qrels
    from dr.io.runs import Run, read_run, sort_hits, write_run

    lexical = LexicalScorer(corpus)
    qids, qtexts = read_texts(queries, "query")
    text_of = dict(zip(qids, qtexts))
    dense_run, _ = read_run(run_path)
    fused_run = Run()
    for qid, hits in dense_run.rankings.items():
        docids = [d for d, _ in hits]
        fused = fuse(np.array([s for _, s in hits]), lexical.scores(text_of[qid], docids), weight)
        fused_run.rankings[qid] = sort_hits(zip(docids, map(float, fused)))
    write_run(output, fused_run, "trec", tag="hybrid")
    return evaluate(read_qrels(qrels), fused_run, ["nDCG@10", "MRR@10", "R@100"])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    actions = parser.add_subparsers(dest="action", required=True)
    dense = actions.add_parser("dense", help="bi-encoder teacher scores from encoded vectors")
    dense.add_argument("--input", required=True)
    dense.add_argument("--query_reps", required=True)
    dense.add_argument("--passage_reps", required=True)
    dense.add_argument("--output", required=True)
    train = actions.add_parser("train", help="hybrid scores for a `dr score` training file")
    train.add_argument("--scored", required=True)
    run = actions.add_parser("run", help="the same fusion on a retrieved run: the teacher's own quality")
    run.add_argument("--run", required=True)
    run.add_argument("--queries", required=True)
    run.add_argument("--qrels", required=True)
    for sub in (train, run):
        sub.add_argument("--corpus", required=True)
        sub.add_argument("--output", required=True)
        sub.add_argument("--weight", type=float, default=1.0, help="w: the lexical part's weight")
    args = parser.parse_args(argv)
    if args.action == "dense":
        score_from_vectors(args.input, args.query_reps, args.passage_reps, args.output)
    elif args.action == "train":
        fuse_training_file(args.scored, args.corpus, args.output, args.weight)
    else:
        metrics = fuse_run(args.run, args.queries, args.corpus, args.qrels, args.output, args.weight)
        print(json.dumps(metrics))


if __name__ == "__main__":
    main()
