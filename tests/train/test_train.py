"""`dr train` in one process: learning, resume, configuration, bad data, data sources."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel

from dr.flags import ConfigError, DataArguments, ModelArguments
from dr.flags import parse_dataclasses as parse_args
from dr.model.encoder import BiEncoder
from dr.model.text import load_tokenizer
from dr.train.args import DRTrainingArguments
from dr.train.groups import DataError, TrainGroups, load_train_groups
from tests.helpers import command

train_main = command("train")
from tests.helpers import REPO, SHARED_DATA, TOPICS, make_train_rows, run, subprocess_env, write_jsonl

REFERENCE_FLAGS = [
    "--output_dir",
    "model_msmarco",
    "--model_name_or_path",
    "bert-base-uncased",
    "--save_steps",
    "20000",
    "--dataset_name",
    "Tevatron/msmarco-passage",
    "--fp16",
    "--per_device_train_batch_size",
    "8",
    "--train_n_passages",
    "8",
    "--learning_rate",
    "5e-6",
    "--q_max_len",
    "16",
    "--p_max_len",
    "128",
    "--num_train_epochs",
    "3",
    "--logging_steps",
    "500",
    "--overwrite_output_dir",
]
ARG_TYPES = (ModelArguments, DataArguments, DRTrainingArguments)


def _train(model_dir: Path, data: Path, out: Path, *extra: str) -> int:
    return train_main(
        [
            "--model_name_or_path",
            str(model_dir),
            "--dataset_name",
            str(data),
            "--output_dir",
            str(out),
            "--q_max_len",
            "16",
            "--p_max_len",
            "32",
            "--seed",
            "11",
            "--logging_steps",
            "1",
            *extra,
        ]
    )


# ---- 3. learning -------------------------------------------------------------------------------------
def _top1_accuracy(model_dir: Path) -> float:
    """Each topic query against one unseen passage per topic: fraction ranking its own topic first."""
    model = BiEncoder.from_pretrained(str(model_dir)).eval()
    tokenizer = load_tokenizer(str(model_dir))
    queries = [f"what about {t}" for t in TOPICS]
    passages = [f"notes {t} with {t} in a story" for t in TOPICS]
    with torch.no_grad():
        q = model.encode_query(dict(tokenizer(queries, padding=True, return_tensors="pt")))
        p = model.encode_passage(dict(tokenizer(passages, padding=True, return_tensors="pt")))
    return float(((q @ p.T).argmax(1) == torch.arange(len(TOPICS))).float().mean())


def test_training_lowers_loss_and_improves_retrieval(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", make_train_rows(120, n_negatives=3))
    start = tmp_path / "start"
    BiEncoder.from_pretrained(str(tiny_model_dir), {"pooling": "mean", "normalize": True}).save(
        start, tokenizer=load_tokenizer(str(tiny_model_dir))
    )
    before = _top1_accuracy(start)
    out = tmp_path / "out"
    assert (
        _train(
            start,
            data,
            out,
            "--per_device_train_batch_size",
            "8",
            "--train_n_passages",
            "4",
            "--learning_rate",
            "3e-3",
            "--num_train_epochs",
            "4",
            "--temperature",
            "0.05",
            "--save_strategy",
            "no",
        )
        == 0
    )
    losses = [
        e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e
    ]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    after = _top1_accuracy(out)
    assert after >= 0.9 and after > before + 0.2, (before, after)
    saved = json.loads((out / "dr_config.json").read_text())
    assert saved["pooling"] == "mean" and saved["normalize"] is True and saved["temperature"] == 0.05
    assert (out / "dr_train_args.json").is_file() and (out / "model.safetensors").is_file()


# ---- 4. resume ---------------------------------------------------------------------------------------
def test_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    """6 steps in one go == 3 steps, a crash, and a resume to 6 (crossing an epoch boundary mid-way)."""
    data = write_jsonl(tmp_path / "train.jsonl", make_train_rows(8, n_negatives=5))
    flags = [
        "--per_device_train_batch_size",
        "2",
        "--train_n_passages",
        "3",
        "--learning_rate",
        "1e-3",
        "--max_steps",
        "6",
        "--save_steps",
        "3",
        "--pooling",
        "mean",
    ]
    full = tmp_path / "full"
    assert _train(tiny_model_dir, data, full, *flags) == 0
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")  # what survived the "crash"
    assert _train(tiny_model_dir, data, resumed, *flags, "--resume_from_checkpoint", "latest") == 0
    expected = AutoModel.from_pretrained(full).state_dict()
    got = AutoModel.from_pretrained(resumed).state_dict()
    halfway = AutoModel.from_pretrained(full / "checkpoint-3").state_dict()
    assert max((expected[k] - halfway[k]).abs().max().item() for k in expected) > 1e-4
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)


def test_existing_output_needs_overwrite_or_resume(tiny_model_dir, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "dr_config.json").write_text("{}")
    data = write_jsonl(tmp_path / "train.jsonl", make_train_rows(4))
    assert _train(tiny_model_dir, data, out, "--max_steps", "1") == 2
    assert "--overwrite_output_dir" in caplog.text


# ---- 5. configuration --------------------------------------------------------------------------------
def test_reference_flags_parse():
    model, data, training = parse_args(ARG_TYPES, REFERENCE_FLAGS)
    assert model.model_name_or_path == "bert-base-uncased" and data.dataset_name == "Tevatron/msmarco-passage"
    assert (training.per_device_train_batch_size, data.train_n_passages, training.learning_rate) == (
        8,
        8,
        5e-6,
    )
    assert (data.q_max_len, data.p_max_len, training.num_train_epochs) == (16, 128, 3)
    assert training.fp16 and training.overwrite_output_dir and training.save_steps == 20000
    assert training.logging_steps == 500 and training.negatives_x_device


def test_home_relative_flag_values_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"output_dir": "~/out", "model_name_or_path": "~/model"}))
    model, data, training = parse_args(ARG_TYPES, ["--config", str(config), "--dataset_name=~/d.jsonl"])
    assert (model.model_name_or_path, data.dataset_name) == (f"{tmp_path}/model", f"{tmp_path}/d.jsonl")
    assert training.output_dir == f"{tmp_path}/out"


def test_newer_spellings_and_extra_flags():
    _, data, training = parse_args(
        ARG_TYPES,
        [
            "--output_dir",
            "o",
            "--model_name_or_path",
            "m",
            "--train_group_size",
            "4",
            "--query_max_len",
            "20",
            "--passage_max_len",
            "64",
            "--query_prefix",
            "query: ",
            "--negatives_x_device",
            "false",
            "--bf16",
            "--gradient_checkpointing",
            "--max_steps",
            "5",
            "--seed",
            "3",
        ],
    )
    assert (data.train_n_passages, data.q_max_len, data.p_max_len, data.query_prefix) == (
        4,
        20,
        64,
        "query: ",
    )
    assert not training.negatives_x_device and training.bf16 and training.gradient_checkpointing
    model, _, _ = parse_args(
        ARG_TYPES,
        [
            "--output_dir",
            "o",
            "--model_name_or_path",
            "m",
            "--pooling",
            "last",
            "--normalize",
            "--untie_encoder",
            "--temperature",
            "0.02",
        ],
    )
    assert (model.pooling, model.normalize, model.untie_encoder, model.temperature) == (
        "last",
        True,
        True,
        0.02,
    )


def test_config_file_with_command_line_override(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model_name_or_path: m\noutput_dir: o\ntrain_group_size: 3\nlearning_rate: 0.001\n")
    model, data, training = parse_args(ARG_TYPES, ["--config", str(config), "--learning_rate", "2e-3"])
    assert model.model_name_or_path == "m" and data.train_n_passages == 3 and training.learning_rate == 2e-3
    as_json = tmp_path / "c.json"
    as_json.write_text(json.dumps({"model_name_or_path": "m", "output_dir": "o", "q_max_len": 9}))
    assert parse_args(ARG_TYPES, ["--config", str(as_json)])[1].q_max_len == 9


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bogus_flag", "1"], "unknown arguments"),
        (["--pooling", "max"], "--pooling"),
        (["--q_max_len", "0"], "--q_max_len"),
        (["--q_max_len", "abc"], "invalid int value"),
        (["--temperature", "-1"], "--temperature"),
    ],
)
def test_bad_flags_fail_clearly(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(ARG_TYPES, ["--output_dir", "o", "--model_name_or_path", "m", *argv])


def test_bad_config_file_keys(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model_name_or_path: m\noutput_dir: o\nlearning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rat"):
        parse_args(ARG_TYPES, ["--config", str(config)])


def test_bad_flag_exit_code_from_the_command_line(tmp_path):
    proc = run(
        [
            sys.executable,
            "-m",
            "dr.train",
            "--output_dir",
            str(tmp_path),
            "--model_name_or_path",
            "m",
            "--pooling",
            "max",
        ],
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2 and "--pooling must be one of" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- 6. bad data -------------------------------------------------------------------------------------
def _rows_with(change) -> list[dict]:
    rows = make_train_rows(4)
    change(rows)
    return rows


BAD_DATA = {
    "missing_field": (lambda rows: [r.pop("query") for r in rows], "field 'query' is missing"),
    "empty_positives": (
        lambda rows: rows[2].update(positive_passages=[]),
        "row 3 (line 3): field 'positive_passages' is empty",
    ),
    "null_query": (lambda rows: rows[1].update(query=None), "row 2 (line 2): field 'query' is null"),
    "wrong_type": (lambda rows: rows[1].update(query=123), "query"),
    "wrong_type_everywhere": (
        lambda rows: [r.update(query=7) for r in rows],
        "field 'query' must be a string",
    ),
    "passage_not_object": (
        lambda rows: [r.update(positive_passages=["text"]) for r in rows],
        "positive_passages",
    ),
    "no_negatives": (
        lambda rows: rows[3].update(negative_passages=[]),
        "row 4 (line 4): field 'negative_passages' is empty",
    ),
    "passage_text_missing": (
        lambda rows: rows[1]["negative_passages"][1].pop("text"),
        "row 2 (line 2): field 'negative_passages[].text'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_fails_with_file_row_and_field(tiny_model_dir, tmp_path, caplog, case):
    change, message = BAD_DATA[case]
    data = write_jsonl(tmp_path / f"{case}.jsonl", _rows_with(change))
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        code = _train(tiny_model_dir, data, out, "--max_steps", "1", "--train_n_passages", "3")
    assert code == 1
    assert str(data) in caplog.text
    assert any(message in r.getMessage() for r in caplog.records), caplog.text
    assert not (out / "dr_config.json").exists() and not (out / "model.safetensors").exists()


@pytest.mark.parametrize("name", ["missing.jsonl", "./nope/train", "/no/such/folder"])
def test_missing_local_data_is_not_looked_up_on_the_hub(tiny_model_dir, tmp_path, caplog, name):
    assert _train(tiny_model_dir, name, tmp_path / "out", "--max_steps", "1") == 1  # type: ignore[arg-type]
    assert f"{name}: no such file or folder" in caplog.text and "hub" not in caplog.text.lower()


def test_empty_file(tiny_model_dir, tmp_path, caplog):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    assert _train(tiny_model_dir, data, tmp_path / "out", "--max_steps", "1") == 1
    assert f"{data}: file is empty" in caplog.text


def test_bad_data_exit_code_from_the_command_line(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", _rows_with(lambda rows: rows[2].update(positive_passages=[])))
    proc = run(
        [
            sys.executable,
            "-m",
            "dr.train",
            "--model_name_or_path",
            str(tiny_model_dir),
            "--dataset_name",
            str(data),
            "--output_dir",
            str(tmp_path / "out"),
        ],
        check=False,
        timeout=120,
    )
    assert proc.returncode == 1 and "row 3" in proc.stderr and "positive_passages" in proc.stderr


# ---- data sources and sampling ---------------------------------------------------------------------------
def test_groups_are_deterministic_per_seed_epoch_and_item(tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", make_train_rows(6, n_negatives=6))
    groups = TrainGroups(load_train_groups(str(data), group_size=4), group_size=4, seed=1)
    again = TrainGroups(load_train_groups(str(data), group_size=4), group_size=4, seed=1)
    assert groups[(0, 3)] == again[(0, 3)]
    assert any(groups[(0, i)] != groups[(1, i)] for i in range(6))  # new negatives every epoch
    item = groups[(2, 5)]
    assert len(item.passages) == 4 and len(item.passage_ids) == 4 and "what about" in item.query
    assert item.passage_ids[0] in item.positive_ids


@pytest.mark.parametrize("spec", ["~/data/t.jsonl", "~/data", "~/data/*.jsonl"])
def test_home_relative_paths_are_expanded(tmp_path, monkeypatch, spec):
    """A `~` path from a config file (no shell expanded it) names the same local data as the full path."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_jsonl(tmp_path / "data" / "t.jsonl", make_train_rows(3, n_negatives=3))
    assert len(load_train_groups(spec, group_size=4)) == 3


