"""`dr encode` precision: bf16 weights vs autocast vs float32, `--bf16 auto`, and what the config records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dr.io.shards import read_shard
from dr.model import precision
from dr.model.precision import choose_precision, cpu_has_native_bf16, parse_bf16
from tests.encode.test_encode import encode
from tests.helpers import command

main = command("encode")


def _vectors(out: Path) -> np.ndarray:
    return read_shard(out.parent / f"{out.name}.arrow")[1].astype(np.float32)


def _resolved(out: Path) -> dict:
    return json.loads((out.parent / f"{out.name}.config.json").read_text())["resolved"]


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def test_bf16_weights_and_autocast_stay_close_to_float32(tiny_model_dir, corpus_file, tmp_path):
    runs = {
        "fp32": (),
        "weights": ("--bf16",),
        "autocast": ("--bf16", "true", "--precision_mode", "autocast"),
    }
    for name, flags in runs.items():
        assert encode(tiny_model_dir, corpus_file, tmp_path / name / "c", *flags) == 0
    fp32 = _vectors(tmp_path / "fp32" / "c")
    for name in ("weights", "autocast"):
        assert _min_cosine(_vectors(tmp_path / name / "c"), fp32) >= 0.999, name
    assert not np.array_equal(_vectors(tmp_path / "weights" / "c"), fp32)  # bf16 really ran
    assert _resolved(tmp_path / "fp32" / "c")["precision"]["dtype"] == "float32"
    weights = _resolved(tmp_path / "weights" / "c")["precision"]
    assert (weights["dtype"], weights["mode"]) == ("bfloat16", "weights")
    autocast = _resolved(tmp_path / "autocast" / "c")["precision"]
    assert (autocast["dtype"], autocast["mode"]) == ("bfloat16", "autocast")


@pytest.mark.parametrize(("native", "dtype"), [(True, "bfloat16"), (False, "float32")])
def test_bf16_auto_follows_the_cpu(tiny_model_dir, corpus_file, tmp_path, monkeypatch, native, dtype):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    out = tmp_path / "o" / "c"
    assert encode(tiny_model_dir, corpus_file, out, "--bf16", "auto") == 0
    resolved = _resolved(out)["precision"]
    assert resolved["dtype"] == dtype and "--bf16 auto" in resolved["reason"]
    saved = json.loads((out.parent / "c.config.json").read_text())
    assert saved["bf16"] == "auto" and saved["precision_mode"] == "weights"


def test_bf16_auto_in_a_config_file_and_yaml_booleans(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    for value, dtype in (("auto", "float32"), ("true", "bfloat16"), ("false", "float32")):
        config = tmp_path / f"{value}.yaml"
        config.write_text(f"bf16: {value}\n")  # YAML reads true/false as booleans
        out = tmp_path / value / "c"
        assert encode(tiny_model_dir, corpus_file, out, "--config", str(config)) == 0
        assert _resolved(out)["precision"]["dtype"] == dtype, value


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--bf16", "maybe"), "--bf16 must be true, false or auto, got 'maybe'"),
        (("--precision_mode", "fast"), "--precision_mode"),
        (("--bf16", "auto", "--fp16"), "--fp16 and --bf16 are mutually exclusive"),
        (("--num_threads", "0"), "--num_threads must be >= 1"),
    ],
)
def test_bad_precision_flags_are_one_line_usage_errors(
    tiny_model_dir,
    corpus_file,
    tmp_path,
    capsys,
    flags,
    message,
):
    assert encode(tiny_model_dir, corpus_file, tmp_path / "o" / "c", *flags) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and not list((tmp_path / "o").glob("*"))


def test_cpu_flags_probe(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    plain = tmp_path / "plain"
    plain.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert cpu_has_native_bf16(x86) and cpu_has_native_bf16(arm) and not cpu_has_native_bf16(plain)


def test_choose_precision_rules():
    yes, no = (lambda: True), (lambda: False)
    assert choose_precision("auto", False, "weights", "cpu", native_cpu_bf16=no).dtype == "float32"
    assert choose_precision("auto", False, "autocast", "cpu", native_cpu_bf16=yes).mode == "autocast"
    assert choose_precision("auto", False, "weights", "cuda", native_cuda_bf16=no).dtype == "float32"
    assert choose_precision("true", False, "weights", "cpu", native_cpu_bf16=no).dtype == "bfloat16"
    assert choose_precision("false", True, "weights", "cuda").dtype == "float16"
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        choose_precision("false", True, "weights", "cpu")
    assert [parse_bf16(v) for v in (True, False, None, "YES", "0", "Auto")] == [
        "true", "false", "false", "true", "false", "auto"
    ]  # fmt: skip


def test_threads_per_rank(monkeypatch):
    import torch

    from dr.encode.run import set_threads

    before = torch.get_num_threads()
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    try:
        cpu = torch.device("cpu")
        assert set_threads(None, cpu, {"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}) == 4  # torchrun's 1
        assert set_threads(None, cpu, {"LOCAL_WORLD_SIZE": "4"}) == 2
        assert set_threads(3, cpu, {"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}) == 3  # the flag wins
        torch.set_num_threads(1)
        assert (
            set_threads(None, cpu, {"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "3"}) == 1
        )  # the user's: kept
        assert set_threads(None, cpu, {}) == 1  # one process: torch's own setting
    finally:
        torch.set_num_threads(before)
