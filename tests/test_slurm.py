"""slurm/ on a real SLURM cluster: `scripts/slurm_local.sh` starts a one-node cluster on this machine
(installing slurm-wlm and munge when missing), `slurm/submit_all.sh` runs train -> encode array (3 tasks)
+ queries -> search -> eval through sbatch with afterok dependencies, and everything it produces equals
the same commands run directly. A failed array task is resubmitted alone (`sbatch --array=K`).

Needs root (it installs packages and starts daemons); CI runs as root. The daemons are stopped at the end
of the session, also when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import (
    REPO,
    _free_port,
    as_flags,
    command,
    make_train_rows,
    run,
    subprocess_env,
    write_jsonl,
)

pytestmark = pytest.mark.slow

SHARDS = 3
SLURM_LOCAL = REPO / "scripts" / "slurm_local.sh"
# The site options, from one place: what a real cluster would set to its account, partition, GPUs.
# This node has 2 CPUs and no GPU, so every job asks for 1 CPU and overrides the scripts' GPU lines.
SITE = {
    "SBATCH_ARGS": "--partition=dr --account=dr-test --time=00:10:00 --cpus-per-task=1 --gpus-per-node=0",
    "TRAIN_SBATCH_ARGS": "--nodes=1",
    "SRUN_ARGS": "--mpi=none",
}


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return (
            "needs root: scripts/slurm_local.sh installs slurm-wlm/munge and starts munged/slurmctld/slurmd"
        )
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        return "SLURM is not installed and apt-get is not available to install it"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node cluster for the session; its daemons are stopped afterwards, whatever happened."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    try:
        run(["bash", str(SLURM_LOCAL), "start"], timeout=900)
        yield
    finally:
        subprocess.run(["bash", str(SLURM_LOCAL), "stop"], check=False, timeout=180)


@pytest.fixture(scope="module")
def workflow(tiny_model_dir, tmp_path_factory) -> dict:
    """Inputs of a tiny retrieval task, and the reference: the same stages run directly, without SLURM."""
    folder = tmp_path_factory.mktemp("slurm")
    rows = make_train_rows(8, n_negatives=2, seed=5)
    passages = {p["docid"]: p for r in rows for p in r["positive_passages"] + r["negative_passages"]}
    inputs = {
        "train": write_jsonl(folder / "train.jsonl", rows),
        "corpus": write_jsonl(folder / "corpus.jsonl", list(passages.values())),
        "queries": folder / "queries.tsv",
        "qrels": folder / "qrels.trec",
        "config": folder / "train.json",
    }
    inputs["queries"].write_text("".join(f"{r['query_id']}\t{r['query']}\n" for r in rows))
    inputs["qrels"].write_text(
        "".join(f"{r['query_id']} 0 {r['positive_passages'][0]['docid']} 1\n" for r in rows)
    )
    config = {
        "model_name_or_path": str(tiny_model_dir),
        "dataset_name": str(inputs["train"]),
        "per_device_train_batch_size": 4,
        "train_n_passages": 3,
        "learning_rate": 0.1,
        "optim": "sgd",
        "max_steps": 2,
        "q_max_len": 16,
        "p_max_len": 32,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 3,
    }
    inputs["config"].write_text(json.dumps(config))
    ref = folder / "ref"
    _direct_pipeline(inputs, ref)
    return {"folder": folder, "ids": sorted(passages), "ref": ref, **inputs}


def _direct_pipeline(inputs: dict, out: Path) -> None:
    """What submit_all.sh's jobs run, as the same dr commands in this process (one thread, as the jobs
    with OMP_NUM_THREADS=1): train, 3 encode shards, queries, search, convert, eval."""
    import torch

    train, encode, search = command("train"), command("encode"), command("search")
    convert, evaluate = command("convert"), command("eval")
    emb, model = out / "embeddings", out / "model"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train(["--config", str(inputs["config"]), "--output_dir", str(model)]) == 0
        for shard in range(SHARDS):
            assert encode(as_flags(model_name_or_path=model, dataset_name=inputs["corpus"], encoded_save_path=emb / "corpus",
                                   encode_num_shard=SHARDS, encode_shard_index=shard)) == 0  # fmt: skip
        assert encode([*as_flags(model_name_or_path=model, dataset_name=inputs["queries"], encoded_save_path=emb / "queries"),
                       "--encode_is_qry"]) == 0  # fmt: skip
        assert search(["--query_reps", str(emb / "queries*.arrow"), "--passage_reps", str(emb / "corpus.*.arrow"),
                       "--save_ranking_to", str(out / "rank.txt"), "--depth", "10"]) == 0  # fmt: skip
        assert convert(["--input", str(out / "rank.txt"), "--output", str(out / "rank.txt.marco")]) == 0
        assert (
            evaluate(as_flags(qrels=inputs["qrels"], run=out / "rank.txt", output=out / "metrics.json")) == 0
        )
    finally:
        torch.set_num_threads(threads)


def _env(workflow: dict, **extra: str) -> dict[str, str]:
    """The submitting shell's environment (sbatch exports it to the jobs): inputs, site options, `extra`."""
    settings = {
        "PYTHON": sys.executable,
        "MASTER_PORT": str(_free_port()),
        "CORPUS": str(workflow["corpus"]),
        "QUERIES": str(workflow["queries"]),
        "QRELS": str(workflow["qrels"]),
        "SHARDS": str(SHARDS),
        "SEARCH_ARGS": "--depth 10",
        **SITE,
    }
    return subprocess_env(**{**settings, **extra})


