"""Training data: load query groups from the hub, local Tevatron-format files or a BEIR folder; validate them;
serve (query, [positive, negatives...]) text deterministically from (seed, epoch, example).

Tevatron row format (JSONL / Parquet / hub):
    {"query_id": str, "query": str,
     "positive_passages": [{"docid": str, "title": str, "text": str}, ...],
     "negative_passages": [{"docid": str, "title": str, "text": str}, ...]}
For distillation (`dr train --loss kl|margin_mse`) every passage also carries "score": float, the
teacher's score for (query, passage) (Tevatron v2's field; `dr score` writes it).

BEIR-style folder: `corpus.jsonl` ({"_id"|"docid", "title", "text"}), queries (`queries.<split>.tsv`,
`queries.tsv`, or `queries.jsonl` with an optional "split" field) and qrels (`qrels.<split>.trec`,
`qrels/<split>.tsv`, `qrels.trec`). Positives come from the qrels (relevance > 0); negatives are sampled
uniformly from the corpus, excluding the query's positives, afresh every epoch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from dr.errors import InputError
from dr.io.corpus import (
    CorpusError,
    InputSpec,
    TextCorpus,
    explain_load_error,
    format_text,
    load_corpus,
    load_dataset,
    resolve_input,
)
from dr.io.input_check import first_line_where, not_a_string
from dr.io.paths import expand_tilde

logger = logging.getLogger(__name__)


class DataError(InputError):
    """Training data is missing, malformed or inconsistent; the message names file, row and field."""


# ---- the served item ------------------------------------------------------------------------------------
def passage_text(passage: dict[str, Any]) -> str:
    """The text the encoder sees: title + " " + text, exactly as `dr encode` builds it (`format_text`)."""
    return format_text(passage.get("text") or "", passage.get("title"))


def choose_group(
    rng: np.random.Generator, n_positives: int, n_negatives: int, group_size: int
) -> tuple[int, list[int]]:
    """Pick one positive and `group_size - 1` negatives (indices); with replacement if too few negatives."""
    positive = int(rng.integers(n_positives))
    wanted = group_size - 1
    if wanted == 0:
        return positive, []
    if n_negatives >= wanted:
        return positive, [int(i) for i in rng.choice(n_negatives, size=wanted, replace=False)]
    order = [int(i) for i in rng.permutation(n_negatives)]
    return positive, order + [
        int(i) for i in rng.choice(n_negatives, size=wanted - n_negatives, replace=True)
    ]


class TrainItem(NamedTuple):
    """One training group as text, plus ids used to recognise in-batch false negatives."""

    query: str
    passages: list[str]  # positive first, then negatives
    passage_ids: list[str]  # docid of each passage (or "text:<text>" when the data has no docids)
    positive_ids: list[str]  # docids of *all* the query's positives, not only the one served
    teacher_scores: list[float] | None = None  # the "score" of each served passage, when all have one


def passage_id(passage: dict[str, Any]) -> str:
    docid = passage.get("docid")
    return str(docid) if docid not in (None, "") else "text:" + passage_text(passage)


class TrainGroups(torch.utils.data.Dataset):
    """Map-style dataset of training groups: item -> TrainItem(query, [positive, negatives...], ids).

    Index with `(epoch, i)` (what `EpochSampler` yields) or a plain `i` (epoch 0). The positive and the
    negatives are a function of (seed, epoch, i) only, so every rank and every rerun agree, and a resumed
    run sees exactly the groups the uninterrupted run would have seen.
    """

    def __init__(
        self,
        source: GroupSource,
        group_size: int,
        seed: int,
        query_prefix: str = "",
        passage_prefix: str = "",
    ) -> None:
        self.source = source
        self.group_size = group_size
        self.seed = seed
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix
        short = source.count_short_groups(group_size - 1)
        if short:
            logger.warning(
                "%d of %d queries have fewer than %d negatives: their negatives are sampled with replacement",
                short,
                len(source),
                group_size - 1,
            )

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> TrainItem:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, epoch, index])
        item = self.source.group(index, rng, self.group_size)
        return item._replace(
            query=self.query_prefix + item.query, passages=[self.passage_prefix + p for p in item.passages]
        )


class GroupSource:
    """Where groups come from; subclasses know their storage."""

    def __len__(self) -> int:
        raise NotImplementedError

    def group(self, index: int, rng: np.random.Generator, group_size: int) -> TrainItem:
        raise NotImplementedError

    def count_short_groups(self, wanted_negatives: int) -> int:
        return 0


class TevatronGroups(GroupSource):
    """Groups stored with their passages (Tevatron format), backed by a memory-mapped `datasets.Dataset`."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        negatives = (
            dataset.data.table.column("negative_passages")
            if "negative_passages" in dataset.column_names
            else None
        )
        self._n_negatives = (
            np.zeros(len(dataset), dtype=np.int64)
            if negatives is None
            else pc.list_value_length(negatives).fill_null(0).to_numpy(zero_copy_only=False)
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def count_short_groups(self, wanted_negatives: int) -> int:
        return int((self._n_negatives < wanted_negatives).sum())

    def group(self, index: int, rng: np.random.Generator, group_size: int) -> TrainItem:
        row = self.dataset[index]
        positives = row["positive_passages"]
        negatives = row.get("negative_passages") or []
        pos, neg = choose_group(rng, len(positives), len(negatives), group_size)
        passages = [positives[pos]] + [negatives[i] for i in neg]
        scores = [p.get("score") for p in passages]
        return TrainItem(
            row["query"],
            [passage_text(p) for p in passages],
            [passage_id(p) for p in passages],
            [passage_id(p) for p in positives],
            None if any(x is None for x in scores) else [float(x) for x in scores],
        )


class BeirGroups(GroupSource):
    """Groups built from qrels: positives from relevance > 0, negatives sampled from the whole corpus.

    The corpus and queries stay memory-mapped Arrow tables (`TextCorpus`); only row numbers are held:
    the training queries' rows and their positives' corpus rows (CSR: `offsets[i]:offsets[i + 1]` of
    `positive_rows`, sorted). A group's texts are read from the table when it is served.
    """

    def __init__(
        self,
        corpus: TextCorpus,
        queries: TextCorpus,
        query_rows: np.ndarray,
        offsets: np.ndarray,
        positive_rows: np.ndarray,
    ) -> None:
        self.corpus = corpus
        self.queries = queries
        self.query_rows = query_rows  # row in `queries` of each training query
        self.offsets = offsets
        self.positive_rows = positive_rows
        self._n_docs = len(corpus)

    def __len__(self) -> int:
        return len(self.query_rows)

    def query_id(self, index: int) -> str:
        """The id of training query `index`."""
        return self.queries.records_at([int(self.query_rows[index])])[0][0]

    def group(self, index: int, rng: np.random.Generator, group_size: int) -> TrainItem:
        positives = self.positive_rows[self.offsets[index] : self.offsets[index + 1]].tolist()
        pos = positives[int(rng.integers(len(positives)))]
        excluded, negatives = set(positives), []
        while len(negatives) < group_size - 1:  # rejection sampling: positives are few, the corpus large
            candidate = int(rng.integers(self._n_docs))
            if candidate not in excluded:
                negatives.append(candidate)
        rows = [pos, *negatives]
        ids, texts = self.corpus.records_at(rows + positives)
        query = self.queries.records_at([int(self.query_rows[index])])[1][0]
        return TrainItem(query, texts[: len(rows)], ids[: len(rows)], ids[len(rows) :])


# ---- locating and loading --------------------------------------------------------------------------------
TRAIN_FORMATS = ("json", "parquet", "arrow")  # the formats that can hold nested passage lists


def load_train_groups(
    dataset_name: str,
    split: str = "train",
    config: str | None = None,
    group_size: int = 8,
    cache_dir: str | None = None,
    need_scores: bool = False,
) -> GroupSource:
    """Load and validate training groups from any supported source (see module docstring).

    `need_scores` (a distillation loss): every passage must carry a finite numeric teacher "score".

    What `dataset_name` means is decided by `dr.io.corpus.resolve_input`, the resolver `dr encode` uses
    too, so both accept the same files, globs, folders and hub names.
    """
    if not dataset_name:
        raise DataError("--dataset_name is required for training (a hub name, a file, a glob or a folder)")
    try:
        spec = resolve_input(expand_tilde(dataset_name), "train", split, config)
    except CorpusError as err:
        raise DataError(str(err)) from err
    if spec.kind == "beir":
        if need_scores:
            raise DataError(
                f"{spec.describe()}: a BEIR folder has no teacher scores for a distillation loss; build a "
                "training file (dr mine) and score it (dr score)"
            )
        return load_beir_groups(Path(spec.files[0]), split, group_size, cache_dir)
    if spec.kind == "hub":
        return TevatronGroups(_load_hub(spec, group_size, cache_dir, need_scores))
    if spec.kind not in TRAIN_FORMATS:
        raise DataError(
            f"{spec.describe()}: {spec.kind} files cannot hold training groups; use JSONL, JSON, Parquet or "
            "Arrow rows in the Tevatron format (or a BEIR folder)"
        )
    import datasets

    parts = [
        _load_local_file(InputSpec(f, spec.kind, (f,)), group_size, cache_dir, need_scores)
        for f in spec.files
    ]
    return TevatronGroups(parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts))


