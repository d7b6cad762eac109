"""`dr eval`: score a run against qrels (MRR@10, nDCG@10, recall, MAP, any ir_measures measure).

Usage::

    dr eval --qrels qrels.dev.trec --run rank.txt --metrics MRR@10 R@1000 --output metrics.json

Semantics (chosen to match the official MS MARCO evaluator and ``trec_eval -c``):

* Evaluated queries are the qrels queries with at least one judgment ``rel >= 1``. Every metric is
  averaged over all of them: a query missing from the run scores 0 (``trec_eval`` without ``-c`` and
  ``ir_measures`` would skip it and inflate the mean). Run queries absent from the qrels are ignored.
* MRR@10 is computed here, exactly as the official MS MARCO script: the reciprocal rank of the first hit
  with ``rel >= 1`` among the top 10, 0 if none, summed and divided by the number of evaluated queries.
* The other metrics come from ``ir_measures`` with its pytrec_eval (trec_eval) backend: nDCG uses the
  graded ``rel`` value as gain (trec_eval's linear gain), R@k and MAP count ``rel >= 1`` as relevant.
  ``MAP`` is an alias of ``AP``; any other ``ir_measures`` name (``P@10``, ``RR``, ...) is passed through.
* Ties: hits are ranked by score descending, then docid ascending (`dr.runfile`). The run handed to
  trec_eval carries strictly decreasing synthetic scores, so trec_eval's own tie rule (score, then docid
  *descending*) never applies and every metric sees the same ranking as MRR@10.

Qrels: TREC ``qid iter docid rel`` (the second column is ignored, e.g. ``0`` or ``Q0``), whitespace or tab
separated, which also covers MS MARCO's ``qrels.*.tsv``; or two columns ``qid docid`` (each line a
relevant doc, rel = 1). The run may be in any format `dr.runfile` reads.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from dr.io.atomic import write_json_atomic
from dr.io.paths import expand_home
from dr.io.runs import FORMATS, Run, read_run

DEFAULT_METRICS = ("MRR@10", "nDCG@10", "R@100", "R@1000", "MAP")
_ALIASES = {"MAP": "AP"}

Qrels = dict[str, dict[str, int]]


class QrelsFormatError(ValueError):
    """A qrels file is malformed."""


class EvalError(ValueError):
    """The qrels and run cannot be evaluated together (unknown metric, no overlapping queries)."""


def read_qrels(path: str | os.PathLike) -> Qrels:
    """Read qrels into qid -> {docid: rel}: TREC / MS MARCO (`qid iter docid rel`), BEIR TSV
    (`query-id corpus-id score`, header line skipped) or 2-column (`qid docid`, relevance 1).

    Raises:
        QrelsFormatError: naming the file and line of the first malformed line.
    """
    path = Path(path)
    if not path.is_file():
        raise QrelsFormatError(f"{path}: qrels file not found")
    qrels: Qrels = {}
    ncols = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if not fields or (number == 1 and fields[0] == "query-id"):  # BEIR header
            continue
        ncols = ncols or len(fields)
        if len(fields) != ncols or ncols not in (2, 3, 4):
            raise QrelsFormatError(
                f"{path}:{number}: {len(fields)} columns; qrels need 4 (qid iter docid rel), 3 (qid docid rel) "
                f"or 2 (qid docid) on every line"
            )
        qid, docid = fields[0], fields[2] if ncols == 4 else fields[1]
        try:
            rel = int(fields[-1]) if ncols > 2 else 1
        except ValueError:
            raise QrelsFormatError(f"{path}:{number}: relevance {fields[-1]!r} is not an integer") from None
        qrels.setdefault(qid, {})[docid] = rel
    if not qrels:
        raise QrelsFormatError(f"{path}: the qrels file is empty")
    return qrels


def judged_queries(qrels: Qrels) -> list[str]:
    """Queries with at least one relevant (rel >= 1) document: the denominator of every metric."""
    return [qid for qid, docs in qrels.items() if any(rel >= 1 for rel in docs.values())]


def reciprocal_rank(hits: list[tuple[str, float]], relevant: dict[str, int], cutoff: int) -> float:
    """1 / rank of the first hit with rel >= 1 within the first `cutoff` hits, else 0."""
    for rank, (docid, _) in enumerate(hits[:cutoff], 1):
        if relevant.get(docid, 0) >= 1:
            return 1.0 / rank
    return 0.0


def _parse_cutoff(name: str) -> int | None:
    """The k of ``MRR@k``, or None when `name` is not an MRR measure."""
    if not name.upper().startswith("MRR@"):
        return None
    value = name.split("@", 1)[1]
    if not value.isdigit() or int(value) < 1:
        raise EvalError(f"metric {name!r}: cutoff must be a positive integer")
    return int(value)


def _ir_measure(name: str):
    import ir_measures

    try:
        return ir_measures.parse_measure(_ALIASES.get(name, name))
    except (ValueError, NameError, SyntaxError, TypeError) as err:
        raise EvalError(f"unknown metric {name!r} (ir_measures could not parse it: {err})") from None


def _rank_scored_run(run: Run, queries: list[str]) -> dict[str, dict[str, float]]:
    """The run as trec_eval input, with strictly decreasing scores that encode dr's ranking exactly."""
    out = {}
    for qid in queries:
        hits = run.rankings.get(qid)
        if hits:
            out[qid] = {docid: float(len(hits) - i) for i, (docid, _) in enumerate(hits)}
    return out


