"""`dr bm25`: the same hits and scores as bm25s on a tiny corpus, cut by the tie rule; the index reused only
for the same corpus and settings; inputs as `dr encode` reads them; run formats; errors."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import bm25s
import pytest

from dr.io.runs import read_run
from dr.ranking import sort_hits
from tests.helpers import command, write_jsonl

bm25_cmd = command("bm25")

CORPUS = [
    {"docid": "d1", "title": "Cats", "text": "the cat sat on the mat"},
    {"docid": "d2", "title": "", "text": "dogs chase cats in the park"},
    {"docid": "d3", "title": "", "text": "a dog and a cat are friends"},
    {"docid": "d4", "title": "", "text": "quantum physics of black holes"},
    {"docid": "d10", "title": "", "text": "dog park bench"},
    {"docid": "d9", "title": "", "text": "dog park bench"},  # same text as d10: tied, d9 ranks first
    {"docid": "d5", "title": "", "text": "the cat and the dog in the park at night"},
]
QUERIES = "q1\tcat on a mat\nq2\tdog park\nq3\tzebra\nq4\tcats\n"


@pytest.fixture
def data(tmp_path: Path) -> tuple[str, str]:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    queries = tmp_path / "queries.tsv"
    queries.write_text(QUERIES)
    return str(corpus), str(queries)


def bm25(corpus: str, queries: str, out: Path, *flags: str) -> int:
    """`dr bm25` in this process: the exit status."""
    return bm25_cmd(["--corpus", corpus, "--queries", queries, "--save_ranking_to", str(out), *flags])


def bm25s_reference(k1: float, b: float, depth: int) -> dict[str, list[tuple[str, float]]]:
    """bm25s alone: every document's score per query, positive ones cut at `depth` by the tie rule."""
    texts = [f"{r['title']} {r['text']}" if r["title"] else r["text"] for r in CORPUS]
    retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    qids, qtexts = zip(*(line.split("\t") for line in QUERIES.splitlines()))
    tokens = bm25s.tokenize(list(qtexts), stopwords="en", show_progress=False)
    rows, scores = retriever.retrieve(tokens, k=len(CORPUS), show_progress=False)
    out = {}
    for qid, row, score in zip(qids, rows, scores):
        hits = [(CORPUS[int(i)]["docid"], float(s)) for i, s in zip(row, score) if s > 0]
        if hits:
            out[qid] = sort_hits(hits)[:depth]
    return out


def test_same_hits_and_scores_as_bm25s_with_ties_by_docid_descending(data, tmp_path):
    corpus, queries = data
    out = tmp_path / "run.txt"
    assert bm25(corpus, queries, out, "--depth", "3") == 0
    run, fmt = read_run(out)
    assert fmt == "tevatron"
    assert run.rankings == bm25s_reference(0.9, 0.4, 3)  # exact floats: scores written losslessly
    assert [d for d, _ in run.rankings["q2"][:2]] == ["d9", "d10"]
    assert "q3" not in run.rankings  # no word in the corpus: no hits
    assert sorted(d for d, _ in run.rankings["q4"]) == [
        "d1",
        "d2",
    ]  # d1 by its title, joined as dr encode does
    config = json.loads(Path(str(out) + ".config.json").read_text())
    assert config["args"]["k1"] == 0.9 and config["index"]["settings"]["b"] == 0.4
    assert config["num_queries_without_hits"] == 1 and config["index"]["reused"] is False


def test_tied_cut_keeps_the_rules_document(data, tmp_path):
    """d9 and d10 tie for q2's top; depth 1 must keep d9 (docid descending), whatever bm25s' partition does."""
    corpus, queries = data
    out = tmp_path / "run.txt"
    assert bm25(corpus, queries, out, "--depth", "1", "--threads", "2") == 0
    run, _ = read_run(out)
    assert [d for d, _ in run.rankings["q2"]] == ["d9"]
    assert run.rankings == bm25s_reference(0.9, 0.4, 1)


def test_k1_b_flags_reach_bm25s(data, tmp_path):
    corpus, queries = data
    out = tmp_path / "run.txt"
    assert bm25(corpus, queries, out, "--depth", "5", "--k1", "1.5", "--b", "0.75") == 0
    assert read_run(out)[0].rankings == bm25s_reference(1.5, 0.75, 5)
    assert bm25s_reference(1.5, 0.75, 5) != bm25s_reference(0.9, 0.4, 5)


