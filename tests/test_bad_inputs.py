"""The bad-input and fault matrix (issue 15, "Inputs and faults"; docs/bad_inputs.md): every case ends in
one line naming the file / row / field, a non-zero exit, no traceback and nothing written."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from tests.helpers import command, make_train_rows, write_jsonl, write_vocab

encode_main = command("encode")
train_main = command("train")


def _corpus_rows(n: int = 8) -> list[dict]:
    return [{"docid": f"d{i}", "title": "", "text": f"apple river {i} copper"} for i in range(n)]


def _encode(model: Path, data: Path, out: Path, *extra: str) -> int:
    argv = [
        "--model_name_or_path", str(model), "--dataset_name", str(data), "--encoded_save_path", str(out),
        "--per_device_eval_batch_size", "4", "--dataloader_num_workers", "0", "--p_max_len", "32",
        "--dataset_cache_dir", str(out.parent / ".cache"),
    ]  # fmt: skip
    return encode_main(argv + list(extra))


def _train(model: Path, data: Path, out: Path, *extra: str) -> int:
    argv = [
        "--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out),
        "--q_max_len", "16", "--p_max_len", "32", "--max_steps", "1", "--per_device_train_batch_size", "2",
        "--train_n_passages", "2", "--report_to", "none", "--save_strategy", "no",
    ]  # fmt: skip
    return train_main(argv + list(extra))


def _fails(capsys, rc: int, *needles: str, status: int = 1) -> str:
    """The command exited `status` with exactly one error line, containing every needle, and no traceback."""
    err = capsys.readouterr().err
    assert rc == status, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", _corpus_rows())


@pytest.fixture
def train_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", make_train_rows(4, n_negatives=1))


def _no_outputs(folder: Path) -> None:
    """Nothing but the input cache (`_encode` keeps it beside the outputs) was written into `folder`."""
    left = [p.name for p in folder.iterdir() if p.name != ".cache"] if folder.exists() else []
    assert not left, left


# ---- item 2: tokenizers ------------------------------------------------------------------------------------
@pytest.fixture
def no_tokenizer_model(tiny_model_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, folder / name)
    return folder


def test_test_tokenizers_are_not_degenerate(tmp_path, tiny_model_dir):
    from dr.model.check import MIN_VOCAB
    from dr.model.text import load_tokenizer

    write_vocab(tmp_path)
    assert len((tmp_path / "vocab.txt").read_text().split()) >= MIN_VOCAB
    assert len(load_tokenizer(str(tiny_model_dir))) >= MIN_VOCAB


def test_model_without_tokenizer_files_is_refused(no_tokenizer_model, corpus, train_file, tmp_path, capsys):
    rc = _encode(no_tokenizer_model, corpus, tmp_path / "o" / "c")
    _fails(capsys, rc, str(no_tokenizer_model), "--tokenizer_name")
    _no_outputs(tmp_path / "o")
    rc = _train(no_tokenizer_model, train_file, tmp_path / "t")
    _fails(capsys, rc, str(no_tokenizer_model), "--tokenizer_name")
    _no_outputs(tmp_path / "t")


def test_tiny_or_oversized_tokenizer_is_refused(tiny_model_dir, corpus, tmp_path, capsys):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    tiny = tmp_path / "tiny-tok"
    tiny.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "apple"]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(tiny)
    rc = _encode(tiny_model_dir, corpus, tmp_path / "o" / "c", "--tokenizer_name", str(tiny))
    _fails(capsys, rc, str(tiny), "only 6 tokens", "--tokenizer_name")
    small = tmp_path / "small-vocab"  # the fixture tokenizer (140 tokens) on a 120-row embedding table
    BertModel(BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(small)  # fmt: skip
    rc = _encode(small, corpus, tmp_path / "o" / "c", "--tokenizer_name", str(tiny_model_dir))
    _fails(capsys, rc, str(small), "140 tokens", "only 120", "--tokenizer_name")
    _no_outputs(tmp_path / "o")


def test_tokenizer_smaller_than_the_embedding_table_is_fine(tiny_model_dir, corpus, tmp_path):
    from transformers import BertConfig, BertModel

    padded = tmp_path / "padded"  # vocab_size padded up to a multiple of 64, as many real models are
    BertModel(BertConfig(vocab_size=192, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(padded)  # fmt: skip
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, padded / name)
    assert _encode(padded, corpus, tmp_path / "o" / "c") == 0


# ---- item 7: model paths -----------------------------------------------------------------------------------
def test_missing_model_folder_is_one_line(corpus, train_file, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    _fails(capsys, _encode(missing, corpus, tmp_path / "o" / "c"), f"no such model folder: {missing}")
    _fails(capsys, _train(missing, train_file, tmp_path / "t"), f"no such model folder: {missing}")
    _no_outputs(tmp_path / "t")


def test_hub_name_offline_says_it_cannot_be_reached(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = _encode(Path("no-such-org/no-such-model"), corpus, tmp_path / "o" / "c")
    _fails(capsys, rc, "no-such-org/no-such-model", "offline")


# ---- item 6: non-UTF-8 bytes -------------------------------------------------------------------------------
def test_non_utf8_corpus_names_file_line_and_byte(corpus, tiny_model_dir, tmp_path, capsys):
    data = corpus.read_bytes().splitlines(keepends=True)
    data[2] = data[2].replace(b"river", b"riv\xe9r")
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b"".join(data))
    offset = sum(len(line) for line in data[:2]) + data[2].index(b"\xe9")
    rc = _encode(tiny_model_dir, bad, tmp_path / "o" / "c")
    _fails(capsys, rc, str(bad), "line 3", f"byte offset {offset}", "UTF-8")
    _no_outputs(tmp_path / "o")


def test_non_utf8_training_data_writes_nothing(train_file, tiny_model_dir, tmp_path, capsys):
    data = train_file.read_bytes().splitlines(keepends=True)
    data[1] = data[1].replace(b"what", b"wh\xffat", 1)
    train_file.write_bytes(b"".join(data))
    out = tmp_path / "t"
    _fails(capsys, _train(tiny_model_dir, train_file, out), str(train_file), "line 2", "UTF-8")
    _no_outputs(out)  # no dr_train_args.json / config.json of a run that never started


# ---- item 5: empty and non-string text ---------------------------------------------------------------------
@pytest.mark.parametrize("value", [42, {"a": 1}, ["x"]])
def test_non_string_text_names_row_and_field(value, tiny_model_dir, tmp_path, capsys):
    rows = _corpus_rows()
    rows[4]["text"] = value
    data = write_jsonl(tmp_path / "typed.jsonl", rows)
    rc = _encode(tiny_model_dir, data, tmp_path / "o" / "c")
    _fails(capsys, rc, str(data), "row 5", "field 'text' must be a string")
    _no_outputs(tmp_path / "o")


def test_non_string_title_is_refused_too(tiny_model_dir, tmp_path, capsys):
    rows = _corpus_rows()
    rows[2]["title"] = 7
    data = write_jsonl(tmp_path / "typed.jsonl", rows)
    _fails(capsys, _encode(tiny_model_dir, data, tmp_path / "o" / "c"), "row 3", "field 'title'")


def test_empty_text_is_encoded_and_counted(tiny_model_dir, tmp_path, caplog):
    rows = _corpus_rows()
    rows[1]["text"] = ""
    rows[6]["text"] = "   "
    data = write_jsonl(tmp_path / "empty-text.jsonl", rows)
    with caplog.at_level(logging.INFO):
        assert _encode(tiny_model_dir, data, tmp_path / "o" / "c") == 0
    assert "2 of the shard's 8 rows have an empty text" in caplog.text, caplog.text


def test_empty_training_passage_text_is_counted(tmp_path, caplog):
    from dr.train.groups import load_train_groups

    rows = make_train_rows(4, n_negatives=1)
    rows[2]["negative_passages"][0]["text"] = ""
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        load_train_groups(str(data), group_size=2)
    assert "1 passages in 'negative_passages' have an empty text" in caplog.text


def test_mixed_type_ids_are_not_json_quoted(tmp_path):
    from dr.io.corpus import load_corpus

    rows = _corpus_rows(3)
    rows[1]["docid"] = 7  # mixed int / str ids arrive from datasets as JSON text: '"d0"', '7', ...
    corpus = load_corpus(str(write_jsonl(tmp_path / "ids.jsonl", rows)))
    assert corpus.records(0, 3)[0] == ["d0", "7", "d2"]


# ---- item 12: clearer messages -----------------------------------------------------------------------------
def test_json_parse_error_gives_the_line_number(corpus, tiny_model_dir, tmp_path, capsys):
    lines = corpus.read_text().splitlines(keepends=True)
    lines.insert(3, '{"docid": "x", "text": \n')
    bad = tmp_path / "broken.jsonl"
    bad.write_text("".join(lines))
    _fails(capsys, _encode(tiny_model_dir, bad, tmp_path / "o" / "c"), str(bad), "line 4", "not valid JSON")
    train = tmp_path / "train-broken.jsonl"
    rows = [json.dumps(r) + "\n" for r in make_train_rows(4, n_negatives=1)]
    rows.insert(2, '{"query_id": "9", "query": \n')
    train.write_text("".join(rows))
    _fails(capsys, _train(tiny_model_dir, train, tmp_path / "t"), str(train), "line 3", "not valid JSON")


def test_wrong_query_type_names_the_line(tiny_model_dir, tmp_path, capsys):
    rows = make_train_rows(4, n_negatives=1)
    rows[2]["query"] = 42
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    line = _fails(capsys, _train(tiny_model_dir, data, tmp_path / "t"), str(data), "line 3", "'query'")
    assert "extension" not in line


def test_wrong_passage_text_type_names_the_row(tmp_path):
    from dr.train.groups import DataError, load_train_groups

    rows = make_train_rows(4, n_negatives=1)
    rows[3]["positive_passages"][0]["text"] = 42
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"row 4 \(line 4\).*positive_passages\[\]\.text") as err:
        load_train_groups(str(data), group_size=2)
    assert "extension" not in str(err.value)


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"", "no rows"), (b"\n\n", "no rows"), (b"hello world\nnot json\n", "line 1: not valid JSON")],
)
def test_empty_or_malformed_corpus(content, needle, tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "corpus.jsonl"
    bad.write_bytes(content)
    line = _fails(capsys, _encode(tiny_model_dir, bad, tmp_path / "o" / "c"), str(bad), needle)
    assert "StopIteration" not in line and "DatasetGenerationError" not in line


# ---- items 8, 9 and issue 10 bugs 2, 3: output folder and resume ----------------------------------------
def test_unwritable_output_dir_is_one_line(tiny_model_dir, train_file, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # fails for root too, unlike a chmod'ed folder
    rc = _train(tiny_model_dir, train_file, blocker / "sub")
    _fails(capsys, rc, f"--output_dir {blocker / 'sub'}", "not a folder")


@pytest.mark.parametrize("value", ["false", "none", "no", "False"])
def test_resume_false_still_guards_an_existing_model(value, tiny_model_dir, train_file, tmp_path, capsys):
    out = tmp_path / "t"
    out.mkdir()
    (out / "dr_config.json").write_text("{}")
    rc = _train(tiny_model_dir, train_file, out, "--resume_from_checkpoint", value)
    _fails(capsys, rc, "already holds a model", status=2)


def test_resume_latest_without_checkpoint_is_one_line(tiny_model_dir, train_file, tmp_path, capsys):
    out = tmp_path / "t"
    out.mkdir()
    rc = _train(tiny_model_dir, train_file, out, "--resume_from_checkpoint", "latest")
    _fails(capsys, rc, "--resume_from_checkpoint latest", "no checkpoint", status=2)


def test_resume_latest_skips_a_checkpoint_cut_short(tiny_model_dir, train_file, tmp_path, capsys, caplog):
    from dr.train.checkpoints import COMPLETE_MARKER

    out = tmp_path / "t"
    flags = ("--save_strategy", "steps", "--save_steps", "1", "--per_device_train_batch_size", "1")
    assert _train(tiny_model_dir, train_file, out, "--max_steps", "2", *flags) == 0
    assert all((out / f"checkpoint-{n}" / COMPLETE_MARKER).is_file() for n in (1, 2))
    # A kill while checkpoint-2 was being written: weights cut short, the marker (written last) absent.
    weights = out / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (out / "checkpoint-2" / COMPLETE_MARKER).unlink()
    with caplog.at_level(logging.INFO):
        rc = _train(
            tiny_model_dir, train_file, out, "--max_steps", "3", "--resume_from_checkpoint", "latest", *flags
        )
    assert rc == 0, capsys.readouterr().err
    assert "resuming from checkpoint-1; skipped newer incomplete checkpoints" in caplog.text
    assert "checkpoint-2" in caplog.text


# ---- item 3: shards checked against their manifest ---------------------------------------------------------
@pytest.fixture
def encoded(tiny_model_dir, corpus, tmp_path) -> dict[str, Path]:
    queries = write_jsonl(
        tmp_path / "q.jsonl", [{"query_id": "q1", "query": "apple"}, {"query_id": "q2", "query": "river"}]
    )
    assert _encode(tiny_model_dir, corpus, tmp_path / "emb" / "corpus") == 0
    assert _encode(tiny_model_dir, queries, tmp_path / "emb" / "q", "--encode_is_qry") == 0
    return {"passages": tmp_path / "emb" / "corpus.arrow", "queries": tmp_path / "emb" / "q.arrow"}


def _search(encoded: dict[str, Path], out: Path, *extra: str) -> int:
    argv = ["--query_reps", str(encoded["queries"]), "--passage_reps", str(encoded["passages"]),
            "--depth", "3", "--save_ranking_to", str(out), "--quiet", *extra]  # fmt: skip
    return command("search")(argv)


def _flip_last_vector_byte(path: Path) -> None:
    """Change one vector value in place (same size, same rows): only the sha256 can tell."""
    import pyarrow as pa
    from pyarrow import ipc

    table = ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    data = bytearray(path.read_bytes())
    needle = table.column("embedding")[0].values.to_numpy().tobytes()[:8]
    at = bytes(data).find(needle)
    assert at > 0
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def test_search_refuses_a_shard_whose_sha256_changed(encoded, tmp_path, capsys, caplog):
    with caplog.at_level(logging.INFO):
        assert _search(encoded, tmp_path / "ok.run") == 0
    assert "checked against their manifest" in caplog.text and "sha256 of 1" in caplog.text
    _flip_last_vector_byte(encoded["passages"])
    rc = _search(encoded, tmp_path / "bad.run")
    _fails(capsys, rc, str(encoded["passages"]), "corpus.manifest.json", "sha256")
    assert not (tmp_path / "bad.run").exists()
    assert _search(encoded, tmp_path / "size.run", "--verify", "size") == 0  # same rows, same size
    assert _search(encoded, tmp_path / "none.run", "--verify", "none") == 0


def test_search_refuses_a_shard_with_other_rows_or_size(encoded, tmp_path, capsys):
    import dataclasses

    from dr.io.shards import read_shard, write_shard

    shard = encoded["passages"]
    ids, vectors, meta = read_shard(shard)  # a valid shard that lost its last row after encoding
    write_shard(shard, dataclasses.replace(meta, count=len(ids) - 1), ids[:-1], vectors[:-1])
    rc = _search(encoded, tmp_path / "bad.run", "--verify", "size")
    _fails(capsys, rc, str(shard), "corpus.manifest.json", "rows")


def test_verify_full_refuses_shards_without_manifest(encoded, tmp_path, capsys):
    (encoded["passages"].parent / "corpus.manifest.json").unlink()
    assert _search(encoded, tmp_path / "auto.run") == 0
    capsys.readouterr()
    rc = _search(encoded, tmp_path / "full.run", "--verify", "full")
    _fails(capsys, rc, str(encoded["passages"]), "--verify full")


# ---- item 10 and item 12 (YAML booleans): a pipeline config is validated whole, before any stage -----------
def _pipeline_config(tmp_path: Path, monkeypatch, **changes: object) -> Path:
    import yaml

    from tests.pipeline.test_pipeline import _write_fixture

    path = _write_fixture(tmp_path, tmp_path / "model")
    monkeypatch.setenv("FIXTURE", str(tmp_path))
    config = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            config[section][name] = value
        else:
            config[section] = value
    path.write_text(yaml.safe_dump(config))
    return path


def test_pipeline_run_dir_of_the_wrong_type(tmp_path, monkeypatch, capsys):
    path = _pipeline_config(tmp_path, monkeypatch, run_dir=[1, 2])
    _fails(capsys, command("pipeline")([str(path)]), "run_dir", "expected a path", status=2)


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        ({"search__depth": -1}, ("search", "--depth", "must be >= 1")),
        ({"search__no_such_flag": 3}, ("search", "no_such_flag")),
        ({"encode__num_shards": "two"}, ("encode.num_shards",)),
        ({"stage_timeout_s": "soon"}, ("stage_timeout_s",)),
        ({"eval__metrics": "MRR@10"}, ("eval.metrics",)),
    ],
)
def test_pipeline_bad_later_stage_fails_before_the_first(change, needles, tmp_path, monkeypatch, capsys):
    path = _pipeline_config(tmp_path, monkeypatch, **change)
    _fails(capsys, command("pipeline")([str(path)]), *needles, status=2)
    assert not (tmp_path / "run").exists()  # nothing ran, nothing was written


def test_yaml_no_for_a_choice_flag_means_no(tmp_path, monkeypatch):
    from dr import pipeline

    path = _pipeline_config(tmp_path, monkeypatch)
    path.write_text(path.read_text().replace("save_strategy: 'no'", "save_strategy: no"))
    cfg = pipeline.load_config(path)
    assert cfg["train"]["save_strategy"] is False  # what YAML 1.1 reads
    pipeline.fix_bool_choices(cfg)
    steps = pipeline.build_steps(cfg)
    pipeline.check_stage_flags(steps)
    cmd = steps[0].cmd
    assert cmd[cmd.index("--save_strategy") + 1] == "no"


# ---- item 15: a stage that is done is done; progress on the console ---------------------------------------
def _done_after_run():
    """A step's `done`: False before it ran (so it runs), True after."""
    calls = []
    return lambda: bool(calls) or calls.append(1) is not None and False


