"""`dr mine`: hard negatives from a run -> Tevatron-format training rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dr.train.groups import load_train_groups
from tests.helpers import command

mine_main = command("mine")
from tests.helpers import write_jsonl


@pytest.fixture()
def inputs(tmp_path: Path) -> dict[str, Path]:
    docs = [
        {"docid": f"d{i}", "title": f"t{i}" if i % 2 else "", "text": f"text of document {i}"}
        for i in range(40)
    ]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    queries = tmp_path / "queries.tsv"
    queries.write_text("q1\tfirst query\nq2\tsecond query\nq3\tthird query\n")
    qrels = tmp_path / "qrels.trec"
    qrels.write_text("q1 0 d3 1\nq1 0 d7 1\nq2 0 d0 1\nq3 0 d5 0\n")
    run = tmp_path / "run.txt"
    lines = []
    for q, offset in (("q1", 0), ("q2", 5), ("q3", 9)):
        for rank in range(30):
            doc = (offset + rank) % 40
            lines.append(f"{q}\td{doc}\t{100 - rank}.5")
    run.write_text("\n".join(lines) + "\n")
    return {"corpus": corpus, "queries": queries, "qrels": qrels, "run": run, "out": tmp_path / "mined.jsonl"}


def _mine(paths: dict[str, Path], *extra: str) -> int:
    return mine_main(
        [
            "--run",
            str(paths["run"]),
            "--queries",
            str(paths["queries"]),
            "--qrels",
            str(paths["qrels"]),
            "--corpus",
            str(paths["corpus"]),
            "--output",
            str(paths["out"]),
            *extra,
        ]
    )


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_mined_rows_exclude_positives_and_respect_ranks(inputs):
    assert _mine(inputs, "--ranks", "2", "20", "--n_negatives", "8") == 0
    rows = {r["query_id"]: r for r in _rows(inputs["out"])}
    assert set(rows) == {"q1", "q2"}  # q3 has no relevant document
    q1 = rows["q1"]
    assert {p["docid"] for p in q1["positive_passages"]} == {"d3", "d7"}
    negatives = [p["docid"] for p in q1["negative_passages"]]
    assert len(negatives) == 8 and len(set(negatives)) == 8
    assert not {"d3", "d7"} & set(negatives)
    ranked = [f"d{i}" for i in range(30)]  # q1's run order
    assert all(2 <= ranked.index(d) + 1 < 20 for d in negatives)
    assert (
        q1["positive_passages"][0]["text"] == "text of document 3"
        and q1["positive_passages"][0]["title"] == "t3"
    )
    assert len(load_train_groups(str(inputs["out"]), group_size=4)) == 2  # valid training data


def test_same_seed_same_file_other_seed_differs(inputs, tmp_path):
    assert _mine(inputs, "--seed", "3", "--n_negatives", "5") == 0
    first = inputs["out"].read_text()
    assert _mine(inputs, "--seed", "3", "--n_negatives", "5") == 0
    assert inputs["out"].read_text() == first
    assert _mine(inputs, "--seed", "4", "--n_negatives", "5") == 0
    assert inputs["out"].read_text() != first


def test_margin_drops_hits_scored_close_to_the_positive(inputs):
    # q1's best positive d3 is at rank 4 (score 96.5): margin 5 keeps hits scored <= 91.5, i.e. rank >= 9.
    assert _mine(inputs, "--ranks", "1", "31", "--n_negatives", "30", "--margin", "5") == 0
    rows = {r["query_id"]: r for r in _rows(inputs["out"])}
    assert {p["docid"] for p in rows["q1"]["negative_passages"]} == {f"d{i}" for i in range(8, 30)}
    # q2's positive d0 was not retrieved: nothing to compare with, the margin does not apply.
    assert len(rows["q2"]["negative_passages"]) == 30


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p["run"].write_text(p["run"].read_text() + "q9\td1\t1.0\n"), "'q9' is not in"),
        (lambda p: p["run"].write_text("q1\td1\n"), "run.txt"),
        (lambda p: p["run"].write_text(p["run"].read_text() + "q1\td1\tnot-a-score\n"), "run.txt"),
        (lambda p: p["qrels"].write_text("q1 0 d3\nq1 0\n"), "qrels.trec"),
    ],
)
def test_bad_inputs_fail_clearly(inputs, capsys, change, message):
    change(inputs)
    assert _mine(inputs) == 1  # bad files: exit status 1
    assert message in capsys.readouterr().err
    assert not inputs["out"].exists()


def test_keep_scores_writes_run_scores_and_null_for_unretrieved_positives(inputs, caplog):
    from dr.train.groups import DataError

    assert _mine(inputs, "--ranks", "2", "20", "--n_negatives", "5", "--keep_scores") == 0
    rows = {r["query_id"]: r for r in _rows(inputs["out"])}
    run_scores = {"q1": {f"d{r}": 100 - r + 0.5 for r in range(30)}}
    q1 = rows["q1"]
    for p in q1["positive_passages"] + q1["negative_passages"]:
        assert p["score"] == run_scores["q1"][p["docid"]]  # d3 -> 97.5, d7 -> 93.5, negatives alike
    q2 = rows["q2"]
    assert q2["positive_passages"][0]["docid"] == "d0" and q2["positive_passages"][0]["score"] is None
    assert all(isinstance(p["score"], float) for p in q2["negative_passages"])
    config = json.loads(Path(str(inputs["out"]) + ".config.json").read_text())
    assert config["counts"]["positives_without_score"] == 1
    assert "dr score" in caplog.text
    assert len(load_train_groups(str(inputs["out"]), group_size=4)) == 2  # contrastive training: fine
    line = 1 + [r["query_id"] for r in _rows(inputs["out"])].index("q2")
    with pytest.raises(DataError, match=rf"row {line} \(line {line}\): field 'positive_passages\[0\].score'"):
        load_train_groups(str(inputs["out"]), group_size=4, need_scores=True)


def test_keep_scores_needs_a_scored_run(inputs, capsys):
    lines = inputs["run"].read_text().splitlines()
    marco = inputs["run"].with_name("run.marco")
    marco.write_text(
        "".join(f"{q}\t{d}\t{i % 30 + 1}\n" for i, (q, d, _) in enumerate(l.split("\t") for l in lines))
    )
    inputs["run"] = marco
    assert _mine(inputs, "--run_format", "marco", "--keep_scores") == 2
    assert "needs a scored run" in capsys.readouterr().err
