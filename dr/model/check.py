"""Refuse a model source or tokenizer that would run but give meaningless vectors, with one line that says
what to do.

Two failure modes are caught here, before anything is trained or encoded:
- a model path that does not exist (or a hub name offline): transformers answers with "Repo id must be in
  the form ..." or several chained tracebacks; we say "no such model folder" (as for training data);
- a folder without tokenizer files: transformers 5 then builds a tokenizer of the 5 special tokens, every
  word becomes [UNK] and 60 passages give 7 distinct vectors, silently. A vocabulary under `MIN_VOCAB`
  tokens, or one with ids beyond the model's embedding table, is refused; `--tokenizer_name` is the fix.
`len(tokenizer)` may differ from the config's `vocab_size` in the harmless direction (embedding tables
padded to a multiple of 8/64, unused reserved rows); only ids that would be out of range are an error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dr.errors import InputError

MIN_VOCAB = 100
# Any of these in a folder means it carries its own tokenizer (fast, WordPiece, BPE, SentencePiece, tiktoken).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


class ModelError(InputError):
    """The model or tokenizer source is missing, unreachable or unusable; the message names it."""


def _offline() -> bool:
    return any(
        os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _in_hub_cache(repo: str, cache_dir: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return True
    try:
        found = try_to_load_from_cache(repo, "config.json", cache_dir=cache_dir)
    except Exception:  # noqa: BLE001 - an invalid repo id: not a cached hub model
        return False
    return isinstance(found, str)


def check_model_source(name_or_path: str, what: str = "model", cache_dir: str | None = None) -> None:
    """Raise `ModelError` when `name_or_path` is neither an existing folder nor a reachable hub name.

    A hub name has the form `name` or `org/name` without a leading `.`, `/` or `~`; anything else is a
    path. Offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), a hub name must already be in the cache.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise ModelError(f"{name_or_path}: not a folder (give the {what} folder, not a file in it)")
    hub_like = (
        not name_or_path.startswith((".", "/", "~"))
        and name_or_path.count("/") <= 1
        and "\\" not in name_or_path
        and all(part for part in name_or_path.split("/"))
    )
    if not hub_like:
        raise ModelError(f"no such {what} folder: {name_or_path}")
    if _offline() and not _in_hub_cache(name_or_path, cache_dir):
        raise ModelError(
            f"no such {what} folder: {name_or_path}; as a hub name it cannot be reached offline "
            "(HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set and it is not in the cache)"
        )


def check_tokenizer_files(model_path: str, tokenizer_name: str | None) -> None:
    """A model folder used as its own tokenizer must hold tokenizer files (see the module docstring)."""
    if tokenizer_name:
        return
    folder = Path(model_path).expanduser()
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(
            f"{model_path}: the model folder has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
            "pass --tokenizer_name with the tokenizer of the model it was trained from"
        )


def check_tokenizer(tokenizer: Any, source: str) -> None:
    """Refuse a degenerate tokenizer: fewer than `MIN_VOCAB` tokens means every word is unknown."""
    size = len(tokenizer)
    if size < MIN_VOCAB:
        raise ModelError(
            f"{source}: its tokenizer has only {size} tokens (fewer than {MIN_VOCAB}: every word would "
            "become unknown); pass --tokenizer_name with the model's real tokenizer"
        )


def check_tokenizer_fits(tokenizer: Any, encoders: list[Any], source: str) -> None:
    """Refuse a tokenizer whose ids exceed an encoder's embedding table (they would index out of range
    or, padded, read untrained rows); a smaller tokenizer than the table is normal and accepted."""
    size = len(tokenizer)
    for encoder in encoders:
        embeddings = encoder.get_input_embeddings() if hasattr(encoder, "get_input_embeddings") else None
        rows = getattr(embeddings, "num_embeddings", None)
        if rows is not None and size > rows:
            raise ModelError(
                f"{source}: the tokenizer has {size} tokens but the model's embedding table only {rows} "
                "(vocab_size): the tokenizer is not this model's; pass --tokenizer_name with the right one"
            )
