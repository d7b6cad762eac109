"""The one tie rule (`dr.ranking`): trec_eval's order, the same numbers from every run format, and search
(exact, quantized, ANN) keeping exactly the rule's documents at a tied depth cut-off."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from dr.io.runs import read_run
from dr.ranking import docid_keys, select_topk, sort_hits, top_hits
from dr.search.ann import search_index
from dr.search.exact import merge_candidates, search_shards
from tests.helpers import command
from tests.search.test_search import make_corpus, write_queries

convert = command("convert")
evaluate = command("eval")
search = command("search")
quantize = command("quantize")

# Ids that order differently as strings and as numbers ("9" > "100" > "10"), plus non-ASCII bytes.
TIED_IDS = ["9", "10", "100", "11", "2", "20", "a", "B", "é", "z", "p-1", "p-01"]


# ---------------------------------------------------------------------------------------- the rule


def test_rule_is_score_desc_then_docid_desc_as_strings():
    hits = [(d, 1.0) for d in TIED_IDS] + [("0", 2.0), ("zz", -1.0)]
    ranked = [d for d, _ in sort_hits(hits)]
    assert ranked[0] == "0" and ranked[-1] == "zz"
    assert ranked[1:-1] == sorted(TIED_IDS, reverse=True)  # Python's str order = UTF-8 byte order
    assert ranked.index("9") < ranked.index("11") < ranked.index("100") < ranked.index("10")  # strings
    assert top_hits(hits, 4) == sort_hits(hits)[:4]
    keys = docid_keys(TIED_IDS)
    assert [TIED_IDS[i] for i in np.argsort(keys)] == sorted(TIED_IDS, reverse=True)


def test_select_topk_follows_the_rule_at_the_cut():
    scores = np.array([[1.0] * len(TIED_IDS)], np.float32)
    keys = docid_keys(TIED_IDS)[None, :]
    slots = np.arange(len(TIED_IDS))[None, :]
    _, _, top = select_topk(scores, keys, slots, 3)
    assert [TIED_IDS[i] for i in top[0]] == sorted(TIED_IDS, reverse=True)[:3]


def test_trec_eval_breaks_ties_as_the_rule():
    """pytrec_eval (trec_eval's code) on a fully tied query: the relevant doc's reciprocal rank is its
    position under `sort_hits`, for every choice of relevant doc and every input order."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    ranked = [d for d, _ in sort_hits((d, 3.5) for d in TIED_IDS)]
    for order, relevant in zip(itertools.permutations(TIED_IDS[:5]), TIED_IDS * 10):
        ids = list(order) + [d for d in TIED_IDS if d not in order]
        evaluator = pytrec_eval.RelevanceEvaluator({"q": {relevant: 1}}, {"recip_rank"})
        got = evaluator.evaluate({"q": {d: 3.5 for d in ids}})["q"]["recip_rank"]
        assert got == pytest.approx(1 / (ranked.index(relevant) + 1)), relevant


# ---------------------------------------------------------------------- every format, one number


def _tied_run(folder: Path) -> tuple[Path, Path]:
    """A Tevatron run with many equal scores (written in an order unrelated to the rule) and its qrels."""
    rng = np.random.default_rng(0)
    lines, qrels = [], []
    for q in range(12):
        ids = [f"{n}" for n in rng.choice(200, size=25, replace=False)] + ["9", "10", "é", "z"]
        ids = list(dict.fromkeys(ids))
        scores = rng.choice([3.0, 2.5, 2.0, 1.0], size=len(ids))  # 4 levels: large tied groups
        lines += [f"Q{q}\t{d}\t{float(s)!r}\n" for d, s in zip(ids, scores)]
        qrels += [f"Q{q} 0 {d} {rng.integers(1, 3)}\n" for d in rng.choice(ids, size=3, replace=False)]
    run_path, qrels_path = folder / "rank.txt", folder / "qrels.trec"
    run_path.write_text("".join(lines))
    qrels_path.write_text("".join(qrels))
    return run_path, qrels_path


METRICS = ["MRR@10", "RR", "AP", "nDCG@10", "P@5", "R@20"]
TREC_EVAL = {"RR": "recip_rank", "AP": "map", "nDCG@10": "ndcg_cut_10", "P@5": "P_5", "R@20": "recall_20"}


def _eval(qrels: Path, run: Path, out: Path) -> dict:
    argv = ["--qrels", str(qrels), "--run", str(run), "--metrics", *METRICS, "--output", str(out)]
    assert evaluate(argv) == 0
    return json.loads(out.read_text())


def test_every_format_of_a_tied_run_evaluates_alike_and_as_trec_eval(tmp_path):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    source, qrels = _tied_run(tmp_path)
    files = {"tevatron": source}
    for fmt, name in (("marco", "run.marco"), ("trec", "run.trec"), ("tevatron", "again.tevatron")):
        src = files["trec"] if fmt == "tevatron" else source  # tevatron again, through TREC
        assert convert(["--input", str(src), "--output", str(tmp_path / name), "--to", fmt]) == 0
        files[fmt if fmt != "tevatron" else "tevatron-again"] = tmp_path / name
    marco_from_trec = tmp_path / "from-trec.marco"
    assert convert(["--input", str(files["trec"]), "--output", str(marco_from_trec)]) == 0
    files["marco-from-trec"] = marco_from_trec
    results = {name: _eval(qrels, path, tmp_path / f"{name}.json") for name, path in files.items()}
    first = results["tevatron"]
    for name, values in results.items():
        assert values == first, name  # bit-identical numbers, whatever the format
    # trec_eval itself on the TREC file (parsed here, not by dr), every judged query is in the run
    run: dict[str, dict[str, float]] = {}
    for line in files["trec"].read_text().splitlines():
        qid, _, docid, _, score, _ = line.split()
        run.setdefault(qid, {})[docid] = float(score)
    judged: dict[str, dict[str, int]] = {}
    for line in qrels.read_text().splitlines():
        qid, _, docid, rel = line.split()
        judged.setdefault(qid, {})[docid] = int(rel)
    per_query = pytrec_eval.RelevanceEvaluator(judged, set(TREC_EVAL.values())).evaluate(run)
    for name, measure in TREC_EVAL.items():
        mean = sum(values[measure] for values in per_query.values()) / len(judged)
        assert first[name] == pytest.approx(mean, abs=1e-12), name
    # the MS MARCO file lists the hits in trec_eval's order: ranks = positions under the rule
    marco, _ = read_run(files["marco"])
    tev, _ = read_run(source)
    for qid, hits in tev.rankings.items():
        assert [d for d, _ in marco.rankings[qid]] == [d for d, _ in sort_hits(hits)]


# ------------------------------------------------------------------- search at a tied cut-off


DIM = 16


def _all_tied(folder: Path, n: int = 60, depth: int = 7):
    """Every passage is the same vector, so every score ties: the top `depth` is decided by docids alone.

    Row order is the reverse of the rule's order, so a scorer keeping the first rows it meets is wrong.
    """
    ids = sorted([str(i) for i in range(n)], key=lambda d: d.encode())  # ascending: rule's order reversed
    vector = np.zeros(DIM, np.float32)
    vector[:4] = 1.0  # binary codes and int8 codes tie too
    passages = np.tile(vector, (n, 1))
    queries = np.vstack([vector, 2 * vector, vector + 0.5]).astype(np.float32)
    expected = sorted(ids, reverse=True)[:depth]
    return queries, passages, ids, expected


@pytest.mark.parametrize("sizes", [[60], [25, 35], [10, 0, 20, 30]], ids=["1-shard", "2-shards", "4-shards"])
@pytest.mark.parametrize("backend", ["cpu", "faiss-cpu"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_exact_search_keeps_the_rules_docs_at_a_tied_cut(tmp_path, sizes, backend, dtype):
    queries, passages, ids, expected = _all_tied(tmp_path)
    paths = make_corpus(tmp_path, passages, ids, sizes, dtype)
    for budget in (3 * DIM * 4, 2**20):  # blocks of 3 rows, and one block per shard
        _, docids = search_shards(queries, paths, 7, max_memory_bytes=budget, backend=backend)
        assert docids == [expected] * len(queries)


def test_rank_merge_keeps_the_rules_docs_at_a_tied_cut(tmp_path):
    """Two per-rank lists (as 2 ranks return them), all tied: the merge keeps the rule's top, not a rank's."""
    queries, passages, ids, expected = _all_tied(tmp_path)
    paths = make_corpus(tmp_path, passages, ids, [30, 30])
    parts = [search_shards(queries, [p], 7) for p in paths]
    _, merged = merge_candidates(parts, 7)
    assert merged == [expected] * len(queries)


def _cli_run(folder: Path, name: str, *extra: str) -> dict[str, list[str]]:
    out = folder / f"{name}.txt"
    argv = ["--query_reps", str(folder / "q.arrow"), "--passage_reps", str(folder / "corpus.*.arrow")]
    assert search([*argv, "--depth", "7", "--save_ranking_to", str(out), "--quiet", *extra]) == 0
    run, _ = read_run(out)
    return {q: [d for d, _ in hits] for q, hits in run.rankings.items()}


@pytest.mark.parametrize(
    "kind, extra",
    [("binary", []), ("binary", ["--rescore", "2"]), ("int8", ["--rescore", "3"]), ("int8", [])],
    ids=["binary", "binary-rescore", "int8-rescore", "int8"],
)
def test_quantized_search_keeps_the_rules_docs_at_a_tied_cut(tmp_path, kind, extra):
    queries, passages, ids, expected = _all_tied(tmp_path)
    make_corpus(tmp_path, passages, ids, [25, 35])
    write_queries(tmp_path / "q.arrow", queries)
    assert quantize(["--passage_reps", str(tmp_path / "corpus.*.arrow"), "--quantize", kind]) == 0
    got = _cli_run(tmp_path, kind, "--quantize", kind, "--max_memory", "256", *extra)
    assert list(got.values()) == [expected] * len(queries)


def test_ann_flat_search_keeps_the_rules_docs_at_a_tied_cut(tmp_path):
    queries, passages, ids, expected = _all_tied(tmp_path)
    make_corpus(tmp_path, passages, ids, [25, 35])
    write_queries(tmp_path / "q.arrow", queries)
    got = _cli_run(tmp_path, "flat", "--index_factory", "Flat")
    assert list(got.values()) == [expected] * len(queries)


def test_search_index_widens_until_the_tie_is_past():
    """faiss returns the first rows among tied hits; the rule wants the last ones (widening 3 times)."""
    faiss = pytest.importorskip("faiss")
    n = 50
    ids = [f"d{i:02d}" for i in range(n)]  # row order = ascending docids: the rule's order reversed
    vectors = np.zeros((n, 4), np.float32)
    vectors[:, 0] = 1.0
    vectors[:5, 0] = 2.0  # 5 clear winners, then 45 ties straddling the cut at depth 8
    index = faiss.IndexFlatIP(4)
    index.add(vectors)
    scores, docids = search_index(index, ids, np.array([[1, 0, 0, 0]], np.float32), depth=8)
    assert docids == [ids[4::-1] + ids[:4:-1][:3]]
    assert scores.tolist() == [[2.0] * 5 + [1.0] * 3]
