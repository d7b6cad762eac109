"""`dr bm25`: a BM25 run of queries over a corpus, in dr's run formats and tie rule.

Usage::

    dr bm25 --corpus corpus.jsonl --queries queries.tsv --depth 1000 --save_ranking_to bm25.txt \\
        [--run_format tevatron|trec|marco] [--index_dir bm25-index] [--k1 0.9 --b 0.4]

Inputs are read as `dr encode` reads them (`dr.io.corpus`): JSONL / TSV / Parquet files, globs, BEIR
folders (``corpus.jsonl``; ``queries.<split>.tsv|jsonl`` or ``queries.jsonl``), a title joined to its
text. Output: the run, written atomically, and ``<run>.config.json`` (the resolved arguments, the index
fingerprint, whether the index was reused, counts and timings), as `dr search` writes.
"""

from __future__ import annotations

import argparse
import logging
import time

from dr.bm25.index import STOPWORDS, Bm25Settings, open_index
from dr.bm25.search import search
from dr.errors import UsageError
from dr.io.atomic import write_json_atomic
from dr.io.corpus import load_corpus
from dr.io.runs import FORMATS, Run, RunFormatError, check_tag, write_run

logger = logging.getLogger("dr.bm25")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dr bm25", description="BM25 (bm25s) run of queries over a corpus.")
    p.add_argument("--corpus", required=True, help="passages: file, glob (quote it), folder or BEIR folder")
    p.add_argument("--queries", required=True, help="queries: file, glob, folder or BEIR folder")
    p.add_argument(
        "--query_split", default="train", help="split of a BEIR folder's queries (queries.<split>.tsv)"
    )
    p.add_argument("--depth", type=int, default=100, help="hits per query (fewer when fewer passages match)")
    p.add_argument("--save_ranking_to", required=True, help="run file to write")
    p.add_argument(
        "--run_format", "--format", dest="run_format", default="tevatron", choices=FORMATS, help="run format"
    )
    p.add_argument("--run_tag", default="bm25", help="tag column of TREC runs")
    p.add_argument(
        "--index_dir", default=None, help="save the index here; reused when corpus and settings are unchanged"
    )
    p.add_argument("--k1", type=float, default=0.9, help="term-frequency saturation (pyserini's 0.9)")
    p.add_argument("--b", type=float, default=0.4, help="length normalization (pyserini's 0.4)")
    p.add_argument("--stopwords", default="en", choices=STOPWORDS, help="English stopword list, or none")
    p.add_argument(
        "--stemmer", default="none", help="none, or a PyStemmer algorithm: porter (pyserini), english, ..."
    )
    p.add_argument("--threads", type=int, default=0, help="query threads; 0 = one per CPU core")
    return p


def run(args: argparse.Namespace) -> int:
    """Build or reuse the index, search every query, write the run and its config sidecar."""
    start = time.perf_counter()
    if args.depth < 1:
        raise UsageError(f"--depth must be >= 1, got {args.depth}")
    if args.threads < 0:
        raise UsageError(f"--threads must be >= 0, got {args.threads}")
    if args.run_format == "trec":
        try:
            check_tag(args.run_tag)
        except RunFormatError as err:
            raise UsageError(f"--run_tag: {err}") from None
    settings = Bm25Settings(k1=args.k1, b=args.b, stopwords=args.stopwords, stemmer=args.stemmer)
    settings.check()

    queries = load_corpus(args.queries, "query", split=args.query_split)
    queries.validate(0, len(queries))
    queries.check_unique(0, len(queries))
    qids, qtexts = queries.records(0, len(queries))

    index = open_index(args.corpus, settings, args.index_dir)
    index_s = time.perf_counter() - start
    hits = search(index, qtexts, settings, args.depth, args.threads)
    docids = index.docids.to_pylist()
    rankings = {
        qid: [(docids[row], float(score)) for row, score in zip(rows.tolist(), scores.tolist())]
        for qid, (rows, scores) in zip(qids, hits)
    }
    empty = sum(not ranking for ranking in rankings.values())
    if empty:
        logger.warning("%d of %d queries share no word with the corpus: no hits", empty, len(qids))
    write_run(args.save_ranking_to, Run(rankings), args.run_format, args.run_tag)
    config = {
        "args": vars(args),
        "index": {**index.fingerprint, "reused": index.reused, "num_passages": len(docids)},
        "num_queries": len(qids),
        "num_queries_without_hits": empty,
        "num_hits": sum(len(r) for r in rankings.values()),
        "timings": {"index_s": index_s, "total_s": time.perf_counter() - start},
    }
    write_json_atomic(args.save_ranking_to + ".config.json", config)
    logger.info("%d queries x depth %d -> %s", len(qids), args.depth, args.save_ranking_to)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`dr bm25` for library callers and tests: the exit status (2 bad flags, 1 bad files)."""
    from dr.cli import run_command

    return run_command("bm25", argv)
