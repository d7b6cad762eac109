"""bench.matryoshka's bookkeeping: a work folder made from other vectors is started over (never reused as
new), and --merge renumbers seeds and refuses results made with other settings."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench.matryoshka import fresh_work, merged_rows, source_key


def _args(data: Path, **over) -> argparse.Namespace:
    base = {"data": str(data), "split": "test", "depth": 100, "rescore": 10, "q_max_len": 64,
            "p_max_len": 256, "batch_size": 64, "max_rows": None, "verify_rows": 64}  # fmt: skip
    return argparse.Namespace(**{**base, **over})


def test_work_folder_starts_over_when_the_model_vectors_change(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "model.safetensors").write_bytes(b"weights v1")
    (run / "embeddings").mkdir()
    (run / "embeddings" / "corpus.arrow").write_bytes(b"vectors v1")
    work = tmp_path / "work" / "plain" / "model0"
    args = _args(tmp_path)
    fresh_work(work, source_key(str(run), args))
    (work / "64").mkdir()  # something derived from v1
    fresh_work(work, source_key(str(run), args))
    assert (work / "64").is_dir()  # same vectors, same settings: reused
    (run / "embeddings" / "corpus.arrow").write_bytes(b"vectors v2")  # retrained, re-encoded
    fresh_work(work, source_key(str(run), args))
    assert not (work / "64").exists()
    (work / "64").mkdir()
    fresh_work(work, source_key(str(run), _args(tmp_path, depth=10)))
    assert not (work / "64").exists()


def _results(path: Path, depth: int = 100) -> Path:
    rows = [{"model": m, "seed": 0, "dim": 64, "search": "exact", "bytes": 8, "ndcg": v, "ratio": 1.0}
            for m, v in (("plain", 0.5), ("matryoshka", 0.6))]  # fmt: skip
    args = {"dims": "64", "depth": depth, "rescore": 10, "split": "test", "q_max_len": 64, "p_max_len": 256,
            "max_rows": None, "qrels": str(path.parent / "qrels.trec")}  # fmt: skip
    path.write_text(json.dumps({"args": args, "rows": rows}))
    return path


def test_merge_renumbers_seeds_and_refuses_other_settings(tmp_path: Path) -> None:
    (tmp_path / "qrels.trec").write_text("q 0 d 1\n")
    rows = merged_rows([str(_results(tmp_path / "a.json")), str(_results(tmp_path / "b.json"))])
    assert sorted((r["model"], r["seed"]) for r in rows) == [
        ("matryoshka", 0), ("matryoshka", 1), ("plain", 0), ("plain", 1)
    ]  # fmt: skip
    with pytest.raises(SystemExit, match="depth"):
        merged_rows([str(_results(tmp_path / "a.json")), str(_results(tmp_path / "c.json", depth=10))])
