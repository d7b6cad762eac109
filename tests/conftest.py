from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import make_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny BERT + WordPiece tokenizer saved in Hugging Face format."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert"))
