"""Clear the lock an interrupted JIT build left behind, so that it cannot hang every later DeepSpeed start.

DeepSpeed compiles its ops (the CPU shared-memory comm op, CPU Adam) on first use with
`torch.utils.cpp_extension`, which guards each build folder with a `lock` file: created when a build
starts, removed when it ends. A process killed mid-build (Ctrl-C, a job's time limit, kill -9) leaves the
file, and torch then waits for it to disappear forever, silently: every later run hangs at start-up.

A build takes seconds to a few minutes (~45 s for the comm op on 2 CPU cores), so a lock older than
`STALE_AFTER_S` cannot belong to a build still running; such a lock is removed with a warning. A younger
one is left alone (another rank or job may be building right now) and only reported.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)

STALE_AFTER_S = 15 * 60  # >10x the longest build measured; a live build's lock is never this old


def extension_build_roots() -> list[Path]:
    """Folders whose sub-folders torch builds extensions in: TORCH_EXTENSIONS_DIR, else torch's cache root.

    Without TORCH_EXTENSIONS_DIR torch adds a `py<version>_<accelerator>` level under its cache folder, so
    the build folders are two levels down there; both levels are returned.
    """
    configured = os.environ.get("TORCH_EXTENSIONS_DIR")
    if configured:
        return [Path(configured)]
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(get_default_build_root())
    return [root, *sorted(p for p in root.glob("py*") if p.is_dir())] if root.is_dir() else []


def build_locks(roots: list[Path], *, now: float | None = None) -> list[tuple[Path, float]]:
    """Every `<root>/<extension>/lock` file with its age in seconds (the file is never written after creation)."""
    now = time.time() if now is None else now
    found = []
    for root in roots:
        for lock in sorted(root.glob("*/lock")):
            try:
                found.append((lock, now - lock.stat().st_mtime))
            except FileNotFoundError:  # its build just finished
                continue
    return found


def clear_stale_extension_locks(*, stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove stale build locks (warning for each), report young ones; returns the removed paths.

    Called before DeepSpeed builds anything, by one process per node (`dr train`: local rank 0); a lock
    another caller removed first is skipped.
    """
    removed = []
    for lock, age_s in build_locks(extension_build_roots()):
        if age_s <= stale_after_s:
            logger.info(
                "%s exists: another process is building %s, and this one will wait for it; if nothing is "
                "building, remove the file (a later start removes it once it is %d min old)",
                lock,
                lock.parent.name,
                stale_after_s // 60,
            )
            continue
        try:
            lock.unlink()
        except FileNotFoundError:  # another rank removed it first
            continue
        removed.append(lock)
        logger.warning(
            "removed %s, a JIT build lock %.0f min old: an earlier build of %s was interrupted, and torch "
            "would have waited for this file forever; the op is rebuilt now",
            lock,
            age_s / 60,
            lock.parent.name,
        )
    return removed