def evaluate(qrels: Qrels, run: Run, metrics: list[str]) -> dict[str, float | int]:
    """Mean of each metric over `judged_queries(qrels)` (missing queries count 0), plus query counts."""
    queries = judged_queries(qrels)
    if not queries:
        raise EvalError("the qrels hold no relevant (rel >= 1) judgment")
    found = [qid for qid in queries if run.rankings.get(qid)]
    if not found:
        raise EvalError(
            f"none of the {len(queries)} judged queries appears in the run: wrong qrels for this run?"
        )
    results: dict[str, float | int] = {}
    ir_names = {}
    for name in metrics:
        cutoff = _parse_cutoff(name)
        if cutoff is not None:
            total = sum(reciprocal_rank(run.rankings.get(q, []), qrels[q], cutoff) for q in queries)
            results[name] = total / len(queries)
        else:
            ir_names[name] = _ir_measure(name)
    if ir_names:
        results.update(_trec_eval_means(qrels, run, queries, ir_names))
    results = {name: results[name] for name in metrics}  # keep the requested order
    results["num_queries"] = len(queries)
    results["num_missing_from_run"] = len(queries) - len(found)
    return results


def _trec_eval_means(qrels: Qrels, run: Run, queries: list[str], measures: dict) -> dict[str, float]:
    """Per-query values from ir_measures' pytrec_eval backend, averaged with 0 for missing queries."""
    import ir_measures

    sums = {name: 0.0 for name in measures}
    by_measure = {str(measure): name for name, measure in measures.items()}
    judged = {qid: qrels[qid] for qid in queries}
    for metric in ir_measures.pytrec_eval.iter_calc(
        list(measures.values()), judged, _rank_scored_run(run, queries)
    ):
        if metric.query_id in judged and not math.isnan(metric.value):
            sums[by_measure[str(metric.measure)]] += metric.value
    return {name: total / len(queries) for name, total in sums.items()}


def format_table(results: dict[str, float | int]) -> str:
    """A two-column text table of metric values."""
    width = max(len(name) for name in results)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for name, value in results.items():
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{name:<{width}}  {text}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dr eval", description="Evaluate a run against qrels.")
    parser.add_argument(
        "--qrels", required=True, help="TREC qrels (qid iter docid rel) or MS MARCO qrels TSV"
    )
    parser.add_argument("--run", required=True, help="run file (tevatron, marco or trec; detected)")
    parser.add_argument("--run_format", default="auto", choices=("auto", *FORMATS))
    parser.add_argument(
        "--metrics", nargs="+", default=list(DEFAULT_METRICS), help="MRR@k or ir_measures names"
    )
    parser.add_argument("--output", default=None, help="write the metrics as JSON here (atomically)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `dr eval`; return the exit status (0 ok, 2 bad input)."""
    args = expand_home(build_parser().parse_args(argv))
    try:
        qrels = read_qrels(args.qrels)
        run, _ = read_run(args.run, args.run_format)
        results = evaluate(qrels, run, args.metrics)
        if args.output:
            write_json_atomic(args.output, results)
    except (ValueError, OSError) as err:
        print(f"dr eval: error: {err}", file=sys.stderr)
        return 2
    print(format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
