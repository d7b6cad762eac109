"""`dr.index.manifest`: passage shard fingerprints, reading an index folder's manifest, the freshness check."""

from __future__ import annotations

import json
import os

import pytest

from dr.index.manifest import MANIFEST, StaleIndex, check_fresh, read_manifest, shard_fingerprint
from dr.io.shards import file_sha256
from dr.search.shard_set import SearchError
from tests.index.test_index_build import corpus, index_argv, index_main

__all__ = ["corpus"]  # the fixture, shared with test_index_build


def test_fingerprint_is_the_encode_manifests_sha256(corpus):
    shard = corpus / "corpus.00.arrow"
    own = shard_fingerprint(shard)  # no encode manifest: the file's own content hash
    assert own == {"bytes": shard.stat().st_size, "sha256": file_sha256(shard)}
    entry = {"path": shard.name, "sha256": "from the encode manifest"}
    (corpus / "corpus.manifest.json").write_text(json.dumps({"files": [entry]}))
    assert shard_fingerprint(shard) == {"bytes": shard.stat().st_size, "sha256": entry["sha256"]}


def test_read_manifest_refuses_unfinished_and_foreign_folders(corpus):
    with pytest.raises(SearchError, match="no index.json: not an index folder, or its build is unfinished"):
        read_manifest(corpus)
    (corpus / MANIFEST).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(SearchError, match="not a dr index manifest"):
        read_manifest(corpus)
    (corpus / MANIFEST).write_text("{")
    with pytest.raises(SearchError, match="unreadable"):
        read_manifest(corpus)


def test_check_fresh_names_a_changed_or_missing_shard(corpus):
    assert index_main(index_argv(corpus, "idx")) == 0
    shards = read_manifest(corpus / "idx")["shards"]
    check_fresh(shards)  # as built
    touched = corpus / "corpus.02.arrow"
    data = touched.read_bytes()
    touched.unlink()
    touched.write_bytes(data)  # copied again: same bytes, another file and mtime
    os.utime(touched, (1_000_000_000, 1_000_000_000))
    check_fresh(shards)
    stat = touched.stat()
    touched.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped, mtime restored
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(StaleIndex, match="corpus.02.arrow: passage shard changed since the index was built"):
        check_fresh(shards)
    touched.unlink()
    with pytest.raises(
        StaleIndex, match="corpus.02.arrow: the index was built from this passage shard, which is gone"
    ):
        check_fresh(shards)
