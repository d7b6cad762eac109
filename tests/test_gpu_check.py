"""bench/gpu_check.py runs end to end: its `--smoke` plan on the CPU goes through every code path but CUDA.

Device time is scarce and the script's first GPU run must not die on a typo; this is its only rehearsal.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.helpers import run

pytestmark = pytest.mark.slow


def test_smoke_plan_measures_every_variant(tmp_path):
    run(
        [
            sys.executable,
            "-m",
            "bench.gpu_check",
            "--smoke",
            "--only",
            "grad_cache",
            "encoding",
            "search",
            "--out",
            str(tmp_path),
        ]
    )
    results = json.loads((tmp_path / "gpu_results.smoke.json").read_text())
    rows = results["grad_cache"]
    assert set(rows) == {"DDP", "DDP + GradCache", "ZeRO-2", "ZeRO-2 + GradCache"}
    for name, row in rows.items():
        assert "error" not in row, f"{name}: {row.get('error')}"
        assert row["finite"] and row["steps_per_s"] > 0
    assert "speed_ratio" in rows["ZeRO-2 + GradCache"]
    assert set(results["encoding"]) == {"bf16/fixed", "bf16/sorted"}
    assert results["search"]["cpu"]["queries_per_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script would run its full plan")
def test_refuses_to_run_without_a_gpu_unless_smoke(tmp_path):
    proc = run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path)], check=False)
    assert proc.returncode != 0 and "--smoke" in proc.stderr
    assert not (tmp_path / "gpu_results.json").exists()
