"""Metrics of a run against qrels, for `dr eval`, the pipeline and the demo (MRR@10, nDCG@10, recall, MAP, any ir_measures measure).

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
* Ties: hits are ranked by score descending, then docid ascending (`dr.io.runs`). The run handed to
  trec_eval carries strictly decreasing synthetic scores, so trec_eval's own tie rule (score, then docid
  *descending*) never applies and every metric sees the same ranking as MRR@10.

Qrels are read by `dr.io.qrels`; the run may be in any format `dr.io.runs` reads.
"""

from __future__ import annotations

import math
from typing import Any

from dr.errors import InputError, UsageError
from dr.io.qrels import Qrels, judged_queries
from dr.io.runs import Run

DEFAULT_METRICS = ("MRR@10", "nDCG@10", "R@100", "R@1000", "MAP")
_ALIASES = {"MAP": "AP"}


class EvalError(InputError):
    """The qrels and run cannot be evaluated together (unknown metric, no overlapping queries)."""


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
        raise UsageError(f"metric {name!r}: cutoff must be a positive integer")
    return int(value)


def _ir_measure(name: str):
    import ir_measures

    try:
        return ir_measures.parse_measure(_ALIASES.get(name, name))
    except (ValueError, NameError, SyntaxError, TypeError) as err:
        raise UsageError(f"unknown metric {name!r} (ir_measures could not parse it: {err})") from None


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


def format_table(results: dict[str, dict[str, Any]] | dict[str, Any], metrics: list[str] | None = None,
                 title: str = "metric") -> str:
    """The one metrics table of every command: rows = systems (or one column of values), columns = metrics.

    `results` is either {system: {metric: value}} (pipeline / demo comparisons) or one {metric: value}
    mapping (`dr eval`), which prints as a two-column table; integer counts follow on one line.
    """
    if results and all(not isinstance(v, dict) for v in results.values()):  # one system
        values = {k: v for k, v in results.items() if not isinstance(v, int) or isinstance(v, bool)}
        counts = {k: v for k, v in results.items() if isinstance(v, int) and not isinstance(v, bool)}
        width = max([len(k) for k in values] + [len(title)])
        lines = [f"{title:<{width}}  value", f"{'-' * width}  ------"]
        lines += [f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in values.items()]
        if counts:
            lines.append("  ".join(f"{k}={v}" for k, v in counts.items()))
        return "\n".join(lines)
    metrics = metrics or sorted({m for values in results.values() for m in values})
    width = max([len(name) for name in results] + [len(title)]) + 2
    header = f"{title:<{width}}" + "".join(f"{m:>10}" for m in metrics)
    lines = [header, "-" * len(header)]
    for name, values in results.items():
        lines.append(f"{name:<{width}}" + "".join(f"{values.get(m, float('nan')):>10.4f}" for m in metrics))
    return "\n".join(lines)
