"""`dr train` through its command line: N ranks with batch b == one process with batch N*b (one SGD step).

SGD, not Adam: Adam's first step is ~sign(gradient) and would hide a wrongly scaled gradient. Dropout is
off in the tiny model, gradient clipping is disabled, and the dataset holds exactly the global batch.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from tests.helpers import REPO, as_flags, make_train_rows, run, torchrun, write_jsonl

pytestmark = pytest.mark.slow

PER_DEVICE = 2
WORLD = 2


def _flags(model_dir: Path, data: Path, out: Path, batch: int) -> list[str]:
    return as_flags(
        model_name_or_path=model_dir,
        dataset_name=data,
        output_dir=out,
        per_device_train_batch_size=batch,
        train_n_passages=3,
        learning_rate=0.5,
        optim="sgd",
        max_steps=1,
        max_grad_norm=0,
        save_strategy="no",
        q_max_len=16,
        p_max_len=32,
        pooling="mean",
        temperature=0.5,
        logging_steps=1,
        seed=7,
    )


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """One process, batch WORLD * PER_DEVICE, on exactly that many queries (with 2 hard negatives each)."""
    folder = tmp_path_factory.mktemp("equivalence")
    data = write_jsonl(folder / "train.jsonl", make_train_rows(WORLD * PER_DEVICE, n_negatives=4, seed=3))
    run([sys.executable, "-m", "dr.train", *_flags(tiny_model_dir, data, folder / "ref", WORLD * PER_DEVICE)])
    return folder, data, AutoModel.from_pretrained(folder / "ref").state_dict()


def _assert_same_weights(out: Path, expected: dict[str, torch.Tensor], start: Path) -> None:
    got = AutoModel.from_pretrained(out).state_dict()
    initial = AutoModel.from_pretrained(start).state_dict()
    moved = max((expected[k] - initial[k]).abs().max().item() for k in expected)
    assert moved > 1e-2, "the reference step did not change the weights: the comparison would be vacuous"
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_torchrun_ddp_equals_single_process(tiny_model_dir, reference):
    folder, data, expected = reference
    run(torchrun(WORLD) + ["-m", "dr.train", *_flags(tiny_model_dir, data, folder / "ddp", PER_DEVICE)])
    _assert_same_weights(folder / "ddp", expected, tiny_model_dir)


def test_torchrun_without_gathering_differs(tiny_model_dir, reference):
    """Control: per-device negatives change the objective, and the weight comparison notices."""
    folder, data, expected = reference
    out = folder / "local"
    run(
        torchrun(WORLD)
        + ["-m", "dr.train", *_flags(tiny_model_dir, data, out, PER_DEVICE), "--negatives_x_device", "false"]
    )
    with pytest.raises(AssertionError):
        _assert_same_weights(out, expected, tiny_model_dir)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_zero_equals_single_process(tiny_model_dir, reference, stage):
    folder, data, expected = reference
    out = folder / f"zero{stage}"
    config = str(REPO / "configs" / "deepspeed" / f"zero{stage}.json")
    flags = _flags(tiny_model_dir, data, out, PER_DEVICE) + ["--deepspeed", config]
    deepspeed_cli = Path(sys.executable).parent / "deepspeed"
    if stage == 1 and deepspeed_cli.exists():  # also exercise DeepSpeed's own launcher once
        launcher = [
            str(deepspeed_cli),
            "--num_gpus",
            str(WORLD),
            "--master_port",
            str(_port()),
            "--module",
            "dr.train",
        ]
    else:
        launcher = torchrun(WORLD) + ["-m", "dr.train"]
    run(launcher + flags, timeout=400)
    _assert_same_weights(out, expected, tiny_model_dir)
    shutil.rmtree(out, ignore_errors=True)


def _port() -> int:
    from tests.helpers import _free_port

    return _free_port()


FAIL_ON_RANK_1 = """
import os, sys
import dr.train.trainer
from dr.cli import run_command
from dr.distributed import exit_status

step = dr.train.trainer.BiEncoderTrainer.training_step

def failing_step(self, *args, **kwargs):
    if os.environ["RANK"] == "1" and self.state.global_step == 1:
        raise RuntimeError("simulated failure on rank 1")
    return step(self, *args, **kwargs)

dr.train.trainer.BiEncoderTrainer.training_step = failing_step
sys.exit(exit_status(run_command("train", sys.argv[1:])))
"""


def test_a_rank_failing_alone_ends_the_job_with_its_traceback(tiny_model_dir, reference, tmp_path):
    """Rank 1 raises in step 2 while rank 0 waits in that step's all_gather. Rank 1 must not wait in a
    teardown barrier (that hung the job, silently, until the process-group timeout): it exits non-zero
    with its traceback and torchrun stops rank 0."""
    _, data, _ = reference
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(FAIL_ON_RANK_1)
    flags = _flags(tiny_model_dir, data, tmp_path / "out", PER_DEVICE) + ["--max_steps", "3"]
    proc = run(torchrun(WORLD) + [str(script), *flags], timeout=150, check=False)
    assert proc.returncode != 0
    assert "RuntimeError: simulated failure on rank 1" in proc.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()
