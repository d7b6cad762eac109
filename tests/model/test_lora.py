"""LoRA adapters: trained through `dr train --lora`, saved alone, reloaded merged for encoding."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from dr.model.encoder import BiEncoder
from dr.model.text import load_tokenizer
from tests.helpers import command

train_main = command("train")
from tests.helpers import REPO, make_train_rows, run, torchrun, write_jsonl


@pytest.fixture()
def lora_model(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", make_train_rows(16))
    out = tmp_path / "lora"
    code = train_main(
        [
            "--model_name_or_path",
            str(tiny_model_dir),
            "--dataset_name",
            str(data),
            "--output_dir",
            str(out),
            "--per_device_train_batch_size",
            "4",
            "--train_n_passages",
            "3",
            "--max_steps",
            "4",
            "--learning_rate",
            "5e-2",
            "--save_strategy",
            "no",
            "--pooling",
            "mean",
            "--lora",
            "--lora_r",
            "4",
            "--lora_target_modules",
            "query,value",
            "--lora_dropout",
            "0",
        ]
    )
    assert code == 0
    return out


def _encode(model: BiEncoder, tokenizer, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval().encode_passage(dict(tokenizer(texts, padding=True, return_tensors="pt")))


def test_adapters_are_saved_alone(lora_model, tiny_model_dir):
    assert (lora_model / "adapter_config.json").is_file() and (
        lora_model / "adapter_model.safetensors"
    ).is_file()
    assert not (lora_model / "model.safetensors").exists()
    config = json.loads((lora_model / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir) and config["r"] == 4


def test_merged_model_encodes_like_the_unmerged_one_and_differs_from_the_base(lora_model, tiny_model_dir):
    tokenizer = load_tokenizer(str(lora_model))
    texts = ["what about apple", "the river story notes", "copper"]
    merged = BiEncoder.from_pretrained(str(lora_model))  # default: merge for encoding
    unmerged = BiEncoder.from_pretrained(str(lora_model), merge_lora=False)
    assert (
        "Peft" in type(unmerged.query_encoder).__name__ and "Peft" not in type(merged.query_encoder).__name__
    )
    torch.testing.assert_close(
        _encode(merged, tokenizer, texts), _encode(unmerged, tokenizer, texts), atol=1e-5, rtol=0
    )
    base = BiEncoder.from_pretrained(str(tiny_model_dir), {"pooling": "mean"})
    assert not torch.allclose(_encode(base, tokenizer, texts), _encode(merged, tokenizer, texts), atol=1e-4)
    # The same adapters applied through --lora_name_or_path on the base model.
    via_flag = BiEncoder.from_pretrained(
        str(tiny_model_dir), {"pooling": "mean"}, lora_name_or_path=str(lora_model)
    )
    torch.testing.assert_close(
        _encode(via_flag, tokenizer, texts), _encode(merged, tokenizer, texts), atol=1e-5, rtol=0
    )


# ---- resume and distributed ------------------------------------------------------------------------------
def _adapters(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


LORA_FLAGS = ["--pooling", "mean", "--lora", "--lora_r", "4", "--lora_target_modules", "query,value"]
LORA_FLAGS += ["--lora_dropout", "0", "--train_n_passages", "3"]


def test_resume_with_lora_equals_uninterrupted(tiny_model_dir, tmp_path):
    """4 LoRA steps in one go == 2 steps, a crash, and a resume from the adapter-only checkpoint."""
    data = write_jsonl(tmp_path / "train.jsonl", make_train_rows(8, n_negatives=4))
    flags = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), *LORA_FLAGS]
    flags += ["--per_device_train_batch_size", "2", "--max_steps", "4", "--save_steps", "2"]
    flags += ["--learning_rate", "5e-2"]
    full = tmp_path / "full"
    assert train_main([*flags, "--output_dir", str(full)]) == 0
    assert not (full / "checkpoint-2" / "model.safetensors").exists()  # the checkpoint holds adapters only
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    assert train_main([*flags, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"]) == 0
    expected, got, halfway = _adapters(full), _adapters(resumed), _adapters(full / "checkpoint-2")
    assert max((expected[k] - halfway[k]).abs().max().item() for k in expected) > 1e-4
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_lora_equals_single_process(tiny_model_dir, tmp_path, stage):
    """2 ranks under ZeRO-2/3 with LoRA: one SGD step lands on the single-process adapters, saved alone."""
    data = write_jsonl(tmp_path / "train.jsonl", make_train_rows(4, n_negatives=4, seed=3))
    flags = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), *LORA_FLAGS]
    flags += ["--max_steps", "1", "--optim", "sgd", "--learning_rate", "0.5", "--max_grad_norm", "0"]
    flags += ["--save_strategy", "no", "--temperature", "0.5", "--seed", "7"]
    reference = tmp_path / "reference"
    run(
        [
            sys.executable,
            "-m",
            "dr.train",
            *flags,
            "--per_device_train_batch_size",
            "4",
            "--output_dir",
            str(reference),
        ]
    )
    out = tmp_path / f"zero{stage}"
    config = str(REPO / "configs" / "deepspeed" / f"zero{stage}.json")
    run(
        torchrun(2)
        + ["-m", "dr.train", *flags, "--per_device_train_batch_size", "2", "--output_dir", str(out)]
        + ["--deepspeed", config],
        timeout=400,
    )
    assert not (out / "model.safetensors").exists() and (out / "adapter_config.json").is_file()
    expected, got = _adapters(reference), _adapters(out)
    # LoRA's B matrices start at zero: a moved B shows the step did something to compare.
    assert max(v.abs().max().item() for k, v in expected.items() if "lora_B" in k) > 1e-3, "vacuous"
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(
            got[name], expected[name], rtol=0, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
    # And the saved adapters load, merged, for encoding.
    BiEncoder.from_pretrained(str(out))
