"""A BM25 index of a corpus: settings, tokenization, build, and reuse from disk only when nothing changed.

The index is `bm25s`'s (a sparse matrix of precomputed BM25 term weights). Built from a corpus read by
the one input resolver (`dr.io.corpus.load_corpus`, passage side: JSONL, TSV, Parquet, BEIR folders, a
title joined to its text as `dr encode` joins it), it can be saved to a folder and reused. A saved index
carries `dr_bm25.json`, its *fingerprint*: the corpus files (absolute path, size, SHA-256), the BM25 and
tokenizer settings and the bm25s version. It is written last, so a folder with it is a complete index;
an index is reused only when the fingerprint of this call is equal, and is otherwise rebuilt in place
with the reason logged (never a stale index silently).

Settings default to pyserini's BM25 (``k1 = 0.9``, ``b = 0.4``, Lucene's BM25 formula, lower-cased words
of two or more characters, English stopwords). Stemming (pyserini stems with Porter) needs the optional
`PyStemmer` package and is off unless asked for (``--stemmer porter`` or ``english``), so that the
default run does not depend on what happens to be installed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from dr.errors import UsageError
from dr.io.atomic import TMP_MARK, atomic_path, write_json_atomic
from dr.io.content_hash import ContentHashes
from dr.io.corpus import load_corpus, resolve_input

logger = logging.getLogger("dr.bm25")

MARKER = "dr_bm25.json"  # the fingerprint; written last, so its presence marks a complete index
DOCIDS = "docids.arrow"  # row -> docid, an Arrow IPC file (no pickle)
FORMAT_VERSION = 1  # of this folder layout; a change rebuilds old indexes
STOPWORDS = ("en", "none")


@dataclass(frozen=True)
class Bm25Settings:
    """Everything that changes the scores. Part of the index fingerprint.

    Attributes:
        k1: term-frequency saturation (pyserini: 0.9; bm25s' own default 1.5).
        b: length normalization (pyserini: 0.4; bm25s' own default 0.75).
        stopwords: "en" (bm25s' English list) or "none".
        stemmer: "none", or a PyStemmer algorithm ("porter" as pyserini, "english" = Snowball).
    """

    k1: float = 0.9
    b: float = 0.4
    stopwords: str = "en"
    stemmer: str = "none"

    def check(self) -> None:
        """Refuse values bm25s would take silently or fail on later (`UsageError` naming the flag)."""
        if not self.k1 >= 0:
            raise UsageError(f"--k1 must be >= 0, got {self.k1}")
        if not 0 <= self.b <= 1:
            raise UsageError(f"--b must be in [0, 1], got {self.b}")
        if self.stopwords not in STOPWORDS:
            raise UsageError(f"--stopwords must be one of {STOPWORDS}, got {self.stopwords!r}")
        self.stemmer_function()

    def stemmer_function(self) -> Any:
        """PyStemmer's `stemWords` for `stemmer`, or None."""
        if self.stemmer == "none":
            return None
        try:
            import Stemmer
        except ImportError:
            raise UsageError(f"--stemmer {self.stemmer} needs PyStemmer (pip install PyStemmer)") from None
        if self.stemmer not in Stemmer.algorithms():
            raise UsageError(
                f"--stemmer {self.stemmer!r}: not one of none, {', '.join(Stemmer.algorithms())}"
            )
        return Stemmer.Stemmer(self.stemmer).stemWords

    def tokenize(self, texts: list[str], as_ids: bool = True) -> Any:
        """bm25s tokens of `texts`: a `Tokenized` (ids + vocab) to index, or lists of words (`as_ids=False`)."""
        import bm25s

        return bm25s.tokenize(
            texts,
            stopwords=None if self.stopwords == "none" else self.stopwords,
            stemmer=self.stemmer_function(),
            return_ids=as_ids,
            show_progress=False,
        )

    def describe(self) -> dict[str, Any]:
        """The settings plus the fixed choices of bm25s that also change scores (for the fingerprint)."""
        import bm25s

        return {**asdict(self), "method": "lucene", "lower": True, "bm25s": bm25s.__version__}


def build(texts: list[str], settings: Bm25Settings) -> Any:
    """A `bm25s.BM25` index of `texts` (row i = texts[i]) under `settings`."""
    import bm25s

    retriever = bm25s.BM25(k1=settings.k1, b=settings.b, method="lucene")
    retriever.index(settings.tokenize(texts), show_progress=False)
    return retriever


@dataclass
class Bm25Index:
    """A built or loaded index and the docid of each of its rows."""

    retriever: Any  # bm25s.BM25
    docids: pa.Array  # string, one per row
    fingerprint: dict[str, Any]
    reused: bool  # True when loaded from --index_dir


def corpus_fingerprint(source: str, split: str = "train") -> dict[str, Any]:
    """What identifies the corpus files: absolute path, size and SHA-256 of each (a hub dataset: its name).
    By content, cached by file identity (`dr.io.content_hash`): a corpus copied again is not reindexed."""
    spec = resolve_input(source, "passage", split)
    if spec.kind == "hub":
        return {"hub": spec.name, "config": spec.config, "split": spec.split}
    hashes = ContentHashes()
    files = [
        {"path": os.path.abspath(name), "size": os.stat(name).st_size, "sha256": hashes.sha256(name)}
        for name in spec.files
    ]
    hashes.save()
    return {"kind": spec.kind, "files": files}


def fingerprint(source: str, settings: Bm25Settings, split: str = "train") -> dict[str, Any]:
    """The fingerprint a saved index must carry to be reused for `source` under `settings`."""
    return {
        "format": FORMAT_VERSION,
        "corpus": corpus_fingerprint(source, split),
        "settings": settings.describe(),
    }


def differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Names of the fingerprint fields that differ (``corpus``, ``settings.k1``, ...), for the log line."""
    out = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key == "settings":
            out += [f"settings.{name}" for name in sorted(set(a) | set(b)) if a.get(name) != b.get(name)]
        elif a != b:
            out.append(key)
    return out


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _is_ours(entry: Path) -> bool:
    """Whether `entry` is a file this module (or bm25s' save) writes into an index folder."""
    name = entry.name.split(TMP_MARK)[0]
    known = name in (MARKER, DOCIDS, "params.index.json", "vocab.index.json") or name.endswith(".index.npy")
    return known and entry.is_file()


def open_index(
    source: str, settings: Bm25Settings, index_dir: str | None = None, split: str = "train"
) -> Bm25Index:
    """The index of corpus `source`: loaded from `index_dir` when its fingerprint matches, else built
    (and saved there when `index_dir` is given).

    Raises:
        UsageError: `index_dir` holds files that are not a dr bm25 index (they would be overwritten).
        CorpusError: the corpus cannot be read, lacks ids or text, or repeats a docid.
    """
    wanted = fingerprint(source, settings, split)
    folder = Path(index_dir) if index_dir else None
    if folder is not None and folder.is_dir():
        saved = _read_marker(folder)
        if saved == wanted:
            return _load(folder, wanted)
        if saved is not None:
            logger.info(
                "%s: index built for another %s; rebuilding", folder, ", ".join(differences(saved, wanted))
            )
        elif not all(_is_ours(entry) for entry in folder.iterdir()):
            raise UsageError(f"--index_dir {folder}: not empty and not a dr bm25 index; give a new folder")
    corpus = load_corpus(source, "passage", split=split)
    n = len(corpus)
    corpus.validate(0, n)
    corpus.check_unique(0, n)
    docids, texts = corpus.records(0, n)
    logger.info("indexing %d passages of %s", n, corpus.spec.describe())
    index = Bm25Index(build(texts, settings), pa.array(docids, pa.string()), wanted, reused=False)
    if folder is not None:
        _save(folder, index)
    return index


def _save(folder: Path, index: Bm25Index) -> None:
    """Write the index files, the marker last (a crash leaves a folder that the next call rebuilds)."""
    if folder.is_dir():
        (folder / MARKER).unlink(missing_ok=True)  # first: the old files are about to change
        for entry in folder.iterdir():
            if _is_ours(entry):
                entry.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    index.retriever.save(str(folder), show_progress=False)
    with atomic_path(folder / DOCIDS) as tmp:
        table = pa.table({"docid": index.docids})
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    write_json_atomic(folder / MARKER, index.fingerprint)


def _load(folder: Path, wanted: dict[str, Any]) -> Bm25Index:
    import bm25s

    retriever = bm25s.BM25.load(str(folder), mmap=True, show_progress=False)
    with pa.memory_map(str(folder / DOCIDS)) as source:
        docids = pa.ipc.open_file(source).read_all().column("docid").combine_chunks()
    logger.info("reusing the index in %s (%d passages)", folder, len(docids))
    return Bm25Index(retriever, docids, wanted, reused=True)