def test_too_few_negatives_are_sampled_with_replacement(tmp_path, caplog):
    data = write_jsonl(tmp_path / "t.jsonl", make_train_rows(3, n_negatives=2))
    with caplog.at_level(logging.WARNING):
        groups = TrainGroups(load_train_groups(str(data), group_size=6), group_size=6, seed=0)
    assert "sampled with replacement" in caplog.text
    assert len(groups[(0, 0)].passages) == 6


def test_folder_and_glob_sources(tmp_path):
    write_jsonl(tmp_path / "d" / "a.jsonl", make_train_rows(3))
    write_jsonl(tmp_path / "d" / "b.jsonl", make_train_rows(5))
    assert len(load_train_groups(str(tmp_path / "d"), group_size=2)) == 8
    assert len(load_train_groups(str(tmp_path / "d" / "*.jsonl"), group_size=2)) == 8
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(make_train_rows(4)), tmp_path / "t.parquet")
    assert len(load_train_groups(str(tmp_path / "t.parquet"), group_size=2)) == 4
    with pytest.raises(DataError, match="matches no files"):
        load_train_groups(str(tmp_path / "nothing*.jsonl"))


@pytest.mark.skipif(not (SHARED_DATA / "scifact").is_dir(), reason="shared SciFact data not present")
def test_beir_folder_scifact():
    source = load_train_groups(str(SHARED_DATA / "scifact"), split="train", group_size=4)
    qrels = {}
    for line in (SHARED_DATA / "scifact" / "qrels.train.trec").read_text().splitlines():
        qid, _, docid, _rel = line.split()
        qrels.setdefault(qid, set()).add(docid)
    assert len(source) == len(qrels)  # every train query with a judged document
    groups = TrainGroups(source, group_size=4, seed=0)
    item = groups[(0, 0)]
    assert len(item.passages) == 4 and len(set(item.passage_ids)) == 4
    assert set(item.positive_ids) <= qrels[source.query_id(0)]
    assert not set(item.passage_ids[1:]) & set(item.positive_ids)  # sampled negatives exclude positives


