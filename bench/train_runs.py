"""Benchmark runs of `dr train`: peak resident memory of a command, and what the Trainer logged.

Peak memory: a fresh wrapper interpreter runs the command and reads its own RUSAGE_CHILDREN, the largest
process of *this* command's tree (a torchrun worker counts; earlier runs of the benchmark do not).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_WRAPPER = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
    "sys.exit(code)"
)


def run_with_peak_rss(
    cmd: list[str], env: dict[str, str], cwd: str, timeout: float = 1800
) -> tuple[subprocess.CompletedProcess, float]:
    """(the finished process, peak RSS in MiB of the largest process it started); raises on failure."""
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
        cwd=cwd,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{proc.stderr[-3000:]}")
    peak_kib = int(proc.stderr.rsplit("PEAK_RSS_KIB", 1)[1].split()[0])
    return proc, peak_kib / 1024


def read_train_log(output_dir: Path) -> tuple[list[dict], float]:
    """(the logged training steps, i.e. entries with a loss, and the Trainer's train_runtime in seconds,
    which excludes start-up) from `output_dir`/trainer_state.json."""
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    runtime = next(e["train_runtime"] for e in history if "train_runtime" in e)
    return [e for e in history if "loss" in e], runtime
