"""Crash-safe file output: write under a temporary name in the same folder, rename when complete.

A reader (or a rerun that checks what exists) therefore never sees a half-written file under its final
name: either the complete file is there, or only a `*.tmp-*` leftover that the next run may delete.

Permissions are those of any file the user creates: mode 0666 minus the umask (0644 under umask 022),
so teammates on a shared cluster can read shards, runs and metrics. (`tempfile.mkstemp` would create
them 0600 whatever the umask; the rename keeps the temporary file's mode.) Folders are made by
`Path.mkdir`, which applies the umask too.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it to `final` only if the block succeeds.

    The temporary file sits in the same directory so that the rename is atomic (same filesystem).
    On any exception the temporary file is removed and the exception propagates.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _create_unique(final.parent, final.name + TMP_MARK)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def publish_once(final: str | os.PathLike, writer: Callable[[Path], Any]) -> bool:
    """Write `final` through `writer(temporary_path)` unless it exists: the first writer wins, atomically.

    For a file that concurrent processes may each compute, identically in intent (array tasks training
    one quantizer), where a later writer must not replace what earlier readers already use: the
    complete temporary file is hard-linked to `final` (which fails if `final` exists), then removed.
    Returns whether this call published `final`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _create_unique(final.parent, final.name + TMP_MARK)
    try:
        writer(tmp_path)
        try:
            os.link(tmp_path, final)
        except FileExistsError:
            return False
        except FileNotFoundError:
            if final.exists():  # a peer that found `final` took our temporary file for a leftover
                return False
            raise
        return True
    finally:
        tmp_path.unlink(missing_ok=True)


def _create_unique(folder: Path, prefix: str, attempts: int = 100) -> Path:
    """Create a new empty file `folder/prefix<random>` with mode 0666 & ~umask; return its path.

    O_EXCL makes the name ours alone (as mkstemp does), while the kernel applies the umask to 0666.
    """
    for _ in range(attempts):
        path = folder / (prefix + secrets.token_hex(4))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return path
    raise FileExistsError(f"{folder}: no free temporary name {prefix}* after {attempts} attempts")


def write_text_atomic(final: str | os.PathLike, text: str) -> None:
    """Write `text` to `final` through a temporary file (see `atomic_path`)."""
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(final: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON to `final` through a temporary file."""
    write_text_atomic(final, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_tagged_json(path: Path, fmt: str, error: type[Exception], what: str) -> dict:
    """Read back a JSON record this package wrote (a manifest), checking its `format` tag: `error` names
    the file when it is unreadable or is some other JSON (`what`: the kind of file expected)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise error(f"{path}: unreadable {what}: {err}") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise error(f"{path}: not a {what} (format != {fmt!r})")
    return data


def remove_stale_temporaries(folder: str | os.PathLike, final_name: str) -> list[Path]:
    """Delete leftovers of an interrupted `atomic_path(folder/final_name)`; return what was removed."""
    removed = []
    for leftover in Path(folder).glob(final_name + TMP_MARK + "*"):
        leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed
