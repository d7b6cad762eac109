"""The default CPU scorer (numpy matmul over float32 tiles + exact threshold selection) against a brute
force: ties at the depth cut-off, float16/float32 shards, passage and query tile boundaries, k >= rows."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from dr.search import exact
from dr.search.exact import BlockScorer, TopK, search_shards
from tests.search.test_search import brute_force, make_corpus, random_data, tied_data


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 7 passage rows (at dim 8) and score matrices of 3 queries: many tiles, odd remainders."""
    monkeypatch.setattr(exact, "_TILE_BYTES", 7 * 8 * 4)
    monkeypatch.setattr(exact, "_SCORE_BYTES", 3 * 7 * 4)


def reference_topk(queries, block, ranks, k):
    """Per query: block rows sorted by (score desc, rank asc), first k (float64 scores)."""
    scores = queries.astype(np.float64) @ block.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(ranks, scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def one_block(queries, block, ranks, k, thr=None):
    top = TopK(len(queries), k)
    if thr is not None:
        top.thr[:] = thr
    top.add_block(queries, block, 0, ranks, BlockScorer("cpu"))
    return top.result()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("k", [1, 5, 40, 100, 300], ids=lambda k: f"k{k}")
def test_block_topk_equals_brute_force_with_ties(small_tiles, dtype, k):
    queries, passages, _ = tied_data(100, 17)  # 17 queries: not a multiple of the 3-query tile
    ranks = np.random.default_rng(1).permutation(100).astype(np.int64)
    scores, rows = one_block(queries, passages.astype(dtype), ranks, k)
    ref_scores, ref_rows = reference_topk(queries, passages, ranks, k)
    n = min(k, 100)  # k >= rows: every row, in order, then empty slots
    np.testing.assert_array_equal(rows[:, :n], ref_rows)
    np.testing.assert_array_equal(scores[:, :n], ref_scores)
    assert (rows[:, n:] == -1).all() and np.isneginf(scores[:, n:]).all()


def test_torch_cast_equals_numpy_cast():
    """torch's float16 -> float32 cast is exact like numpy's: subnormals, signed zeros, inf and NaN included,
    from a read-only view (a mapped shard) without a warning."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)  # every float16 value
    src = bits.view(np.float16).reshape(256, 256)
    src.setflags(write=False)
    dst = np.empty(src.shape, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact._torch_cast(src, dst)
    want = src.astype(np.float32)
    nan = np.isnan(want)
    assert (np.isnan(dst) == nan).all()  # NaN payloads may differ (torch quiets signalling NaNs)
    np.testing.assert_array_equal(dst[~nan].view(np.uint32), want[~nan].view(np.uint32))


@pytest.mark.parametrize(
    "after, planned",
    [(0, 0), (150 * 8, 0), (1 << 40, 0), (1000, 1000)],
    ids=["torch", "switch-midway", "numpy", "planned"],
)
def test_float16_search_same_whichever_cast(small_tiles, monkeypatch, after, planned):
    """torch's cast takes over after `_TORCH_CAST_AFTER` elements, or from the start when the planned
    search is that large: the hits are identical to numpy's cast throughout."""
    monkeypatch.setattr(exact, "_TORCH_CAST_AFTER", after)
    queries, passages, _ = tied_data(300, 11)
    ranks = np.random.default_rng(3).permutation(300).astype(np.int64)
    reference = TopK(len(queries), 25)
    numpy_only = BlockScorer("cpu")
    numpy_only.torch_cast = False
    reference.add_block(queries, passages.astype(np.float16), 0, ranks, numpy_only)
    top, scorer = TopK(len(queries), 25), BlockScorer("cpu", planned_elements=planned)
    if planned:
        assert scorer._use_torch_cast(0)  # decided before any tile is cast
    top.add_block(queries, passages.astype(np.float16), 0, ranks, scorer)
    for got, want in zip(top.result(), reference.result()):
        np.testing.assert_array_equal(got, want)
    assert scorer._cast_elements == passages.size
    if after == 1 << 40:
        assert scorer.torch_cast in (None, True)  # numpy until the count is reached (or torch already loaded)
    else:
        assert scorer.torch_cast is True


def test_threshold_skips_only_what_cannot_enter(small_tiles):
    """Hits below the threshold are dropped; hits tied with it are kept (their docid may still win)."""
    queries, passages, _ = tied_data(60, 5)
    ranks = np.arange(60, dtype=np.int64)
    ref_scores, ref_rows = reference_topk(queries, passages, ranks, 10)
    thr = ref_scores[:, 4].astype(np.float32)
    scores, rows = one_block(queries, passages, ranks, 10, thr)
    for q in range(5):
        keep = ref_scores[q] >= thr[q]
        np.testing.assert_array_equal(rows[q, : keep.sum()], ref_rows[q, keep])
        assert (rows[q, keep.sum() :] == -1).all() and np.isneginf(scores[q, keep.sum() :]).all()


def test_hits_equals_flatnonzero():
    rng = np.random.default_rng(4)
    buf = np.ones(8 * 40, dtype=bool)  # stale flags from an earlier, larger tile must not leak
    for shape in [(1, 1), (3, 7), (5, 13), (4, 64)]:
        scores = rng.standard_normal(shape).astype(np.float32)
        thr = np.quantile(scores, 0.8, axis=1).astype(np.float32)
        np.testing.assert_array_equal(exact._hits(scores, thr, buf), np.flatnonzero(scores >= thr[:, None]))


def test_topk_over_blocks_equals_one_block(small_tiles):
    """The running top k over several blocks (thresholds and candidates carried over) equals one pass."""
    queries, passages, _ = tied_data(150, 11, seed=2)
    ranks = np.random.default_rng(3).permutation(150).astype(np.int64)
    scorer = BlockScorer("cpu")
    top = TopK(11, 20)
    for lo, hi in [(0, 9), (9, 9), (9, 80), (80, 150)]:
        top.add_block(queries, passages[lo:hi].astype(np.float16), lo, ranks[lo:hi], scorer)
    scores, rows = top.result()
    ref_scores, ref_rows = reference_topk(queries, passages, ranks, 20)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_array_equal(scores, ref_scores)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("backend", ["cpu", "faiss-cpu"])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_search_shards_backends_equal_brute_force(tmp_path, small_tiles, dtype, backend, ties):
    """Several shards (one empty), small blocks (--max_memory of 13 rows), both scorers, both dtypes."""
    if ties:
        queries, passages, ids = tied_data(230, 10, seed=5)
    else:
        queries, passages, ids = random_data(230, 10, seed=5, dim=8)
    paths = make_corpus(tmp_path, passages, ids, [40, 0, 150, 40], dtype)
    stored = passages.astype(dtype).astype(np.float32)
    scores, docids = search_shards(queries, paths, depth=25, max_memory_bytes=13 * 8 * 4, backend=backend)
    ref_scores, ref_ids = brute_force(queries, stored, ids, 25)
    assert docids == ref_ids
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_unknown_backend_is_a_usage_error():
    from dr.errors import UsageError

    with pytest.raises(UsageError, match="backend"):
        BlockScorer("gpu-please")
