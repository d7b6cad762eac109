"""The model card (README.md) `dr train` writes: Hugging Face front matter, the training record, metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from dr.model.card import _command_line, update_card_metrics, write_model_card
from tests.helpers import command, make_train_rows, write_jsonl


def front_matter(path: Path) -> tuple[dict, str]:
    match = re.match(r"---\n(.*?)\n---\n(.*)", path.read_text(), flags=re.DOTALL)
    assert match, "no YAML front matter"
    return yaml.safe_load(match.group(1)), match.group(2)


CONFIG = {"pooling": "mean", "normalize": True, "query_prefix": "q: ", "passage_prefix": "", "q_max_len": 16}


def test_card_front_matter_and_body(tmp_path):
    card = write_model_card(
        tmp_path,
        base_model="sentence-transformers/all-MiniLM-L6-v2",
        encoder_config=CONFIG,
        command="dr train --output_dir out --pooling mean",
        arguments={"learning_rate": 5e-5, "output_dir": "out"},
        dataset="Tevatron/msmarco-passage",
    )
    meta, body = front_matter(card)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["library_name"] == "sentence-transformers"
    assert meta["pipeline_tag"] == "sentence-similarity"
    assert {"sentence-transformers", "feature-extraction", "sentence-similarity", "dr"} <= set(meta["tags"])
    assert meta["datasets"] == ["Tevatron/msmarco-passage"]
    assert "dr train --output_dir out --pooling mean" in body and '"learning_rate": 5e-05' in body
    assert "| similarity | cosine |" in body and "Not evaluated yet" in body
    # A local data file is named in the body, not in `datasets` (the hub links that field).
    meta, body = front_matter(write_model_card(
        tmp_path, base_model="m", encoder_config=CONFIG, command=None, arguments={}, dataset=str(tmp_path)
    ))  # fmt: skip
    assert "datasets" not in meta and str(tmp_path) in body


def test_update_card_metrics_replaces_the_evaluation(tmp_path):
    write_model_card(tmp_path, base_model="m", encoder_config=CONFIG, command="dr train", arguments={})
    update_card_metrics(
        tmp_path, {"nDCG@10": 0.5, "MRR@10": np.float64(0.25), "queries": 300}, dataset="scifact"
    )
    card = update_card_metrics(tmp_path, {"nDCG@10": 0.75}, dataset="scifact")  # a second call replaces
    meta, body = front_matter(card)
    assert meta["dr_metrics"] == {"dataset": "scifact", "nDCG@10": 0.75}
    assert meta["library_name"] == "sentence-transformers"  # the rest of the front matter is kept
    assert "| nDCG@10 | 0.7500 |" in body and "0.5000" not in body and "Not evaluated yet" not in body
    assert body.count("## Evaluation") == 1 and "## Training" in body
    # A folder without a card gets a minimal one.
    meta, body = front_matter(update_card_metrics(tmp_path / "bare", {"R@100": 1.0}))
    assert meta["dr_metrics"] == {"R@100": 1.0} and "| R@100 | 1.0000 |" in body


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["/usr/bin/dr", "train", "--output_dir", "a b"], "dr train --output_dir 'a b'"),
        (["/x/dr/train/__main__.py", "--pooling", "mean"], "python -m dr.train --pooling mean"),
        (["/x/pytest", "-q"], None),
    ],
)
def test_command_line(argv, expected):
    assert _command_line(argv) == expected


def test_dr_train_writes_card_and_st_files(tiny_model_dir, tmp_path):
    """One real (tiny, 2-step) `dr train`: the folder has a card and opens in sentence-transformers."""
    pytest.importorskip("sentence_transformers")
    (tmp_path / "out").mkdir()
    data = write_jsonl(tmp_path / "train.jsonl", make_train_rows(8))
    argv = [
        "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--output_dir",
        str(tmp_path / "out"), "--q_max_len", "16", "--p_max_len", "16", "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--train_n_passages", "2", "--pooling", "mean", "--normalize",
        "--query_prefix", "q: ", "--save_strategy", "no", "--report_to", "none",
    ]  # fmt: skip
    assert command("train")(argv) == 0
    out = tmp_path / "out"
    meta, body = front_matter(out / "README.md")
    assert meta["base_model"] == str(tiny_model_dir) and meta["library_name"] == "sentence-transformers"
    assert str(data) in body and '"pooling": "mean"' in body
    assert json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]["query"] == "q: "
    from sentence_transformers import SentenceTransformer

    vectors = SentenceTransformer(str(out), device="cpu").encode_query(["what about apple"])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