def _load_hub(spec: InputSpec, group_size: int, cache_dir: str | None, need_scores: bool = False) -> Any:
    try:
        ds = load_dataset(spec, cache_dir)
    except Exception as err:
        raise DataError(f"cannot load {spec.describe()} from the hub: {err}") from err
    validate_groups(ds.data.table, spec.name, group_size, need_scores)
    return ds


def _load_local_file(
    spec: InputSpec, group_size: int, cache_dir: str | None, need_scores: bool = False
) -> Any:
    path = Path(spec.files[0])
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    try:
        ds = load_dataset(spec, cache_dir)
    except Exception as err:  # bad UTF-8, a bad JSON line: named by file line (dr/io/input_check.py)
        raise DataError(explain_load_error(spec, err)) from err
    validate_groups(ds.data.table, str(path), group_size, need_scores)
    return ds


def _row_label(source: str, index: int) -> str:
    line = f" (line {index + 1})" if source.endswith((".jsonl", ".json")) else ""
    return f"{source}: row {index + 1}{line}"


def _first_true(mask: pa.ChunkedArray | pa.Array) -> int | None:
    hits = np.flatnonzero(np.asarray(mask.fill_null(True).to_numpy(zero_copy_only=False)))
    return int(hits[0]) if len(hits) else None


