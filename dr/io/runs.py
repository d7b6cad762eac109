"""Run files: the ranked lists that `dr search` writes and `dr eval` / `dr convert` read.

A run maps each query id to its hits, best first. Three text formats are read and written:

    tevatron   ``qid<TAB>docid<TAB>score``           one line per hit (what Tevatron writes with --save_text)
    marco      ``qid<TAB>docid<TAB>rank``            1-based ranks, no scores (MS MARCO / pyserini)
    trec       ``qid Q0 docid rank score tag``       what trec_eval reads

Reading accepts any whitespace as separator. The format is detected only where the content leaves no
doubt: 6 columns is TREC; 3 columns is Tevatron when some third field cannot be a rank (a float such as
``12.5``, a number below 1, or a value repeated within a query). A 3-column file whose third fields are
all positive integers, unique per query, reads both as MS MARCO ranks and as Tevatron integer scores (in
the opposite order): it is refused (`AmbiguousRunFormat`) unless its suffix names the format
(``.marco``, ``.tevatron``) or the caller passes the format (``dr convert --from``, ``--run_format``).

Ordering rules (the same everywhere in dr, so conversions are lossless and every format of one run
evaluates alike):

* Scored formats (tevatron, trec) are ordered by dr's one tie rule (`dr.ranking`): score descending, then
  docid descending (string order) among exactly equal scores, as trec_eval ranks them. The TREC rank
  column is validated but, as in trec_eval, not used for ordering. `dr search` writes hits in exactly
  this order, so reading its output changes nothing, and an MS MARCO file converted from it ranks the
  hits as trec_eval does.
* MS MARCO runs are ordered by their rank column. They carry no scores; when a score is needed (writing
  tevatron or trec) it is synthesized as ``1 / rank``, which is strictly decreasing in the rank, so the
  order and the ranks survive a round trip (the same convention as pyserini's MS MARCO -> TREC converter).

Scores are written with ``repr(float)``, the shortest text that reads back to the same float, so no two
distinct scores collapse into a tie on the way through a file.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dr.errors import InputError, UsageError
from dr.io.atomic import atomic_path
from dr.ranking import Hit, sort_hits  # the tie rule; re-exported here for older callers

FORMATS = ("tevatron", "marco", "trec")
DEFAULT_TAG = "dr"
_INT = re.compile(r"^[0-9]+$")


class RunFormatError(InputError):
    """A run file is malformed (bad column count, number, duplicate hit) or its format is unknown."""


class AmbiguousRunFormat(RunFormatError, UsageError):
    """The content fits two formats (MS MARCO ranks, Tevatron integer scores): the user must name one.

    A usage error (exit status 2) rather than bad data: the file may be fine, the command lacks a flag.
    """

    exit_code = UsageError.exit_code


# A suffix that names a format settles content that fits two (`.tsv` does not: both formats are TSV).
_DECLARING_SUFFIX = {".marco": "marco", ".tevatron": "tevatron"}


@dataclass
class Run:
    """Ranked hits per query, best first.

    Attributes:
        rankings: qid -> [(docid, score), ...] sorted best first. Query order is the order of first
            appearance (in the input file, or in the query shard for `dr search`).
        scored: False when the scores are synthetic (``1 / rank``, read from an MS MARCO file).
    """

    rankings: dict[str, list[Hit]] = field(default_factory=dict)
    scored: bool = True

    def __len__(self) -> int:
        return len(self.rankings)

    def num_hits(self) -> int:
        return sum(len(hits) for hits in self.rankings.values())


def synthetic_score(rank: int) -> float:
    """Score given to the hit at 1-based `rank` when the source format has none (MS MARCO)."""
    return 1.0 / rank


def format_score(score: float) -> str:
    """Shortest text that parses back to the same float (lossless, unlike a fixed ``%.6f``)."""
    return repr(float(score))


# ----------------------------------------------------------------------------------------------- reading


def _split_lines(path: Path) -> list[tuple[int, list[str]]]:
    """Non-blank lines of `path` as (1-based line number, whitespace-split fields)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RunFormatError(f"{path}: not UTF-8 text: {err}") from err
    return [(number, line.split()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


def detect_format(
    rows: list[tuple[int, list[str]]], source: str = "<run>", flag: str = "--run_format"
) -> str:
    """The format of split run lines where their content, or the suffix of `source`, tells it.

    Raises:
        AmbiguousRunFormat: 3 columns that read both as MS MARCO and as Tevatron; the message names `flag`.
        RunFormatError: no lines, or a column count no format has.
    """
    if not rows:
        raise RunFormatError(f"{source}: the run file is empty")
    ncols = len(rows[0][1])
    if ncols == 6:
        return "trec"
    if ncols != 3:
        raise RunFormatError(
            f"{source}:{rows[0][0]}: {ncols} columns; expected 3 (tevatron qid docid score / marco qid docid "
            f"rank) or 6 (trec qid Q0 docid rank score tag)"
        )
    seen: set[tuple[str, str]] = set()
    for _, fields in rows:
        if len(fields) != 3 or not _INT.match(fields[2]) or int(fields[2]) < 1:
            return "tevatron"
        key = (fields[0], fields[2])
        if key in seen:  # a repeated rank within a query: these are scores, not ranks
            return "tevatron"
        seen.add(key)
    declared = _DECLARING_SUFFIX.get(Path(source).suffix.lower())
    if declared:
        return declared
    raise AmbiguousRunFormat(
        f"{source}: cannot tell the run format: every third column is a positive integer, unique per query, "
        f"which reads as MS MARCO ranks and as Tevatron integer scores (opposite orders); pass {flag} marco "
        f"or {flag} tevatron"
    )


def _parse_score(text: str, source: str, number: int) -> float:
    try:
        score = float(text)
    except ValueError:
        raise RunFormatError(f"{source}:{number}: score {text!r} is not a number") from None
    if math.isnan(score):
        raise RunFormatError(f"{source}:{number}: score is NaN")
    return score


def _parse_rank(text: str, source: str, number: int) -> int:
    if not _INT.match(text) or int(text) < 1:
        raise RunFormatError(f"{source}:{number}: rank {text!r} is not a positive integer")
    return int(text)


def parse_run(rows: list[tuple[int, list[str]]], fmt: str, source: str = "<run>") -> Run:
    """Build a `Run` from split lines in format `fmt` (one of `FORMATS`)."""
    if fmt not in FORMATS:
        raise RunFormatError(f"unknown run format {fmt!r}; expected one of {FORMATS}")
    ncols = 6 if fmt == "trec" else 3
    scored: dict[str, list[Hit]] = {}
    ranked: dict[str, list[tuple[int, str]]] = {}
    seen_docs: dict[str, dict[str, int]] = {}
    seen_ranks: dict[str, dict[int, int]] = {}
    for number, fields in rows:
        if len(fields) != ncols:
            raise RunFormatError(
                f"{source}:{number}: {len(fields)} columns, expected {ncols} for a {fmt} run"
            )
        qid, docid = fields[0], fields[2] if fmt == "trec" else fields[1]
        first = seen_docs.setdefault(qid, {}).setdefault(docid, number)
        if first != number:
            raise RunFormatError(
                f"{source}:{number}: docid {docid!r} repeated for query {qid!r} (first on line {first})"
            )
        if fmt == "marco":
            rank = _parse_rank(fields[2], source, number)
            first = seen_ranks.setdefault(qid, {}).setdefault(rank, number)
            if first != number:
                raise RunFormatError(
                    f"{source}:{number}: rank {rank} repeated for query {qid!r} (first on line {first})"
                )
            ranked.setdefault(qid, []).append((rank, docid))
        elif fmt == "trec":
            _parse_rank(fields[3], source, number)  # validated only: trec_eval orders by score
            scored.setdefault(qid, []).append((docid, _parse_score(fields[4], source, number)))
        else:
            scored.setdefault(qid, []).append((docid, _parse_score(fields[2], source, number)))
    if fmt == "marco":
        rankings = {}
        for qid, pairs in ranked.items():
            pairs.sort()
            rankings[qid] = [(docid, synthetic_score(i)) for i, (_, docid) in enumerate(pairs, 1)]
        return Run(rankings, scored=False)
    return Run({qid: sort_hits(hits) for qid, hits in scored.items()}, scored=True)


def read_run(path: str | os.PathLike, fmt: str = "auto", flag: str = "--run_format") -> tuple[Run, str]:
    """Read a run file; return (run, the format used). `fmt` is "auto" or one of `FORMATS`.

    `flag` is the caller's option for the format, named in the message when "auto" cannot decide.

    Raises:
        AmbiguousRunFormat: "auto" on content that fits two formats (see `detect_format`).
        RunFormatError: naming the file and line of the first malformed line.
    """
    path = Path(path)
    if not path.is_file():
        raise RunFormatError(f"{path}: run file not found")
    rows = _split_lines(path)
    if fmt == "auto":
        fmt = detect_format(rows, str(path), flag)
    elif not rows:
        raise RunFormatError(f"{path}: the run file is empty")
    return parse_run(rows, fmt, str(path)), fmt


# ----------------------------------------------------------------------------------------------- writing


def check_tag(tag: str) -> None:
    """Refuse a TREC run tag that would break the 6-column line (`RunFormatError`)."""
    if not tag or any(ch.isspace() for ch in tag):
        raise RunFormatError(f"run tag {tag!r} must be non-empty and contain no whitespace")


def format_lines(run: Run, fmt: str, tag: str = DEFAULT_TAG) -> Iterable[str]:
    """Yield the lines (with newline) of `run` in format `fmt`; ranks are the 1-based list positions.

    Hits are written in list order, which `Run` keeps sorted best first. A run read from MS MARCO gets
    synthetic ``1 / rank`` scores in the scored formats.
    """
    if fmt not in FORMATS:
        raise RunFormatError(f"unknown run format {fmt!r}; expected one of {FORMATS}")
    if fmt == "trec":
        check_tag(tag)
    for qid, hits in run.rankings.items():
        for rank, (docid, score) in enumerate(hits, 1):
            if not run.scored:
                score = synthetic_score(rank)
            if fmt == "tevatron":
                yield f"{qid}\t{docid}\t{format_score(score)}\n"
            elif fmt == "marco":
                yield f"{qid}\t{docid}\t{rank}\n"
            else:
                yield f"{qid} Q0 {docid} {rank} {format_score(score)} {tag}\n"


def write_run(path: str | os.PathLike, run: Run, fmt: str, tag: str = DEFAULT_TAG) -> None:
    """Write `run` to `path` in format `fmt` atomically (nothing appears under `path` on failure)."""
    lines = format_lines(run, fmt, tag)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.writelines(lines)


def format_for_suffix(path: str | os.PathLike, default: str = "marco") -> str:
    """The run format a file name suggests, else `default`.

    ``.marco`` and ``.tsv`` (MS MARCO runs are usually named ``run.*.tsv``) -> marco, ``.trec`` -> trec,
    ``.tevatron`` -> tevatron.
    """
    suffix = Path(path).suffix.lower()
    return {".marco": "marco", ".tsv": "marco", ".trec": "trec", ".tevatron": "tevatron"}.get(suffix, default)