def _submit_all(run_dir: Path, env: dict[str, str]) -> tuple[dict[str, str], list[list[str]]]:
    """Run submit_all.sh from `run_dir` (the job logs land there); return {stage: job id} and the printed
    sbatch commands."""
    run_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["bash", str(REPO / "slurm" / "submit_all.sh"), str(run_dir)], env=env, cwd=run_dir,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = dict(
        re.findall(r"^(train|encode corpus|encode queries|search|eval): +(\d+)", proc.stdout, re.MULTILINE)
    )
    commands = [shlex.split(line[2:]) for line in proc.stderr.splitlines() if line.startswith("+ sbatch ")]
    return jobs, commands


def _states(job: str) -> dict[str, tuple[str, str]]:
    """{job or array task id: (state, reason)} from scontrol (array jobs: one entry per task)."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, check=False)
    out = {}
    for line in proc.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        key = (
            f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}" if "ArrayTaskId" in fields else fields["JobId"]
        )
        out[key] = (fields.get("JobState", "?"), fields.get("Reason", ""))
    return out


def _wait(jobs: list[str], logs: Path, timeout: float = 400) -> dict[str, tuple[str, str]]:
    """Wait until none of `jobs` is pending or running; return the states of all their tasks. On timeout
    cancel them and fail with the job logs."""
    deadline = time.monotonic() + timeout
    while True:
        states = {k: v for job in jobs for k, v in _states(job).items()}
        if states and not [k for k, (state, _) in states.items() if state in ACTIVE]:
            return states
        if time.monotonic() > deadline:
            subprocess.run(["scancel", *jobs], check=False)
            pytest.fail(f"jobs still waiting after {timeout}s: {states}\n{_logs(logs)}")
        time.sleep(1)


ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED")


def _logs(folder: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(folder.glob("*.out")))


def _shards(emb: Path) -> list[Path]:
    return sorted(emb.glob("corpus.*.arrow"))


def _assert_same_outputs(run_dir: Path, ref: Path, ids: list[str]) -> None:
    """Shards cover the corpus exactly once and equal the direct run's; so do the run and the metrics."""
    from dr.io.runs import read_run
    from dr.io.shards import read_shard

    files = _shards(run_dir / "embeddings")
    assert [f.name for f in files] == [f.name for f in _shards(ref / "embeddings")]
    assert [f".{i:05d}-of-{SHARDS:05d}." in f.name for i, f in enumerate(files)] == [True] * SHARDS
    got_ids = [i for f in files for i in read_shard(f)[0]]
    assert sorted(got_ids) == ids and len(got_ids) == len(set(got_ids))  # every passage exactly once
    for got, want in zip(files, _shards(ref / "embeddings")):
        got_shard, want_shard = read_shard(got), read_shard(want)
        assert got_shard[0] == want_shard[0]
        np.testing.assert_allclose(got_shard[1], want_shard[1], atol=1e-5)
    got_run, want_run = read_run(run_dir / "rank.txt")[0], read_run(ref / "rank.txt")[0]
    assert list(got_run.rankings) == list(want_run.rankings)
    for qid, hits in want_run.rankings.items():
        assert [d for d, _ in got_run.rankings[qid]] == [d for d, _ in hits], qid
        np.testing.assert_allclose([s for _, s in got_run.rankings[qid]], [s for _, s in hits], atol=1e-4)
    assert (run_dir / "rank.txt.marco").read_text() == (ref / "rank.txt.marco").read_text()
    got, want = (
        json.loads((run_dir / "metrics.json").read_text()),
        json.loads((ref / "metrics.json").read_text()),
    )
    assert got.keys() == want.keys() and want
    np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], atol=1e-6)


