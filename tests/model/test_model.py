"""Pooling and model save/load details."""

from __future__ import annotations

import torch

from dr.model.encoder import BiEncoder, pool
from dr.model.text import load_tokenizer


def test_pooling_modes_with_right_and_left_padding():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    torch.testing.assert_close(pool(hidden, right, "cls"), hidden[:, 0])
    torch.testing.assert_close(pool(hidden, right, "mean")[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pool(hidden, right, "last"), torch.stack([hidden[0, 1], hidden[1, 3]]))
    torch.testing.assert_close(pool(hidden, left, "last"), hidden[:, -1])  # decoders pad on the left


def test_last_token_pooling_on_a_decoder_backbone(tmp_path, tiny_model_dir):
    """A tiny GPT-2 (no pad token): the tokenizer gets one, last-token pooling ignores padding."""
    from transformers import GPT2Config, GPT2Model

    tokenizer = load_tokenizer(str(tiny_model_dir))
    GPT2Model(
        GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=16, n_layer=1, n_head=2, n_positions=64)
    ).save_pretrained(tmp_path / "gpt")
    model = BiEncoder.from_pretrained(str(tmp_path / "gpt"), {"pooling": "last", "normalize": True}).eval()
    short = dict(tokenizer(["apple river"], return_tensors="pt"))
    padded = dict(
        tokenizer(
            ["apple river", "a much longer text about the copper engine"], padding=True, return_tensors="pt"
        )
    )
    with torch.no_grad():
        alone = model.encode_passage(short)
        batched = model.encode_passage(padded)
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=0)


def test_checkpointing_reaches_every_encoder_under_both_names(tiny_model_dir):
    for method in ("activation_checkpointing_enable", "gradient_checkpointing_enable"):
        model = BiEncoder.from_pretrained(str(tiny_model_dir), {"untie_encoder": True})
        getattr(model, method)()
        assert (
            model.query_encoder.is_gradient_checkpointing and model.passage_encoder.is_gradient_checkpointing
        )
