"""BEIR-folder training groups: the same groups for the same seed whatever the storage, and bad input
named clearly. The expected docids were captured from the earlier implementation (the whole corpus held as
Python lists), so a change of how the corpus is stored or looked up cannot change what is trained on."""

from __future__ import annotations

from pathlib import Path

import pytest

from dr.train.groups import DataError, TrainGroups, load_train_groups
from tests.helpers import write_jsonl

TITLES = ("", "-", "Title")  # no title, MS MARCO's placeholder, a real title


def _doc(i: int) -> dict:
    title = TITLES[i % 3] + (f" {i}" if i % 3 == 2 else "")
    return {"_id": f"doc{i}", "title": title, "text": f"text of {i} " + "word " * (i % 5)}


def _doc_text(docid: str) -> str:
    """What the encoder must see for `docid` (title + " " + text, no placeholder title)."""
    doc = _doc(int(docid[3:]))
    return f"{doc['title']} {doc['text']}" if doc["title"] not in ("", "-") else doc["text"]


QUERIES = {f"q{i}": f"query number {i}" for i in range(8)}
QRELS = """q0 0 doc3 1
q0 0 doc7 2
q1 0 doc1 1
q2 0 doc10 0
q3 0 doc39 1
q3 0 doc0 1
q3 0 doc20 1
q4 0 doc2 1
q4 0 missing99 1
q6 0 doc5 1
q7 0 doc5 1
q7 0 doc6 0
q8 0 doc1 1
"""


