"""`dr quantize` and `dr search --quantize/--rescore`: the shard format read with plain pyarrow, equality with
exact search when the rescoring covers the corpus (ties included), and bad flags / bad shards."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pytest

from dr.index.quantize import Int8Calibration
from dr.io.runs import read_run
from tests.helpers import command
from tests.search.test_search import make_corpus, meta, tied_data, write_queries

quantize = command("quantize")
search = command("search")
DIM = 16


@pytest.fixture
def corpus(tmp_path):
    queries, passages, ids = tied_data(240, 9, dim=DIM, distinct=40)
    paths = make_corpus(tmp_path, passages, ids, [70, 0, 90, 80])
    write_queries(tmp_path / "q.arrow", queries)
    return tmp_path, paths, passages, ids


def read_arrow(path):
    return pa.ipc.open_file(str(path)).read_all()


def test_binary_shards_round_trip_with_plain_pyarrow(corpus):
    folder, paths, passages, ids = corpus
    assert quantize(["--passage_reps", str(folder / "corpus.*.arrow"), "--quantize", "binary"]) == 0
    start = 0
    for path in paths:
        table = read_arrow(folder / "binary" / path.rsplit("/", 1)[1])
        meta_ = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
        assert table.schema.names == ["id", "code"]
        assert meta_["dr.quantize"] == "binary" and meta_["dr.code_bytes"] == str(DIM // 8)
        assert meta_["dr.dim"] == str(DIM) and meta_["dr.count"] == str(len(table))
        codes = table.column("code").combine_chunks().flatten().to_numpy().reshape(-1, DIM // 8)
        floats = passages[start : start + len(table)]
        np.testing.assert_array_equal(np.unpackbits(codes, axis=1).astype(bool), floats > 0)
        assert table.column("id").to_pylist() == ids[start : start + len(table)]
        start += len(table)
    manifest = json.loads((folder / "binary" / "binary.manifest.json").read_text())
    assert [f["path"] for f in manifest["files"]] == sorted(p.rsplit("/", 1)[1] for p in paths)
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])


def test_int8_shards_round_trip_and_rerun_keeps_them(corpus, caplog):
    folder, paths, passages, _ = corpus
    argv = ["--passage_reps", str(folder / "corpus.*.arrow"), "--quantize", "int8", "--max_memory", "200"]
    assert quantize(argv) == 0
    out = folder / "int8" / paths[2].rsplit("/", 1)[1]
    table = read_arrow(out)
    raw = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    offset, scale = (np.array(json.loads(raw[k]), np.float32) for k in ("dr.int8_offset", "dr.int8_scale"))
    np.testing.assert_array_equal(offset, passages.min(axis=0))  # calibrated on the whole corpus
    codes = table.column("code").combine_chunks().flatten().to_numpy().reshape(-1, DIM)
    assert codes.dtype == np.int8
    decoded = offset + scale * (codes.astype(np.float32) + 128)
    np.testing.assert_allclose(decoded, passages[70:160], atol=float(scale.max()) / 2 + 1e-6)
    calibration = Int8Calibration.from_metadata(raw, DIM, str(out))
    np.testing.assert_array_equal(calibration.encode(passages[70:160]), codes)
    before = out.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="dr.quantize"):
        assert quantize(argv) == 0
    assert out.stat().st_mtime_ns == before and "0 shard(s) written, 4 kept" in caplog.text


def _run(folder, name, *extra):
    run_file = folder / f"{name}.txt"
    argv = ["--query_reps", str(folder / "q.arrow"), "--passage_reps", str(folder / "corpus.*.arrow")]
    assert search([*argv, "--depth", "30", "--save_ranking_to", str(run_file), *extra]) == 0
    return read_run(str(run_file))[0]


@pytest.mark.parametrize("kind", ["binary", "int8"])
def test_rescore_covering_the_corpus_equals_exact_search_with_ties(corpus, kind):
    folder, *_ = corpus
    assert quantize(["--passage_reps", str(folder / "corpus.*.arrow"), "--quantize", kind]) == 0
    exact = _run(folder, "exact")
    # 8 * 30 >= 240 passages; tiny blocks and query batches exercise the merges.
    got = _run(folder, kind, "--quantize", kind, "--rescore", "8", "--max_memory", "256", "--batch_size", "4")
    assert got.rankings == exact.rankings  # ids and scores (the scores are small integers: exact)
    approx = _run(folder, kind + "-first", "--quantize", kind, "--rescore", "1")
    assert all(len(hits) == 30 for hits in approx.rankings.values())


def test_rescore_equals_exact_on_float_vectors(tmp_path):
    rng = np.random.default_rng(5)
    passages = rng.standard_normal((150, 32)).astype(np.float16)
    ids = [f"d{j}" for j in rng.permutation(150)]
    make_corpus(tmp_path, passages, ids, [60, 90], dtype="float16")
    write_queries(tmp_path / "q.arrow", rng.standard_normal((7, 32)).astype(np.float32))
    assert quantize(["--passage_reps", str(tmp_path / "corpus.*.arrow"), "--quantize", "binary"]) == 0
    exact = _run(tmp_path, "exact")
    got = _run(tmp_path, "bin", "--quantize", "binary", "--rescore", "5")
    for qid, hits in exact.rankings.items():
        assert [d for d, _ in got.rankings[qid]] == [d for d, _ in hits]
        np.testing.assert_allclose([s for _, s in got.rankings[qid]], [s for _, s in hits], rtol=1e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--quantize", "binary", "--rescore", "0"], "--rescore"),
        (["--quantize", "int4"], "--quantize"),
        (["--rescore", "3"], "--rescore needs --quantize"),
        (["--quantize", "int8", "--use_gpu"], "--use_gpu"),
    ],
)
def test_bad_search_flags_exit_2_with_one_line(corpus, capsys, extra, message):
    folder, *_ = corpus
    argv = ["--query_reps", str(folder / "q.arrow"), "--passage_reps", str(folder / "corpus.*.arrow")]
    assert search([*argv, "--save_ranking_to", str(folder / "r.txt"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err and "Traceback" not in err
    assert not (folder / "r.txt").exists()


def test_binary_needs_a_dim_divisible_by_8(tmp_path, capsys):
    rng = np.random.default_rng(0)
    make_corpus(
        tmp_path, rng.standard_normal((10, 12)).astype(np.float32), [f"d{i}" for i in range(10)], [10]
    )
    write_queries(tmp_path / "q.arrow", rng.standard_normal((2, 12)).astype(np.float32))
    glob = str(tmp_path / "corpus.*.arrow")
    assert quantize(["--passage_reps", glob, "--quantize", "binary"]) == 2
    argv = ["--query_reps", str(tmp_path / "q.arrow"), "--passage_reps", glob, "--save_ranking_to", "r.txt"]
    assert search([*argv, "--quantize", "binary"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("divisible by 8" in line and "dim 12" in line for line in err)
    assert not (tmp_path / "binary").exists()


def test_missing_or_mismatched_quantized_shards_exit_1(corpus, capsys):
    folder, paths, passages, ids = corpus
    argv = ["--query_reps", str(folder / "q.arrow"), "--passage_reps", str(folder / "corpus.*.arrow")]
    argv += ["--save_ranking_to", str(folder / "r.txt"), "--quantize", "int8", "--rescore", "2"]
    assert search(argv) == 1
    assert "run `dr quantize" in capsys.readouterr().err
    assert quantize(["--passage_reps", str(folder / "corpus.*.arrow"), "--quantize", "int8"]) == 0
    capsys.readouterr()
    # The float shard re-encoded with other ids after quantizing: the codes no longer belong to it.
    from dr.io.shards import write_shard

    swapped = ids[70:160][::-1]
    write_shard(paths[2], meta(90, dim=DIM), swapped, passages[70:160])
    assert search([*argv, "--verify", "none"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "does not match the float shard" in err and "row 0" in err
    # Codes of another dimension under the right name.
    make_corpus(folder / "other", np.ones((90, 8), np.float32), swapped, [90])
    quantize(["--passage_reps", str(folder / "other" / "corpus.00.arrow"), "--quantize", "int8",
              "--output_dir", str(folder / "int8-other")])  # fmt: skip
    capsys.readouterr()
    (folder / "int8-other" / "corpus.00.arrow").replace(folder / "int8" / paths[2].rsplit("/", 1)[1])
    assert search([*argv, "--verify", "none"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "dim=codes 8 vs floats 16" in err
    assert not (folder / "r.txt").exists()


def test_the_reading_recipe_in_docs_formats_md_works(corpus, monkeypatch):
    import re

    from tests.helpers import REPO

    folder, paths, passages, _ = corpus
    assert quantize(["--passage_reps", paths[0], "--quantize", "int8"]) == 0
    (folder / "int8" / "corpus.arrow").symlink_to(folder / "int8" / "corpus.00.arrow")
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "formats.md").read_text(), re.DOTALL)
    monkeypatch.chdir(folder)
    namespace: dict = {}
    exec(compile(blocks[-1], "docs/formats.md", "exec"), namespace)  # noqa: S102 - our own docs
    scale = namespace["scale"]
    np.testing.assert_allclose(namespace["approx"], passages[:70], atol=float(scale.max()) / 2 + 1e-6)