def _locate_bad_passage_row(source: str, name: str, need_scores: bool = False) -> str | None:
    """For a JSONL file whose passages do not share one shape: the first row with a malformed passage
    (with `need_scores`, also the first passage whose "score" is missing, not a number or not finite)."""
    if not source.endswith((".jsonl", ".json")) or not Path(source).is_file():
        return None
    with open(source, encoding="utf-8") as f:
        for index, line in enumerate(f):
            if not line.strip():
                continue
            value = json.loads(line).get(name)
            if not isinstance(value, list):
                return f"{_row_label(source, index)}: field {name!r} must be a list, found {type(value).__name__}"
            for passage in value:
                if not isinstance(passage, dict):
                    return f"{_row_label(source, index)}: field '{name}[]' must be objects, found {type(passage).__name__}"
                if not isinstance(passage.get("text"), str):
                    return f"{_row_label(source, index)}: field '{name}[].text' is missing or not a string"
            for j, passage in enumerate(value if need_scores else []):
                problem = _score_problem(passage.get("score"))
                if problem:
                    return f"{_row_label(source, index)}: field '{name}[{j}].score' {problem}{SCORE_HINT}"
    return None


SCORE_HINT = " (a distillation loss needs a teacher score on every passage; `dr score` writes them)"


def _score_problem(value: Any) -> str:
    """Why a JSON value is not a usable teacher score ("" when it is one)."""
    if value is None:
        return "is missing or null"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number, found {json.dumps(value)[:40]}"
    if not np.isfinite(value):
        return f"must be finite, found {value}"
    return ""


