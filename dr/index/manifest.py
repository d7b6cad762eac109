"""The index folder's manifest (``index.json``): its format, the passage shards' fingerprints, reading it,
and the freshness check that a search makes before trusting it.

`dr.index.build` writes the manifest (last, once every shard index is complete); `dr.search.ann` and
`dr search --index_factory` read it. What a manifest says about each passage shard is its path, rows and
fingerprint: the sha256 the encode manifest records for it where one lists it (cheap: no rehashing of a
large shard), else its size and content SHA-256 (cached by file identity, `dr.io.content_hash`: shards
copied elsewhere stay fresh). A shard whose fingerprint changed is refused (`StaleIndex`): the index's rows
would no longer be its rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dr.io.atomic import read_tagged_json
from dr.io.content_hash import ContentHashes
from dr.search.shard_set import SearchError

FORMAT = "dr.index"
MANIFEST = "index.json"


class StaleIndex(SearchError):
    """A passage shard changed since the index was built from it (exit 1)."""


def shard_fingerprint(path: str | os.PathLike, hashes: ContentHashes | None = None) -> dict:
    """What identifies a passage shard's content cheaply: the encode manifest's sha256 where a manifest
    beside it lists it (plus the size), else the size and the file's own SHA-256 (from `hashes`' cache
    when the file is unchanged)."""
    path = Path(path)
    stat = path.stat()
    for manifest in sorted(path.parent.glob("*.manifest.json")):
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for entry in data.get("files", []) if isinstance(data, dict) else []:
            if isinstance(entry, dict) and entry.get("path") == path.name and entry.get("sha256"):
                return {"bytes": stat.st_size, "sha256": entry["sha256"]}
    return {"bytes": stat.st_size, "sha256": (hashes or ContentHashes()).sha256(path)}


def check_fresh(shards: list[dict]) -> None:
    """Refuse when a passage shard recorded in an index manifest is gone or differs (`StaleIndex`)."""
    hashes = ContentHashes()
    try:
        for shard in shards:
            path = shard["path"]
            if not Path(path).is_file():
                raise StaleIndex(f"{path}: the index was built from this passage shard, which is gone")
            now = shard_fingerprint(path, hashes)
            if now != shard["fingerprint"]:
                raise StaleIndex(
                    f"{path}: passage shard changed since the index was built ({shard['fingerprint']} -> "
                    f"{now}); rebuild it with dr index"
                )
    finally:
        hashes.save()  # once, not per shard: each save rereads and rewrites the whole cache file


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a complete index folder (`SearchError` when there is none or it is unreadable)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise SearchError(
            f"{folder}: no {MANIFEST}: not an index folder, or its build is unfinished (run dr index)"
        )
    return read_tagged_json(path, FORMAT, SearchError, "dr index manifest")
