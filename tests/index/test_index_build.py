"""`dr index`: one trained quantizer, one index per passage shard, the same bytes however the work is split
(ranks, array tasks, concurrent or not), resume after a crash between shards or a kill -9 part-way
through one, and a manifest that fingerprints the passage shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dr.index import build
from dr.index.manifest import MANIFEST
from dr.io.shards import file_sha256
from tests.helpers import REPO, command, run, subprocess_env, torchrun
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
    assert all("sha256" in s["fingerprint"] for s in manifest["shards"])  # its own hash: no encode manifest


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


# A real `python -m dr.index` (the same entry point, `module_main`), stopped at a known point: once the
# index of shard 2 is half on disk under its temporary name (shards 0 and 1 are complete, shard 3 not
# begun), it says so through a file and waits for the test's SIGKILL. The wait is in the test's wrapper,
# not in dr: a kill needs no cooperation from the process it stops.
PAUSE_IN_THIRD_SHARD = """
import sys, time
from pathlib import Path

import faiss

from dr.cli import module_main

ready, real_write = Path(sys.argv.pop(1)), faiss.write_index


def write_then_wait(index, path):
    real_write(index, path)
    if Path(path).name.startswith("shard-00002.faiss.tmp-"):
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        ready.touch()
        time.sleep(600)


faiss.write_index = write_then_wait
sys.exit(module_main("index"))
"""


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"dr index ended (exit {proc.returncode}) before the kill point")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("kill point not reached in time")
        time.sleep(0.05)


def _stamps(folder: Path, names: list[str]) -> dict[str, tuple[int, int, str]]:
    return {
        n: ((folder / n).stat().st_mtime_ns, (folder / n).stat().st_size, file_sha256(folder / n))
        for n in names
    }


def test_kill_9_mid_build_then_rerun_skips_complete_shards(corpus):
    assert index_main(index_argv(corpus, "ref")) == 0
    assert search_main(search_argv(corpus, "ref", "ref.txt")) == 0
    script, ready, out = corpus / "pause_in_third_shard.py", corpus / "ready", corpus / "idx"
    script.write_text(PAUSE_IN_THIRD_SHARD)
    with open(corpus / "killed.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(ready), *index_argv(corpus, "idx")],
            stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(), cwd=REPO,
        )  # fmt: skip
        _wait_for(ready, proc)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    complete = [f"shard-0000{i}.{ext}" for i in (0, 1) for ext in ("faiss", "json")]
    left = sorted(p.name for p in out.iterdir())
    assert set(complete) <= set(left) and MANIFEST not in left, left
    assert not [n for n in left if n.startswith(("shard-00002", "shard-00003")) and ".tmp-" not in n], left
    temporary = [n for n in left if ".tmp-" in n]
    assert len(temporary) == 1 and temporary[0].startswith("shard-00002.faiss.tmp-"), left  # half written
    (out / "shard-00002.json.tmp-dead").write_text("{")  # as a kill while writing shard 2's record leaves
    kept = _stamps(out, [*complete, build.TRAINED, build.IDENTITY])
    time.sleep(0.01)  # a rewrite would show in the mtimes

    rerun = run([sys.executable, "-m", "dr.index", *index_argv(corpus, "idx")], timeout=120)
    assert "shard-00000.faiss is complete; skipped" in rerun.stderr
    assert "shard-00001.faiss is complete; skipped" in rerun.stderr
    assert "shard-00002.faiss is complete" not in rerun.stderr
    assert _stamps(out, list(kept)) == kept
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    assert files(out) == files(corpus / "ref")
    assert search_main(search_argv(corpus, "idx", "run.txt")) == 0
    assert (corpus / "run.txt").read_bytes() == (corpus / "ref.txt").read_bytes()


@pytest.mark.slow
def test_concurrent_array_tasks_build_the_same_index_as_one_process(corpus):
    """Two array tasks started together (as SLURM may): both train, the first quantizer published wins."""
    assert index_main(index_argv(corpus, "one")) == 0
    cmd = [sys.executable, "-m", "dr.index", *index_argv(corpus, "tasks", "--num_shards", "2")]
    tasks = [
        subprocess.Popen(cmd, env=subprocess_env(SLURM_ARRAY_TASK_ID=str(i)), cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for i in (0, 1)
    ]  # fmt: skip
    for task in tasks:
        output = task.communicate(timeout=120)[0]
        assert task.returncode == 0, output[-4000:]
    assert files(corpus / "tasks") == files(corpus / "one")
    assert not [p.name for p in (corpus / "tasks").iterdir() if ".tmp-" in p.name]
    assert search_main(search_argv(corpus, "one", "run1.txt")) == 0
    assert search_main(search_argv(corpus, "tasks", "run2.txt")) == 0
    assert (corpus / "run1.txt").read_bytes() == (corpus / "run2.txt").read_bytes()
