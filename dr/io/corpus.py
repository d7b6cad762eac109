"""What `--dataset_name` means, for every command (`resolve_input`), and text inputs as (id, text) records.

`resolve_input` is the one resolver: `dr encode`, `dr train` (side "train": Tevatron rows or a BEIR folder),
`dr mine` and the demo all ask it, so they accept the same files, globs, folders and hub names.
`TextCorpus` finds the rows and the id/text(/title) fields and gives back `(id, text)` pairs where `text`
is ``prefix + title + " " + text`` (title only when non-empty).

Supported inputs (``--dataset_name``):

* a Hugging Face hub dataset name, optionally ``NAME/SPLIT`` (Tevatron's ``Tevatron/msmarco-passage/dev``);
* a local JSONL / JSON / Parquet / Arrow file, a TSV file (``id<TAB>text``, no header), or a glob of them;
* a folder: BEIR-style (``corpus.jsonl`` for passages; ``queries.<split>.tsv|jsonl`` or ``queries.jsonl|tsv``
  for queries; a queries.jsonl with a ``split`` field gives the requested split's rows), otherwise every
  JSONL/Parquet/TSV/Arrow file in it (sorted).

Rows are read through `datasets.load_dataset`, which converts the input once into an Arrow cache and then
memory-maps it: the corpus is never held whole in memory, and several ranks can share one cache.
Field names are found automatically (ids: docid, _id, query_id, qid, id; passage text: text, contents;
query text: query, text) or given explicitly.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dr.errors import InputError
from dr.io.input_check import json_lines_problem, quiet_json_loader, utf8_problem

ID_FIELDS = ("docid", "_id", "query_id", "qid", "id")
TEXT_FIELDS = {"passage": ("text", "contents"), "query": ("query", "text")}
TITLE_FIELD = "title"
SPLIT_FIELD = "split"  # BEIR-style queries.jsonl files may hold every split, tagged per row
_FORMATS = {
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".tsv": "tsv",
    ".txt": "tsv",
}
_GLOB_CHARS = set("*?[")


class CorpusError(InputError):
    """The input cannot be read or lacks a required field; the message names the file, row and field."""


@dataclass(frozen=True)
class InputSpec:
    """Where rows come from: a hub dataset, or local files of one format."""

    source: str  # what the user gave, for messages
    kind: str  # hub | json | parquet | arrow | tsv
    files: tuple[str, ...] = ()
    name: str | None = None  # hub dataset name
    config: str | None = None
    split: str = "train"

    def describe(self) -> str:
        if self.kind == "hub":
            return f"hub dataset {self.name} (config {self.config}, split {self.split})"
        return (
            self.files[0] if len(self.files) == 1 else f"{self.source} ({len(self.files)} {self.kind} files)"
        )


def _format_of(path: str) -> str | None:
    name = path.lower()
    for suffix in sorted(_FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return _FORMATS[suffix]
    return None


def _files_spec(source: str, files: Sequence[str]) -> InputSpec:
    kinds = {_format_of(f) for f in files}
    if None in kinds:
        unknown = [f for f in files if _format_of(f) is None]
        raise CorpusError(
            f"{source}: unsupported file type {unknown[0]} (expected one of {sorted(_FORMATS)})"
        )
    if len(kinds) != 1:
        raise CorpusError(f"{source}: mixes file formats {sorted(kinds)}; give one format at a time")
    return InputSpec(source=source, kind=kinds.pop(), files=tuple(files))


CORPUS_FILES = ("corpus.jsonl", "corpus.jsonl.gz", "corpus.parquet", "corpus.tsv")


def is_beir_folder(path: str | os.PathLike) -> bool:
    """A BEIR-style folder: a corpus file (+ queries and qrels) rather than a folder of data files."""
    folder = Path(path)
    return folder.is_dir() and any((folder / name).is_file() for name in CORPUS_FILES)


def _data_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.iterdir() if p.is_file() and _format_of(p.name))


def _folder_files(folder: Path, side: str, split: str) -> list[str]:
    """The files of a folder input for `dr encode`: the BEIR layout first, else every supported file."""
    if side == "passage":
        candidates = list(CORPUS_FILES)
    else:
        candidates = [f"queries.{split}.tsv", f"queries.{split}.jsonl", "queries.jsonl", "queries.tsv"]
    for name in candidates:
        if (folder / name).is_file():
            return [str(folder / name)]
    if side == "query" and is_beir_folder(folder):
        # Its other files are the corpus and qrels, never queries: name what is missing instead.
        raise CorpusError(f"{folder}: no queries for split {split!r} (looked for {', '.join(candidates)})")
    return _data_files(folder)


def resolve_input(
    source: str, side: str = "passage", split: str = "train", config: str | None = None
) -> InputSpec:
    """Decide what `source` (a path, glob, folder or hub name) refers to: the one resolver of `dr`.

    `side` is "passage" or "query" (what `dr encode` reads) or "train" (`dr train`): for training a BEIR
    folder is one input of kind "beir" (queries + qrels + corpus), any other folder means its data files.
    """
    if side not in (*TEXT_FIELDS, "train"):
        raise CorpusError(f"side must be 'query', 'passage' or 'train', got {side!r}")
    path = Path(source).expanduser()
    if path.is_dir():
        if side == "train" and is_beir_folder(path):
            return InputSpec(source=source, kind="beir", files=(str(path),), split=split)
        files = _data_files(path) if side == "train" else _folder_files(path, side, split)
        if not files:
            raise CorpusError(f"{source}: folder holds no JSONL/Parquet/TSV/Arrow files")
        return _files_spec(source, files)
    if path.is_file():
        return _files_spec(source, [str(path)])
    if _GLOB_CHARS & set(source):
        files = sorted(glob.glob(os.path.expanduser(source)))
        if not files:
            raise CorpusError(f"{source}: glob matches no files")
        return _files_spec(source, files)
    if _format_of(source) or source.startswith((".", "/", "~")):
        raise CorpusError(f"{source}: no such file or folder")
    parts = source.split("/")
    if len(parts) == 3:  # Tevatron's NAME/SPLIT form of a hub dataset
        return InputSpec(source=source, kind="hub", name="/".join(parts[:2]), config=config, split=parts[2])
    return InputSpec(source=source, kind="hub", name=source, config=config, split=split)


def load_dataset(spec: InputSpec, cache_dir: str | None = None):
    """Load (or reuse the Arrow cache of) the input as a memory-mapped `datasets.Dataset`."""
    import datasets

    check_text_files(spec)
    datasets.disable_progress_bars()
    if spec.kind == "hub":
        return datasets.load_dataset(spec.name, spec.config, split=spec.split, cache_dir=cache_dir)
    if spec.kind == "tsv":
        # Tevatron/MS MARCO style: no header, id<TAB>text, no quoting, "NA" stays text.
        features = datasets.Features({"id": datasets.Value("string"), "text": datasets.Value("string")})
        return datasets.load_dataset(
            "csv",
            data_files=list(spec.files),
            split="train",
            sep="\t",
            header=None,
            column_names=["id", "text"],
            quoting=csv.QUOTE_NONE,
            na_filter=False,
            features=features,
            cache_dir=cache_dir,
        )
    with quiet_json_loader():  # its own error line would precede ours, which names the line
        return datasets.load_dataset(
            spec.kind, data_files=list(spec.files), split="train", cache_dir=cache_dir
        )


def check_text_files(spec: InputSpec) -> None:
    """Refuse local JSON/TSV files with invalid UTF-8 before `datasets` reads them (pyarrow lets some
    through, to fail later without a file name or, worse, to be encoded or trained on)."""
    if spec.kind not in ("json", "tsv"):
        return
    for path in spec.files:
        problem = utf8_problem(path)
        if problem:
            raise CorpusError(problem)


def explain_load_error(spec: InputSpec, err: Exception) -> str:
    """One line for a failed load: the first bad line of a JSONL input when one is found, else the cause
    (datasets wraps it: `DatasetGenerationError`, or `StopIteration` for an empty file)."""
    if isinstance(err, InputError):
        return str(err)
    if spec.kind == "json":
        for path in spec.files:
            problem = json_lines_problem(path)
            if problem:
                return problem
    cause = err
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, StopIteration) or "corresponds to no data" in str(cause):
        return f"{spec.describe()}: no rows (the input is empty)"
    return f"{spec.describe()}: cannot read: {str(cause) or type(cause).__name__}"


def _pick(
    columns: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, spec: InputSpec
) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise CorpusError(f"{spec.describe()}: no {what} field {wanted!r} (fields: {list(columns)})")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise CorpusError(
        f"{spec.describe()}: missing {what} field: none of {list(candidates)} found (fields: {list(columns)}); "
        f"name it with --{what}_field"
    )


def _as_strings(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """A column as Arrow strings: numbers are cast; mixed-type JSON values arrive JSON-encoded and are decoded."""
    if isinstance(
        column.type, pa.BaseExtensionType
    ):  # datasets' arrow.json: mixed types, each value JSON text
        values = [
            None if v is None else json.loads(v) for v in column.cast(column.type.storage_type).to_pylist()
        ]
        return pa.array([None if v is None else str(v) for v in values], pa.string())
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column
    return pc.cast(column, pa.string())


BLANK_CHECK_ROWS = 1 << 16  # rows whose texts `validate` trims at once (a copy): bounds its memory
NO_TITLE = ("", "-")  # MS MARCO (Tevatron) rows carry "-" as a placeholder title


def format_text(text: str, title: str | None = None, prefix: str = "") -> str:
    """``prefix + title + " " + text``; the title and its space only when there is a real title.

    Training (`dr.train.groups`) and encoding both build passage text here, so they always agree.
    """
    title = (title or "").strip()
    if title not in NO_TITLE:
        text = f"{title} {text}"
    return prefix + text


@dataclass
class TextCorpus:
    """Indexable (id, text) records over a memory-mapped Arrow table.

    Row numbers in error messages are 1-based over the input (for one JSONL/TSV file: its line number
    when it has no blank lines).
    """

    dataset: object  # datasets.Dataset (memory-mapped; pickles by file reference for DataLoader workers)
    spec: InputSpec
    id_field: str
    text_field: str
    title_field: str | None = None
    prefix: str = ""
    limit: int | None = None
    _table: pa.Table | None = field(default=None, repr=False, compare=False)
    _batches: list[pa.RecordBatch] | None = field(
        default=None, repr=False, compare=False
    )  # records_at's index
    _batch_starts: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n if self.limit is None else min(n, self.limit)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_table"] = state["_batches"] = state["_batch_starts"] = None  # re-derived after unpickling
        return state

    @property
    def table(self) -> pa.Table:
        if self._table is None:
            if getattr(self.dataset, "_indices", None) is not None:
                raise CorpusError(
                    f"{self.spec.describe()}: datasets with an indices mapping are not supported"
                )
            self._table = self.dataset.data.table
        return self._table

    def _where(self, row: int) -> str:
        return f"{self.spec.describe()}: row {row + 1}"

    def column(self, name: str, start: int, stop: int) -> pa.ChunkedArray:
        return self.table.column(name).slice(start, stop - start)

    def ids(self, start: int, stop: int) -> pa.Array | pa.ChunkedArray:
        """The ids of rows [start, stop) as Arrow strings (vectorised checks)."""
        return _as_strings(self.column(self.id_field, start, stop))

    def validate(self, start: int, stop: int) -> int:
        """Fail on the first row in [start, stop) without an id or text (null or absent), or whose text
        (or title) is not a string; return how many rows have an empty (or all-blank) text.

        Empty text is allowed (a passage may be only a title; a corpus may hold placeholders) but
        counted, so that the caller logs it; a number or an object where text belongs is an error.
        """
        for name in (self.id_field, self.text_field):
            values = self.column(name, start, stop)
            if values.null_count:
                first = pc.index(pc.is_null(values), True).as_py()
                raise CorpusError(f"{self._where(start + first)}: missing field {name!r}")
        empty = pc.equal(pc.utf8_length(self.ids(start, stop)), 0)
        if pc.any(empty).as_py():
            raise CorpusError(
                f"{self._where(start + pc.index(empty, True).as_py())}: empty {self.id_field!r}"
            )
        for name in (self.text_field, self.title_field):
            if name is not None:
                self._check_strings(name, start, stop)
        blank = 0
        for step in range(start, stop, BLANK_CHECK_ROWS):  # trimming copies the texts: a step at a time
            texts = self.column(self.text_field, step, min(step + BLANK_CHECK_ROWS, stop))
            blank += int(pc.sum(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(texts)), 0)).as_py() or 0)
        return blank

    def _check_strings(self, name: str, start: int, stop: int) -> None:
        """Refuse a text/title column that holds anything but strings, naming the first such row."""
        values = self.column(name, start, stop)
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            return
        if pa.types.is_null(values.type):
            return  # every value null: the null checks above own that case
        if isinstance(values.type, pa.BaseExtensionType):  # datasets' arrow.json: mixed types, JSON text each
            storage = values.cast(values.type.storage_type).to_pylist()
            decoded = [None if v is None else json.loads(v) for v in storage]
        else:
            decoded = values.to_pylist()
        for i, value in enumerate(decoded):
            if value is not None and not isinstance(value, str):
                raise CorpusError(
                    f"{self._where(start + i)}: field {name!r} must be a string, found "
                    f"{type(value).__name__} ({json.dumps(value, default=str)[:40]})"
                )

    def check_unique(self, start: int, stop: int) -> None:
        """Fail if an id occurs twice in rows [start, stop); vectorised, before anything is encoded."""
        ids = self.ids(start, stop)
        if pc.count_distinct(ids).as_py() == len(ids):
            return
        counts = pc.value_counts(ids)
        dup = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        rows = [start + i for i in pc.indices_nonzero(pc.equal(ids, dup)).to_pylist()[:2]]
        raise CorpusError(
            f"{self.spec.describe()}: duplicate {self.id_field} {dup!r} at rows {rows[0] + 1} and {rows[1] + 1}"
        )

    def records(self, start: int, stop: int) -> tuple[list[str], list[str]]:
        """(ids, texts) of rows [start, stop), text = prefix + optional title + text."""
        return self._records(self.table.slice(start, stop - start))

    def records_at(self, rows: Sequence[int]) -> tuple[list[str], list[str]]:
        """(ids, texts) of the given rows, in their order: random access (one training group's passages)
        that reads only those rows of the memory-mapped table.

        Each row is a slice of its record batch, found by bisection: `Table.take` concatenates every
        chunk of a column first (~1 s at 1M rows) and `Table.slice` walks the chunks (~10 ms a group at 1M).
        """
        if self._batches is None:
            self._batches = self.table.to_batches()  # zero-copy views, one per record batch
            self._batch_starts = np.cumsum([0] + [b.num_rows for b in self._batches])
        found = np.searchsorted(self._batch_starts, rows, side="right") - 1
        slices = [
            self._batches[b].slice(row - self._batch_starts[b], 1) for b, row in zip(found.tolist(), rows)
        ]
        return self._records(pa.Table.from_batches(slices, schema=self.table.schema))

    def _records(self, table: pa.Table) -> tuple[list[str], list[str]]:
        ids = _as_strings(table.column(self.id_field)).to_pylist()
        texts = table.column(self.text_field).to_pylist()
        if self.title_field is None:
            return ids, [self.prefix + t for t in texts]
        titles = table.column(self.title_field).to_pylist()
        return ids, [format_text(t, title, self.prefix) for t, title in zip(texts, titles)]


def _only_split(dataset: object, spec: InputSpec, split: str) -> object:
    """The rows of `split` (an in-memory table: query files are small); an error naming the splits present."""
    import datasets

    table = dataset.data.table
    keep = pc.equal(table.column(SPLIT_FIELD), split)
    if not pc.any(keep).as_py():
        present = sorted(str(v) for v in pc.unique(table.column(SPLIT_FIELD)).to_pylist())
        raise CorpusError(f"{spec.describe()}: no query of split {split!r} (its splits: {present})")
    return datasets.Dataset(table.filter(keep))


def load_corpus(
    source: str,
    side: str = "passage",
    *,
    split: str = "train",
    config: str | None = None,
    prefix: str = "",
    id_field: str | None = None,
    text_field: str | None = None,
    title_field: str | None = None,
    cache_dir: str | None = None,
    limit: int | None = None,
) -> TextCorpus:
    """Open `source` as (id, text) records for `side` ("passage" joins a title when the rows have one)."""
    spec = resolve_input(source, side, split, config)
    try:
        dataset = load_dataset(spec, cache_dir)
    except Exception as err:  # datasets raises many types; re-raised naming the input, line and cause
        raise CorpusError(explain_load_error(spec, err)) from err
    columns = list(dataset.column_names)
    if side == "query" and SPLIT_FIELD in columns and len(spec.files) == 1:
        dataset = _only_split(dataset, spec, split)  # one queries.jsonl holding every split
    id_name = _pick(columns, id_field, ID_FIELDS, "id", spec)
    text_name = _pick(columns, text_field, TEXT_FIELDS[side], "text", spec)
    title_name = title_field
    if title_field is not None:
        _pick(columns, title_field, (), "title", spec)
    elif side == "passage" and TITLE_FIELD in columns:
        title_name = TITLE_FIELD
    return TextCorpus(dataset, spec, id_name, text_name, title_name, prefix, limit)
