"""`dr eval`: hand-computed metrics, official MS MARCO MRR@10 semantics, tie order, clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dr.io.qrels import read_qrels
from tests.helpers import command

evaluate_main = command("eval")

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MSMARCO = DATA / "msmarco-passage-format"

# Graded qrels. qA: rels 3 (a1), 1 (a2), 2 (a3). qB: one relevant doc never retrieved. qC: relevant doc
# but the query is missing from the run. qD: only a rel-0 judgment -> not evaluated at all.
QRELS = """qA 0 a1 3
qA 0 a2 1
qA 0 a3 2
qA 0 x9 0
qB 0 b1 1
qC 0 c1 2
qD 0 d1 0
"""
# qA ranking: x9 (rel 0), a2 (1), junk, a1 (3); a3 never retrieved. qB: only non-relevant docs.
# qZ is not in the qrels and must be ignored.
RUN = """qA\tx9\t4.0
qA\ta2\t3.0
qA\tjunk\t2.0
qA\ta1\t1.0
qB\tzz\t9.0
qB\tyy\t8.0
qZ\tz1\t1.0
"""


def hand_metrics() -> dict[str, float]:
    """The expected values, computed from the definitions (trec_eval's linear-gain nDCG)."""
    log2 = math.log2
    queries = 3  # qA, qB, qC: those with at least one rel >= 1
    rr = {"qA": 1 / 2, "qB": 0.0, "qC": 0.0}
    dcg = 1 / log2(3) + 3 / log2(5)  # a2 at rank 2, a1 at rank 4
    idcg = 3 / log2(2) + 2 / log2(3) + 1 / log2(4)
    ndcg = {"qA": dcg / idcg, "qB": 0.0, "qC": 0.0}
    ap = {"qA": (1 / 2 + 2 / 4) / 3, "qB": 0.0, "qC": 0.0}  # 3 relevant docs, 2 found at ranks 2 and 4
    recall = {"qA": 2 / 3, "qB": 0.0, "qC": 0.0}
    return {
        "MRR@10": sum(rr.values()) / queries,
        "nDCG@10": sum(ndcg.values()) / queries,
        "MAP": sum(ap.values()) / queries,
        "R@100": sum(recall.values()) / queries,
    }


@pytest.fixture
def fixture_files(tmp_path):
    (tmp_path / "qrels.trec").write_text(QRELS)
    (tmp_path / "rank.txt").write_text(RUN)
    return tmp_path


def test_hand_computed_fixture(fixture_files, capsys):
    out = fixture_files / "metrics.json"
    argv = ["--qrels", str(fixture_files / "qrels.trec"), "--run", str(fixture_files / "rank.txt")]
    assert evaluate_main([*argv, "--metrics", "MRR@10", "nDCG@10", "MAP", "R@100", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    for name, value in hand_metrics().items():
        assert results[name] == pytest.approx(value, abs=1e-12), name
    assert results["num_queries"] == 3 and results["num_missing_from_run"] == 1
    table = capsys.readouterr().out
    assert "MRR@10" in table and f"{hand_metrics()['MRR@10']:.4f}" in table


def test_home_relative_paths_from_flag_equals_form(fixture_files, monkeypatch):
    """`--qrels=~/x` reaches the program unexpanded (the shell leaves `~` after `=` alone)."""
    monkeypatch.setenv("HOME", str(fixture_files))
    out = fixture_files / "metrics.json"
    assert (
        evaluate_main(
            ["--qrels=~/qrels.trec", "--run=~/rank.txt", "--metrics", "MRR@10", "--output=~/metrics.json"]
        )
        == 0
    )
    assert json.loads(out.read_text())["MRR@10"] == pytest.approx(hand_metrics()["MRR@10"], abs=1e-12)


def test_mrr_cutoff_and_tie_order(tmp_path):
    """Equal scores rank by docid descending (trec_eval's rule): the relevant 'a' comes after 'b' -> RR 1/2,
    whatever the file order."""
    (tmp_path / "qrels").write_text("1 0 a 1\n2 0 r 1\n")
    (tmp_path / "run").write_text(
        "1 b 5.0\n1 a 5.0\n" + "".join(f"2 n{i:02d} {20 - i}.5\n" for i in range(10)) + "2 r 0.1\n"
    )
    out = tmp_path / "m.json"
    argv = ["--qrels", str(tmp_path / "qrels"), "--run", str(tmp_path / "run"), "--output", str(out)]
    assert evaluate_main([*argv, "--metrics", "MRR@10", "MRR@11", "RR"]) == 0
    results = json.loads(out.read_text())
    assert results["MRR@10"] == pytest.approx(0.5 / 2)  # query 2: relevant at rank 11 -> 0 within 10
    assert results["MRR@11"] == pytest.approx((0.5 + 1 / 11) / 2)
    assert results["RR"] == pytest.approx((0.5 + 1 / 11) / 2)  # trec_eval sees the same order


def test_two_column_qrels(tmp_path):
    (tmp_path / "qrels.tsv").write_text("1\tb\n2\tc\n")
    assert read_qrels(tmp_path / "qrels.tsv") == {"1": {"b": 1}, "2": {"c": 1}}


@pytest.mark.parametrize(
    "qrels,message",
    [
        ("1 0 a 1\n1 0 b\n", "qrels:2: 3 columns"),
        ("1 0 a x\n", "qrels:1: relevance 'x' is not an integer"),
        ("", "qrels: the qrels file is empty"),
        ("1 0 a 0\n", "no relevant (rel >= 1) judgment"),
        ("9 0 a 1\n", "none of the 1 judged queries appears in the run"),
    ],
)
def test_bad_qrels_or_mismatch(tmp_path, capsys, qrels, message):
    (tmp_path / "qrels").write_text(qrels)
    (tmp_path / "run").write_text("1 a 1.0\n")
    out = tmp_path / "m.json"
    argv = ["--qrels", str(tmp_path / "qrels"), "--run", str(tmp_path / "run"), "--output", str(out)]
    assert evaluate_main(argv) == 1  # bad files: exit status 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_unknown_metric(fixture_files, capsys):
    argv = ["--qrels", str(fixture_files / "qrels.trec"), "--run", str(fixture_files / "rank.txt")]
    assert evaluate_main([*argv, "--metrics", "Bogus@3"]) == 2
    assert "unknown metric 'Bogus@3'" in capsys.readouterr().err


def _load_msmarco_qrels(path: Path) -> dict[str, set[str]]:
    """Independent reader: the official evaluator treats every qrels line as a relevant passage."""
    relevant: dict[str, set[str]] = {}
    for line in path.read_text().splitlines():
        qid, _, docid, _ = line.split()
        relevant.setdefault(qid, set()).add(docid)
    return relevant


@pytest.mark.skipif(not MSMARCO.is_dir(), reason=f"real data not found at {MSMARCO}")
@pytest.mark.parametrize(
    "qrels_name", ["qrels.dev-subset.trec", "original/qrels.msmarco-passage.dev-subset.txt"]
)
def test_official_mrr_on_msmarco_dev_subset(tmp_path, qrels_name):
    """A synthetic MS MARCO run with known ranks: MRR@10 divides by ALL 6,980 judged queries."""
    qrels = _load_msmarco_qrels(MSMARCO / qrels_name)
    lines, expected_sum = [], 0.0
    for i, (qid, docs) in enumerate(sorted(qrels.items())):
        if i % 7 == 0:
            continue  # missing from the run: counts 0
        target = i % 13 + 1  # rank of the first relevant passage; 11..13 fall outside the top 10
        hits = [f"fake{i}_{j}" for j in range(15)]
        hits[target - 1] = min(docs)
        lines += [f"{qid}\t{docid}\t{rank}\n" for rank, docid in enumerate(hits, 1)]
        expected_sum += 1 / target if target <= 10 else 0.0
    expected = expected_sum / len(qrels)
    (tmp_path / "run.marco").write_text("".join(lines))
    out = tmp_path / "metrics.json"
    argv = ["--qrels", str(MSMARCO / qrels_name), "--run", str(tmp_path / "run.marco"), "--output", str(out)]
    assert evaluate_main([*argv, "--metrics", "MRR@10", "R@1000"]) == 0
    results = json.loads(out.read_text())
    assert len(qrels) == 6980 and results["num_queries"] == 6980
    assert results["MRR@10"] == pytest.approx(expected, abs=1e-12)
    # R@1000: the first relevant of each present query is retrieved; queries with several relevant get a share.
    expected_recall = sum(1 / len(d) for i, (_, d) in enumerate(sorted(qrels.items())) if i % 7) / len(qrels)
    assert results["R@1000"] == pytest.approx(expected_recall, abs=1e-12)


@pytest.mark.skipif(not (DATA / "cranfield").is_dir(), reason="cranfield data not found")
def test_graded_cranfield_qrels_load():
    qrels = read_qrels(DATA / "cranfield" / "qrels.trec")
    assert len(qrels) == 225 and max(max(d.values()) for d in qrels.values()) == 4
