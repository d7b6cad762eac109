"""Metrics of a run against qrels, for `dr eval`, the pipeline and the demo (`ACCEPTED_METRICS`).

Usage::

    dr eval --qrels qrels.dev.trec --run rank.txt --metrics MRR@10 R@1000 --output metrics.json

Semantics (chosen to match the official MS MARCO evaluator and ``trec_eval -c``):

* Evaluated queries are the qrels queries with at least one judgment ``rel >= 1``. Every metric is
  averaged over all of them: a query missing from the run scores 0 (``trec_eval`` without ``-c`` would
  skip it and inflate the mean). Run queries absent from the qrels are ignored. ``ir_measures`` 0.4.3
  also scores missing queries 0, but averages over every qrels query, those judged only ``rel = 0``
  included (each scores 0), so its mean is lower than dr's when the qrels hold such queries.
* Accepted metrics (`ACCEPTED_METRICS`): ``MRR@k`` and ``RR@k`` (the same value) are computed here,
  exactly as the official MS MARCO script: the reciprocal rank of the first hit with ``rel >= 1`` among
  the top k, 0 if none, summed and divided by the number of evaluated queries. The others (RR, AP/MAP,
  AP@k, nDCG, nDCG@k, P@k, R@k, Success@k, Rprec, Bpref) come from trec_eval through ir_measures'
  pytrec_eval backend: nDCG uses the graded ``rel`` value as gain (trec_eval's linear gain), the others
  count ``rel >= 1`` as relevant. Two names of one measure (``AP MAP``) are computed once and both
  reported. Other ir_measures names are refused rather than passed to a backend that might compute a
  different measure under their name (pytrec_eval has no RR cutoff, for one).
* Ties (`evaluation_ranking`): scored runs (TREC, Tevatron) are ranked by dr's tie rule (`dr.ranking`:
  score descending, then docid *descending*), which is how trec_eval ranks a TREC run, so the numbers are
  the published trec_eval ones. MS MARCO runs are ranked by their rank column, as the official MRR@10
  script does; dr writes them in the same rule's order, so every format of one run gives one number.
  Every metric sees the same ranking (the run handed to trec_eval carries strictly decreasing synthetic
  scores that encode it).

Qrels are read by `dr.io.qrels`; the run may be in any format `dr.io.runs` reads.
"""

from __future__ import annotations

import math
import re
from typing import Any

from dr.errors import InputError, UsageError
from dr.io.qrels import Qrels, judged_queries
from dr.io.runs import Run
from dr.ranking import sort_hits

DEFAULT_METRICS = ("MRR@10", "nDCG@10", "R@100", "R@1000", "MAP")

# Accepted metric families -> cutoff rule: "k" a cutoff is required, "k?" optional, "" none allowed.
# Each one is checked digit for digit against ir_measures (tests/test_bad_outputs.py).
_FAMILIES = {
    "MRR": "k",  # the official MS MARCO MRR@k; the same value as RR@k
    "RR": "k?",  # RR: trec_eval recip_rank (no cutoff); RR@k: computed here, as MRR@k
    "AP": "k?",  # trec_eval map / map_cut_k
    "MAP": "k?",  # an alias of AP
    "nDCG": "k?",  # trec_eval ndcg / ndcg_cut_k: graded rel as linear gain
    "P": "k",  # trec_eval P_k
    "R": "k",  # trec_eval recall_k
    "Success": "k",  # trec_eval success_k
    "Rprec": "",  # trec_eval Rprec
    "Bpref": "",  # trec_eval bpref
}
_FAMILY_BY_KEY = {family.lower(): family for family in _FAMILIES}
_IR_MEASURES_NAME = {"MAP": "AP"}
_METRIC_NAME = re.compile(r"^([A-Za-z]+)(?:@([0-9]+))?$")
ACCEPTED_METRICS = "MRR@k, RR, RR@k, AP, AP@k, MAP, MAP@k, nDCG, nDCG@k, P@k, R@k, Success@k, Rprec, Bpref"
# One name per family and cutoff form, the list the agreement test with ir_measures runs over.
ACCEPTED_METRIC_EXAMPLES = (
    "MRR@10", "MRR@3", "RR", "RR@10", "RR@3", "AP", "AP@10", "MAP", "MAP@5", "nDCG", "nDCG@10", "nDCG@3",
    "P@1", "P@10", "R@5", "R@100", "R@1000", "Success@1", "Success@5", "Rprec", "Bpref",
)  # fmt: skip


class EvalError(InputError):
    """The qrels and run cannot be evaluated together (no relevant judgment, no overlapping queries)."""


def reciprocal_rank(docids: list[str], relevant: dict[str, int], cutoff: int) -> float:
    """1 / rank of the first docid with rel >= 1 within the first `cutoff`, else 0."""
    for rank, docid in enumerate(docids[:cutoff], 1):
        if relevant.get(docid, 0) >= 1:
            return 1.0 / rank
    return 0.0


def _parse_metric(name: str) -> tuple[str, int | None]:
    """(canonical family, cutoff or None) of an accepted metric name; `UsageError` for anything else.

    Names are matched case-insensitively (``ndcg@10`` is ``nDCG@10``); see `ACCEPTED_METRICS`.
    """
    match = _METRIC_NAME.match(name.strip())
    family = _FAMILY_BY_KEY.get(match.group(1).lower()) if match else None
    cutoff = match.group(2) if match else None
    rule = _FAMILIES.get(family)
    if (
        rule is None
        or (cutoff is None and rule == "k")
        or (cutoff is not None and (rule == "" or int(cutoff) < 1))
    ):
        raise UsageError(f"unknown metric {name!r}; dr eval accepts: {ACCEPTED_METRICS}")
    return family, None if cutoff is None else int(cutoff)


