"""Decoder backbones: last-token pooling reads an EOS token appended to every text, in training and
encoding alike (RepLLaMA-style), unless the tokenizer already ends texts with EOS or it is switched off."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dr.io.shards import read_shard
from dr.model.encoder import BiEncoder, EncoderConfig
from dr.model.text import load_tokenizer, resolve_append_eos, tokenize_unpadded
from dr.train.collator import TrainCollator
from dr.train.groups import TrainItem
from tests.helpers import command

encode_main, train_main = command("encode"), command("train")
from tests.helpers import make_tiny_decoder, make_train_rows, write_jsonl


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    return make_tiny_decoder(tmp_path_factory.mktemp("decoder"))


def test_append_eos_defaults(decoder_dir, tiny_model_dir, tmp_path):
    decoder = load_tokenizer(str(decoder_dir))
    assert decoder.pad_token == decoder.eos_token == "</s>"  # no pad token: EOS pads
    assert decoder.padding_side == "right"  # saved as "left": see load_tokenizer
    assert resolve_append_eos(EncoderConfig(pooling="last"), decoder) is True
    assert resolve_append_eos(EncoderConfig(pooling="mean"), decoder) is False
    assert resolve_append_eos(EncoderConfig(pooling="last", append_eos=False), decoder) is False
    assert resolve_append_eos(EncoderConfig(pooling="cls", append_eos=True), decoder) is True
    bert = load_tokenizer(str(tiny_model_dir))  # no EOS token at all
    assert resolve_append_eos(EncoderConfig(pooling="last"), bert) is False
    ends_with_eos = load_tokenizer(str(make_tiny_decoder(tmp_path / "templated", eos_in_template=True)))
    assert resolve_append_eos(EncoderConfig(pooling="last"), ends_with_eos) is False


def test_eos_is_kept_within_max_length(decoder_dir):
    tokenizer = load_tokenizer(str(decoder_dir))
    long_text = " ".join(["apple"] * 50)
    rows = tokenize_unpadded(tokenizer, [long_text, "river"], max_length=8, append_eos=True)
    assert [len(r) for r in rows["input_ids"]] == [8, 2]
    assert all(r[-1] == tokenizer.eos_token_id for r in rows["input_ids"])
    plain = tokenize_unpadded(tokenizer, [long_text], max_length=8, append_eos=False)
    assert plain["input_ids"][0][-1] != tokenizer.eos_token_id and len(plain["input_ids"][0]) == 8


def test_collator_ends_every_text_with_eos(decoder_dir):
    tokenizer = load_tokenizer(str(decoder_dir))
    items = [
        TrainItem("what about apple", ["apple story", "the river engine copper"], ["d1", "d2"], ["d1"]),
        TrainItem("river", ["river", "engine apple"], ["d3", "d4"], ["d3"]),
    ]
    batch = TrainCollator(tokenizer, q_max_len=8, p_max_len=8, append_eos=True)(items)
    for side in ("query", "passage"):
        ids, mask = batch[side]["input_ids"], batch[side]["attention_mask"]
        last = mask.sum(1) - 1  # right padding: the last real token of each row
        assert (ids[torch.arange(len(ids)), last] == tokenizer.eos_token_id).all()
        assert (mask[:, 0] == 1).all() and (last >= 1).all()


@pytest.mark.slow
def test_trained_decoder_encodes_with_the_eos_it_was_trained_with(decoder_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", make_train_rows(8))
    out = tmp_path / "model"
    argv = [
        "--model_name_or_path", str(decoder_dir), "--dataset_name", str(data), "--output_dir", str(out),
        "--per_device_train_batch_size", "4", "--train_n_passages", "2", "--max_steps", "2",
        "--save_strategy", "no", "--pooling", "last", "--normalize", "--q_max_len", "8", "--p_max_len", "16",
        "--temperature", "0.05", "--lora", "--lora_r", "4", "--lora_target_modules", "c_attn",
        "--grad_cache", "--gc_q_chunk_size", "3", "--gc_p_chunk_size", "5",  # all of issue 6 at once
    ]  # fmt: skip
    assert train_main(argv) == 0
    saved = json.loads((out / "dr_config.json").read_text())
    assert saved["append_eos"] is True and saved["pooling"] == "last"

    texts = ["apple river engine", "copper", " ".join(["river"] * 40)]
    corpus = write_jsonl(
        tmp_path / "corpus.jsonl", [{"docid": f"d{i}", "text": t} for i, t in enumerate(texts)]
    )
    emb = tmp_path / "emb" / "corpus.arrow"
    flags = [
        "--model_name_or_path", str(out), "--dataset_name", str(corpus), "--encoded_save_path", str(emb),
        "--per_device_eval_batch_size", "2", "--dataloader_num_workers", "0",
        "--dataset_cache_dir", str(tmp_path / ".cache"),
    ]  # fmt: skip
    assert encode_main(flags) == 0
    ids, vectors, _ = read_shard(emb)
    assert ids == ["d0", "d1", "d2"]

    model, tokenizer = BiEncoder.from_pretrained(str(out)).eval(), load_tokenizer(str(out))

    def direct(append_eos: bool) -> np.ndarray:
        with torch.no_grad():
            return np.stack(
                [
                    model.encode_passage(
                        dict(
                            tokenizer.pad(
                                tokenize_unpadded(tokenizer, [t], 16, append_eos), return_tensors="pt"
                            )
                        )
                    )[0].numpy()
                    for t in texts
                ]
            )

    np.testing.assert_allclose(vectors, direct(append_eos=True), atol=1e-5)
    assert np.abs(vectors - direct(append_eos=False)).max() > 1e-3  # the EOS changes the pooled state
