"""`dr search`: exactness against a numpy brute force (any sharding, blocks, ranks), ties, bad inputs."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dr.io.runs import read_run
from dr.io.shards import ShardMeta, write_shard
from dr.search.exact import merge_candidates, search_shards
from dr.search.shard_set import parse_bytes
from tests.helpers import command

main = command("search")

REPO = Path(__file__).resolve().parents[2]
DIM = 24


def meta(
    count: int, side: str = "passage", dim: int = DIM, dtype: str = "float32", model: str = "enc"
) -> ShardMeta:
    return ShardMeta(model, "cls", True, dim, dtype, 32, side, count)


def make_corpus(
    folder: Path, vectors: np.ndarray, ids: list[str], sizes: list[int], dtype="float32"
) -> list[str]:
    """Write `vectors` as consecutive shards of the given sizes; return the shard paths in order."""
    assert sum(sizes) == len(ids)
    paths, start = [], 0
    for i, size in enumerate(sizes):
        path = folder / f"corpus.{i:02d}.arrow"
        write_shard(
            path,
            meta(size, dim=vectors.shape[1], dtype=dtype),
            ids[start : start + size],
            vectors[start : start + size],
        )
        paths.append(str(path))
        start += size
    return paths


def write_queries(path: Path, vectors: np.ndarray, dtype: str = "float32", **kw) -> list[str]:
    qids = [f"q{i}" for i in range(len(vectors))]
    write_shard(
        path, meta(len(vectors), side="query", dim=vectors.shape[1], dtype=dtype, **kw), qids, vectors
    )
    return qids


def brute_force(queries: np.ndarray, passages: np.ndarray, ids: list[str], depth: int):
    """Reference ranking: float64 scores, ordered by score desc, then docid desc (the rule of dr.ranking)."""
    scores = queries.astype(np.float64) @ passages.astype(np.float64).T
    out_ids, out_scores = [], []
    for row in scores:
        order = sorted(range(len(ids)), key=lambda j: (row[j], ids[j]), reverse=True)[:depth]
        out_ids.append([ids[j] for j in order])
        out_scores.append(row[order])
    return np.array(out_scores), out_ids


def random_data(n: int, nq: int, seed: int = 0, dim: int = DIM):
    rng = np.random.default_rng(seed)
    passages = rng.standard_normal((n, dim)).astype(np.float32)
    queries = rng.standard_normal((nq, dim)).astype(np.float32)
    ids = [f"doc{j}" for j in rng.permutation(n)]  # docid order unrelated to row order
    return queries, passages, ids


def tied_data(n: int, nq: int, dim: int = 8, distinct: int = 9, seed: int = 0):
    """Small-integer vectors (exact in float16, any summation order) drawn from `distinct` rows: many
    passages share each score, so ties straddle every cut-off; docids unrelated to row order."""
    rng = np.random.default_rng(seed)
    base = rng.integers(-2, 3, size=(distinct, dim)).astype(np.float32)
    passages = base[rng.integers(0, len(base), size=n)]
    queries = rng.integers(-2, 3, size=(nq, dim)).astype(np.float32)
    ids = [f"p{j:05d}" for j in rng.permutation(n)]
    return queries, passages, ids


@pytest.mark.parametrize(
    "sizes",
    [[300], [120, 180], [5, 0, 150, 44, 101]],
    ids=["1-shard", "2-shards", "5-uneven-with-empty"],
)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_sharded_search_equals_brute_force(tmp_path, sizes, dtype):
    queries, passages, ids = random_data(sum(sizes), 17)
    paths = make_corpus(tmp_path, passages, ids, sizes, dtype)
    stored = passages.astype(dtype).astype(np.float32)  # what the shards really hold
    scores, docids = search_shards(queries, paths, depth=20, max_memory_bytes=2**20)
    ref_scores, ref_ids = brute_force(queries, stored, ids, 20)
    assert docids == ref_ids
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("block_rows", [1, 7, 40])
def test_max_memory_smaller_than_a_shard_is_still_exact(tmp_path, block_rows):
    queries, passages, ids = random_data(200, 9, seed=1)
    paths = make_corpus(tmp_path, passages, ids, [90, 110])
    budget = block_rows * DIM * 4  # bytes of float32 vectors: block_rows rows at a time
    scores, docids = search_shards(queries, paths, depth=15, max_memory_bytes=budget, batch_size=4)
    ref_scores, ref_ids = brute_force(queries, passages, ids, 15)
    assert docids == ref_ids
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-4)


def test_exact_ties_break_by_docid_everywhere(tmp_path):
    """Small-integer vectors give exactly representable, massively tied scores in any summation order."""
    rng = np.random.default_rng(3)
    base = rng.integers(-1, 2, size=(12, 8)).astype(np.float32)
    passages = base[rng.integers(0, len(base), size=300)]  # many duplicates -> exact ties
    queries = rng.integers(-1, 2, size=(11, 8)).astype(np.float32)
    ids = [f"p{j:04d}" for j in rng.permutation(300)]
    paths = make_corpus(tmp_path, passages, ids, [50, 0, 130, 120])
    ref_scores, ref_ids = brute_force(queries, passages, ids, 25)
    for budget in (3 * 8 * 4, 64 * 8 * 4, 2**20):
        scores, docids = search_shards(queries, paths, depth=25, max_memory_bytes=budget)
        assert docids == ref_ids
        np.testing.assert_array_equal(scores, ref_scores)


def test_merge_candidates_is_exact_with_ties():
    a = (np.array([[3.0, 2.0, 1.0]], np.float32), [["b", "y", "z"]])
    b = (np.array([[3.0, 2.0]], np.float32), [["a", "c"]])
    scores, docids = merge_candidates([a, b], depth=4)
    assert docids == [["b", "a", "y", "c"]]  # ties: docid descending
    assert scores.tolist() == [[3.0, 3.0, 2.0, 2.0]]


def test_parse_bytes():
    assert parse_bytes("2G") == 2 * 2**30
    assert parse_bytes("512M") == 512 * 2**20
    assert parse_bytes("1.5KiB") == 1536
    assert parse_bytes("1000") == 1000
    with pytest.raises(ValueError, match="max_memory"):
        parse_bytes("lots")


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def corpus(tmp_path):
    queries, passages, ids = random_data(160, 8, seed=5)
    paths = make_corpus(tmp_path, passages, ids, [60, 0, 100])
    qids = write_queries(tmp_path / "queries.arrow", queries)
    return tmp_path, queries, passages, ids, qids, paths


def cli(
    folder: Path, *extra: str, queries: str = "queries.arrow", passages: str = "corpus.*.arrow"
) -> list[str]:
    return [
        "--query_reps", str(folder / queries), "--passage_reps", str(folder / passages),
        "--save_ranking_to", str(folder / "run.txt"), "--quiet", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("fmt", ["tevatron", "marco", "trec"])
def test_cli_writes_exact_run_and_config(corpus, fmt):
    folder, queries, passages, ids, qids, _ = corpus
    argv = cli(folder, "--depth", "12", "--format", fmt, "--max_memory", "2K", "--save_text")
    assert main(argv) == 0
    run, _ = read_run(folder / "run.txt", fmt)
    _, ref_ids = brute_force(queries, passages, ids, 12)
    assert list(run.rankings) == qids
    assert [[d for d, _ in run.rankings[q]] for q in qids] == ref_ids
    assert (folder / "run.txt.config.json").is_file()


def test_cli_depth_beyond_corpus_warns_and_returns_everything(corpus, caplog):
    folder, queries, passages, ids, qids, _ = corpus
    with caplog.at_level(logging.WARNING, logger="dr.search"):
        assert main(cli(folder, "--depth", "1000")) == 0
    assert "exceeds the 160 passages" in caplog.text
    run, _ = read_run(folder / "run.txt")
    _, ref_ids = brute_force(queries, passages, ids, 160)
    assert [[d for d, _ in run.rankings[q]] for q in qids] == ref_ids


def test_cli_use_gpu_without_gpu_falls_back_to_cpu(corpus, caplog):
    folder, *_ = corpus
    pytest.importorskip("faiss")
    import faiss
    import torch

    if faiss.get_num_gpus() > 0 or torch.cuda.is_available():
        pytest.skip("a GPU is present: no fallback to test")
    with caplog.at_level(logging.WARNING, logger="dr.search"):
        assert main(cli(folder, "--use_gpu", "--depth", "5")) == 0
    assert "no GPU" in caplog.text


@pytest.mark.parametrize("factory,params", [("Flat", None), ("IVF4,Flat", "nprobe=4")])
def test_index_factory_save_and_load(corpus, factory, params):
    """With every list probed, an IVF index is exact; saving and loading gives the same run."""
    folder, queries, passages, ids, qids, _ = corpus
    extra = ["--index_params", params] if params else []
    index = str(folder / "index.faiss")
    assert main(cli(folder, "--depth", "10", "--index_factory", factory, "--save_index", index, *extra)) == 0
    first = (folder / "run.txt").read_text()
    _, ref_ids = brute_force(queries, passages, ids, 10)
    run, _ = read_run(folder / "run.txt")
    assert [[d for d, _ in run.rankings[q]] for q in qids] == ref_ids
    argv = ["--query_reps", str(folder / "queries.arrow"), "--load_index", index, "--depth", "10"]
    argv += ["--save_ranking_to", str(folder / "run.txt"), "--quiet", *extra]
    assert main(argv) == 0
    assert (folder / "run.txt").read_text() == first


# ------------------------------------------------------------------------------------------ bad input


def assert_fails(argv: list[str], capsys, *needles: str) -> None:
    out = Path(argv[argv.index("--save_ranking_to") + 1])
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    assert not out.exists() and not Path(str(out) + ".config.json").exists()


def test_query_passage_dim_mismatch(corpus, capsys):
    folder, *_ = corpus
    write_queries(folder / "q16.arrow", np.ones((3, 16), np.float32))
    assert_fails(cli(folder, queries="q16.arrow"), capsys, "dim 16", f"dim {DIM}")


def test_model_mismatch_between_queries_and_passages(corpus, capsys):
    folder, queries, *_ = corpus
    write_queries(folder / "qother.arrow", queries, model="other-encoder")
    assert_fails(cli(folder, queries="qother.arrow"), capsys, "different encoders", "--allow_model_mismatch")
    assert main(cli(folder, "--allow_model_mismatch", queries="qother.arrow")) == 0


@pytest.mark.parametrize("field", ["model", "dtype"])
def test_shard_with_different_metadata(corpus, capsys, field):
    folder, *_ = corpus
    other = {"model": {"model": "other-encoder"}, "dtype": {"dtype": "float16"}}[field]
    write_shard(folder / "corpus.99.arrow", meta(2, **other), ["x1", "x2"], np.ones((2, DIM), np.float32))
    assert_fails(cli(folder), capsys, "corpus.99.arrow", f"{field}=")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_or_truncated_shard(corpus, capsys, damage):
    folder, *_, paths = corpus
    data = Path(paths[-1]).read_bytes()
    Path(paths[-1]).write_bytes(b"not an arrow file" * 10 if damage == "garbage" else data[: len(data) // 2])
    assert_fails(cli(folder), capsys, Path(paths[-1]).name, "corrupt or truncated")


def test_duplicate_docid_across_shards(corpus, capsys):
    folder, _, _, ids, _, paths = corpus
    write_shard(folder / "corpus.99.arrow", meta(1), [ids[100]], np.ones((1, DIM), np.float32))
    assert_fails(cli(folder), capsys, repr(ids[100]), Path(paths[-1]).name, "corpus.99.arrow")


def test_empty_query_file(corpus, capsys):
    folder, *_ = corpus
    write_queries(folder / "empty.arrow", np.zeros((0, DIM), np.float32))
    assert_fails(cli(folder, queries="empty.arrow"), capsys, "empty query file")


def test_no_passage_shards_match(corpus, capsys):
    folder, *_ = corpus
    assert_fails(cli(folder, passages="nothing-*.arrow"), capsys, "--passage_reps", "no file matches")


def test_passage_shard_given_as_queries(corpus, capsys):
    folder, *_ = corpus
    assert_fails(cli(folder, queries="corpus.00.arrow"), capsys, "passage shard where query reps")


# ------------------------------------------------------------------------------------------- 2 ranks


def torchrun(folder: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "dr.search", *cli(folder, *extra)]
    return subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("ties", [False, True], ids=["random", "exact-ties"])
def test_two_ranks_equal_brute_force(tmp_path, ties):
    queries, passages, ids = random_data(500, 13, seed=7)
    if ties:  # small integers: exactly tied scores, the docid tie-break must survive the rank merge
        rng = np.random.default_rng(8)
        passages = rng.integers(-1, 2, size=(20, DIM)).astype(np.float32)[rng.integers(0, 20, size=500)]
        queries = rng.integers(-1, 2, size=(13, DIM)).astype(np.float32)
    make_corpus(tmp_path, passages, ids, [70, 0, 180, 5, 245])
    write_queries(tmp_path / "queries.arrow", queries)
    proc = torchrun(tmp_path, "--depth", "30", "--max_memory", "4K")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run, _ = read_run(tmp_path / "run.txt")
    ref_scores, ref_ids = brute_force(queries, passages, ids, 30)
    assert [[d for d, _ in run.rankings[f"q{i}"]] for i in range(len(queries))] == ref_ids
    got = np.array([[s for _, s in run.rankings[f"q{i}"]] for i in range(len(queries))])
    np.testing.assert_allclose(got, ref_scores, rtol=1e-5, atol=1e-4)
    assert '"world_size": 2' in (tmp_path / "run.txt.config.json").read_text()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_ranks_bad_input_exits_nonzero_without_hanging(corpus):
    folder, _, _, ids, _, _ = corpus
    write_shard(folder / "corpus.99.arrow", meta(1), [ids[0]], np.ones((1, DIM), np.float32))
    proc = torchrun(folder, "--depth", "5")
    assert proc.returncode != 0
    # torchrun itself prints a ChildFailedError traceback; dr's own message is one line.
    assert "dr search: error: docid" in proc.stderr and "occurs in shards" in proc.stderr
    assert not (folder / "run.txt").exists()
