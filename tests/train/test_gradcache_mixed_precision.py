"""GradCache under fp16/bf16 mixed precision: the loss scale is applied once, overflows skip the step.

fp16 training scales the loss before backward (torch's GradScaler, or DeepSpeed's dynamic loss scale) and
skips the optimizer step when the scaled gradients overflow. GradCache replaces one backward by a float32
loss backward plus one backward per chunk, so it must (a) scale every chunk backward by the same factor and
(b) let the overflow check see all of them. Both are GPU features; here they run on the CPU:

- torch's GradScaler and float16 autocast work on the CPU, but accelerate only turns them on for a GPU, so
  the in-process test switches them on by hand, as `Accelerator` and `prepare_model` do on a GPU;
- DeepSpeed's fp16 engine runs through `tests/fp16_cpu_train.py`, which only lifts the "no fp16 on this
  device" refusals (see its docstring); its bf16 engine runs on the CPU as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.utils import get_mixed_precision_context_manager
from transformers import AutoModel

from dr.train.args import DRTrainingArguments
from dr.train.trainer import BiEncoderTrainer
from tests.helpers import REPO, make_train_rows, run, torchrun, write_jsonl
from tests.train.test_gradcache import make_batch, make_model, run_step
from tests.train.test_train_distributed import PER_DEVICE, WORLD, _flags

SCALE = 2.0**12


def make_trainer(model_dir: Path, tmp_path: Path, fp16: bool) -> BiEncoderTrainer:
    """A trainer on the tiny model; with `fp16`, the GradScaler and autocast a GPU run would get."""
    model = make_model(model_dir)
    args = DRTrainingArguments(
        output_dir=str(tmp_path / "out"), report_to="none", gc_q_chunk_size=2, gc_p_chunk_size=4, fp16=fp16
    )
    trainer = BiEncoderTrainer(model=model, args=args)
    trainer.current_gradient_accumulation_steps = 1
    if fp16:
        accelerator = trainer.accelerator
        accelerator.native_amp = True  # what Accelerator.__init__ sets for fp16 on a GPU
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
        # prepare_model wraps the instance forward in autocast; GradCache bypasses it and must autocast itself.
        model.forward = get_mixed_precision_context_manager(True)(model.forward)
    return trainer


def worst_relative_error(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """Largest |got - expected| over all parameters, relative to the largest expected gradient entry."""
    largest = max(g.abs().max().item() for g in expected.values())
    return max((got[n] - g).abs().max().item() for n, g in expected.items()) / largest


def test_grad_scaler_scales_every_chunk_once(tiny_model_dir, tmp_path):
    fp32 = make_trainer(tiny_model_dir, tmp_path, fp16=False)
    fp16 = make_trainer(tiny_model_dir, tmp_path, fp16=True)
    batch = make_batch(tiny_model_dir)
    loss32, grads32 = run_step(fp32, batch, grad_cache=False)
    plain_loss, plain = run_step(fp16, batch, grad_cache=False)
    cached_loss, cached = run_step(fp16, batch, grad_cache=True)

    assert plain_loss.item() != loss32.item(), "autocast was not active: the test would not exercise fp16"
    torch.testing.assert_close(cached_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert set(cached) == set(plain) == set(grads32)
    # Same (scaled) gradients as the plain fp16 step, up to float16 rounding of the chunked forwards.
    assert worst_relative_error(cached, plain) < 5e-3
    # Both carry the loss scale exactly once: unscaled, they are the float32 gradients.
    assert worst_relative_error({n: g / SCALE for n, g in cached.items()}, grads32) < 1e-2
    assert worst_relative_error({n: g / SCALE**2 for n, g in cached.items()}, grads32) > 0.5


# ---- DeepSpeed ZeRO-2, fp16 and bf16, on 2 ranks -----------------------------------------------------------
GC_FLAGS = ["--grad_cache", "--gc_q_chunk_size", "1", "--gc_p_chunk_size", "2"]


def deepspeed_config(folder: Path, initial_scale_power: int) -> Path:
    """configs/deepspeed/zero2.json with another initial fp16 loss scale."""
    config = json.loads((REPO / "configs" / "deepspeed" / "zero2.json").read_text())
    config["fp16"]["initial_scale_power"] = initial_scale_power
    path = folder / f"zero2-scale{initial_scale_power}.json"
    path.write_text(json.dumps(config))
    return path


def train_deepspeed(
    model_dir: Path, data: Path, out: Path, precision: str, config: Path, extra: list[str]
) -> list[dict]:
    """One SGD step of `dr train --{precision} --deepspeed config` on 2 ranks; returns the logged entries."""
    flags = _flags(model_dir, data, out, PER_DEVICE) + [f"--{precision}", "--deepspeed", str(config), *extra]
    entry = [str(REPO / "tests" / "fp16_cpu_train.py")] if precision == "fp16" else ["-m", "dr.train"]
    run(torchrun(WORLD) + entry + flags, timeout=300)
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mixed-precision")
    return write_jsonl(folder / "train.jsonl", make_train_rows(WORLD * PER_DEVICE, n_negatives=4, seed=3))


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "tolerance"), [("fp16", 1e-2), ("bf16", 5e-2)])
def test_deepspeed_grad_cache_step_equals_plain_step(
    tiny_model_dir, train_data, tmp_path, precision, tolerance
):
    """fp16: dynamic loss scale 64 (no overflow on this batch); bf16: no loss scale, bf16 weights."""
    config = deepspeed_config(tmp_path, initial_scale_power=6)
    logs = {
        name: train_deepspeed(tiny_model_dir, train_data, tmp_path / name, precision, config, extra)
        for name, extra in (("plain", []), ("gc", GC_FLAGS))
    }
    plain, cached = (next(e for e in logs[k] if "loss" in e) for k in ("plain", "gc"))
    assert cached["loss"] == pytest.approx(plain["loss"], rel=1e-3)
    assert cached["grad_norm"] == pytest.approx(plain["grad_norm"], rel=5e-3)  # unscaled by the engine

    initial = AutoModel.from_pretrained(tiny_model_dir).state_dict()
    got = AutoModel.from_pretrained(tmp_path / "gc").state_dict()
    expected = AutoModel.from_pretrained(tmp_path / "plain").state_dict()
    assert next(iter(got.values())).dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    moved = sum((expected[k].float() - initial[k]).norm() ** 2 for k in expected) ** 0.5
    apart = sum((got[k].float() - expected[k].float()).norm() ** 2 for k in expected) ** 0.5
    assert moved > 1.0, "the step did not move the weights: the comparison would be vacuous"
    assert apart < tolerance * moved  # half-precision weights: a few units in the last place


@pytest.mark.slow
def test_deepspeed_fp16_overflow_skips_the_grad_cache_step(tiny_model_dir, train_data, tmp_path):
    """At loss scale 2**16 the scaled gradients overflow float16: the engine must skip the step."""
    config = deepspeed_config(tmp_path, initial_scale_power=16)
    history = train_deepspeed(tiny_model_dir, train_data, tmp_path / "gc", "fp16", config, GC_FLAGS)
    step = next(e for e in history if "loss" in e)
    assert step["grad_norm"] == float("inf")
    initial = AutoModel.from_pretrained(tiny_model_dir).state_dict()
    got = AutoModel.from_pretrained(tmp_path / "gc").state_dict()
    for name, tensor in initial.items():
        assert torch.equal(got[name], tensor.half()), f"{name} changed although the step overflowed"
