"""`dr.io.content_hash`: the cache returns a file's hash only while the file is unchanged (a rewrite that
restores the mtime still misses it), never caches a file changed within the racy window, and a corrupt or
missing cache costs a rehash, not a wrong hash."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from dr.io import content_hash
from dr.io.content_hash import ContentHashes


@pytest.fixture
def later(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache's clock 10 s ahead: files the test just wrote count as settled (outside the racy window)."""
    monkeypatch.setattr(content_hash, "_clock", lambda: time.time() + 10)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_hash_is_the_sha256_and_is_read_from_the_cache_while_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, later: None
) -> None:
    path = _write(tmp_path / "corpus.jsonl", b"passage one\n")
    cache = tmp_path / "cache" / "hashes.json"
    first = ContentHashes(cache)
    assert first.sha256(path) == hashlib.sha256(b"passage one\n").hexdigest()
    first.save()
    assert cache.is_file()

    def fail(_path: object) -> str:
        raise AssertionError("read the file although it is unchanged")

    monkeypatch.setattr(content_hash, "file_sha256", fail)
    assert ContentHashes(cache).sha256(path) == hashlib.sha256(b"passage one\n").hexdigest()


def test_a_rewrite_that_restores_the_mtime_is_rehashed(tmp_path: Path, later: None) -> None:
    path = _write(tmp_path / "qrels.trec", b"q 0 d1 1\n")
    cache = tmp_path / "hashes.json"
    hashes = ContentHashes(cache)
    hashes.sha256(path)
    hashes.save()
    st = path.stat()
    path.write_bytes(b"q 0 d2 1\n")  # same size, other bytes
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime set back: only ctime tells
    assert ContentHashes(cache).sha256(path) == hashlib.sha256(b"q 0 d2 1\n").hexdigest()


def test_a_file_changed_just_before_hashing_is_not_cached(tmp_path: Path) -> None:
    path = tmp_path / "fresh.tsv"
    path.write_bytes(b"1\tquery\n")
    hashes = ContentHashes(tmp_path / "hashes.json")
    hashes.sha256(path)
    hashes.save()
    assert not (tmp_path / "hashes.json").exists()  # nothing cacheable: the file may still be changing


def test_a_corrupt_or_disabled_cache_only_costs_a_rehash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, later: None
) -> None:
    path = _write(tmp_path / "model.safetensors", b"\x00" * 1000)
    cache = tmp_path / "hashes.json"
    cache.write_text("{not json")
    hashes = ContentHashes(cache)
    assert hashes.sha256(path) == hashlib.sha256(b"\x00" * 1000).hexdigest()
    hashes.save()
    assert ContentHashes(cache)._entries  # rewritten as a valid cache
    monkeypatch.setenv("DR_CACHE_DIR", "off")
    assert content_hash.default_cache_file() is None
    off = ContentHashes()
    assert off.sha256(path) == hashlib.sha256(b"\x00" * 1000).hexdigest()
    off.save()  # nowhere to save: no error