def check_metrics(names: list[str]) -> None:
    """Refuse unknown metric names (`UsageError`) before any file is read."""
    for name in names:
        _parse_metric(name)


def _ir_measure(family: str, cutoff: int | None):
    """The ir_measures measure that trec_eval computes for an accepted (non-RR@k) metric."""
    import ir_measures

    spelled = _IR_MEASURES_NAME.get(family, family) + ("" if cutoff is None else f"@{cutoff}")
    return ir_measures.parse_measure(spelled)


def evaluation_ranking(run: Run) -> dict[str, list[str]]:
    """The ranking every metric sees: trec_eval's for scored runs, the rank column for MS MARCO runs.

    Scored runs (TREC, Tevatron) are ordered by `dr.ranking.sort_hits` (score descending, then docid
    *descending*), which is what trec_eval (and so pytrec_eval, ir_measures, pyserini) does with a TREC
    run: the published numbers. MS MARCO runs carry ranks, not scores; they are evaluated in rank order,
    as the official MRR@10 script does.
    """
    if not run.scored:
        return {qid: [docid for docid, _ in hits] for qid, hits in run.rankings.items()}
    return {qid: [docid for docid, _ in sort_hits(hits)] for qid, hits in run.rankings.items()}


def _rank_scored_run(ranking: dict[str, list[str]], queries: list[str]) -> dict[str, dict[str, float]]:
    """`ranking` as trec_eval input, with strictly decreasing scores that encode it exactly."""
    out = {}
    for qid in queries:
        docids = ranking.get(qid)
        if docids:
            out[qid] = {docid: float(len(docids) - i) for i, docid in enumerate(docids)}
    return out


def evaluate(qrels: Qrels, run: Run, metrics: list[str]) -> dict[str, float | int]:
    """Mean of each metric over `judged_queries(qrels)` (missing queries count 0), plus query counts.

    Every metric is computed on the same `evaluation_ranking(run)`. ``MRR@k`` and ``RR@k`` (the same
    measure) are computed here; the others by trec_eval through ir_measures' pytrec_eval backend, each
    distinct trec_eval measure once, its value reported under every requested name that denotes it.
    """
    parsed = {name: _parse_metric(name) for name in metrics}
    queries = judged_queries(qrels)
    if not queries:
        raise EvalError("the qrels hold no relevant (rel >= 1) judgment")
    ranking = evaluation_ranking(run)
    found = [qid for qid in queries if ranking.get(qid)]
    if not found:
        raise EvalError(
            f"none of the {len(queries)} judged queries appears in the run: wrong qrels for this run?"
        )
    results: dict[str, float | int] = {}
    trec_eval_names = {}
    for name, (family, cutoff) in parsed.items():
        if family in ("MRR", "RR") and cutoff is not None:
            total = sum(reciprocal_rank(ranking.get(q, []), qrels[q], cutoff) for q in queries)
            results[name] = total / len(queries)
        else:
            trec_eval_names[name] = _ir_measure(family, cutoff)
    if trec_eval_names:
        results.update(_trec_eval_means(qrels, ranking, queries, trec_eval_names))
    results = {name: results[name] for name in metrics}  # keep the requested order
    results["num_queries"] = len(queries)
    results["num_missing_from_run"] = len(queries) - len(found)
    return results


def _trec_eval_means(
    qrels: Qrels, ranking: dict[str, list[str]], queries: list[str], measures: dict
) -> dict[str, float]:
    """Per-query values from ir_measures' pytrec_eval backend, averaged with 0 for missing queries.

    `measures` maps requested names to ir_measures measures; two names may map to one measure (``AP`` and
    ``MAP``), which is computed once and reported under both.
    """
    import ir_measures

    unique = {str(measure): measure for measure in measures.values()}
    sums = dict.fromkeys(unique, 0.0)
    judged = {qid: qrels[qid] for qid in queries}
    for metric in ir_measures.pytrec_eval.iter_calc(
        list(unique.values()), judged, _rank_scored_run(ranking, queries)
    ):
        key = str(metric.measure)
        if key not in sums:  # a measure the backend would compute as another one: never average it silently
            raise RuntimeError(f"trec_eval returned {key}, which was not requested")  # a bug, not input
        if metric.query_id in judged and not math.isnan(metric.value):
            sums[key] += metric.value
    return {name: sums[str(measure)] / len(queries) for name, measure in measures.items()}


def format_table(
    results: dict[str, dict[str, Any]] | dict[str, Any],
    metrics: list[str] | None = None,
    title: str = "metric",
) -> str:
    """The one metrics table of every command: rows = systems (or one column of values), columns = metrics.

    `results` is either {system: {metric: value}} (pipeline / demo comparisons) or one {metric: value}
    mapping (`dr eval`), which prints as a two-column table; integer counts follow on one line.
    """
    if results and all(not isinstance(v, dict) for v in results.values()):  # one system
        values = {k: v for k, v in results.items() if not isinstance(v, int) or isinstance(v, bool)}
        counts = {k: v for k, v in results.items() if isinstance(v, int) and not isinstance(v, bool)}
        width = max([len(k) for k in values] + [len(title)])
        lines = [f"{title:<{width}}  value", f"{'-' * width}  ------"]
        lines += [
            f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}"
            for k, v in values.items()
        ]
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