@pytest.mark.parametrize("option", ["--gradient_checkpointing", "--untie_encoder", "--bf16"])
def test_training_options_run_and_reload(tiny_model_dir, tmp_path, option):
    data = write_jsonl(tmp_path / "train.jsonl", make_train_rows(8))
    out = tmp_path / "out"
    assert (
        _train(
            tiny_model_dir,
            data,
            out,
            "--per_device_train_batch_size",
            "4",
            "--train_n_passages",
            "3",
            "--max_steps",
            "2",
            "--save_strategy",
            "no",
            option,
        )
        == 0
    )
    model = BiEncoder.from_pretrained(str(out))
    assert (model.passage_encoder is not None) == (option == "--untie_encoder")
    assert (out / "query_model").is_dir() == (option == "--untie_encoder")


BF16_DEEPSPEED_ARGS = """
import json, sys
from dr.distributed import prepare_launch
extra = prepare_launch(deepspeed=True, bf16=True)
from transformers import TrainingArguments
from dr.train.args import DRTrainingArguments
flags = dict(output_dir=sys.argv[1], bf16=True, deepspeed=sys.argv[2], report_to="none")
try:
    TrainingArguments(**flags, **extra)
    upstream = "accepted"
except ValueError as err:
    upstream = str(err)
ours = DRTrainingArguments(**flags, **extra)
print(json.dumps({"upstream": upstream, "ours": [ours.bf16, ours.use_cpu]}))
"""


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is about machines without a GPU")
def test_bf16_deepspeed_on_cpu_still_needs_the_patch(tmp_path):
    """`dr.train.args._bf16_allowed_on_cpu` works around transformers' bf16 device check; when plain
    `TrainingArguments` accept `--bf16 --deepspeed` on a CPU-only machine, this fails: drop the patch."""
    config = str(REPO / "configs" / "deepspeed" / "zero2.json")
    proc = subprocess.run(
        [sys.executable, "-c", BF16_DEEPSPEED_ARGS, str(tmp_path), config],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "doesn't support bf16" in result["upstream"]  # still refused upstream: the patch is needed
    assert result["ours"] == [True, False]  # ours accept it, and DeepSpeed keeps its own CPU accelerator
