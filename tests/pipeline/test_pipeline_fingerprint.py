"""`dr pipeline` stage fingerprints: a rerun in the same run directory recomputes exactly the stages whose
inputs changed (and everything downstream), never reuses outputs of another config, and `--dry_run` says
what it would do. Most tests run the real plan and runner in-process with the subprocess replaced by a
fake that writes each stage's output (a JSON copy of its argv), so a test takes milliseconds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from dr.pipeline.config import load_config
from dr.pipeline.fingerprint import (
    Fingerprinter,
    fingerprint_of,
    path_fingerprint,
    plan,
    read_json,
    record_path,
    running_path,
    split_command,
)
from dr.pipeline.runner import Runner, StageFailed
from dr.pipeline.steps import Layout, build_steps
from tests.helpers import command

ALL = ["train", "encode_corpus[0/2]", "encode_corpus[1/2]", "encode_queries", "search", "convert", "eval"]
AFTER_ENCODE = ["search", "convert", "eval"]


def _fixture(folder: Path, train: bool = True) -> Path:
    """Input files (contents are never parsed: stages are fakes) and a config with 2 corpus shards."""
    model = folder / "model-in"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for name in ("train.jsonl", "corpus.jsonl", "queries.tsv", "qrels.trec"):
        (folder / name).write_text(f"{name} v1\n")
    config = {
        "run_dir": str(folder / "run"),
        "model": {"model_name_or_path": str(model), "pooling": "mean", "normalize": True},
        "train": {"dataset_name": str(folder / "train.jsonl"), "learning_rate": 1e-3, "max_steps": 2}
        if train
        else None,
        "encode": {
            "corpus": str(folder / "corpus.jsonl"),
            "queries": str(folder / "queries.tsv"),
            "num_shards": 2,
        },
        "search": {"depth": 10},
        "eval": {"qrels": str(folder / "qrels.trec"), "metrics": ["MRR@10", "R@10"]},
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _outputs(lay: Layout, name: str) -> Path:
    """Where the fake stage writes its output (the real path for train/search/convert/eval)."""
    if name.startswith("encode_"):
        return lay.embeddings / f"{name}.json"
    if name.startswith("eval_"):  # the evaluation of a run that is not the final one
        return lay.run_metrics(name.removeprefix("eval_"))
    return {
        "train": lay.model / "dr_config.json",
        "search": lay.run,
        "convert": lay.root / "run.trec",
        "bm25": lay.bm25_run,
        "fuse": lay.fused_run,
        "rerank": lay.rerank_run,
        "eval": lay.metrics,
    }[name]


def _run(cfg_path: Path, *overrides: str, force: bool = False, fail: str | None = None) -> list[str]:
    """Run the pipeline in-process with fake stages; returns the names of the stages that ran."""
    cfg = load_config(cfg_path, list(overrides))
    lay = Layout(cfg["run_dir"])
    steps = build_steps(cfg)
    for step in steps:
        out = _outputs(lay, step.name)
        step.done = out.is_file
        if step.name.startswith("encode_"):  # the real check reads `dr encode` manifests
            real = step.invalidate
            step.invalidate = lambda real=real, out=out: (real(), out.unlink(missing_ok=True))
    ran: list[str] = []

    def execute(step) -> None:
        if step.name == fail:
            raise StageFailed(f"{step.name}: exit status 1")
        out = _outputs(lay, step.name)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(step.cmd))  # the output says which command made it
        ran.append(step.name)

    runner = Runner(cfg, quiet=True, force=force)
    runner.layout.logs.mkdir(parents=True, exist_ok=True)
    runner._execute = execute  # type: ignore[method-assign]
    runner.run(steps)
    return ran


def _assert_records_match_outputs(run_dir: Path) -> None:
    lay = Layout(str(run_dir))
    for name in ALL:
        record = read_json(record_path(lay.stages, name))
        out = _outputs(lay, name)
        if record is not None:  # a record exists only for outputs that its command produced
            assert json.loads(out.read_text()) == record["argv"], name


@pytest.mark.parametrize(
    ("overrides", "expected", "reason"),
    [
        (["search.depth=5"], AFTER_ENCODE, "search: rerun (search.depth: 10 -> 5)"),
        (
            ["eval.metrics=[nDCG@10]"],
            ["eval"],
            'eval: rerun (eval.metrics: ["MRR@10", "R@10"] -> ["nDCG@10"])',
        ),
        (["train.learning_rate=0.5"], ALL, "train: rerun (train.learning_rate: 0.001 -> 0.5)"),
        (["train.max_steps=3"], ALL, "train: rerun (train.max_steps: 2 -> 3)"),
        (["model.pooling=cls"], ALL, "train: rerun (model.pooling: mean -> cls)"),
        (["processes.search=2"], AFTER_ENCODE, "search: rerun (processes.search: 1 -> 2)"),
        (
            ["encode.query_flags.q_max_len=8"],
            ["encode_queries", *AFTER_ENCODE],
            "encode.query_flags.q_max_len",
        ),
        (["train.logging_steps=1", "train.report_to=none"], [], ""),  # logging flags change nothing
        (["stage_timeout_s=100", "env.X=1"], [], ""),
    ],
)
def test_a_changed_key_reruns_its_stage_and_everything_downstream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], expected: list[str], reason: str
) -> None:
    cfg_path = _fixture(tmp_path)
    assert _run(cfg_path) == ALL
    assert _run(cfg_path) == []  # nothing changed: everything reused
    capsys.readouterr()
    assert _run(cfg_path, *overrides) == expected
    out = capsys.readouterr().out
    assert reason in out
    for name in expected[1:]:
        assert f"{name}: rerun (" in out and "upstream" in out.split(f"{name}: rerun (")[1].split("\n")[0]
    _assert_records_match_outputs(tmp_path / "run")
    assert _run(cfg_path, *overrides) == []


def test_zero_shot_pooling_reruns_every_encode(tmp_path: Path) -> None:
    cfg_path = _fixture(tmp_path, train=False)
    assert _run(cfg_path) == ALL[1:]
    assert _run(cfg_path, "model.pooling=cls") == ALL[1:]
    assert _run(cfg_path, "model.pooling=cls", "search.depth=3") == AFTER_ENCODE


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("qrels.trec", ["eval"]),
        ("corpus.jsonl", ["encode_corpus[0/2]", "encode_corpus[1/2]", *AFTER_ENCODE]),
        ("queries.tsv", ["encode_queries", *AFTER_ENCODE]),
        ("train.jsonl", ALL),
        ("model-in/config.json", ALL),  # a model folder: by its members' content
    ],
)
def test_an_input_file_changed_in_place_reruns_its_readers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, expected: list[str]
) -> None:
    cfg_path = _fixture(tmp_path)
    assert _run(cfg_path) == ALL
    (tmp_path / name).write_text("changed in place, longer than before\n")
    capsys.readouterr()
    assert _run(cfg_path) == expected
    assert f"input {tmp_path / name.split('/')[0]} changed" in capsys.readouterr().out


def test_a_small_file_is_fingerprinted_by_content(tmp_path: Path) -> None:
    path = tmp_path / "qrels.trec"
    path.write_text("q 0 d 1\n")
    before = path_fingerprint(path)
    path.write_text("q 0 d 1\n")  # new mtime, same bytes
    assert path_fingerprint(path) == before
    path.write_text("q 0 e 1\n")  # same size, other bytes
    assert path_fingerprint(path) != before


def test_inputs_copied_again_with_new_mtimes_rerun_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dataset or model copied again (new mtimes and inodes, same bytes) reuses every stage: a
    fingerprint by mtime would retrain and delete the model it had. A hidden member (a download
    `.cache`) is not part of a folder's fingerprint."""
    cfg_path = _fixture(tmp_path)
    assert _run(cfg_path) == ALL
    for name in ("train.jsonl", "corpus.jsonl", "queries.tsv", "qrels.trec", "model-in/config.json"):
        path = tmp_path / name
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(data)  # a new file: new inode, ctime and mtime
        os.utime(path, (1_000_000_000, 1_000_000_000))
    (tmp_path / "model-in" / ".cache").mkdir()
    (tmp_path / "model-in" / ".cache" / "download.lock").write_text("now")
    capsys.readouterr()
    assert _run(cfg_path) == []
    # The same bytes are still the test: a folder member's content change reruns everything.
    (tmp_path / "model-in" / "config.json").write_text("{ }")
    assert _run(cfg_path) == ALL