def test_index_reused_then_rebuilt_when_corpus_or_settings_change(data, tmp_path, caplog):
    corpus, queries = data
    index_dir, out = tmp_path / "index", tmp_path / "run.txt"
    args = [corpus, queries, out, "--depth", "10", "--index_dir", str(index_dir)]
    assert bm25(*args) == 0
    first = read_run(out)[0].rankings
    assert (index_dir / "dr_bm25.json").is_file()

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dr.bm25"):
        assert bm25(*args) == 0
    assert "reusing the index" in caplog.text and "indexing" not in caplog.text
    assert read_run(out)[0].rankings == first
    assert json.loads(Path(str(out) + ".config.json").read_text())["index"]["reused"] is True

    # The corpus copied again (new file, new mtime, same bytes): still the same corpus, the index is reused.
    data_bytes = Path(corpus).read_bytes()
    Path(corpus).unlink()
    Path(corpus).write_bytes(data_bytes)
    os.utime(corpus, (1_000_000_000, 1_000_000_000))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dr.bm25"):
        assert bm25(*args) == 0
    assert "reusing the index" in caplog.text and "indexing" not in caplog.text

    # The corpus changes: a new passage about zebras must be found, so the index must be rebuilt.
    write_jsonl(Path(corpus), CORPUS + [{"docid": "d6", "title": "", "text": "a zebra"}])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dr.bm25"):
        assert bm25(*args) == 0
    assert "index built for another corpus; rebuilding" in caplog.text
    assert read_run(out)[0].rankings["q3"][0][0] == "d6"

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dr.bm25"):
        assert bm25(*args, "--k1", "1.2") == 0
    assert "index built for another settings.k1; rebuilding" in caplog.text
    assert json.loads((index_dir / "dr_bm25.json").read_text())["settings"]["k1"] == 1.2


def test_index_dir_with_foreign_files_is_refused(data, tmp_path):
    corpus, queries = data
    index_dir = tmp_path / "mine"
    index_dir.mkdir()
    (index_dir / "notes.txt").write_text("keep me")
    code = bm25(corpus, queries, tmp_path / "r.txt", "--index_dir", str(index_dir))
    assert code == 2 and (index_dir / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("fmt", ["trec", "marco", "tevatron"])
def test_run_formats_agree(data, tmp_path, fmt):
    corpus, queries = data
    out = tmp_path / f"run.{fmt}"
    assert bm25(corpus, queries, out, "--depth", "4", "--run_format", fmt) == 0
    run, _ = read_run(out, fmt)
    expected = bm25s_reference(0.9, 0.4, 4)
    assert {q: [d for d, _ in hits] for q, hits in run.rankings.items()} == {
        q: [d for d, _ in hits] for q, hits in expected.items()
    }
    if fmt == "trec":
        assert out.read_text().splitlines()[0].endswith(" bm25")


def test_beir_folder_inputs(tmp_path):
    folder = tmp_path / "beir"
    beir_rows = [{"_id": r["docid"], "title": r["title"], "text": r["text"]} for r in CORPUS]
    write_jsonl(folder / "corpus.jsonl", beir_rows)
    write_jsonl(folder / "queries.jsonl", [{"_id": "q1", "text": "cats"}])
    out = tmp_path / "run.txt"
    assert bm25(str(folder), str(folder), out) == 0
    assert sorted(d for d, _ in read_run(out)[0].rankings["q1"]) == ["d1", "d2"]  # d1 by its title


def test_bad_flags_and_duplicate_docids(data, tmp_path):
    corpus, queries = data
    out = tmp_path / "r.txt"
    assert bm25(corpus, queries, out, "--depth", "0") == 2
    assert bm25(corpus, queries, out, "--b", "1.5") == 2
    assert (
        bm25(corpus, queries, out, "--stemmer", "no-such-stemmer") == 2
    )  # PyStemmer missing, or no such one
    dup = write_jsonl(tmp_path / "dup.jsonl", CORPUS + [CORPUS[0]])
    assert bm25(str(dup), queries, out) == 1
    assert not (tmp_path / "r.txt").exists()
