"""Fusion of several runs of the same queries into one: reciprocal rank fusion and weighted linear fusion.

Both work query by query on `dr.io.runs.Run` objects, whose hits are already in the one tie rule's order
(`dr.ranking`; an MS MARCO run in its rank order), and both rank the fused hits by that rule again.

**RRF** (Cormack, Clarke & Buettcher, SIGIR 2009): ``score(d) = sum_i w_i / (k + rank_i(d))`` over the
runs that returned `d` for the query, ``rank_i`` counted from 1 in run i's order, ``k = 60`` by default,
``w_i = 1`` unless weights are given. A document contributes only where it is present. Scores are not
used, so MS MARCO runs (ranks only) fuse as well as scored ones.

**Linear**: ``score(d) = sum_i w_i * norm_i(d)``, where ``norm_i`` normalizes run i's scores *per query*:

    minmax   (s - min) / (max - min): the run's best hit 1, its last 0 (the default);
    zscore   (s - mean) / std (population std over the query's hits);
    none     the raw score.

A document that run i did not return for the query gets run i's *floor* for that query: 0 under minmax,
the lowest z-score the run gave under zscore, the lowest raw score under none (as if it tied the run's last
hit). A run whose scores on a query are all equal (or that has one hit) carries no order: minmax gives
each of its hits 0.5 (above its floor 0: the run did retrieve them), zscore gives 0 (= its floor). Linear
fusion needs real scores, so it refuses MS MARCO runs (`LinearNeedsScores`).

**Queries**: a query present in only some runs is fused from the runs that have it (the others neither
add nor subtract); `fuse` reports how many such queries there were. Output query order: first
appearance, runs taken in the order given.

Sums use `math.fsum` (exactly rounded, so independent of the order of the runs): two documents with the
same ranks in swapped runs get exactly equal RRF scores, and the tie rule then decides between them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from dr.errors import InputError, UsageError
from dr.io.runs import Run
from dr.ranking import Hit, top_hits

METHODS = ("rrf", "linear")
NORMALIZATIONS = ("minmax", "zscore", "none")
DEFAULT_RRF_K = 60.0
TIED_MINMAX = 0.5  # minmax value of every hit of a run whose scores on a query are all equal


class LinearNeedsScores(UsageError):
    """Linear fusion was asked of a run without scores (MS MARCO: ranks only)."""


@dataclass
class FusionReport:
    """What the caller logs and records next to the fused run."""

    num_queries: int
    partial_queries: int  # queries missing from at least one run


def normalize(hits: Sequence[Hit], method: str) -> tuple[dict[str, float], float]:
    """(docid -> normalized score, the floor a missing document gets) of one run's hits for one query."""
    scores = [score for _, score in hits]
    if method == "none":
        return dict(hits), min(scores)
    if method == "minmax":
        low, high = min(scores), max(scores)
        if high == low:
            return {docid: TIED_MINMAX for docid, _ in hits}, 0.0
        return {docid: (score - low) / (high - low) for docid, score in hits}, 0.0
    if method == "zscore":
        mean = math.fsum(scores) / len(scores)
        std = math.sqrt(math.fsum((s - mean) ** 2 for s in scores) / len(scores))
        if std == 0:
            return {docid: 0.0 for docid, _ in hits}, 0.0
        normalized = {docid: (score - mean) / std for docid, score in hits}
        return normalized, min(normalized.values())
    raise UsageError(f"--normalize must be one of {NORMALIZATIONS}, got {method!r}")


def rrf_query(rankings: Sequence[tuple[float, Sequence[Hit]]], k: float) -> list[Hit]:
    """RRF scores of one query from (weight, hits best first) of each run that has it (unsorted)."""
    parts: dict[str, list[float]] = {}
    for weight, hits in rankings:
        for rank, (docid, _) in enumerate(hits, 1):
            parts.setdefault(docid, []).append(weight / (k + rank))
    return [(docid, math.fsum(values)) for docid, values in parts.items()]


def linear_query(rankings: Sequence[tuple[float, Sequence[Hit]]], method: str) -> list[Hit]:
    """Linear fusion scores of one query from (weight, hits) of each run that has it (unsorted)."""
    normalized = [(weight, *normalize(hits, method)) for weight, hits in rankings if hits]
    docids = {docid for _, scores, _ in normalized for docid in scores}
    return [
        (docid, math.fsum(weight * scores.get(docid, floor) for weight, scores, floor in normalized))
        for docid in docids
    ]


def fuse(
    runs: Sequence[Run],
    method: str = "rrf",
    depth: int = 100,
    weights: Sequence[float] | None = None,
    rrf_k: float = DEFAULT_RRF_K,
    normalization: str = "minmax",
    names: Sequence[str] | None = None,
) -> tuple[Run, FusionReport]:
    """Fuse `runs` query by query; each query keeps its top `depth` hits under the tie rule.

    `names` (file names) are used in error messages. Raises `UsageError` for a bad method, weights or
    parameters, `LinearNeedsScores` for linear fusion of an unscored run.
    """
    names = list(names or [f"run {i + 1}" for i in range(len(runs))])
    weights = list(weights) if weights is not None else [1.0] * len(runs)
    check(runs, method, depth, weights, rrf_k, normalization, names)
    qids = list(dict.fromkeys(qid for run in runs for qid in run.rankings))
    fused: dict[str, list[Hit]] = {}
    partial = 0
    for qid in qids:
        present = [(w, run.rankings[qid]) for w, run in zip(weights, runs) if qid in run.rankings]
        partial += len(present) < len(runs)
        if method == "rrf":
            scored = rrf_query(present, rrf_k)
        else:
            scored = linear_query(present, normalization)
        fused[qid] = top_hits(scored, depth)
    return Run(fused, scored=True), FusionReport(num_queries=len(qids), partial_queries=partial)


def check(
    runs: Sequence[Run],
    method: str,
    depth: int,
    weights: Sequence[float],
    rrf_k: float,
    normalization: str,
    names: Sequence[str],
) -> None:
    """Refuse what fusion cannot do, naming the flag (or the run file)."""
    if method not in METHODS:
        raise UsageError(f"--method must be one of {METHODS}, got {method!r}")
    if normalization not in NORMALIZATIONS:
        raise UsageError(f"--normalize must be one of {NORMALIZATIONS}, got {normalization!r}")
    if len(runs) < 2:
        raise UsageError(f"--runs: fusion needs at least 2 runs, got {len(runs)}")
    if depth < 1:
        raise UsageError(f"--depth must be >= 1, got {depth}")
    if len(weights) != len(runs):
        raise UsageError(f"--weights: {len(weights)} weights for {len(runs)} runs; give one per run")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(w > 0 for w in weights):
        raise UsageError(f"--weights must be finite, >= 0 and not all 0, got {list(weights)}")
    if not (math.isfinite(rrf_k) and rrf_k >= 0):
        raise UsageError(f"--rrf_k must be a finite number >= 0, got {rrf_k}")
    if method == "linear":
        for name, run in zip(names, runs):
            if not run.scored:
                raise LinearNeedsScores(
                    f"{name}: an MS MARCO run (ranks, no scores): linear fusion needs scores; use --method rrf"
                    " or give the run in a scored format (tevatron, trec)"
                )
            for qid, hits in run.rankings.items():
                if not all(math.isfinite(score) for _, score in hits):
                    raise InputError(
                        f"{name}: query {qid!r} has an infinite score; linear fusion needs finite ones"
                    )