def _as_version_1(cfg_path: Path) -> None:
    """Rewrite every stage record as dr before content fingerprints wrote it (version 1, inputs by mtime)."""
    cfg = load_config(cfg_path, [])
    stages, printer = Layout(cfg["run_dir"]).stages, Fingerprinter(cfg["run_dir"])
    v1: dict[str, str] = {}
    for step in build_steps(cfg):
        record = read_json(record_path(stages, step.name))
        assert record is not None
        payload = printer.payload(step, {u: v1[u] for u in step.upstream}, version=1)
        v1[step.name] = fingerprint_of(payload)
        old = {**record, **payload, "version": 1, "fingerprint": v1[step.name], "finished": "then"}
        record_path(stages, step.name).write_text(json.dumps(old))


def test_records_of_an_older_dr_are_upgraded_while_inputs_are_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Upgrading dr must not retrain: a version-1 record (inputs by mtime) that still matches its inputs is
    rewritten in today's format, its outputs kept; once an input's mtime moved, v1 cannot tell a copy from
    an edit, so the stage reruns and says why."""
    cfg_path = _fixture(tmp_path)
    assert _run(cfg_path) == ALL
    stages = Layout(str(tmp_path / "run")).stages
    today = {name: read_json(record_path(stages, name))["fingerprint"] for name in ALL}
    _as_version_1(cfg_path)
    capsys.readouterr()
    assert _run(cfg_path) == []
    assert (
        "train: skip (record made by an older dr, inputs untouched; record upgraded)"
        in capsys.readouterr().out
    )
    for name in ALL:
        record = read_json(record_path(stages, name))
        assert (
            record["version"] == 2 and record["fingerprint"] == today[name] and record["finished"] == "then"
        )
    assert _run(cfg_path) == []

    _as_version_1(cfg_path)
    model_file = tmp_path / "model-in" / "config.json"
    os.utime(model_file, (1_000_000_000, 1_000_000_000))  # same bytes, but v1 sees only the mtime
    capsys.readouterr()
    assert _run(cfg_path) == ALL
    assert "train: rerun (stage record made by an older dr" in capsys.readouterr().out


def test_a_run_directory_without_records_is_not_reused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run directories of the previous dr have outputs but no stage records: everything reruns."""
    cfg_path = _fixture(tmp_path)
    assert _run(cfg_path) == ALL
    for path in (tmp_path / "run" / "stages").iterdir():
        path.unlink()
    capsys.readouterr()
    assert _run(cfg_path) == ALL
    assert "train: rerun (no stage record" in capsys.readouterr().out