def _runner(tmp_path: Path, quiet: bool = True):
    from dr import pipeline

    cfg = {"run_dir": str(tmp_path / "run"), "env": {}, "stage_timeout_s": None}
    runner = pipeline.Runner(cfg, quiet=quiet)
    runner.layout.logs.mkdir(parents=True)
    return runner


def test_stage_ends_when_its_process_exits_even_if_a_child_holds_the_pipe(tmp_path):
    import sys
    import time

    from dr import pipeline

    runner = _runner(tmp_path)
    # The stage exits at once but leaves a process behind that inherited its stdout (as an orphaned
    # worker does): reading to end-of-file used to wait for that process, i.e. "hang at exit".
    cmd = [sys.executable, "-c", "import subprocess, sys; subprocess.Popen(['sleep', '40']); print('done')"]
    started = time.monotonic()
    runner.run([pipeline.Step("stage", cmd, done=_done_after_run())])
    assert time.monotonic() - started < 25
    assert "done" in (runner.layout.logs / "stage.log").read_text()


def test_quiet_stage_prints_its_progress(tmp_path, capsys):
    import re
    import sys

    from dr import pipeline

    runner = _runner(tmp_path)
    runner.progress_interval_s = 0.0
    script = (
        "import sys, time\n"
        "for i in (3, 7):\n"
        "    sys.stderr.write(f'\\r{i*10}%|###| {i}/10 [00:01<00:02, 42.5psg/s]'); sys.stderr.flush(); time.sleep(0.2)\n"
    )
    runner.run([pipeline.Step("encode_corpus[0/1]", [sys.executable, "-c", script], done=_done_after_run())])
    out = capsys.readouterr().out
    assert "encode_corpus[0/1]: 3/10 psg, 42.5 psg/s" in out, out  # the first line: tqdm's rate
    assert re.search(r"encode_corpus\[0/1\]: 7/10 psg, [0-9.]+ psg/s", out), (
        out
    )  # then measured (4 in ~0.2 s)


