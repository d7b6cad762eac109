"""`dr search --index_dir`: stale shards refused, --rescore gives exact scores, short hit lists reported."""

from __future__ import annotations

import json
import logging

import numpy as np

from dr.io.runs import read_run
from tests.test_index_build import SIZES, clustered, corpus, index_argv, index_main, search_argv, search_main
from tests.test_search import brute_force, make_corpus

__all__ = ["corpus"]  # the fixture, shared with test_index_build


def test_changed_passage_shard_is_refused(corpus, capsys):
    assert index_main(index_argv(corpus, "idx")) == 0
    make_corpus(corpus, clustered(sum(SIZES), seed=7), [f"p{j}" for j in range(sum(SIZES))], SIZES)  # re-encoded
    assert search_main(search_argv(corpus, "idx", "run.txt")) == 1
    err = capsys.readouterr().err
    assert "corpus.00.arrow: passage shard changed since the index was built" in err, err
    assert not (corpus / "run.txt").exists() and not (corpus / "run.txt.config.json").exists()


def _truth(corpus):
    from dr.io.shards import read_shard

    paths = sorted(corpus.glob("corpus.*.arrow"))
    shards = [read_shard(p) for p in paths]
    ids = [d for s in shards for d in s[0]]
    passages = np.concatenate([s[1] for s in shards if len(s[0])])
    queries = read_shard(corpus / "queries.arrow")[1]
    return queries, passages, ids


def test_rescore_returns_exact_scores(corpus):
    assert index_main(index_argv(corpus, "idx")) == 0
    argv = search_argv(corpus, "idx", "run.txt", "--rescore", "3")
    argv[argv.index("nprobe=3")] = "nprobe=1"  # a rough first pass: its candidates still get exact scores
    assert search_main(argv) == 0
    queries, passages, ids = _truth(corpus)
    exact = queries.astype(np.float64) @ passages.astype(np.float64).T
    row_of = {d: j for j, d in enumerate(ids)}
    run, _ = read_run(corpus / "run.txt")
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
