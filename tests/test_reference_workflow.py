"""The reference (Tevatron) workflow, command for command, on local data with a tiny model.

Only the program names change (`python -m dr.<stage>`), `--fp16` is dropped (CPU) and sizes are small;
the flag spellings, the `.pkl` output names and the search glob are the reference's own.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.helpers import TOPICS, make_train_rows, run, write_jsonl

pytestmark = pytest.mark.slow


def test_reference_commands_end_to_end(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_train_rows(48, n_negatives=7))
    corpus = write_jsonl(
        tmp_path / "corpus.jsonl",
        [{"docid": f"doc-{t}", "title": "-", "text": f"{t} notes about the {t} story"} for t in TOPICS],
    )
    dev = write_jsonl(
        tmp_path / "dev.jsonl", [{"query_id": f"q-{t}", "query": f"what about {t}"} for t in TOPICS]
    )
    qrels = tmp_path / "qrels.dev.tsv"
    qrels.write_text("".join(f"q-{t}\t0\tdoc-{t}\t1\n" for t in TOPICS))
    py = [sys.executable, "-m"]
    model = tmp_path / "model_msmarco"
    run(
        py
        + [
            "dr.train",
            "--output_dir",
            str(model),
            "--model_name_or_path",
            str(tiny_model_dir),
            "--save_steps",
            "20000",
            "--dataset_name",
            str(train),
            "--per_device_train_batch_size",
            "8",
            "--train_n_passages",
            "8",
            "--learning_rate",
            "5e-4",
            "--q_max_len",
            "16",
            "--p_max_len",
            "32",
            "--num_train_epochs",
            "3",
            "--logging_steps",
            "5",
            "--overwrite_output_dir",
        ],
        timeout=300,
    )
    assert (model / "dr_config.json").is_file()
    # fmt: off
    encode = py + ["dr.encode", f"--output_dir={tmp_path / 'temp'}", "--model_name_or_path", str(model),
                   "--per_device_eval_batch_size", "16"]
    for shard in ("00", "01"):
        run(encode + ["--p_max_len", "32", "--dataset_name", str(corpus), "--encoded_save_path",
                      str(tmp_path / f"corpus_emb.{shard}.pkl"), "--encode_num_shard", "2", "--encode_shard_index", shard])
    run(encode + ["--dataset_name", str(dev), "--encoded_save_path", str(tmp_path / "query_emb.pkl"),
                  "--q_max_len", "16", "--encode_is_qry"])
    # fmt: on
    assert not list(tmp_path.glob("*.pkl"))  # nothing is pickled
    rank = tmp_path / "rank.txt"
    run(
        py
        + [
            "dr.search",
            "--query_reps",
            str(tmp_path / "query_emb.pkl"),
            "--passage_reps",
            str(tmp_path / "corpus_emb.*.pkl"),
            "--depth",
            "100",
            "--batch_size",
            "-1",
            "--save_text",
            "--save_ranking_to",
            str(rank),
        ]
    )
    lines = rank.read_text().splitlines()
    assert len(lines) == len(TOPICS) * len(TOPICS)  # depth 100 > corpus: every passage, once per query
    run(py + ["dr.convert", "--input", str(rank), "--output", str(tmp_path / "rank.txt.marco")])
    metrics = tmp_path / "metrics.json"
    run(
        py
        + [
            "dr.evaluate",
            "--qrels",
            str(qrels),
            "--run",
            str(tmp_path / "rank.txt.marco"),
            "--output",
            str(metrics),
        ]
    )
    # A smoke check, not a quality bar (tests/train/test_train.py checks learning): random order gives ~0.10.
    assert json.loads(metrics.read_text())["MRR@10"] > 0.2