def test_progress_of_training_steps():
    from dr.pipeline.progress import StageProgress

    lines: list[str] = []
    progress = StageProgress("train", interval_s=0.0, emit=lines.append)
    progress.feed(b" 40%|####      | 12/31 [00:59<01:33,  4.90s/it]")
    assert lines and lines[-1].endswith("train: 12/31 steps, 4.9 s/step")


def test_progress_rate_is_measured_between_lines_not_taken_from_a_resumed_bar():
    """A resumed training's bar jumps from 0 to 51 in no time, and tqdm's average says 4.56 it/s for many
    steps after; the printed rate is the one measured between two printed lines."""
    from dr.pipeline.progress import StageProgress

    now = [0.0]
    lines: list[str] = []
    progress = StageProgress("train", interval_s=10.0, emit=lines.append, clock=lambda: now[0])
    now[0] = 10.0
    progress.feed(b" 50%|#####     | 51/102 [00:01<00:11,  4.56it/s]")
    assert lines[-1].endswith("train: 51/102 steps, 4.56 step/s")  # nothing measured yet: tqdm's rate
    now[0] = 70.0
    progress.feed(b" 52%|#####     | 53/102 [01:01<00:11,  4.45s/it]")
    assert lines[-1].endswith("train: 53/102 steps, 30 s/step")


def test_demo_config_has_no_stage_timeout():
    import yaml

    from tests.helpers import REPO

    assert yaml.safe_load((REPO / "dr" / "demo" / "demo.yaml").read_text())["stage_timeout_s"] is None


def test_yaml_no_in_a_train_config_file_means_no(tmp_path):
    from dr.flags import parse_flags
    from dr.train.cli import build_parser

    config = tmp_path / "train.yaml"
    config.write_text("save_strategy: no\nmax_steps: 3\n")
    argv = ["--config", str(config), "--output_dir", str(tmp_path / "o"), "--model_name_or_path", "m"]
    args = parse_flags(build_parser(), argv)
    assert args.save_strategy == "no" and args.max_steps == 3