def test_submit_all_runs_the_workflow_on_slurm(slurm_cluster, workflow):
    run_dir = workflow["folder"] / "slurm-run"
    jobs, commands = _submit_all(run_dir, _env(workflow, TRAIN_CONFIG=str(workflow["config"])))
    assert list(jobs) == ["train", "encode corpus", "encode queries", "search", "eval"]
    assert all("--partition=dr" in c and "--account=dr-test" in c for c in commands)
    states = _wait([jobs["eval"], jobs["search"], jobs["encode corpus"], jobs["encode queries"], jobs["train"]],
                   run_dir)  # fmt: skip
    assert {k: s for k, (s, _) in states.items()} == dict.fromkeys(states, "COMPLETED"), _logs(run_dir)
    assert sorted(k for k in states if k.startswith(jobs["encode corpus"] + "_")) == [
        f"{jobs['encode corpus']}_{i}" for i in range(SHARDS)
    ]  # a real array: 3 tasks of one job
    assert (run_dir / "metrics.json").is_file()
    from safetensors.torch import load_file

    trained, direct = (
        load_file(run_dir / "model" / "model.safetensors"),
        load_file(workflow["ref"] / "model" / "model.safetensors"),
    )
    assert trained.keys() == direct.keys()
    for name, tensor in direct.items():
        np.testing.assert_allclose(trained[name].numpy(), tensor.numpy(), atol=1e-5, err_msg=name)
    _assert_same_outputs(run_dir, workflow["ref"], workflow["ids"])
    log = (run_dir / f"dr-encode-{jobs['encode corpus']}_1.out").read_text()
    assert "+ srun --kill-on-bad-exit=1 --ntasks=1 --cpus-per-task=1 --mpi=none" in log  # site srun options


FAIL_ONCE = """#!/usr/bin/env bash
# PYTHON for the jobs: array task 1's encode dies once, as if its node failed while writing its shard.
if [[ "${SLURM_ARRAY_TASK_ID:-}" == 1 && " $* " == *" -m dr.encode "* ]] && mkdir "$0.failed" 2>/dev/null; then
  echo partial > "$EMB/corpus.00001-of-00003.rank00000-of-00001.arrow.tmp-1234"
  echo "simulated failure of array task 1" >&2
  exit 3
fi
exec "$REAL_PYTHON" "$@"
"""


def test_failed_array_task_is_resubmitted_alone(slurm_cluster, workflow):
    """Task 1 of the encode array fails: search and eval wait on a dependency that can never be met. The
    user cancels them, resubmits tasks 0-1 with the printed command (`sbatch --array=0-1 ...`) and submits
    search and eval after it: task 0 is complete and skipped, task 1 is redone, the result is the direct
    run's."""
    run_dir = workflow["folder"] / "fault-run"
    emb = run_dir / "embeddings"
    wrapper = workflow["folder"] / "python-fail-once"
    wrapper.write_text(FAIL_ONCE)
    wrapper.chmod(0o755)
    env = _env(workflow, MODEL=str(workflow["ref"] / "model"), PYTHON=str(wrapper), REAL_PYTHON=sys.executable,
               EMB=str(emb))  # fmt: skip
    jobs, commands = _submit_all(run_dir, env)
    assert list(jobs) == ["encode corpus", "encode queries", "search", "eval"]  # no TRAIN_CONFIG: no training
    corpus, queries = jobs["encode corpus"], jobs["encode queries"]
    states = _wait([corpus, queries], run_dir)
    assert states[f"{corpus}_1"][0] == "FAILED" and states[queries][0] == "COMPLETED", states
    assert states[f"{corpus}_0"][0] == states[f"{corpus}_2"][0] == "COMPLETED", states
    for _ in range(60):  # the scheduler marks the dependency on its next pass
        if _states(jobs["search"])[jobs["search"]] == ("PENDING", "DependencyNeverSatisfied"):
            break
        time.sleep(0.5)
    assert _states(jobs["search"])[jobs["search"]] == ("PENDING", "DependencyNeverSatisfied")
    assert "simulated failure of array task 1" in (run_dir / f"dr-encode-{corpus}_1.out").read_text()
    subprocess.run(["scancel", jobs["search"], jobs["eval"]], check=True, timeout=30)
    done = {p.name: p.stat().st_mtime_ns for p in _shards(emb)}
    assert len(done) == 2

    # Resubmit with the command submit_all.sh printed, only --array changed.
    (encode_command,) = [c for c in commands if any(a.startswith("--array=") for a in c)]
    resubmit = [("--array=0-1" if a.startswith("--array=") else a) for a in encode_command]
    proc = subprocess.run(resubmit, env={**env, "DR_SLURM_DIR": str(REPO / "slurm")}, cwd=run_dir,
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    again = proc.stdout.strip().split(";")[0]
    tail, _ = _submit_all(run_dir, {**env, "STAGES": "search eval", "AFTER": again})
    states = _wait([tail["eval"], tail["search"], again], run_dir)
    assert {k: s for k, (s, _) in states.items()} == dict.fromkeys(states, "COMPLETED"), _logs(run_dir)
    skipped = (run_dir / f"dr-encode-{again}_0.out").read_text()
    assert "corpus.00000-of-00003.rank00000-of-00001.arrow is complete" in skipped and "skipped" in skipped
    assert {p.name: p.stat().st_mtime_ns for p in _shards(emb)}.items() >= done.items()  # not recomputed
    assert not list(emb.glob("*.tmp-*"))
    _assert_same_outputs(run_dir, workflow["ref"], workflow["ids"])
