"""Check embedding shards against the manifest `dr encode` wrote beside them, before they are searched.

A shard altered after encoding (a bit flip, a partial copy, a file replaced by hand) is otherwise searched
as if it were right: one changed vector can come first for every query. `dr encode` records for each file
its row count, byte size and sha256 in `<base>[.<shard>-of-<N>].manifest.json`; the manifest that lists a
shard is found beside it (a `*.manifest.json` whose "files" name it).

`--verify` modes (`VERIFY_MODES`):
- `auto` (default): every shard a manifest lists: row count and byte size (cheap), and its sha256 when the
  manifest has one (one read of the file: about 1 s per GB); shards no manifest lists are used as they
  are, with one log line saying how many.
- `full`: as auto, but a shard without a manifest entry with a sha256 is an error.
- `size`: row count and byte size only (no hashing), for very large corpora on slow disks.
- `none`: no check.
The time the checks took is logged. Torch-free (numpy / pyarrow only).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from pyarrow import ipc

from dr.io.shards import file_sha256
from dr.search.shard_set import SearchError

logger = logging.getLogger("dr.search")

VERIFY_MODES = ("auto", "full", "size", "none")


@dataclass
class VerifyReport:
    """What `verify_shards` checked, for the log line and the run's config sidecar."""

    mode: str
    checked: int = 0
    hashed: int = 0
    hashed_bytes: int = 0
    unlisted: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        parts = [f"{self.checked} shard(s) checked against their manifest ({self.mode})"]
        if self.hashed:
            parts.append(f"sha256 of {self.hashed} ({self.hashed_bytes / 2**20:.1f} MiB)")
        if self.unlisted:
            parts.append(f"{self.unlisted} listed by no manifest (not verified)")
        return "; ".join(parts) + f" in {self.seconds:.2f}s"


def _manifest_entries(
    folder: Path, cache: dict[Path, dict[str, tuple[Path, dict]]]
) -> dict[str, tuple[Path, dict]]:
    """{file name: (manifest path, its entry)} over every manifest in `folder` (read once per folder)."""
    if folder not in cache:
        entries: dict[str, tuple[Path, dict]] = {}
        for manifest in sorted(folder.glob("*.manifest.json")):
            try:
                data = json.loads(manifest.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise SearchError(f"{manifest}: unreadable manifest: {err}") from err
            for entry in data.get("files", []) if isinstance(data, dict) else []:
                if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                    entries[entry["path"]] = (manifest, entry)
        cache[folder] = entries
    return cache[folder]


def _row_count(path: Path) -> int:
    """Rows actually in an Arrow IPC file (batch headers only, memory-mapped)."""
    try:
        reader = ipc.open_file(pa.memory_map(str(path), "r"))
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    except (pa.ArrowInvalid, OSError) as err:
        raise SearchError(f"{path}: not a readable Arrow shard ({err}); re-encode it") from err


def verify_shards(paths: list[str], mode: str = "auto") -> VerifyReport:
    """Check each shard against its manifest entry; raise `SearchError` naming the first that differs."""
    if mode not in VERIFY_MODES:
        raise SearchError(f"--verify must be one of {VERIFY_MODES}, got {mode!r}")
    report = VerifyReport(mode)
    if mode == "none":
        return report
    began = time.perf_counter()
    cache: dict[Path, dict[str, tuple[Path, dict]]] = {}
    for name in paths:
        path = Path(name)
        found = _manifest_entries(path.parent, cache).get(path.name)
        if found is None or (mode == "full" and not found[1].get("sha256")):
            if mode == "full":
                raise SearchError(
                    f"{path}: no manifest beside it records its sha256, so --verify full cannot check it "
                    "(use --verify auto to search unlisted shards as they are)"
                )
            report.unlisted += 1
            continue
        manifest, entry = found
        where = f"{path}: does not match {manifest.name}"
        rows = _row_count(path)
        if entry.get("rows") is not None and rows != entry["rows"]:
            raise SearchError(f"{where} ({rows} rows, the manifest says {entry['rows']}); re-encode it")
        size = path.stat().st_size
        if entry.get("bytes") is not None and size != entry["bytes"]:
            raise SearchError(f"{where} ({size} bytes, the manifest says {entry['bytes']}); re-encode it")
        if mode in ("auto", "full") and entry.get("sha256"):
            if file_sha256(path) != entry["sha256"]:
                raise SearchError(f"{where} (sha256 differs: the file changed after encoding); re-encode it")
            report.hashed += 1
            report.hashed_bytes += size
        report.checked += 1
    report.seconds = time.perf_counter() - began
    return report