def _validate_scores(table: pa.Table, source: str, name: str, struct: pa.StructType) -> None:
    """Every passage of column `name` has a finite numeric "score" (vectorised); DataError naming row/field."""
    column = table.column(name)
    lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.cumsum(lengths)])

    def where(flat: int) -> str:  # the row and passage index of a flattened passage position
        row = int(np.searchsorted(starts, flat, side="right")) - 1
        return f"{_row_label(source, row)}: field '{name}[{flat - starts[row]}].score'"

    if struct.get_field_index("score") < 0:
        raise DataError(f"{_row_label(source, 0)}: field '{name}[0].score' is missing{SCORE_HINT}")
    kind = struct.field("score").type
    scores = pc.struct_field(pc.list_flatten(column), "score")
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        located = _locate_bad_passage_row(source, name, need_scores=True)  # mixed JSON values: read the file
        if located:
            raise DataError(located)
        first = _first_true(pc.invert(pc.is_null(scores)))
        found = "" if first is None else f", found {scores[first].as_py()!r}"
        raise DataError(f"{where(first or 0)} must be a number (the column is {kind}{found}){SCORE_HINT}")
    bad = _first_true(pc.is_null(scores))
    if bad is not None:
        raise DataError(f"{where(bad)} is missing or null{SCORE_HINT}")
    if pa.types.is_floating(kind):
        values = scores.to_numpy(zero_copy_only=False)
        bad_values = np.flatnonzero(~np.isfinite(values))
        if len(bad_values):
            raise DataError(f"{where(int(bad_values[0]))} must be finite, found {values[bad_values[0]]}")


def validate_groups(table: pa.Table, source: str, group_size: int, need_scores: bool = False) -> None:
    """Check schema and content of Tevatron-format rows, vectorised; raise DataError naming row and field.

    `need_scores`: every passage must also carry a finite numeric teacher "score" (distillation).
    """
    if table.num_rows == 0:
        raise DataError(f"{source}: no rows")
    required = ["query", "positive_passages"] + (["negative_passages"] if group_size > 1 else [])
    for name in required:
        if name not in table.column_names:
            raise DataError(f"{source}: field {name!r} is missing (row 1 has fields {table.column_names})")
    if not pa.types.is_string(table.schema.field("query").type) and not pa.types.is_large_string(
        table.schema.field("query").type
    ):
        located = None
        if source.endswith((".jsonl", ".json")) and Path(source).is_file():
            located = first_line_where(source, lambda row: not_a_string(row, "query"))
        raise DataError(
            located or f"{source}: field 'query' must be a string, found {table.schema.field('query').type}"
        )
    bad = _first_true(pc.is_null(table.column("query")))
    if bad is not None:
        raise DataError(f"{_row_label(source, bad)}: field 'query' is null or missing")
    for name in ("positive_passages", "negative_passages"):
        if name not in table.column_names:
            continue
        ftype = table.schema.field(name).type
        if not (pa.types.is_list(ftype) or pa.types.is_large_list(ftype)) or not pa.types.is_struct(
            ftype.value_type
        ):
            # mixed shapes: find the row by reading the file
            located = _locate_bad_passage_row(source, name, need_scores)
            raise DataError(
                located
                or f"{source}: field {name!r} must be a list of {{docid, title, text}} objects, found {ftype}"
            )
        struct = ftype.value_type
        if struct.get_field_index("text") < 0:
            raise DataError(
                f"{source}: field {name!r}: passages have no 'text' (fields: {[f.name for f in struct]})"
            )
        if not pa.types.is_string(struct.field("text").type) and not pa.types.is_large_string(
            struct.field("text").type
        ):
            raise DataError(
                _locate_bad_passage_row(source, name)
                or f"{source}: field '{name}.text' must be a string, found {struct.field('text').type}"
            )
        column = table.column(name)
        lengths = pc.list_value_length(column).fill_null(0)
        if name == "positive_passages":
            bad = _first_true(pc.equal(lengths, 0))
            if bad is not None:
                raise DataError(f"{_row_label(source, bad)}: field 'positive_passages' is empty or missing")
        elif group_size > 1:
            bad = _first_true(pc.equal(lengths, 0))
            if bad is not None:
                raise DataError(
                    f"{_row_label(source, bad)}: field 'negative_passages' is empty but --train_n_passages "
                    f"{group_size} needs {group_size - 1} negatives per query (use --train_n_passages 1 for "
                    "in-batch negatives only)"
                )
        texts = pc.struct_field(pc.list_flatten(column), "text")
        bad_flat = _first_true(pc.is_null(texts))
        if bad_flat is not None:  # map the flattened passage index back to its row
            offsets = np.cumsum(lengths.to_numpy(zero_copy_only=False))
            row = int(np.searchsorted(offsets, bad_flat, side="right"))
            raise DataError(f"{_row_label(source, row)}: field '{name}[].text' is null or missing")
        empty = int(pc.sum(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(texts)), 0)).as_py() or 0)
        if empty:  # allowed, as in `dr encode` (docs/encode.md): such a passage is its title alone
            logger.warning("%s: %d passages in %r have an empty text", source, empty, name)
        if need_scores:
            _validate_scores(table, source, name, struct)


