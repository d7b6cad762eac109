"""`dr pipeline`: config handling, and an end-to-end run on a tiny fixture that is killed during encoding
and resumed without redoing finished stages or duplicating passages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from dr import pipeline
from dr.io.runs import read_run
from tests.helpers import REPO, command, make_train_rows, subprocess_env, write_jsonl


def _write_fixture(folder: Path, model: Path, n_queries: int = 24) -> Path:
    """Tiny train JSONL, corpus, queries, qrels and a pipeline config (2 corpus shards, 2 processes)."""
    rows = make_train_rows(n_queries, n_negatives=2)
    write_jsonl(folder / "train.jsonl", rows)
    corpus = {p["docid"]: p for r in rows for p in r["positive_passages"] + r["negative_passages"]}
    write_jsonl(folder / "corpus.jsonl", list(corpus.values()))
    (folder / "queries.tsv").write_text("".join(f"{r['query_id']}\t{r['query']}\n" for r in rows))
    (folder / "qrels.trec").write_text(
        "".join(f"{r['query_id']} 0 {r['positive_passages'][0]['docid']} 1\n" for r in rows)
    )
    config = {
        "run_dir": str(folder / "run"),
        "model": {"model_name_or_path": str(model), "pooling": "mean", "normalize": True},
        "train": {
            "dataset_name": "${FIXTURE}/train.jsonl",
            "per_device_train_batch_size": 8,
            "train_n_passages": 2,
            "max_steps": 2,
            "learning_rate": 1e-3,
            "temperature": 0.1,
            "q_max_len": 16,
            "p_max_len": 32,
            "save_strategy": "no",
            "report_to": "none",
        },
        "encode": {
            "corpus": "${FIXTURE}/corpus.jsonl",
            "queries": "${FIXTURE}/queries.tsv",
            "num_shards": 2,
            "per_device_eval_batch_size": 16,
            "p_max_len": 32,
            "q_max_len": 16,
        },
        "search": {"depth": 10},
        "eval": {"qrels": "${FIXTURE:-missing}/qrels.trec", "metrics": ["MRR@10", "R@10"]},
        "processes": {"train": 1, "encode": 2, "search": 2},
        "stage_timeout_s": 240,
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ---- config ---------------------------------------------------------------------------------------------
def test_config_overrides_variables_and_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_path = _write_fixture(tmp_path, tmp_path / "model")
    monkeypatch.setenv("FIXTURE", str(tmp_path))
    cfg = pipeline.load_config(cfg_path, ["train.max_steps=5", "search.depth=7", "processes.encode=1"])
    assert cfg["train"]["max_steps"] == 5 and cfg["search"]["depth"] == 7 and cfg["processes"]["encode"] == 1
    assert cfg["train"]["dataset_name"] == f"{tmp_path}/train.jsonl"
    assert cfg["eval"]["qrels"] == f"{tmp_path}/qrels.trec" and cfg["eval"]["run_format"] == "trec"
    zero_shot = pipeline.load_config(cfg_path, ["train=null", "run_dir=elsewhere"])
    assert zero_shot["train"] is None and zero_shot["run_dir"] == str(Path("elsewhere").absolute())
    monkeypatch.setenv("HOME", str(tmp_path))
    assert pipeline.load_config(cfg_path, ["run_dir=~/runs/a"])["run_dir"] == f"{tmp_path}/runs/a"
    steps = [s.name for s in pipeline.build_steps(zero_shot)]
    assert steps == [
        "encode_corpus[0/2]",
        "encode_corpus[1/2]",
        "encode_queries",
        "search",
        "convert",
        "eval",
    ]
    encode_cmd = pipeline.build_steps(zero_shot)[0].cmd
    assert (
        "--pooling" in encode_cmd and "--normalize" in encode_cmd
    )  # zero-shot: the model section's settings
    with pytest.raises(pipeline.PipelineError, match="unknown top-level keys"):
        pipeline.load_config(cfg_path, ["trian.max_steps=5"])
    with pytest.raises(pipeline.PipelineError, match="processes.encode"):
        pipeline.load_config(cfg_path, ["processes.encode=0"])
    with pytest.raises(pipeline.PipelineError, match="KEY=VALUE"):
        pipeline.load_config(cfg_path, ["train"])


def test_package_model_path_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    module = type(sys)("fake_model_pkg")
    module.get_model_path = lambda: "/opt/models/mini"  # type: ignore[attr-defined]
    module.other = lambda: "/opt/other"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_model_pkg", module)
    assert pipeline.expand_value("package:fake_model_pkg") == "/opt/models/mini"
    assert pipeline.expand_value({"a": ["package:fake_model_pkg:other"]}) == {"a": ["/opt/other"]}
    with pytest.raises(pipeline.PipelineError, match="cannot import"):
        pipeline.expand_value("package:no_such_module_xyz")
    argv = pipeline.flags_to_argv({"bf16": True, "fp16": False, "metrics": ["A", "B"], "x": None, "lr": 1e-5})
    assert argv == ["--bf16", "--fp16", "false", "--metrics", "A", "B", "--lr", "1e-05"]
    # One dialect for every command now (dr.flags): argparse commands take `--flag false` too.
    assert pipeline.flags_to_argv({"save_text": False, "depth": 3}) == [
        "--save_text",
        "false",
        "--depth",
        "3",
    ]


def test_dry_run_prints_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg_path = _write_fixture(tmp_path, tmp_path / "model")
    monkeypatch.setenv("FIXTURE", str(tmp_path))
    assert command("pipeline")([str(cfg_path), "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "-m dr.train" in out and "--output_dir" in out
    assert "torch.distributed.run --standalone --nproc_per_node 2 -m dr.encode" in out
    assert "--encode_num_shard 2 --encode_shard_index 1" in out and "-m dr.evaluate" in out
    assert "train: rerun (no stage record" in out and "eval: rerun (" in out  # a new run directory
    assert not (tmp_path / "run").exists()


# ---- end to end, killed and resumed ---------------------------------------------------------------------
def _pipeline_cmd(cfg_path: Path) -> list[str]:
    return [sys.executable, "-m", "dr.pipeline", str(cfg_path)]


def _kill_when(proc: subprocess.Popen, condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"pipeline ended (exit {proc.returncode}) before the kill point")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("kill point not reached in time")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: pipeline, torchrun and its workers
    proc.wait(timeout=30)


@pytest.mark.slow
def test_pipeline_killed_during_encoding_resumes(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg_path = _write_fixture(tmp_path, tiny_model_dir)
    env = subprocess_env(FIXTURE=str(tmp_path))
    run_dir = tmp_path / "run"
    emb = run_dir / "embeddings"
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as log:
        proc = subprocess.Popen(
            _pipeline_cmd(cfg_path),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
        # kill once shard 0 is complete (its manifest exists): shard 1 is pending or half-written
        _kill_when(proc, lambda: (emb / "corpus.00000-of-00002.manifest.json").is_file(), timeout=300)
    assert (run_dir / "model" / "dr_config.json").is_file()
    assert not (run_dir / "metrics.json").exists()
    model_mtime = (run_dir / "model" / "dr_config.json").stat().st_mtime_ns
    shard0 = {p: p.stat().st_mtime_ns for p in emb.glob("corpus.00000-of-00002.*.arrow")}
    assert len(shard0) == 2  # one file per encode rank

    second = subprocess.run(
        _pipeline_cmd(cfg_path), check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=400
    )
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    lines = [ln for ln in second.stdout.splitlines() if ln.startswith("[dr pipeline")]
    assert any("train: skip" in ln for ln in lines)
    assert any("encode_corpus[0/2]: skip" in ln for ln in lines)
    assert any("encode_corpus[1/2]: done in" in ln for ln in lines) and any(
        "eval: done in" in ln for ln in lines
    )
    assert (run_dir / "model" / "dr_config.json").stat().st_mtime_ns == model_mtime
    assert {p: p.stat().st_mtime_ns for p in shard0} == shard0

    files = sorted(emb.glob("corpus.*.arrow"))
    assert len(files) == 4
    ids = [i for f in files for i in pa.ipc.open_file(f).read_all().column("id").to_pylist()]
    corpus_ids = [json.loads(line)["docid"] for line in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(corpus_ids) and len(set(ids)) == len(ids)  # every passage exactly once
    run, _ = read_run(run_dir / "run.trec")
    assert len(run) == 24 and all(len(hits) == 10 for hits in run.rankings.values())
    assert set(run.rankings) == {str(i) for i in range(24)}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["MRR@10"] <= 1.0 and metrics["num_queries"] == 24
    card = (run_dir / "model" / "README.md").read_text()  # the model card reports the pipeline's metrics
    assert "dr_metrics" in card and "MRR@10" in card.split("## Evaluation", 1)[1]
    resolved = json.loads((run_dir / "config.json").read_text())
    assert resolved["train"]["dataset_name"] == f"{tmp_path}/train.jsonl"
    assert "MRR@10" in second.stdout.splitlines()[-3] + second.stdout  # the final metrics table

    third = subprocess.run(
        _pipeline_cmd(cfg_path), check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    assert third.returncode == 0
    events = [ln.split("] ", 1)[1] for ln in third.stdout.splitlines() if ln.startswith("[dr pipeline")]
    assert (
        sum(e.endswith("skip (outputs complete)") for e in events) == 7
    )  # train, 2+1 encodes, search, convert, eval
    assert not any(": start:" in e for e in events)
    records = {p.name for p in (run_dir / "stages").iterdir()}
    assert len(records) == 7 and not any(".running." in name for name in records)

    # The bug this guards: a changed search.depth kept the old run and metrics. Now search, convert and
    # eval rerun (nothing is retrained or re-encoded) and config.json says depth 5.
    fourth = subprocess.run(
        [*_pipeline_cmd(cfg_path), "--set", "search.depth=5"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert fourth.returncode == 0, fourth.stdout[-4000:] + fourth.stderr[-4000:]
    started = [ln.split("] ", 1)[1].split(":")[0] for ln in fourth.stdout.splitlines() if ": start:" in ln]
    assert started == ["search", "convert", "eval"]
    assert "search: rerun (search.depth: 10 -> 5)" in fourth.stdout
    run, _ = read_run(run_dir / "run.trec")
    assert all(len(hits) == 5 for hits in run.rankings.values())
    assert json.loads((run_dir / "config.json").read_text())["search"]["depth"] == 5
    search_record = json.loads((run_dir / "stages" / "search.json").read_text())
    assert search_record["config"]["search.depth"] == 5 and "5" in search_record["argv"]
