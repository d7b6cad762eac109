"""Stable integer keys for strings (Python's `hash()` differs between processes and runs)."""

from __future__ import annotations

import hashlib


def stable_hash64(text: str) -> int:
    """An unsigned 64-bit integer of `text` (blake2b), the same on every rank, machine and run."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