# ---- BEIR-style folders ----------------------------------------------------------------------------------
def _first_existing(folder: Path, names: list[str]) -> Path | None:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


def load_beir_groups(folder: Path, split: str, group_size: int, cache_dir: str | None = None) -> BeirGroups:
    """Training groups from a BEIR-style folder: queries of `split` with at least one relevant document.

    Memory: the corpus is read through the memory-mapped Arrow cache, as `dr encode` reads it; held in
    memory are the qrels, the training queries' ids while matching, and row numbers.
    """
    from dr.io.qrels import read_qrels

    try:
        corpus = load_corpus(str(folder), side="passage", cache_dir=cache_dir)
        corpus.validate(0, len(corpus))
        corpus.check_unique(0, len(corpus))  # a docid must name one passage (as `dr encode` requires)
        pa.default_memory_pool().release_unused()  # the check's hash table, else kept for the whole run
        queries = load_corpus(str(folder), side="query", split=split, cache_dir=cache_dir)  # only `split`'s
        queries.validate(0, len(queries))  # a null query text would otherwise fail mid-training
        query_ids = queries.ids(0, len(queries)).to_pylist()
        r_path = _first_existing(
            folder, [f"qrels.{split}.trec", f"qrels/{split}.tsv", f"qrels.{split}.tsv", "qrels.trec"]
        )
        if r_path is None:
            raise DataError(f"{folder}: BEIR folder has no qrels for split {split!r}")
        qrels = read_qrels(r_path)
    except InputError as err:
        raise DataError(str(err)) from err
    if len(corpus) == 0:
        raise DataError(f"{folder}: the corpus has no documents")
    judged = {qid: [d for d, rel in qrels.get(qid, {}).items() if rel > 0] for qid in query_ids}
    doc_rows = _corpus_rows(corpus, sorted({d for docs in judged.values() for d in docs}))
    query_rows, offsets, positive_rows, missing_docs = [], [0], [], 0
    for row, qid in enumerate(query_ids):
        positives = sorted(doc_rows[d] for d in judged[qid] if d in doc_rows)
        missing_docs += len(judged[qid]) - len(positives)
        if positives:
            query_rows.append(row)
            positive_rows.extend(positives)
            offsets.append(len(positive_rows))
    if not query_rows:
        raise DataError(f"{folder}: no query of split {split!r} has a relevant document in {r_path.name}")
    most = int(np.diff(offsets).max())
    if len(corpus) < group_size + most:
        raise DataError(f"{folder}: {len(corpus)} documents are too few to sample {group_size - 1} negatives")
    logger.info(
        "BEIR folder %s: %d training queries (split %s), %d documents%s",
        folder,
        len(query_rows),
        split,
        len(corpus),
        f"; {missing_docs} qrels point to unknown documents" if missing_docs else "",
    )
    return BeirGroups(
        corpus,
        queries,
        np.asarray(query_rows, dtype=np.int64),
        np.asarray(offsets, dtype=np.int64),
        np.asarray(positive_rows, dtype=np.int64),
    )


MATCH_ROWS = 1 << 20  # corpus rows matched against the qrels per step: bounds the temporary arrays


def _corpus_rows(corpus: TextCorpus, docids: list[str]) -> dict[str, int]:
    """docid -> corpus row for the given docids (those in the corpus): one vectorised pass over the id
    column (a hash set of `docids` only, not of the corpus), so no Python object per passage is made."""
    if not docids:
        return {}
    rows: dict[str, int] = {}
    wanted = None
    for start in range(0, len(corpus), MATCH_ROWS):
        ids = corpus.ids(start, min(start + MATCH_ROWS, len(corpus)))
        if wanted is None:
            wanted = pa.array(docids, ids.type)  # in the id column's string type
        where = pc.index_in(ids, value_set=wanted).fill_null(-1).to_numpy(zero_copy_only=False)
        for offset in np.flatnonzero(where >= 0).tolist():
            rows[docids[where[offset]]] = start + offset
    return rows
