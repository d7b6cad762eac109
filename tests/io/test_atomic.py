"""`dr.io.atomic.publish_once`: the first complete file wins, later writers leave it alone, nothing is left."""

from __future__ import annotations

from pathlib import Path

import pytest

from dr.io.atomic import publish_once


def test_first_writer_wins_and_no_temporary_file_is_left(tmp_path: Path):
    final = tmp_path / "trained.faiss"
    assert publish_once(final, lambda tmp: tmp.write_bytes(b"first")) is True
    assert publish_once(final, lambda tmp: tmp.write_bytes(b"second")) is False
    assert final.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["trained.faiss"]


def test_a_failed_writer_publishes_nothing(tmp_path: Path):
    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish_once(tmp_path / "trained.faiss", fail)
    assert list(tmp_path.iterdir()) == []


def test_a_peer_that_removed_our_temporary_file_after_publishing_is_no_error(tmp_path: Path):
    final = tmp_path / "trained.faiss"

    def peer_publishes_and_cleans_up(tmp: Path) -> None:
        final.write_bytes(b"peer")
        tmp.unlink()  # the peer took it for a leftover of a killed trainer

    assert publish_once(final, peer_publishes_and_cleans_up) is False
    assert final.read_bytes() == b"peer"
