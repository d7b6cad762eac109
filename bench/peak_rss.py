"""Run a command and measure the peak resident memory of its largest process (CPU benchmarks).

A fresh wrapper interpreter runs the command and reads its own RUSAGE_CHILDREN: that peak is the largest
process of *this* command's tree (a torchrun worker counts; earlier runs of the benchmark do not).
"""

from __future__ import annotations

import subprocess
import sys

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
