from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.helpers import make_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The content hash cache of the pipeline and BM25 fingerprints: one per test session, not the user's.
os.environ["DR_CACHE_DIR"] = tempfile.mkdtemp(prefix="dr-test-cache-")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny BERT + WordPiece tokenizer saved in Hugging Face format."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    """A small JSONL corpus (`tests.encode.test_encode.make_rows`), for the encode tests of any folder."""
    from tests.encode.test_encode import make_rows
    from tests.helpers import write_jsonl

    return write_jsonl(tmp_path / "corpus.jsonl", make_rows())