def make_beir_fixture(folder: Path, n_docs: int = 40) -> Path:
    """A small BEIR folder: graded and rel-0 judgments, a judged docid absent from the corpus, a query
    without judgments, a judged query absent from the queries file, titles of every kind."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "corpus.jsonl", [_doc(i) for i in range(n_docs)])
    (folder / "queries.train.tsv").write_text("".join(f"{q}\t{t}\n" for q, t in QUERIES.items()))
    (folder / "qrels.train.trec").write_text(QRELS)
    return folder


# epoch -> per training query: passage docids, positive first; seed 13, 4 passages per group. Training queries in
# file order: q0 q1 q3 q4 q6 q7 (q2 has only a rel-0 judgment, q5 none; q4's missing99 is dropped).
EXPECTED_4 = {
    0: [
        ["doc7", "doc34", "doc32", "doc34"],
        ["doc1", "doc16", "doc27", "doc12"],
        ["doc0", "doc8", "doc19", "doc30"],
        ["doc2", "doc19", "doc18", "doc27"],
        ["doc5", "doc8", "doc37", "doc6"],
        ["doc5", "doc38", "doc32", "doc23"],
    ],
    1: [
        ["doc7", "doc11", "doc26", "doc20"],
        ["doc1", "doc7", "doc27", "doc34"],
        ["doc0", "doc10", "doc32", "doc2"],
        ["doc2", "doc34", "doc23", "doc20"],
        ["doc5", "doc28", "doc34", "doc37"],
        ["doc5", "doc2", "doc39", "doc27"],
    ],
}
POSITIVES = [["doc3", "doc7"], ["doc1"], ["doc0", "doc20", "doc39"], ["doc2"], ["doc5"], ["doc5"]]
QIDS = ["q0", "q1", "q3", "q4", "q6", "q7"]


@pytest.fixture
def beir(tmp_path: Path) -> Path:
    return make_beir_fixture(tmp_path / "beir")


def _items(folder: Path, group_size: int) -> dict[int, list]:
    source = load_train_groups(str(folder), split="train", group_size=4)
    groups = TrainGroups(source, group_size, seed=13, query_prefix="Q: ", passage_prefix="P: ")
    return {epoch: [groups[(epoch, i)] for i in range(len(groups))] for epoch in (0, 1)}


@pytest.mark.parametrize("group_size", [4, 1])
def test_groups_are_those_of_the_list_implementation(beir, group_size):
    """Same seed -> the same positives, negatives (repeats included), texts and order as before."""
    for epoch, items in _items(beir, group_size).items():
        assert [item.passage_ids for item in items] == [ids[:group_size] for ids in EXPECTED_4[epoch]]
        assert [item.positive_ids for item in items] == POSITIVES
        assert [item.query for item in items] == ["Q: " + QUERIES[q] for q in QIDS]
        for item in items:
            assert item.passages == ["P: " + _doc_text(d) for d in item.passage_ids]


def test_the_corpus_is_matched_in_steps(beir, monkeypatch):
    """The qrels -> corpus row match over several steps (and a step holding no judged docid) agrees."""
    from dr.train import groups

    whole = _items(beir, 4)
    monkeypatch.setattr(groups, "MATCH_ROWS", 3)
    assert _items(beir, 4) == whole


def test_groups_survive_pickling(beir):
    """DataLoader workers get the dataset pickled: the memory-mapped corpus travels by file reference."""
    import pickle

    groups = TrainGroups(load_train_groups(str(beir), split="train", group_size=4), 4, seed=13)
    copy = pickle.loads(pickle.dumps(groups))
    assert [copy[(1, i)] for i in range(len(copy))] == [groups[(1, i)] for i in range(len(groups))]
    assert copy.source.query_id(2) == "q3"


def test_numeric_docids_match_string_qrels(tmp_path):
    folder = make_beir_fixture(tmp_path / "beir")
    write_jsonl(folder / "corpus.jsonl", [{"_id": i, "title": "", "text": f"t {i}"} for i in range(40)])
    (folder / "qrels.train.trec").write_text("q0 0 3 1\nq1 0 7 1\n")
    groups = TrainGroups(load_train_groups(str(folder), split="train", group_size=4), 4, seed=13)
    assert [groups[(0, i)].passage_ids for i in range(2)] == [["3", "35", "34", "32"], ["7", "16", "27", "1"]]
    assert groups[(0, 0)].passages[0] == "t 3"


def _corpus_with(folder: Path, row: str) -> Path:
    lines = (folder / "corpus.jsonl").read_text().splitlines(keepends=True)
    (folder / "corpus.jsonl").write_text("".join(lines[:5] + [row + "\n"] + lines[6:]))
    return folder


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            '{"_id": "doc3", "title": "", "text": "again"}',
            r"corpus.jsonl: duplicate _id 'doc3' at rows 4 and 6",
        ),
        ('{"_id": "doc5", "title": "", "text": null}', r"corpus.jsonl: row 6: missing field 'text'"),
        ('{"_id": "doc5", "title": "", "text": 5}', r"corpus.jsonl: row 6: field 'text' must be a string"),
        ('{"title": "", "text": "x"}', r"corpus.jsonl: row 6: missing field '_id'"),
        ('{"_id": "doc5", "text": "x"', r"corpus.jsonl: line 6: not valid JSON"),
    ],
)
def test_a_bad_corpus_row_is_named(beir, row, message):
    with pytest.raises(DataError, match=message):
        load_train_groups(str(_corpus_with(beir, row)), split="train", group_size=4)


def test_a_null_query_text_is_named(beir):
    (beir / "queries.train.tsv").unlink()
    write_jsonl(beir / "queries.jsonl", [{"_id": "q0", "text": "zero"}, {"_id": "q1", "text": None}])
    with pytest.raises(DataError, match=r"queries.jsonl: row 2: missing field 'text'"):
        load_train_groups(str(beir), split="train", group_size=4)


def test_judged_docids_outside_the_corpus(beir, caplog):
    """Dropped and counted when some are there; an error naming the qrels file when none are."""
    import logging

    with caplog.at_level(logging.INFO, logger="dr.train.groups"):
        assert len(load_train_groups(str(beir), split="train", group_size=4)) == 6
    assert "1 qrels point to unknown documents" in caplog.text
    (beir / "qrels.train.trec").write_text("q0 0 nope 1\n")
    with pytest.raises(
        DataError, match=r"no query of split 'train' has a relevant document in qrels.train.trec"
    ):
        load_train_groups(str(beir), split="train", group_size=4)


def test_too_small_a_corpus_says_so(tmp_path):
    folder = make_beir_fixture(tmp_path / "beir", n_docs=4)
    (folder / "qrels.train.trec").write_text("q0 0 doc1 1\n")
    with pytest.raises(DataError, match="4 documents are too few to sample 3 negatives"):
        load_train_groups(str(folder), split="train", group_size=4)


def test_dr_train_names_a_duplicate_docid(beir, tiny_model_dir, tmp_path, capsys):
    from tests.helpers import command

    _corpus_with(beir, '{"_id": "doc3", "title": "", "text": "again"}')
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(beir), "--dataset_split", "train",
            "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--report_to", "none"]  # fmt: skip
    assert command("train")(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "duplicate _id 'doc3' at rows 4 and 6" in err
    assert not (tmp_path / "out" / "dr_config.json").exists()


def test_records_at_reads_rows_across_record_batches():
    """Random access finds each row in its record batch (several batches of unequal sizes), any order."""
    import datasets
    import pyarrow as pa

    from dr.io.corpus import InputSpec, TextCorpus

    rows = [_doc(i) for i in range(10)]
    batches = [pa.RecordBatch.from_pylist(rows[a:b]) for a, b in ((0, 3), (3, 4), (4, 10))]
    corpus = TextCorpus(
        datasets.Dataset(pa.Table.from_batches(batches)), InputSpec("t", "json"), "_id", "text", "title"
    )
    wanted = [9, 0, 3, 3, 4, 2]
    assert corpus.records_at(wanted) == tuple(
        [part[0] for part in column] for column in zip(*(corpus.records(r, r + 1) for r in wanted))
    )
    assert corpus.records_at(wanted)[1][0] == _doc_text("doc9")
    assert corpus.records_at([]) == ([], [])


def test_blank_texts_are_counted_in_steps(tmp_path, monkeypatch):
    from dr.io import corpus as corpus_module
    from dr.io.corpus import load_corpus

    write_jsonl(
        tmp_path / "c.jsonl", [{"_id": f"d{i}", "text": " " if i % 4 == 0 else "x"} for i in range(10)]
    )
    corpus = load_corpus(str(tmp_path / "c.jsonl"))
    assert corpus.validate(0, 10) == 3 and corpus.validate(1, 9) == 2
    monkeypatch.setattr(corpus_module, "BLANK_CHECK_ROWS", 3)
    assert corpus.validate(0, 10) == 3 and corpus.validate(1, 9) == 2
