"""`dr index`: one trained quantizer, one index per passage shard, the same bytes however the work is split,
resume after a crash between shards, and a manifest that fingerprints the passage shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dr.index import build
from dr.index.manifest import MANIFEST
from dr.io.shards import file_sha256
from tests.helpers import command, run, torchrun
from tests.search.test_search import make_corpus, write_queries

index_main = command("index")
search_main = command("search")

SIZES = [150, 0, 200, 170]  # an empty shard is a part too


def clustered(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, dim)).astype(np.float32)
    return centres[rng.integers(0, 12, n)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    passages = clustered(sum(SIZES))
    ids = [f"p{j}" for j in np.random.default_rng(1).permutation(len(passages))]
    make_corpus(tmp_path, passages, ids, SIZES)
    write_queries(tmp_path / "queries.arrow", clustered(9, seed=2))
    return tmp_path


def index_argv(folder: Path, out: str, *extra: str) -> list[str]:
    return ["--passage_reps", str(folder / "corpus.*.arrow"), "--index_factory", "IVF8,Flat",
            "--output_dir", str(folder / out), "--train_size", "300", "--seed", "3", *extra]  # fmt: skip


def search_argv(folder: Path, index: str, run_file: str, *extra: str) -> list[str]:
    return ["--query_reps", str(folder / "queries.arrow"), "--index_dir", str(folder / index), "--depth", "20",
            "--index_params", "nprobe=3", "--save_ranking_to", str(folder / run_file), "--quiet", *extra]  # fmt: skip


def files(folder: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir())}


def test_array_tasks_build_the_same_index_as_one_process(corpus):
    assert index_main(index_argv(corpus, "one")) == 0
    assert index_main(index_argv(corpus, "tasks", "--num_shards", "2", "--shard_index", "1")) == 0
    assert not (corpus / "tasks" / MANIFEST).exists()  # task 0's shards are missing
    assert index_main(index_argv(corpus, "tasks", "--num_shards", "2", "--shard_index", "0")) == 0
    one, tasks = files(corpus / "one"), files(corpus / "tasks")
    assert one == tasks
    assert {f"shard-{i:05d}.faiss" for i in range(4)} <= set(one)
    assert search_main(search_argv(corpus, "one", "run1.txt")) == 0
    assert search_main(search_argv(corpus, "tasks", "run2.txt")) == 0
    assert (corpus / "run1.txt").read_bytes() == (corpus / "run2.txt").read_bytes()
    manifest = json.loads((corpus / "one" / MANIFEST).read_text())
    assert manifest["factory"] == "IVF8,Flat" and manifest["seed"] == 3 and manifest["train_rows"] == 300
    assert [s["rows"] for s in manifest["shards"]] == SIZES
    assert all("mtime_ns" in s["fingerprint"] for s in manifest["shards"])  # no encode manifest here


def test_resume_after_a_crash_between_shards(corpus, monkeypatch):
    assert index_main(index_argv(corpus, "ref")) == 0
    import faiss

    real_write = faiss.write_index
    calls = []

    def crash_on_third_shard(index, path):
        calls.append(path)
        if len(calls) == 4:  # trained.faiss, shard 0, shard 1, then shard 2 dies part-way
            Path(path).write_bytes(b"partial")
            raise OSError("killed")
        real_write(index, path)

    monkeypatch.setattr(faiss, "write_index", crash_on_third_shard)
    assert index_main(index_argv(corpus, "idx")) == 1
    monkeypatch.setattr(faiss, "write_index", real_write)
    out = corpus / "idx"
    assert not (out / "shard-00002.faiss").exists() and not (out / MANIFEST).exists()
    (out / "shard-00001.json").unlink()  # a crash between a shard's index and its ids: redone
    added = []
    real_add = build._add_shard
    monkeypatch.setattr(build, "_add_shard", lambda *a, **k: (added.append(a[3].start), real_add(*a, **k)))
    assert index_main(index_argv(corpus, "idx")) == 0
    assert added == [1, 2, 3]
    assert files(out) == files(corpus / "ref")


def test_another_configuration_is_refused(corpus, capsys):
    assert index_main(index_argv(corpus, "idx")) == 0
    argv = index_argv(corpus, "idx")
    argv[argv.index("IVF8,Flat")] = "IVF4,Flat"
    assert index_main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert index_main([*argv, "--overwrite"]) == 0


@pytest.mark.slow
def test_two_ranks_build_and_search_as_one_process(corpus):
    assert index_main(index_argv(corpus, "one")) == 0
    assert search_main(search_argv(corpus, "one", "run1.txt")) == 0
    run(torchrun(2) + ["-m", "dr.index", *index_argv(corpus, "two")], timeout=300)
    assert files(corpus / "one") == files(corpus / "two")
    run(torchrun(2) + ["-m", "dr.search", *search_argv(corpus, "two", "run2.txt")], timeout=300)
    assert (corpus / "run1.txt").read_bytes() == (corpus / "run2.txt").read_bytes()
