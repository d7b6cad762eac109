"""Find and name what is wrong in a local text input file: bad UTF-8, bad JSON lines, wrong value types.

Why a module of its own: `datasets` / pyarrow read JSONL fast but report problems as a 0-based row of an
internal block ("in row 0"), a type (`extension<arrow.json>`), or an exception name (`StopIteration`,
`DatasetGenerationError`), and pyarrow accepts some invalid UTF-8 silently. These helpers read the file
itself, line by line, to say *file: line N (byte B): what*. They run in full only where it is cheap and
needed: `utf8_problem` streams the bytes once before a text file is converted (it decodes at disk speed),
the line-by-line locators only after the fast reader has already failed or found a bad type.

Torch-free: training and encoding both call it; every function returns a message (or None) and the caller
raises its own error class (`DataError`, `CorpusError`).
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

TEXT_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".tsv", ".txt")
_CHUNK = 1 << 24  # 16 MiB: big enough to decode at full speed, small enough to keep memory flat


def _open_bytes(path: str | Path) -> BinaryIO:
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def utf8_problem(path: str | Path) -> str | None:
    """`"<path>: line N (byte offset B): not valid UTF-8 (...)"` for the first bad byte, else None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 0  # bytes and newlines before the current chunk
    with _open_bytes(path) as f:
        while True:
            chunk = f.read(_CHUNK)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                # err.start counts from the bytes the decoder held back plus this chunk; a held-back
                # (incomplete) sequence is at most 3 bytes, so clamp at the chunk start.
                pos = max(err.start - len(err.object) + len(chunk), 0)
                line = lines + chunk.count(b"\n", 0, pos) + 1
                return (
                    f"{path}: line {line} (byte offset {offset + pos}): not valid UTF-8 "
                    f"(byte 0x{err.object[err.start]:02x}); re-encode the file as UTF-8"
                )
            if not chunk:
                return None
            offset += len(chunk)
            lines += chunk.count(b"\n")


def _json_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) of every non-blank line."""
    with _open_bytes(path) as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                yield number, raw


def json_lines_problem(path: str | Path) -> str | None:
    """The first line of a JSONL file that is not a JSON object, named by its 1-based line number; a file
    without any row says so. None when every line parses (the problem is elsewhere)."""
    rows = 0
    try:
        for number, raw in _json_lines(path):
            rows += 1
            try:
                value = json.loads(raw)
            except UnicodeDecodeError:
                return utf8_problem(path)
            except json.JSONDecodeError as err:
                return f"{path}: line {number}: not valid JSON ({err.msg} at column {err.colno})"
            if not isinstance(value, dict):
                return f"{path}: line {number}: expected a JSON object per line, found {type(value).__name__}"
    except OSError as err:
        return f"{path}: cannot read: {err}"
    if rows == 0:
        return f"{path}: no rows (the file is empty or holds only blank lines)"
    return None


def first_line_where(path: str | Path, test: Callable[[dict[str, Any]], str | None]) -> str | None:
    """`"<path>: line N: <what test says>"` for the first JSON object line where `test` returns a message."""
    for number, raw in _json_lines(path):
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # reported by json_lines_problem
        if isinstance(value, dict):
            found = test(value)
            if found:
                return f"{path}: line {number}: {found}"
    return None


def not_a_string(row: dict[str, Any], name: str) -> str | None:
    """A message when `row[name]` is present but not a string (null/absent values are checked elsewhere)."""
    value = row.get(name)
    if value is None or isinstance(value, str):
        return None
    return f"field {name!r} must be a string, found {type(value).__name__} ({json.dumps(value)[:40]})"


@contextlib.contextmanager
def quiet_json_loader() -> Iterator[None]:
    """Mute the error line that `datasets`' JSON loader logs ("... in row 0") before it raises: the caller
    replaces the exception with one line naming the file line (`json_lines_problem`)."""
    log = logging.getLogger("datasets.packaged_modules.json.json")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)
