"""Crash-safe file output: write under a temporary name in the same folder, rename when complete.

A reader (or a rerun that checks what exists) therefore never sees a half-written file under its final
name: either the complete file is there, or only a `*.tmp-*` leftover that the next run may delete.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
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
    fd, tmp = tempfile.mkstemp(prefix=final.name + TMP_MARK, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text_atomic(final: str | os.PathLike, text: str) -> None:
    """Write `text` to `final` through a temporary file (see `atomic_path`)."""
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(final: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON to `final` through a temporary file."""
    write_text_atomic(final, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def remove_stale_temporaries(folder: str | os.PathLike, final_name: str) -> list[Path]:
    """Delete leftovers of an interrupted `atomic_path(folder/final_name)`; return what was removed."""
    removed = []
    for leftover in Path(folder).glob(final_name + TMP_MARK + "*"):
        leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed
