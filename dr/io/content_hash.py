"""SHA-256 of input files, cached by file identity so that an unchanged file is read only once.

Why content and not mtime: a dataset or model folder copied again (a fresh checkout, `rsync` without `-t`, a
node's scratch disk filled from shared storage) has new mtimes and the same bytes. Fingerprints made of
mtimes then say "input changed", and `dr pipeline` retrains and re-encodes from scratch, deleting the
outputs it had. Content hashes say what matters: same bytes, same result.

Reading every byte on every run would be slow for an 8.8M-passage corpus or a 7B model, so each hash is
cached under the file's identity: (device, inode, size, mtime_ns, ctime_ns). Any write changes ctime, and
ctime cannot be set back from user space, so a rewrite that restores the mtime (`touch -r`, `cp -p` onto
the file) still misses the cache. A file changed less than `RACY_SECONDS` before it was hashed is hashed
but not cached (it may still be being written within one timestamp tick: git's "racy clean" case).

The cache is one JSON file, `$DR_CACHE_DIR/content-hashes.json` (default `$XDG_CACHE_HOME/dr`, else
`~/.cache/dr`), shared by every run directory; `DR_CACHE_DIR=off` disables it. It only ever saves
reading a file: a lost, corrupt or unwritable cache costs a rehash, never a wrong hash.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from dr.io.atomic import write_json_atomic
from dr.io.shards import file_sha256

logger = logging.getLogger(__name__)

RACY_SECONDS = 2.0
LOG_BYTES = 256 * 1024 * 1024  # say so when hashing a file this large (it takes seconds)
MAX_ENTRIES = 200_000  # the cache keeps the newest entries up to this many
CACHE_VERSION = 1


def default_cache_file() -> Path | None:
    """Where the hash cache lives (see the module docstring), or None when `DR_CACHE_DIR=off`."""
    folder = os.environ.get("DR_CACHE_DIR")
    if folder == "off":
        return None
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "dr")
    return Path(folder) / "content-hashes.json"


def _clock() -> float:
    """Seconds since the epoch (a function of its own so tests can move it)."""
    return time.time()


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class ContentHashes:
    """File SHA-256s with the identity cache; `save()` merges new entries into the cache file."""

    def __init__(self, cache_file: Path | None | str = "default") -> None:
        self.cache_file = default_cache_file() if cache_file == "default" else cache_file
        self._entries: dict[str, dict[str, Any]] = self._load()
        self._new: dict[str, dict[str, Any]] = {}

    def _load(self) -> dict[str, dict[str, Any]]:
        if self.cache_file is None:
            return {}
        try:
            data = json.loads(Path(self.cache_file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
            return {}
        entries = data.get("files")
        return entries if isinstance(entries, dict) else {}

    def sha256(self, path: str | os.PathLike) -> str:
        """The SHA-256 of the file at `path`, from the cache when its identity is unchanged."""
        key = os.path.realpath(path)
        st = os.stat(key)
        identity = _identity(st)
        entry = self._new.get(key) or self._entries.get(key)
        if (
            isinstance(entry, dict)
            and entry.get("identity") == identity
            and isinstance(entry.get("sha256"), str)
        ):
            return entry["sha256"]
        if st.st_size >= LOG_BYTES:
            logger.info("hashing %s (%.1f GB) once for the stage fingerprints", key, st.st_size / 1e9)
        started = _clock()
        value = file_sha256(key)
        after = os.stat(key)
        changed_at = max(after.st_mtime_ns, after.st_ctime_ns) / 1e9
        if _identity(after) == identity and started - changed_at >= RACY_SECONDS:
            self._new[key] = {"identity": identity, "sha256": value, "hashed": _clock()}
        return value

    def save(self) -> None:
        """Merge the entries hashed since the last save into the cache file (atomically; errors ignored:
        the cache only saves time)."""
        if self.cache_file is None or not self._new:
            return
        merged = {**self._load(), **self._new}
        if len(merged) > MAX_ENTRIES:
            newest = sorted(merged.items(), key=lambda kv: kv[1].get("hashed", 0), reverse=True)
            merged = dict(newest[:MAX_ENTRIES])
        try:
            Path(self.cache_file).parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(Path(self.cache_file), {"version": CACHE_VERSION, "files": merged})
        except OSError as err:
            logger.debug("content hash cache not saved (%s)", err)
            return
        self._entries, self._new = merged, {}
