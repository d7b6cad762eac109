"""Relevance judgments (qrels): read by `dr eval`, `dr mine` and BEIR-folder training alike.

Formats: TREC ``qid iter docid rel`` (the second column is ignored, e.g. ``0`` or ``Q0``), whitespace or
tab separated, which also covers MS MARCO's ``qrels.*.tsv``; BEIR TSV ``query-id corpus-id score`` (header
line skipped); or two columns ``qid docid`` (each line a relevant doc, rel = 1).
"""

from __future__ import annotations

import os
from pathlib import Path

from dr.errors import InputError

Qrels = dict[str, dict[str, int]]


class QrelsFormatError(InputError):
    """A qrels file is malformed."""


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
    ncols, first = None, None  # the column count of the first data line, and its number
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if not fields or (number == 1 and fields[0] == "query-id"):  # BEIR header
            continue
        if ncols is None:
            ncols, first = len(fields), number
        if len(fields) not in (2, 3, 4):
            raise QrelsFormatError(
                f"{path}:{number}: {len(fields)} columns; qrels need 4 (qid iter docid rel), 3 (qid docid rel) "
                f"or 2 (qid docid)"
            )
        if len(fields) != ncols:
            raise QrelsFormatError(
                f"{path}:{number}: {len(fields)} columns where line {first} has {ncols}: every line must have "
                f"the same columns (4: qid iter docid rel, 3: qid docid rel, or 2: qid docid)"
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
