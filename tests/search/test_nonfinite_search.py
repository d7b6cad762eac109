"""NaN / +-inf vectors: `dr search` (exact, ANN, 2 ranks) and `dr quantize` refuse them with the file, row
and id, exit status 1 and no output; before, a NaN ended in a traceback and +inf was ranked first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dr.io.shards import write_shard
from tests.helpers import command
from tests.search.test_search import meta, random_data, torchrun, write_queries

search = command("search")
quantize = command("quantize")

BAD_ROW = 23  # in the second shard
VALUES = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}


def _corpus(folder: Path, dtype: str = "float32", bad: float | None = None, side: str = "passage") -> Path:
    """Shards of 40, 60 and 30 rows, and 5 queries; `bad` goes into row BAD_ROW of corpus.01 (passage) or
    of the query shard (query), at position 7. Returns the file that holds it."""
    queries, passages, ids = random_data(130, 5, seed=3)
    passages = passages.astype(dtype)
    if bad is not None and side == "passage":
        passages[40 + BAD_ROW, 7] = bad
    if bad is not None and side == "query":
        queries[3, 7] = bad
    start = 0
    for i, size in enumerate([40, 60, 30]):
        write_shard(
            folder / f"corpus.{i:02d}.arrow", meta(size, dtype=dtype), ids[start : start + size],
            passages[start : start + size],
        )  # fmt: skip
        start += size
    write_queries(folder / "queries.arrow", queries)
    return folder / ("corpus.01.arrow" if side == "passage" else "queries.arrow")


def _argv(folder: Path, *extra: str) -> list[str]:
    return [
        "--query_reps", str(folder / "queries.arrow"), "--passage_reps", str(folder / "corpus.*.arrow"),
        "--save_ranking_to", str(folder / "run.txt"), "--depth", "10", "--quiet", *extra,
    ]  # fmt: skip


def _assert_refused(err: str, folder: Path, bad_file: Path, row: int) -> None:
    assert "Traceback" not in err and "ArrowIndexError" not in err, err
    assert f"{bad_file}: row {row} " in err and "position 7 of" in err and "NaN or inf" in err, err
    assert not (folder / "run.txt").exists() and not (folder / "run.txt.config.json").exists()


@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(
    "mode",
    [[], ["--max_memory", "2K"], ["--index_factory", "Flat"]],
    ids=["exact", "exact-small-blocks", "ann-flat"],
)
def test_passage_shard_with_non_finite_value(tmp_path, capsys, value, dtype, mode):
    bad_file = _corpus(tmp_path, dtype, VALUES[value])
    assert search(_argv(tmp_path, *mode)) == 1
    _assert_refused(capsys.readouterr().err, tmp_path, bad_file, BAD_ROW)


@pytest.mark.parametrize("value", list(VALUES))
def test_query_shard_with_non_finite_value(tmp_path, capsys, value):
    bad_file = _corpus(tmp_path, bad=VALUES[value], side="query")
    assert search(_argv(tmp_path)) == 1
    err = capsys.readouterr().err
    _assert_refused(err, tmp_path, bad_file, 3)
    assert "(id 'q3')" in err


def test_error_names_the_docid(tmp_path, capsys):
    _corpus(tmp_path, bad=np.nan)
    _, _, ids = random_data(130, 5, seed=3)
    assert search(_argv(tmp_path)) == 1
    assert f"(id {ids[40 + BAD_ROW]!r})" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["int8", "binary"])
def test_quantize_refuses_non_finite_input(tmp_path, capsys, kind):
    bad_file = _corpus(tmp_path, bad=np.inf)
    assert quantize(["--passage_reps", str(tmp_path / "corpus.*.arrow"), "--quantize", kind]) == 1
    err = capsys.readouterr().err
    assert f"{bad_file}: row {BAD_ROW} " in err and "Traceback" not in err, err
    assert not (tmp_path / kind / "corpus.01.arrow").exists()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_ranks_the_failing_rank_reports(tmp_path):
    bad_file = _corpus(tmp_path, bad=np.nan)
    proc = torchrun(tmp_path, "--depth", "10", "--max_memory", "2K")
    assert proc.returncode != 0
    assert proc.stderr.count(f"dr search: error: {bad_file}: row {BAD_ROW} ") == 1, proc.stderr[-3000:]
    assert not (tmp_path / "run.txt").exists()


def test_float32_passage_whose_scores_overflow_is_refused(tmp_path, capsys):
    """Finite values so large that the float32 dot product overflows to inf: the same refusal, named."""
    queries, passages, ids = random_data(50, 5, seed=3)
    passages[BAD_ROW] = 3e38  # finite, but its score against any query is > float32's max
    write_shard(tmp_path / "corpus.00.arrow", meta(50), ids, passages)
    write_queries(tmp_path / "queries.arrow", np.abs(queries))
    assert search(_argv(tmp_path)) == 1
    err = capsys.readouterr().err
    assert f"corpus.00.arrow: row {BAD_ROW} " in err and "overflow" in err and "Traceback" not in err, err
    assert not (tmp_path / "run.txt").exists()
