"""bench.folds, the out-of-fold teacher's bookkeeping: folds partition the queries, each teacher trains on the
other folds only, and the merge restores the input's order and refuses a missing or doubly scored query."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.folds import fold_of_queries, merge, split


def _group(query_id: str, docids: list[str], score: float | None = None) -> dict:
    def passage(docid: str) -> dict:
        return {"docid": docid, "text": f"text {docid}", **({} if score is None else {"score": score})}

    return {"query_id": query_id, "query": f"query {query_id}", "positive_passages": [passage(docids[0])],
            "negative_passages": [passage(d) for d in docids[1:]]}  # fmt: skip


def _write(path: Path, groups: list[dict]) -> None:
    path.write_text("".join(json.dumps(g) + "\n" for g in groups), encoding="utf-8")


def _query_ids(path: Path) -> list[str]:
    return [json.loads(line)["query_id"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_folds_partition_the_queries_and_each_teacher_never_sees_its_fold(tmp_path: Path) -> None:
    mined = tmp_path / "mined.jsonl"
    _write(mined, [_group(str(q), [f"d{q}", f"n{q}"]) for q in range(11)])
    split(str(mined), folds=3, seed=7, output_dir=str(tmp_path / "folds"))
    held_out = [set(_query_ids(tmp_path / "folds" / f"fold-{k}.jsonl")) for k in range(3)]
    assert set().union(*held_out) == {str(q) for q in range(11)}
    assert sum(len(fold) for fold in held_out) == 11  # disjoint
    assert all(3 <= len(fold) <= 4 for fold in held_out)
    for k in range(3):
        trained_on = set(_query_ids(tmp_path / "folds" / f"train-{k}.jsonl"))
        assert trained_on.isdisjoint(held_out[k])
        assert trained_on | held_out[k] == {str(q) for q in range(11)}
    ids = [str(q) for q in range(11)]
    assert fold_of_queries(ids, 3, 7) == fold_of_queries(ids, 3, 7)  # a rerun makes the same split
    assert fold_of_queries(ids, 3, 7) != fold_of_queries(ids, 3, 8)


def test_merge_restores_input_order_and_refuses_missing_or_repeated_queries(tmp_path: Path) -> None:
    mined = tmp_path / "mined.jsonl"
    order = ["5", "1", "3", "2"]
    _write(mined, [_group(q, [f"d{q}", f"n{q}"]) for q in order])
    _write(tmp_path / "a.jsonl", [_group("3", ["d3", "n3"], 1.0), _group("5", ["d5", "n5"], 2.0)])
    _write(tmp_path / "b.jsonl", [_group("2", ["d2", "n2"], 3.0), _group("1", ["d1", "n1"], 4.0)])
    merge(str(mined), [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], str(tmp_path / "out.jsonl"))
    assert _query_ids(tmp_path / "out.jsonl") == order
    merged = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [g["positive_passages"][0]["score"] for g in merged] == [2.0, 4.0, 1.0, 3.0]

    with pytest.raises(SystemExit, match="no scores"):
        merge(str(mined), [str(tmp_path / "a.jsonl")], str(tmp_path / "partial.jsonl"))
    assert not (tmp_path / "partial.jsonl").exists()
    with pytest.raises(SystemExit, match="more than one fold"):
        merge(
            str(mined), [str(tmp_path / "a.jsonl"), str(tmp_path / "a.jsonl")], str(tmp_path / "twice.jsonl")
        )


def test_a_line_without_query_id_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_group("1", ["d1"])) + "\n" + '{"query": "no id"}\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"bad.jsonl:2"):
        split(str(bad), folds=2, seed=1, output_dir=str(tmp_path / "folds"))


def test_accuracy_counts_positives_first_and_the_mass_on_them(tmp_path: Path, capsys) -> None:
    from bench.folds import accuracy

    scored = tmp_path / "scored.jsonl"
    sharp = _group("1", ["p", "a", "b", "c"], 0.0)
    for passage, score in zip(sharp["negative_passages"], (-1.0, -2.0, -3.0)):
        passage["score"] = score
    wrong = _group("2", ["p", "a", "b", "c"], 0.0)
    wrong["negative_passages"][0]["score"] = 5.0  # a negative above the positive
    _write(scored, [sharp, wrong])
    accuracy(str(scored), temperatures=[1.0], group=4)
    out = capsys.readouterr().out
    assert "1/2 queries (50.0 %)" in out
    expected = (1 / (1 + math.exp(-1) + math.exp(-2) + math.exp(-3)) + 1 / (1 + math.exp(5) + 2)) / 2
    assert f"{expected:.3f}" in out
