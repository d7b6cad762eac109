"""Two nodes on one machine: two torchrun agents (`--nnodes 2 --node_rank 0|1`, c10d rendezvous on a
localhost port, gloo) run `dr train`, `dr encode` and `dr search`, and each equals one process, as the
single-node equivalence tests check. With one process per node, global rank 1 has local rank 0 on its
node: the rank in shard names and manifests must be the global one (the local rank only picks a device),
or both nodes would write `rank00000`.
"""

from __future__ import annotations

import numpy as np
import pytest

from dr.io.runs import read_run
from dr.io.shards import read_manifest, read_shard
from tests.encode.test_encode import N_ROWS, encode, read_all
from tests.helpers import as_flags, launch_two_nodes
from tests.search.test_search import brute_force, cli, make_corpus, random_data, write_queries
from tests.train.test_train_distributed import PER_DEVICE, _assert_same_weights, _flags, reference  # noqa: F401

pytestmark = pytest.mark.slow


def test_two_nodes_train_equals_single_process(tiny_model_dir, reference):  # noqa: F811 - the fixture
    """One SGD step with hard negatives gathered across both nodes == one process with the global batch."""
    folder, data, expected = reference
    out = folder / "two-nodes"
    launch_two_nodes(["-m", "dr.train", *_flags(tiny_model_dir, data, out, PER_DEVICE)], timeout=300)
    _assert_same_weights(out, expected, tiny_model_dir)


@pytest.mark.parametrize("per_node", [1, 2], ids=["1-per-node", "2-per-node"])
def test_two_nodes_encode_equals_one_process(tiny_model_dir, corpus_file, tmp_path, per_node):
    """Every global rank writes its own file and the manifest lists them by global rank, whatever the local
    ranks (with 1 per node both workers are local rank 0; with 2, local ranks 0 and 1 on both nodes)."""
    world = 2 * per_node
    assert encode(tiny_model_dir, corpus_file, tmp_path / "one" / "corpus") == 0
    one_ids, one, _ = read_shard(tmp_path / "one" / "corpus.arrow")
    flags = as_flags(model_name_or_path=tiny_model_dir, dataset_name=corpus_file,
                     encoded_save_path=tmp_path / "two" / "corpus", per_device_eval_batch_size=8, window_batches=2,
                     p_max_len=64, dataloader_num_workers=0, dataset_cache_dir=tmp_path / "cache")  # fmt: skip
    results = launch_two_nodes(["-m", "dr.encode", *flags], nproc_per_node=per_node, timeout=300)
    ids, vectors = read_all(tmp_path / "two", "corpus.*.arrow")
    assert ids == one_ids and len(set(ids)) == N_ROWS
    np.testing.assert_allclose(vectors, one, atol=1e-5)
    names = sorted(p.name for p in (tmp_path / "two").glob("*.arrow"))
    assert names == [f"corpus.00000-of-00001.rank{r:05d}-of-{world:05d}.arrow" for r in range(world)]
    manifest = read_manifest(tmp_path / "two" / "corpus.00000-of-00001.manifest.json")
    assert manifest["world_size"] == world
    assert [(f["rank"], f["path"]) for f in manifest["files"]] == list(enumerate(names))
    assert sum(f["rows"] for f in manifest["files"]) == N_ROWS
    logs = results[0].stderr + results[1].stderr
    assert all(f"[rank {r}/{world}]" in logs for r in range(world))


def test_two_nodes_search_equals_brute_force(tmp_path):
    """The nodes split the shards; global rank 0 merges and writes the run, which is the exact ranking."""
    queries, passages, ids = random_data(300, 11, seed=9)
    make_corpus(tmp_path, passages, ids, [70, 0, 130, 100])
    write_queries(tmp_path / "queries.arrow", queries)
    launch_two_nodes(["-m", "dr.search", *cli(tmp_path, "--depth", "20", "--max_memory", "4K")], timeout=300)
    run, _ = read_run(tmp_path / "run.txt")
    ref_scores, ref_ids = brute_force(queries, passages, ids, 20)
    assert [[d for d, _ in run.rankings[f"q{i}"]] for i in range(len(queries))] == ref_ids
    got = np.array([[s for _, s in run.rankings[f"q{i}"]] for i in range(len(queries))])
    np.testing.assert_allclose(got, ref_scores, rtol=1e-5, atol=1e-4)
    assert '"world_size": 2' in (tmp_path / "run.txt.config.json").read_text()
