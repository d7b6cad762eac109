"""`dr search --index_dir`: stale shards refused, --rescore gives exact scores, short hit lists reported."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from dr.io.runs import read_run
from tests.index.test_index_build import (
    SIZES,
    clustered,
    corpus,
    index_argv,
    index_main,
    search_argv,
    search_main,
)
from tests.search.test_search import brute_force, make_corpus

__all__ = ["corpus"]  # the fixture, shared with test_index_build


def test_changed_passage_shard_is_refused(corpus, capsys):
    assert index_main(index_argv(corpus, "idx")) == 0
    make_corpus(
        corpus, clustered(sum(SIZES), seed=7), [f"p{j}" for j in range(sum(SIZES))], SIZES
    )  # re-encoded
    assert search_main(search_argv(corpus, "idx", "run.txt")) == 1
    err = capsys.readouterr().err
    assert "corpus.00.arrow: passage shard changed since the index was built" in err, err
    assert not (corpus / "run.txt").exists() and not (corpus / "run.txt.config.json").exists()


def test_removed_passage_shard_is_refused(corpus, capsys):
    assert index_main(index_argv(corpus, "idx")) == 0
    (corpus / "corpus.03.arrow").unlink()
    assert search_main(search_argv(corpus, "idx", "run.txt")) == 1
    err = capsys.readouterr().err
    assert "corpus.03.arrow: the index was built from this passage shard, which is gone" in err, err
    assert not (corpus / "run.txt").exists() and not (corpus / "run.txt.config.json").exists()


def _truth(corpus):
    from dr.io.shards import read_shard

    paths = sorted(corpus.glob("corpus.*.arrow"))
    shards = [read_shard(p) for p in paths]
    ids = [d for s in shards for d in s[0]]
    passages = np.concatenate([s[1] for s in shards if len(s[0])])
    queries = read_shard(corpus / "queries.arrow")[1]
    return queries, passages, ids


def _scores_by_hit(path) -> dict[tuple[str, str], float]:
    """(qid, docid) -> its score in a run file (tevatron format: qid docid score)."""
    return {(q, d): float(s) for q, d, s in (line.split() for line in path.read_text().splitlines())}


def test_rescore_returns_exact_scores(corpus):
    assert index_main(index_argv(corpus, "idx")) == 0
    argv = search_argv(corpus, "idx", "run.txt", "--rescore", "3")
    argv[argv.index("nprobe=3")] = "nprobe=1"  # a rough first pass: its candidates still get exact scores
    assert search_main(argv) == 0
    # exact `dr search`'s score of each returned hit (it ranks every passage here): its float32 BLAS sums
    # differ from the rescoring's correctly rounded float64 sums by at most the float32 dot-product error
    # bound, dim * 2**-24 * sum_i |q_i p_i| (docs/search.md); the last-bit count depends on the BLAS
    # kernel (2 ULP with OpenBLAS's Haswell kernel, 4 with its AVX-512 one)
    exact_argv = ["--query_reps", str(corpus / "queries.arrow"), "--passage_reps", str(corpus / "corpus.*.arrow"),
                  "--depth", str(sum(SIZES)), "--save_ranking_to", str(corpus / "exact.txt"), "--quiet"]  # fmt: skip
    assert search_main(exact_argv) == 0
    rescored, exact_run = _scores_by_hit(corpus / "run.txt"), _scores_by_hit(corpus / "exact.txt")
    assert len(rescored) == 9 * 20
    queries, passages, ids = _truth(corpus)
    exact = queries.astype(np.float64) @ passages.astype(np.float64).T
    magnitude = np.abs(queries).astype(np.float64) @ np.abs(passages).astype(np.float64).T
    bound = (passages.shape[1] + 2) * 2.0**-24 * magnitude  # gamma_dim, with room for its 1 / (1 - dim u)
    run, _ = read_run(corpus / "run.txt")
    row_of = {d: j for j, d in enumerate(ids)}
    for i, qid in enumerate(run.rankings):  # the run lists the queries in the queries file's order
        for docid, _ in run.rankings[qid]:
            j = row_of[docid]
            assert abs(np.float32(exact_run[(qid, docid)]) - exact[i, j]) <= bound[i, j], (qid, docid)
    for i, hits in enumerate(run.rankings.values()):
        got = np.array([s for _, s in hits])
        want = exact[i, [row_of[d] for d, _ in hits]].astype(np.float32)
        np.testing.assert_array_equal(got.astype(np.float32), want)
        assert list(got) == sorted(got, reverse=True)
    # every list probed: the index's candidates contain exact search's top 20, and rescoring ranks them so
    argv[argv.index("nprobe=1")] = "nprobe=8"
    assert search_main(argv) == 0
    run, _ = read_run(corpus / "run.txt")
    _, ref_ids = brute_force(queries, passages, ids, 20)
    assert [[d for d, _ in hits] for hits in run.rankings.values()] == ref_ids


def test_short_hit_lists_are_reported(corpus, caplog):
    argv = index_argv(corpus, "idx")
    argv[argv.index("IVF8,Flat")] = "IVF16,Flat"
    assert index_main(argv) == 0
    argv = search_argv(corpus, "idx", "run.txt", "--depth", "100")
    argv[argv.index("nprobe=3")] = "nprobe=1"
    with caplog.at_level(logging.WARNING, logger="dr.search"):
        assert search_main(argv) == 0
    config = json.loads((corpus / "run.txt.config.json").read_text())
    short = config["queries_short_of_depth"]
    assert short > 0 and config["fewest_hits"] < 100
    assert f"{short} of 9 queries got fewer than 100 hits" in caplog.text
    run, _ = read_run(corpus / "run.txt")
    assert min(len(h) for h in run.rankings.values()) == config["fewest_hits"]


def test_int8_first_pass_equals_the_old_faiss_knn_pass(tmp_path):
    """The int8 first pass now runs through exact search's scorer; it ranks as the faiss.knn pass did."""
    import faiss
    import pyarrow as pa

    from dr.index.quantize import Int8Calibration
    from dr.ranking import docid_keys, search_past_ties, select_topk
    from tests.index.test_quantize import quantize

    rng = np.random.default_rng(4)
    passages = rng.standard_normal((300, 24)).astype(np.float32)
    ids = [f"d{j}" for j in rng.permutation(300)]
    make_corpus(tmp_path, passages, ids, [120, 180])
    queries = rng.standard_normal((6, 24)).astype(np.float32)
    from tests.search.test_search import write_queries

    write_queries(tmp_path / "q.arrow", queries)
    assert quantize(["--passage_reps", str(tmp_path / "corpus.*.arrow"), "--quantize", "int8"]) == 0
    tables = [pa.ipc.open_file(str(tmp_path / "int8" / f"corpus.0{i}.arrow")).read_all() for i in range(2)]
    codes = np.concatenate(
        [t.column("code").combine_chunks().flatten().to_numpy().reshape(-1, 24) for t in tables]
    )
    raw = {k.decode(): v.decode() for k, v in tables[0].schema.metadata.items()}
    cal = Int8Calibration.from_metadata(raw, 24, "int8")
    qscaled = np.ascontiguousarray(queries * cal.scale, dtype=np.float32)
    shift = (queries @ (cal.offset + np.float32(128) * cal.scale)).astype(np.float32)
    floats = codes.astype(np.float32)

    def old(which, k):  # the pass as it was: faiss.knn on the float32 codes, plus the shift
        scores, rows = faiss.knn(qscaled[which], floats, k, metric=faiss.METRIC_INNER_PRODUCT)
        return scores + shift[which, None], rows

    scores, rows = search_past_ties(old, np.arange(6), 25, 300)
    keys = docid_keys(ids)
    ref_scores, _, ref_rows = select_topk(scores, keys[rows], rows, 25)
    run_file = tmp_path / "run.txt"
    argv = ["--query_reps", str(tmp_path / "q.arrow"), "--passage_reps", str(tmp_path / "corpus.*.arrow"),
            "--quantize", "int8", "--depth", "25", "--max_memory", "2K", "--save_ranking_to", str(run_file)]  # fmt: skip
    assert search_main(argv) == 0
    run, _ = read_run(run_file)
    for i, hits in enumerate(run.rankings.values()):
        assert [d for d, _ in hits] == [ids[r] for r in ref_rows[i]]
        np.testing.assert_allclose([s for _, s in hits], ref_scores[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "factory",
    [
        "IVF16,Flat",
        "IVF16,PQ4",
        "IVF16,PQ4x4fs",
        "IVF8,SQ8",
        "IVF16_HNSW8,Flat",
        "OPQ4,IVF8,PQ4",
        "PCA8,IVF8,Flat",
        "HNSW8",
    ],
)
def test_shared_coarse_assignment_finds_what_index_search_finds(factory):
    """The lists assigned once per batch give faiss's own hits and scores, bit for bit, for every shard."""
    import faiss

    from dr.search.ann import CoarseAssignment

    passages = clustered(600, seed=5)
    queries = np.ascontiguousarray(clustered(40, seed=6))  # >= 20 rows: faiss's BLAS path of the quantizer
    trained = faiss.index_factory(16, factory, faiss.METRIC_INNER_PRODUCT)
    faiss.ParameterSpace().set_index_parameters(trained, "")
    trained.train(passages[:400])
    assignment = CoarseAssignment(queries)
    for shard in np.array_split(passages, 3):  # each a copy of the trained index, as dr index makes them
        index = faiss.clone_index(trained)
        index.add(shard)
        if "IVF" in factory:
            faiss.ParameterSpace().set_index_parameters(index, "nprobe=3")
        for batch in (queries, np.ascontiguousarray(queries[[1, 7, 30]])):  # the batch, a tie re-search
            want_scores, want_rows = index.search(batch, 12)
            got_scores, got_rows = assignment.searcher(index)(batch, 12)
            np.testing.assert_array_equal(got_rows, want_rows)
            assert got_scores.tobytes() == want_scores.tobytes()


def test_ivf_shards_search_the_quantizer_once_per_batch(corpus, monkeypatch):
    """Four shards, one coarse assignment; the run is byte for byte the per-shard `index.search` one."""
    from dr.search import ann

    assert index_main(index_argv(corpus, "idx")) == 0
    calls = []
    real_assign = ann._assign
    monkeypatch.setattr(ann, "_assign", lambda *a: calls.append(len(a[2])) or real_assign(*a))
    assert search_main(search_argv(corpus, "idx", "shared.txt")) == 0
    assert calls[0] == 9 and calls.count(9) == 1, calls  # tie re-searches of some queries only besides
    monkeypatch.setattr(ann.CoarseAssignment, "searcher", lambda self, index: index.search)
    assert search_main(search_argv(corpus, "idx", "per-shard.txt")) == 0
    assert (corpus / "shared.txt").read_bytes() == (corpus / "per-shard.txt").read_bytes()
