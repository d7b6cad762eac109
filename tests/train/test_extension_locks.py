"""A JIT build lock left by an interrupted DeepSpeed start is removed once stale, so later starts do not hang;
a young lock (a build running now) is left alone."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import pytest

from dr.train.extension_locks import (
    STALE_AFTER_S,
    build_locks,
    clear_stale_extension_locks,
    extension_build_roots,
)
from tests.helpers import REPO, as_flags, make_train_rows, run, subprocess_env, torchrun, write_jsonl
from tests.rerank.test_rerank import make_cross_encoder


def _lock(root: Path, extension: str, age_s: float) -> Path:
    lock = root / extension / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_stale_lock_is_removed_and_young_one_kept(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = _lock(tmp_path, "deepspeed_shm_comm", STALE_AFTER_S + 60)
    young = _lock(tmp_path, "cpu_adam", 30)
    (tmp_path / "other" / "build.ninja").parent.mkdir()  # a finished build: no lock, nothing to do
    with caplog.at_level(logging.INFO, logger="dr.train.extension_locks"):
        assert clear_stale_extension_locks() == [stale]
    assert not stale.exists() and young.exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "deepspeed_shm_comm" in warnings[0] and "interrupted" in warnings[0]
    assert any("cpu_adam" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    assert clear_stale_extension_locks() == []  # idempotent


def test_ages_are_measured_from_the_lock_files_time(tmp_path):
    lock = _lock(tmp_path, "op", 100)
    [(found, age)] = build_locks([tmp_path], now=lock.stat().st_mtime + 100)
    assert found == lock and age == pytest.approx(100)
    assert build_locks([tmp_path / "missing"]) == []


def test_default_root_has_a_python_level_under_torchs_cache(tmp_path, monkeypatch):
    """Without TORCH_EXTENSIONS_DIR torch builds in <cache>/py<ver>_<accelerator>/<extension>."""
    import torch.utils.cpp_extension

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(torch.utils.cpp_extension, "get_default_build_root", lambda: str(tmp_path))
    stale = _lock(tmp_path / "py312_cpu", "deepspeed_shm_comm", STALE_AFTER_S + 1)
    assert tmp_path / "py312_cpu" in extension_build_roots()
    assert clear_stale_extension_locks() == [stale]


@pytest.mark.slow
def test_deepspeed_start_after_an_interrupted_build_does_not_hang(tmp_path):
    """Before the fix each rank waited on the lock forever (a 400 s test timeout); now the run trains."""
    extensions = tmp_path / "extensions"
    built = Path(subprocess_env()["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm"  # the other tests' cache
    if (built / "deepspeed_shm_comm.so").is_file():  # reuse the build the other DeepSpeed tests made
        shutil.copytree(built, extensions / "deepspeed_shm_comm", ignore=shutil.ignore_patterns("lock"))
    lock = _lock(extensions, "deepspeed_shm_comm", STALE_AFTER_S + 60)
    start = make_cross_encoder(tmp_path / "start", seed=3)
    data = write_jsonl(tmp_path / "train.jsonl", make_train_rows(4, n_negatives=4, seed=3))
    flags = as_flags(
        model_type="cross_encoder", model_name_or_path=start, dataset_name=data, output_dir=tmp_path / "out",
        per_device_train_batch_size=2, train_n_passages=3, max_steps=1, save_strategy="no", max_length=40,
        report_to="none", deepspeed=REPO / "configs" / "deepspeed" / "zero2.json",
    )  # fmt: skip
    proc = run(torchrun(2) + ["-m", "dr.train", *flags], timeout=300, TORCH_EXTENSIONS_DIR=str(extensions))
    assert not lock.exists()
    assert "interrupted" in proc.stderr
    assert (tmp_path / "out" / "dr_cross_encoder.json").is_file()
