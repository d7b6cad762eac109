"""`dr fuse`: RRF and linear fusion against hand computations, partial documents and queries, the tie rule
on the output, unscored (MS MARCO) runs, and the errors."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from dr.errors import UsageError
from dr.fuse.fusion import LinearNeedsScores, fuse, normalize
from dr.io.runs import Run, read_run
from tests.helpers import command

fuse_cmd = command("fuse")


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def fuse_files(out: Path, *flags: str) -> int:
    """`dr fuse --save_ranking_to out FLAGS` in this process: the exit status."""
    return fuse_cmd(["--save_ranking_to", str(out), *flags])


def scores_of(run: Run, qid: str) -> list[tuple[str, float]]:
    return run.rankings[qid]


# Run A ranks q1: a (3.0), b (2.0), c (1.0); run B ranks q1: b (0.9), a (0.8), d (0.1).
RUN_A = "q1\ta\t3.0\nq1\tb\t2.0\nq1\tc\t1.0\n"
RUN_B = "q1\tb\t0.9\nq1\ta\t0.8\nq1\td\t0.1\n"


# ---- RRF -------------------------------------------------------------------------------------------------
def test_rrf_by_hand_with_a_tie_broken_by_docid_descending(tmp_path):
    out = tmp_path / "fused.txt"
    a, b = write(tmp_path / "a.txt", RUN_A), write(tmp_path / "b.txt", RUN_B)
    code = fuse_files(out, "--runs", a, b, "--method", "rrf", "--depth", "10")
    assert code == 0
    fused, _ = read_run(out)
    # a: 1/61 + 1/62, b: 1/62 + 1/61 (exactly equal: fsum) -> tie, b before a (docid descending);
    # c: 1/63 (only in A), d: 1/63 (only in B) -> tie, d before c.
    expected = [("b", 1 / 61 + 1 / 62), ("a", 1 / 61 + 1 / 62), ("d", 1 / 63), ("c", 1 / 63)]
    got = scores_of(fused, "q1")
    assert [d for d, _ in got] == [d for d, _ in expected]
    assert all(math.isclose(s, e, rel_tol=1e-15) for (_, s), (_, e) in zip(got, expected))
    assert got[0][1] == got[1][1] and got[2][1] == got[3][1]  # exact ties, decided by the rule


def test_rrf_sums_are_exact_whatever_the_order_of_three_runs():
    """x, y, z have the ranks 1, 2, 7 in three runs, in rotated orders. Added left to right, y's sum comes
    out one ulp lower than x's and z's; fsum makes the three equal, so the tie rule orders them."""

    def ranked(first: str, second: str, seventh: str, run: str) -> Run:
        docids = [first, second] + [f"{run}{i}" for i in range(4)] + [seventh]
        return Run({"q": [(d, float(10 - i)) for i, d in enumerate(docids)]})

    runs = [ranked("x", "z", "y", "a"), ranked("y", "x", "z", "b"), ranked("z", "y", "x", "c")]
    fused, _ = fuse(runs, "rrf", depth=3)
    assert [d for d, _ in fused.rankings["q"]] == ["z", "y", "x"]
    assert len({s for _, s in fused.rankings["q"]}) == 1


def test_rrf_weights_and_k_and_depth():
    runs = [Run({"q": [("a", 2.0), ("b", 1.0)]}), Run({"q": [("b", 2.0), ("a", 1.0)]})]
    fused, _ = fuse(runs, "rrf", depth=1, weights=[1.0, 3.0], rrf_k=0.0)
    # a: 1/1 + 3/2 = 2.5, b: 1/2 + 3/1 = 3.5
    assert fused.rankings["q"] == [("b", 3.5)]


def test_rrf_uses_the_ranks_of_an_ms_marco_run(tmp_path):
    marco = write(tmp_path / "m.marco", "q1\tc\t1\nq1\ta\t2\n")
    out = tmp_path / "fused.txt"
    assert fuse_files(out, "--runs", write(tmp_path / "a.txt", RUN_A), marco, "--depth", "10") == 0
    fused, _ = read_run(out)
    got = dict(scores_of(fused, "q1"))
    assert got["c"] == pytest.approx(1 / 63 + 1 / 61) and got["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert got["b"] == pytest.approx(1 / 62)
    assert [d for d, _ in scores_of(fused, "q1")] == ["a", "c", "b"]  # a: 1/61 + 1/62 > c: 1/61 + 1/63


# ---- linear ----------------------------------------------------------------------------------------------
def test_linear_minmax_by_hand_missing_docs_get_zero(tmp_path):
    out = tmp_path / "fused.trec"
    a, b = write(tmp_path / "a.txt", RUN_A), write(tmp_path / "b.txt", RUN_B)
    flags = ["--method", "linear", "--weights", "0.5", "2", "--depth", "10", "--run_format", "trec"]
    code = fuse_files(out, "--runs", a, b, *flags)
    assert code == 0
    fused, fmt = read_run(out)
    assert fmt == "trec"
    # A minmax: a 1, b 0.5, c 0 (d missing: 0). B minmax over [0.9, 0.8, 0.1]: b 1, a 0.875, d 0 (c: 0).
    expected = {"a": 0.5 * 1 + 2 * 0.875, "b": 0.5 * 0.5 + 2 * 1, "c": 0.0, "d": 0.0}
    got = dict(scores_of(fused, "q1"))
    assert got == pytest.approx(expected)
    assert [d for d, _ in scores_of(fused, "q1")] == ["b", "a", "d", "c"]  # c, d tied at 0: d first


def test_linear_zscore_by_hand_missing_docs_get_the_runs_lowest():
    run_a = Run({"q": [("a", 3.0), ("b", 2.0), ("c", 1.0)]})
    run_b = Run({"q": [("b", 4.0), ("d", 0.0)]})
    fused, _ = fuse([run_a, run_b], "linear", depth=10, normalization="zscore")
    std_a = math.sqrt(2 / 3)  # population std of 3, 2, 1
    za = {"a": 1 / std_a, "b": 0.0, "c": -1 / std_a}
    zb = {"b": 1.0, "d": -1.0}  # mean 2, std 2
    expected = {
        "a": za["a"] + (-1.0),  # missing from B: B's lowest z
        "b": za["b"] + zb["b"],
        "c": za["c"] + (-1.0),
        "d": min(za.values()) + zb["d"],  # missing from A: A's lowest z
    }
    assert dict(fused.rankings["q"]) == pytest.approx(expected)


def test_linear_normalize_none_uses_raw_scores_and_the_lowest_for_missing():
    runs = [Run({"q": [("a", 5.0), ("b", 1.0)]}), Run({"q": [("b", 2.0)]})]
    fused, _ = fuse(runs, "linear", 10, normalization="none")
    assert dict(fused.rankings["q"]) == {"a": 7.0, "b": 3.0}


def test_all_equal_scores_minmax_half_zscore_zero():
    hits = [("a", 2.0), ("b", 2.0)]
    assert normalize(hits, "minmax") == ({"a": 0.5, "b": 0.5}, 0.0)
    assert normalize(hits, "zscore") == ({"a": 0.0, "b": 0.0}, 0.0)
    # the flat run still lifts its own hits above a document it did not return
    fused, _ = fuse([Run({"q": hits}), Run({"q": [("c", 1.0), ("a", 0.0)]})], "linear", 10)
    assert dict(fused.rankings["q"]) == {"a": 0.5, "b": 0.5, "c": 1.0}


def test_linear_refuses_ms_marco_runs(tmp_path):
    marco = write(tmp_path / "m.marco", "q1\tc\t1\nq1\ta\t2\n")
    with pytest.raises(LinearNeedsScores, match=r"m\.marco: an MS MARCO run.*--method rrf"):
        runs = [read_run(marco)[0], read_run(write(tmp_path / "a.txt", RUN_A))[0]]
        fuse(runs, "linear", names=[marco, "a.txt"])
    code = fuse_files(tmp_path / "o.txt", "--runs", str(tmp_path / "a.txt"), marco, "--method", "linear")
    assert code == 2 and not (tmp_path / "o.txt").exists()


# ---- partial queries -------------------------------------------------------------------------------------
def test_query_in_only_some_runs_is_fused_from_those_and_warned_once(tmp_path, caplog):
    a = write(tmp_path / "a.txt", RUN_A + "q2\tx\t1.5\n")
    b = write(tmp_path / "b.txt", RUN_B + "q3\ty\t0.5\nq3\tz\t0.25\n")
    out = tmp_path / "fused.txt"
    with caplog.at_level(logging.WARNING, logger="dr.fuse"):
        assert fuse_files(out, "--runs", a, b, "--method", "linear") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("2 of 3 queries")
    fused, _ = read_run(out)
    assert list(fused.rankings) == ["q1", "q2", "q3"]
    assert fused.rankings["q2"] == [("x", 0.5)]  # one hit: minmax 0.5, no other run to add
    assert fused.rankings["q3"] == [("y", 1.0), ("z", 0.0)]
    config = json.loads(Path(str(out) + ".config.json").read_text())
    assert config["num_partial_queries"] == 2 and [i["format"] for i in config["inputs"]] == ["tevatron"] * 2


# ---- errors ----------------------------------------------------------------------------------------------
def test_weights_count_mismatch_is_a_usage_error(tmp_path):
    a, b = write(tmp_path / "a.txt", RUN_A), write(tmp_path / "b.txt", RUN_B)
    assert fuse_files(tmp_path / "o.txt", "--runs", a, b, "--weights", "1") == 2
    with pytest.raises(UsageError, match="1 weights for 2 runs"):
        fuse([Run(), Run()], weights=[1.0])


def test_bad_line_is_named_by_file_and_line(tmp_path, caplog):
    bad = write(tmp_path / "bad.txt", "q1\ta\t1.5\nq1\tb\tnot-a-number\n")
    with caplog.at_level(logging.ERROR):
        code = fuse_files(tmp_path / "o.txt", "--runs", write(tmp_path / "a.txt", RUN_A), bad)
    assert code == 1 and f"{bad}:2: score 'not-a-number' is not a number" in caplog.text
    assert not (tmp_path / "o.txt").exists()


def test_missing_run_file_and_other_usage_errors(tmp_path, caplog):
    a = write(tmp_path / "a.txt", RUN_A)
    out = tmp_path / "o.txt"
    with caplog.at_level(logging.ERROR):
        assert fuse_files(out, "--runs", a, str(tmp_path / "nope.txt")) == 1
    assert "nope.txt: run file not found" in caplog.text
    assert fuse_files(out, "--runs", a) == 2  # one run
    assert fuse_files(out, "--runs", a, a, "--normalize", "zscore") == 2  # rrf has no normalization
    assert fuse_files(out, "--runs", a, a, "--run_formats", "trec", "marco", "tevatron") == 2
    assert fuse_files(out, "--runs", a, a, "--weights", "1", "-1") == 2
    assert not out.exists()


def test_ambiguous_run_needs_run_formats(tmp_path):
    ints = write(tmp_path / "ints.txt", "q1\ta\t1\nq1\tb\t2\n")
    a, out = write(tmp_path / "a.txt", RUN_A), tmp_path / "o.txt"
    assert fuse_files(out, "--runs", ints, a) == 2
    assert fuse_files(out, "--runs", ints, a, "--run_formats", "marco", "tevatron") == 0
    fused, _ = read_run(out)
    assert fused.rankings["q1"][0][0] == "a"  # a: rank 1 in both (1/61 + 1/61)
