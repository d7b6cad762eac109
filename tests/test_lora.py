"""LoRA adapters: trained through `dr train --lora`, saved alone, reloaded merged for encoding."""

from __future__ import annotations

import json

import pytest
import torch

from dr.model import BiEncoder, load_tokenizer
from dr.train import main as train_main
from tests.helpers import make_train_rows, write_jsonl


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