def test_a_failed_rerun_leaves_no_record_of_outputs_it_did_not_make(tmp_path: Path) -> None:
    cfg_path = _fixture(tmp_path)
    run_dir = tmp_path / "run"
    _run(cfg_path)
    (run_dir / "config.json").write_text("{}")  # what run_pipeline writes after a successful run
    with pytest.raises(StageFailed):
        _run(cfg_path, "search.depth=5", fail="search")
    stages = Layout(str(run_dir)).stages
    assert {p.name for p in stages.iterdir()} == {
        "train.json",
        "encode_corpus_0_2.json",
        "encode_corpus_1_2.json",
        "encode_queries.json",
        "search.running.json",
    }
    assert not (run_dir / "run.tevatron.txt").exists() and not (run_dir / "metrics.json").exists()
    assert not (run_dir / "config.json").exists()  # it would claim the new config made the old outputs
    _assert_records_match_outputs(run_dir)
    assert _run(cfg_path, "search.depth=5") == AFTER_ENCODE  # then it resumes where it failed


def test_train_resumes_only_checkpoints_of_its_own_fingerprint(tmp_path: Path) -> None:
    cfg_path = _fixture(tmp_path)
    lay = Layout(str(tmp_path / "run"))
    with pytest.raises(StageFailed):  # killed mid-training: a checkpoint, no record
        _run(cfg_path, fail="train")
    (lay.model / "checkpoint-1").mkdir(parents=True)
    steps = build_steps(load_config(cfg_path))
    [train] = [d for d in plan(steps, lay.stages, lay.root) if d.step.name == "train"]
    assert train.rerun and train.resume and "--resume_from_checkpoint" in train.step.cmd
    assert "resuming" in train.reason
    assert _run(cfg_path) == ALL  # resumes: the checkpoint is kept and --resume_from_checkpoint passed
    assert (lay.model / "checkpoint-1").is_dir()
    assert "--resume_from_checkpoint" in read_json(record_path(lay.stages, "train"))["argv"]
    with pytest.raises(StageFailed):  # killed again, now under the old learning rate
        _run(cfg_path, "train.max_steps=5", fail="train")
    (lay.model / "checkpoint-1").mkdir(parents=True)

    # Another learning rate: the checkpoint belongs to the old config and must go.
    steps = build_steps(load_config(cfg_path, ["train.learning_rate=0.5"]))
    [train] = [d for d in plan(steps, lay.stages, lay.root) if d.step.name == "train"]
    assert train.rerun and not train.resume
    assert _run(cfg_path, "train.learning_rate=0.5") == ALL
    assert not (lay.model / "checkpoint-1").exists()
    assert "--resume_from_checkpoint" not in read_json(record_path(lay.stages, "train"))["argv"]


