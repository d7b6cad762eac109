"""The package's shape and its conventions (issue 10): torch-free modules, one CLI and error convention,
one input resolver, one precedence rule for model settings, and the bugs found while unifying them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dr.cli import COMMANDS
from dr.errors import InputError, UsageError
from dr.io.corpus import CorpusError, load_corpus
from dr.model.encoder import BiEncoder, EncoderConfig
from dr.train.groups import DataError, load_train_groups
from tests.helpers import (
    REPO,
    as_flags,
    command,
    make_train_rows,
    run,
    subprocess_env,
    torchrun,
    write_jsonl,
)

PYTHON = sys.executable


# ---- torch only where it is needed ------------------------------------------------------------------
def test_shards_search_eval_and_the_cli_import_no_torch():
    """`python -c "import dr.io.shards"` (and the CPU search, eval, pipeline, the CLI) never import torch."""
    modules = "dr.io.shards, dr.search.cli, dr.search.shard_set, dr.eval.eval_cli, dr.pipeline.cli, dr.cli"
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    proc = subprocess.run(
        [PYTHON, "-c", code], capture_output=True, text=True, env=subprocess_env(), check=True
    )
    assert proc.stdout.strip() == "False", proc.stderr


def _imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function (`from a import b`: a and a.b)."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_model_settings_and_st_format_do_not_import_the_model():
    """No import cycle encoder <-> st_format: both take `EncoderConfig` and the subfolder names from
    `dr.model.config`, which imports neither (nor torch: reading a folder's settings needs no model)."""
    for name in ("config", "st_format"):
        imported = _imported_modules(REPO / "dr" / "model" / f"{name}.py")
        assert "dr.model.encoder" not in imported and "torch" not in imported, name
    from dr.model import config, encoder, st_format

    assert encoder.EncoderConfig is st_format.EncoderConfig is config.EncoderConfig  # old names still work
    assert (encoder.QUERY_SUBDIR, encoder.PASSAGE_SUBDIR) == ("query_model", "passage_model")
    code = "import sys, dr.model.st_format, dr.model.config; print('torch' in sys.modules)"
    proc = subprocess.run(
        [PYTHON, "-c", code], capture_output=True, text=True, env=subprocess_env(), check=True
    )
    assert proc.stdout.strip() == "False", proc.stderr


# ---- one CLI convention -------------------------------------------------------------------------------
HELP_FLAGS = {
    "train": "--train_n_passages",
    "encode": "--encode_is_qry",
    "search": "--passage_reps",
    "convert": "--run_format",
    "eval": "--metrics",
    "mine": "--n_negatives",
    "score": "--teacher_type",
    "pipeline": "--force",
    "demo": "--small",
    "quantize": "--output_dir",
    "bm25": "--index_dir",
    "fuse": "--rrf_k",
    "index": "--index_factory",
    "rerank": "--input_run_format",
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_help_shows_its_flags(name):
    proc = subprocess.run(
        [PYTHON, "-m", "dr.cli", name, "--help"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert HELP_FLAGS[name] in proc.stdout and f"dr {name}" in proc.stdout


REQUIRED = {
    "search": ["--query_reps", "q", "--save_ranking_to", "r"],
    "convert": ["--input", "i", "--output", "o"],
    "eval": ["--qrels", "q", "--run", "r"],
    "mine": ["--run", "r", "--queries", "q", "--qrels", "x", "--corpus", "c", "--output", "o"],
    "pipeline": ["cfg.yaml"],
    "encode": ["--model_name_or_path", "m"],
    "score": ["--model_name_or_path", "m", "--teacher_type", "bi", "--dataset_name", "d", "--output", "o"],
    "quantize": ["--passage_reps", "p", "--quantize", "int8"],
    "rerank": [
        "--model_name_or_path",
        "m",
        "--run",
        "r",
        "--corpus",
        "c",
        "--queries",
        "q",
        "--save_ranking_to",
        "o",
    ],
}


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_an_unknown_flag_is_a_usage_error_everywhere(name, capsys):
    assert command(name)([*REQUIRED[name], "--no_such_flag", "1"]) == 2
    err = capsys.readouterr().err
    assert f"dr {name}: error:" in err and "no_such_flag" in err and "Traceback" not in err


def test_bad_files_exit_1_and_bad_flags_exit_2_in_every_stage(tmp_path, tiny_model_dir, capsys):
    missing = str(tmp_path / "missing.jsonl")
    train = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "m")]
    assert command("train")([*train, "--dataset_name", missing]) == 1
    encode = ["--model_name_or_path", str(tiny_model_dir), "--encoded_save_path", str(tmp_path / "e")]
    assert command("encode")([*encode, "--dataset_name", missing]) == 1
    assert (
        command("search")(["--query_reps", missing, "--passage_reps", missing, "--save_ranking_to", "r"]) == 1
    )
    assert command("train")([*train, "--dataset_name", missing, "--pooling", "max"]) == 2
    assert command("encode")([*encode, "--dataset_name", missing, "--embedding_dtype", "int4"]) == 2
    assert (
        command("search")(
            ["--query_reps", missing, "--save_ranking_to", "r", "--depth", "0", "--passage_reps", "x"]
        )
        == 2
    )
    assert command("demo")(["--config", str(tmp_path / "no.yaml")]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert issubclass(DataError, InputError) and issubclass(CorpusError, InputError)


def test_booleans_and_config_files_work_the_same_for_argparse_commands(tmp_path):
    """`--flag false` and `--config FILE` are accepted by every command, not only train/encode."""
    from dr.flags import parse_flags
    from dr.search.cli import build_parser

    config = tmp_path / "search.yaml"
    config.write_text("query_reps: q.arrow\npassage_reps: p.arrow\ndepth: 7\nformat: trec\n")
    args = parse_flags(
        build_parser(), ["--config", str(config), "--save_ranking_to", "r", "--save_text", "false"]
    )
    assert (args.depth, args.run_format, args.save_text) == (7, "trec", False)  # old spelling `format` works
    args = parse_flags(
        build_parser(), ["--query_reps", "q", "--save_ranking_to", "r", "--quiet", "--run_format", "marco"]
    )
    assert args.quiet is True and args.run_format == "marco"
    with pytest.raises(UsageError, match="boolean"):
        parse_flags(build_parser(), ["--query_reps", "q", "--save_ranking_to", "r", "--quiet", "maybe"])


# ---- one input resolver: training takes what encoding takes -------------------------------------------
def test_training_reads_gzipped_jsonl_and_arrow_as_encode_does(tmp_path):
    import gzip

    import datasets

    rows = make_train_rows(3, n_negatives=2)
    gz = tmp_path / "train.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    assert len(load_train_groups(str(gz), group_size=3)) == 3
    arrow_dir = tmp_path / "arrow"
    datasets.Dataset.from_list(rows).save_to_disk(str(arrow_dir))
    arrow_file = next(arrow_dir.glob("*.arrow"))
    assert len(load_train_groups(str(arrow_file), group_size=3)) == 3
    (tmp_path / "queries.tsv").write_text("1\tq\n")
    with pytest.raises(DataError, match="cannot hold training groups"):
        load_train_groups(str(tmp_path / "queries.tsv"), group_size=3)


def _beir_folder(folder: Path, queries: dict[str, str]) -> Path:
    folder.mkdir()
    write_jsonl(
        folder / "corpus.jsonl", [{"_id": f"d{i}", "title": "", "text": f"doc {i}"} for i in range(20)]
    )
    (folder / "qrels.test.trec").write_text("q1 0 d1 1\n")
    (folder / "qrels.train.trec").write_text("q0 0 d0 1\n")
    for name, text in queries.items():
        (folder / name).write_text(text)
    return folder


def test_a_queries_file_without_the_split_names_the_split(tmp_path):
    """Bug 4: a queries.jsonl whose split column lacks the split failed with 'not enough values to unpack'."""
    folder = _beir_folder(
        tmp_path / "beir", {"queries.jsonl": '{"_id": "q0", "text": "zero", "split": "train"}\n'}
    )
    with pytest.raises(DataError, match=r"no query of split 'test' \(its splits: \['train'\]\)"):
        load_train_groups(str(folder), split="test", group_size=2)
    with pytest.raises(CorpusError, match="no query of split 'test'"):
        load_corpus(str(folder), "query", split="test")
    assert load_corpus(str(folder), "query", split="train").records(0, 1) == (["q0"], ["zero"])


def test_a_folder_without_the_split_s_queries_says_so(tmp_path):
    """Bug 5: a BEIR folder without queries.<split>.* reported 'mixes file formats'."""
    folder = _beir_folder(tmp_path / "beir", {"queries.train.tsv": "q0\tzero\n"})
    with pytest.raises(CorpusError, match="no queries for split 'test'"):
        load_corpus(str(folder), "query", split="test")
    with pytest.raises(DataError, match="no queries for split 'test'"):
        load_train_groups(str(folder), split="test", group_size=2)


# ---- model settings: flag > dr_config.json > default, once ----------------------------------------------
def test_settings_resolve_flag_over_saved_over_default():
    saved = EncoderConfig(pooling="mean", query_prefix="query: ", passage_prefix="passage: ", q_max_len=20)
    resolved = EncoderConfig.resolve(saved, {"pooling": None, "query_prefix": "", "p_max_len": 64})
    assert resolved.pooling == "mean" and resolved.q_max_len == 20  # unset flags inherit
    assert resolved.query_prefix == "" and resolved.passage_prefix == "passage: "  # "" clears
    assert resolved.p_max_len == 64
    assert EncoderConfig.resolve(None, {}).pooling == "cls"


def test_dr_config_is_written_atomically(tmp_path, monkeypatch):
    """Bug 6: dr_config.json marks a complete model; a crash while writing it must not leave it behind."""
    import dr.io.atomic

    def crash(*_):
        raise OSError("disk full")

    monkeypatch.setattr(dr.io.atomic.os, "replace", crash)
    with pytest.raises(OSError):
        EncoderConfig().save(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_fine_tuning_keeps_saved_prefixes_and_encode_can_clear_them(tiny_model_dir, tmp_path):
    """Bug 9: prefixes saved in a dr folder were dropped when fine-tuning from it; encode could not clear one."""
    start = tmp_path / "start"
    model = BiEncoder.from_pretrained(
        str(tiny_model_dir), {"query_prefix": "query: ", "passage_prefix": "passage: "}
    )
    from dr.model.text import load_tokenizer

    model.save(start, tokenizer=load_tokenizer(str(tiny_model_dir)))
    data = write_jsonl(tmp_path / "train.jsonl", make_train_rows(4, n_negatives=2))
    out = tmp_path / "tuned"
    flags = as_flags(
        model_name_or_path=start,
        dataset_name=data,
        output_dir=out,
        max_steps=1,
        per_device_train_batch_size=2,
        train_n_passages=2,
        save_strategy="no",
        report_to="none",
    )
    assert command("train")(flags) == 0
    saved = json.loads((out / "dr_config.json").read_text())
    assert (saved["query_prefix"], saved["passage_prefix"]) == ("query: ", "passage: ")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"docid": "a", "text": "apple"}])
    base = tmp_path / "emb" / "corpus"
    encode = [
        "--model_name_or_path",
        str(out),
        "--dataset_name",
        str(corpus),
        "--encoded_save_path",
        str(base),
    ]
    assert command("encode")([*encode, "--passage_prefix", ""]) == 0
    assert json.loads(Path(f"{base}.config.json").read_text())["resolved"]["prefix"] == ""
    assert command("encode")([*encode, "--overwrite"]) == 0
    assert json.loads(Path(f"{base}.config.json").read_text())["resolved"]["prefix"] == "passage: "


# ---- pipeline --force --------------------------------------------------------------------------------
def test_pipeline_force_retrains_instead_of_resuming(tmp_path):
    """Bug 1: --force ran the train step unchanged: `dr train` refused the folder or resumed a checkpoint."""
    from dr.pipeline import build_steps, resolve_config

    cfg = resolve_config(
        {
            "run_dir": str(tmp_path / "run"),
            "model": {"model_name_or_path": "m"},
            "train": {"dataset_name": "d.jsonl"},
            "encode": {"corpus": "c.jsonl", "queries": "q.tsv"},
            "eval": {"qrels": "qrels.trec"},
        }
    )
    model_dir = tmp_path / "run" / "model"
    (model_dir / "checkpoint-5").mkdir(parents=True)
    (model_dir / "dr_config.json").write_text("{}")
    train = build_steps(cfg)[0]
    assert train.done() and "--resume_from_checkpoint" in train.cmd
    train.invalidate()  # what the runner does for every step under --force
    assert not train.done() and not model_dir.exists()
    assert "--resume_from_checkpoint" not in train.cmd


# ---- distributed -------------------------------------------------------------------------------------
SLOW_INDEX_BUILD = """
import os, sys, time
import dr.index.build as ann
import dr.search.cli as search_cli
from dr.cli import module_main

build = ann.build_index
def slow_build(*args, **kwargs):  # longer than the process-group timeout of this test
    time.sleep(8)
    return build(*args, **kwargs)
search_cli.build_index = slow_build
raise SystemExit(module_main("search"))
"""


@pytest.mark.slow
def test_multi_rank_index_build_does_not_hold_other_ranks_in_a_collective(tmp_path):
    """Bug 7: with --index_factory, rank 1 waited in the teardown barrier while rank 0 built the index; a
    build longer than the process-group timeout failed the job."""
    from dr.io.shards import ShardMeta, write_shard

    rng = np.random.default_rng(0)
    write_shard(
        tmp_path / "corpus.arrow",
        ShardMeta("m", "cls", False, 8, "float32", 8, "passage", 64),
        [f"d{i}" for i in range(64)],
        rng.standard_normal((64, 8)),
    )
    write_shard(
        tmp_path / "q.arrow",
        ShardMeta("m", "cls", False, 8, "float32", 8, "query", 3),
        ["q0", "q1", "q2"],
        rng.standard_normal((3, 8)),
    )
    script = tmp_path / "slow_search.py"
    script.write_text(SLOW_INDEX_BUILD)
    run_file = tmp_path / "run.txt"
    argv = [
        "--query_reps",
        str(tmp_path / "q.arrow"),
        "--passage_reps",
        str(tmp_path / "corpus.arrow"),
        "--index_factory",
        "Flat",
        "--depth",
        "5",
        "--save_ranking_to",
        str(run_file),
    ]
    run(torchrun(2) + [str(script), *argv], timeout=240, DR_PROCESS_GROUP_TIMEOUT_S="3")
    assert len(run_file.read_text().splitlines()) == 15


def _masked_logged(out: Path) -> int:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return next(entry["masked_false_negatives"] for entry in history if "masked_false_negatives" in entry)


@pytest.mark.slow
def test_logged_false_negative_count_is_global(tiny_model_dir, tmp_path):
    """Bug 8: the logged masked_false_negatives was rank 0's own count. Every query's positive is also a
    hard negative of another query: 4 masked pairs in the global batch, 2 on each of 2 ranks."""
    rows = make_train_rows(4, n_negatives=2, seed=1)
    for i, row in enumerate(rows):
        row["negative_passages"][0] = dict(rows[(i + 1) % 4]["positive_passages"][0])
    data = write_jsonl(tmp_path / "train.jsonl", rows)

    def flags(out: Path, batch: int) -> list[str]:
        return as_flags(
            model_name_or_path=tiny_model_dir,
            dataset_name=data,
            output_dir=out,
            max_steps=1,
            per_device_train_batch_size=batch,
            train_n_passages=3,
            save_strategy="no",
            logging_steps=1,
            report_to="none",
            seed=3,
        )

    run([PYTHON, "-m", "dr.train", *flags(tmp_path / "one", 4)])
    run(torchrun(2) + ["-m", "dr.train", *flags(tmp_path / "two", 2)], timeout=400)
    assert _masked_logged(tmp_path / "one") == 4
    assert _masked_logged(tmp_path / "two") == 4


def test_gathered_sum_needs_no_group():
    from dr.distributed import all_reduce_sum

    assert int(all_reduce_sum(torch.tensor(3))) == 3


def test_run_phases_sets_up_works_then_publishes_and_publishes_nothing_after_a_failure(monkeypatch):
    """`dr score` / `dr rerank`'s shape (`dr.distributed.run_phases`), one process: rank 0 of 1."""
    from dr.distributed import run_phases

    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    done: list = []
    run_phases(lambda rank, world: done.append(("setup", rank, world)) or "plan",
               lambda plan: done.append(("work", plan)), lambda plan: done.append(("publish", plan)))  # fmt: skip
    assert done == [("setup", 0, 1), ("work", "plan"), ("publish", "plan")]

    def fail(plan: str) -> None:
        raise InputError("bad row")

    done.clear()
    with pytest.raises(InputError, match="bad row"):
        run_phases(lambda rank, world: "plan", fail, lambda plan: done.append(("publish", plan)))
    assert done == []


def test_repository_entry_points_exist():
    for module in (
        "dr/train/__main__.py",
        "dr/encode/__main__.py",
        "dr/search/__main__.py",
        "dr/convert.py",
        "dr/evaluate.py",
    ):
        assert (REPO / module).is_file()