def test_outputs_finished_just_before_a_kill_are_adopted(tmp_path: Path) -> None:
    """Killed after a stage's outputs were complete but before its record was written: same fingerprint
    (its running marker) and complete outputs -> reused, record written then."""
    cfg_path = _fixture(tmp_path)
    lay = Layout(str(tmp_path / "run"))
    _run(cfg_path)
    record = record_path(lay.stages, "search")
    running_path(lay.stages, "search").write_bytes(record.read_bytes())
    record.unlink()
    for name in ("convert", "eval"):  # what the runner had deleted before search started
        record_path(lay.stages, name).unlink()
    assert _run(cfg_path) == ["convert", "eval"]
    assert record.is_file() and not running_path(lay.stages, "search").exists()


def test_incomplete_outputs_rerun_the_stage_and_its_dependents(tmp_path: Path) -> None:
    cfg_path = _fixture(tmp_path)
    _run(cfg_path)
    (tmp_path / "run" / "run.tevatron.txt").unlink()  # same fingerprint, output gone
    assert _run(cfg_path) == AFTER_ENCODE


def test_fingerprints_chain_through_upstream_stages(tmp_path: Path) -> None:
    """eval's fingerprint covers convert's, which covers search's: a depth change reaches eval even if
    a record downstream survived."""
    cfg_path = _fixture(tmp_path)
    lay = Layout(str(tmp_path / "run"))
    before = {d.step.name: d for d in plan(build_steps(load_config(cfg_path)), lay.stages, lay.root)}
    after = {
        d.step.name: d
        for d in plan(build_steps(load_config(cfg_path, ["search.depth=5"])), lay.stages, lay.root)
    }
    assert before["eval"].payload["upstream"] == {"convert": before["convert"].fingerprint}
    assert before["eval"].fingerprint != after["eval"].fingerprint
    assert before["encode_queries"].fingerprint == after["encode_queries"].fingerprint


def test_records_of_stages_no_longer_in_the_config_are_removed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg_path = _fixture(tmp_path)
    _run(cfg_path)
    capsys.readouterr()
    expected = ["encode_corpus[0/1]", *AFTER_ENCODE]  # not train, not the queries
    assert _run(cfg_path, "encode.num_shards=1") == expected
    assert "search: rerun (encode.num_shards: 2 -> 1;" in capsys.readouterr().out
    names = {p.name for p in (tmp_path / "run" / "stages").iterdir()}
    assert "encode_corpus_0_1.json" in names and "encode_corpus_1_2.json" not in names


def test_force_reruns_everything(tmp_path: Path) -> None:
    cfg_path = _fixture(tmp_path)
    _run(cfg_path)
    assert _run(cfg_path, force=True) == ALL


def test_dry_run_says_reuse_or_rerun_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("dr.pipeline.steps.manifest_complete", lambda layout: True)  # fake encodes
    cfg_path = _fixture(tmp_path)
    assert command("pipeline")([str(cfg_path), "--dry_run"]) == 0
    assert "train: rerun (no stage record" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()
    _run(cfg_path)
    before = sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "run").rglob("*"))
    assert command("pipeline")([str(cfg_path), "--dry_run", "--set", "search.depth=50"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith(("  ", "{", "}", '"'))]
    assert "train: reuse" in lines and "encode_queries: reuse" in lines
    assert "search: rerun (search.depth: 10 -> 50)" in lines
    assert "convert: rerun (upstream search changed)" in lines
    assert "eval: rerun (upstream search changed)" in lines
    assert sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "run").rglob("*")) == before


def test_split_command() -> None:
    torchrun = [
        "py",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "dr.encode",
        "--x",
        "1",
    ]
    assert split_command(torchrun) == ("dr.encode", 2, ["--x", "1"])
    assert split_command(["py", "-m", "dr.search", "--depth", "3"]) == ("dr.search", 1, ["--depth", "3"])
