"""GradCache (`--grad_cache`) gives the plain loss and gradients.

In one process the real `BiEncoderTrainer.training_step` is run twice on the same batch, plainly and with
GradCache, and the loss and every parameter gradient compared (hard negatives, a false negative to mask,
chunk sizes that do not divide the batch, gradient accumulation, untied encoders, dropout on). Under
torchrun, one SGD step of `dr train --grad_cache` on 2 ranks (DDP and DeepSpeed ZeRO 0-3) must land on the
weights of the plain single-process step on the global batch (tests/train/test_train_distributed.py's method).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, BertConfig, BertModel

import dr.train.gradcache
from dr.model.encoder import BiEncoder, EncoderConfig
from dr.model.text import load_tokenizer
from dr.train.args import DRTrainingArguments
from dr.train.collator import id_key
from dr.train.trainer import BiEncoderTrainer
from tests.helpers import REPO, TOPICS, make_train_rows, run, torchrun, write_jsonl
from tests.train.test_train_distributed import (  # noqa: F401  (`reference` is a module-scoped fixture)
    PER_DEVICE,
    WORLD,
    _assert_same_weights,
    _flags,
    reference,
)

N_QUERIES, GROUP = 5, 3  # 5 queries x (1 positive + 2 hard negatives); chunk sizes 2 and 4 do not divide


def make_batch(model_dir: Path) -> dict:
    """A collated batch in `TrainCollator`'s layout with three (query, passage) pairs to mask.

    Query 3's positive is the same document as query 0's positive, and query 1's second hard negative is
    query 2's positive document.
    """
    tokenizer = load_tokenizer(str(model_dir))
    queries = [f"what about {TOPICS[i]}" for i in range(N_QUERIES)]
    passages, docids = [], []
    for i in range(N_QUERIES):
        passages += [
            f"{TOPICS[i]} story {TOPICS[i]}",
            f"{TOPICS[i + 10]} notes",
            f"the {TOPICS[i + 20]} text",
        ]
        docids += [f"pos{i}", f"neg{i}a", f"neg{i}b"]
    docids[3 * GROUP] = "pos0"
    docids[1 * GROUP + 2] = "pos2"
    return {
        "query": dict(tokenizer(queries, padding=True, return_tensors="pt")),
        "passage": dict(tokenizer(passages, padding=True, return_tensors="pt")),
        "passage_keys": torch.tensor([id_key(d) for d in docids]),
        "positive_keys": torch.tensor([[id_key(docids[i * GROUP])] for i in range(N_QUERIES)]),
    }


def make_model(model_dir: Path, untie: bool = False, dropout: float = 0.0) -> BiEncoder:
    """The tiny BERT (optionally untied, optionally with dropout) as a BiEncoder."""
    config = EncoderConfig(pooling="mean", temperature=0.5, untie_encoder=untie)

    cfg = BertConfig.from_pretrained(str(model_dir))
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = dropout

    def encoder() -> BertModel:
        return BertModel.from_pretrained(str(model_dir), config=cfg)

    return BiEncoder(encoder(), encoder() if untie else None, config)


def make_trainer(model: BiEncoder, tmp_path: Path, q_chunk: int, p_chunk: int) -> BiEncoderTrainer:
    args = DRTrainingArguments(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        gc_q_chunk_size=q_chunk,
        gc_p_chunk_size=p_chunk,
        mask_false_negatives=True,
    )
    trainer = BiEncoderTrainer(model=model, args=args)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop before each step
    return trainer


def run_step(trainer: BiEncoderTrainer, batch: dict, grad_cache: bool, seed: int = 0) -> tuple:
    """(returned loss, {name: grad}) of one training_step from zero gradients, under a fixed seed."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    trainer.args.grad_cache = grad_cache
    torch.manual_seed(seed)
    loss = trainer.training_step(model, batch)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss, grads


def assert_same(plain: tuple, cached: tuple, atol: float = 1e-6) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = plain, cached
    assert not loss_b.requires_grad
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-7)
    assert set(grads_b) == set(grads_a)
    assert max(g.abs().max().item() for g in grads_a.values()) > 1e-3  # not a vacuous comparison
    for name, grad in grads_a.items():
        torch.testing.assert_close(
            grads_b[name], grad, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize(
    ("q_chunk", "p_chunk", "untie", "ga_steps"),
    [(2, 4, False, 1), (1, 7, True, 1), (2, 4, False, 3), (64, 64, False, 1)],
)
def test_grad_cache_step_equals_plain_step(tiny_model_dir, tmp_path, q_chunk, p_chunk, untie, ga_steps):
    model = make_model(tiny_model_dir, untie=untie)
    trainer = make_trainer(model, tmp_path, q_chunk, p_chunk)
    trainer.current_gradient_accumulation_steps = ga_steps  # what the training loop sets before each step
    batch = make_batch(tiny_model_dir)
    plain = run_step(trainer, batch, grad_cache=False)
    masked_plain = int(trainer.loss_log.counts["masked_false_negatives"])
    no_sync_calls = []
    no_sync = trainer.accelerator.no_sync
    trainer.accelerator.no_sync = lambda model: no_sync_calls.append(1) or no_sync(model)
    cached = run_step(trainer, batch, grad_cache=True)
    n_chunks = -(-N_QUERIES // q_chunk) + -(-N_QUERIES * GROUP // p_chunk)
    assert len(no_sync_calls) == n_chunks - 1  # DDP would all-reduce only in the last chunk's backward
    masked_both = int(trainer.loss_log.counts["masked_false_negatives"])
    assert masked_plain == 3 and masked_both == 6  # 3 (query, passage) pairs masked, both paths
    assert_same(plain, cached)
    # Untied: the query encoder gets gradients although the last chunk backward is a passage chunk.
    assert any(n.startswith("passage_encoder.") for n in cached[1]) == untie


def test_without_false_negative_masking_the_loss_changes(tiny_model_dir, tmp_path):
    """Control for the masking: GradCache follows `--mask_false_negatives false` too (and it matters)."""
    model = make_model(tiny_model_dir)
    trainer = make_trainer(model, tmp_path, 2, 4)
    batch = make_batch(tiny_model_dir)
    masked = run_step(trainer, batch, grad_cache=True)
    trainer.args.mask_false_negatives = False
    plain = run_step(trainer, batch, grad_cache=False)
    cached = run_step(trainer, batch, grad_cache=True)
    assert_same(plain, cached)
    assert abs(masked[0].item() - cached[0].item()) > 1e-3


def test_dropout_single_chunk_equals_plain_step(tiny_model_dir, tmp_path):
    """Dropout on, one chunk per side: GradCache draws its masks in the plain forward's order."""
    trainer = make_trainer(make_model(tiny_model_dir, dropout=0.1), tmp_path, 64, 64)
    batch = make_batch(tiny_model_dir)
    assert_same(run_step(trainer, batch, False, seed=3), run_step(trainer, batch, True, seed=3))


def _chunked_reference(
    trainer: BiEncoderTrainer, batch: dict, q_chunk: int, p_chunk: int, seed: int
) -> tuple:
    """The plain loss with the forward done chunk by chunk (with a graph), in GradCache's order.

    Under one seed this draws the dropout masks GradCache's first pass draws, so it is the objective
    GradCache must differentiate.
    """
    model = trainer.model
    model.train()  # from_pretrained leaves the encoders in eval mode
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    q = torch.cat([model.encode_query(c) for c in dr.train.gradcache.split_batch(batch["query"], q_chunk)])
    p = torch.cat(
        [model.encode_passage(c) for c in dr.train.gradcache.split_batch(batch["passage"], p_chunk)]
    )
    loss = trainer.loss_fn(
        q, p, passage_keys=batch["passage_keys"], positive_keys=batch["positive_keys"]
    ).loss
    loss.backward()
    return loss.detach(), {n: prm.grad.clone() for n, prm in model.named_parameters() if prm.grad is not None}


def test_dropout_masks_are_replayed(tiny_model_dir, tmp_path, monkeypatch):
    """Dropout on, several chunks: the recomputed chunks must reuse the first pass's masks.

    Without the RNG replay (the control) the gradients no longer match: the test can see a missing replay.
    """
    model = make_model(tiny_model_dir, dropout=0.1)
    trainer = make_trainer(model, tmp_path, 2, 4)
    batch = make_batch(tiny_model_dir)
    expected = _chunked_reference(trainer, batch, 2, 4, seed=5)
    assert_same(expected, run_step(trainer, batch, True, seed=5))

    monkeypatch.setattr(dr.train.gradcache.RngState, "replay", lambda self: contextlib.nullcontext())
    loss, grads = run_step(trainer, batch, True, seed=5)
    assert loss.item() == pytest.approx(expected[0].item(), rel=1e-6)  # same first pass ...
    worst = max((grads[n] - g).abs().max().item() for n, g in expected[1].items())
    assert worst > 1e-4  # ... but gradients of other dropout masks


def test_forward_as_restores_the_instance_forward(tiny_model_dir):
    model = make_model(tiny_model_dir)
    with dr.train.gradcache.forward_as(model, lambda batch: batch):
        assert model(batch=3) == 3
    assert "forward" not in model.__dict__
    wrapped = model.forward
    model.forward = wrapped  # like accelerate's autocast wrapper: an instance attribute
    with dr.train.gradcache.forward_as(model, lambda batch: batch):
        pass
    assert model.__dict__["forward"] is wrapped


# ---- 2 ranks through `dr train` -----------------------------------------------------------------------
GC_FLAGS = ["--grad_cache", "--gc_q_chunk_size", "1", "--gc_p_chunk_size", "2"]


@pytest.mark.slow
def test_torchrun_ddp_grad_cache_equals_single_process(tiny_model_dir, reference):  # noqa: F811
    folder, data, expected = reference
    out = folder / "gc-ddp"
    run(torchrun(WORLD) + ["-m", "dr.train", *_flags(tiny_model_dir, data, out, PER_DEVICE), *GC_FLAGS])
    _assert_same_weights(out, expected, tiny_model_dir)


# ZeRO 0 and 1 pass too but cost ~45 s more; DR_TEST_ALL_ZERO_STAGES=1 runs them.
_CHEAP = os.environ.get("DR_TEST_ALL_ZERO_STAGES") != "1"
_OPTIONAL = pytest.mark.skipif(_CHEAP, reason="set DR_TEST_ALL_ZERO_STAGES=1")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [pytest.param(0, marks=_OPTIONAL), pytest.param(1, marks=_OPTIONAL), 2, 3])
def test_deepspeed_grad_cache_equals_single_process(tiny_model_dir, reference, stage):  # noqa: F811
    folder, data, expected = reference
    out = folder / f"gc-zero{stage}"
    config = str(REPO / "configs" / "deepspeed" / f"zero{stage}.json")
    flags = _flags(tiny_model_dir, data, out, PER_DEVICE) + GC_FLAGS + ["--deepspeed", config]
    run(torchrun(WORLD) + ["-m", "dr.train", *flags], timeout=400)
    _assert_same_weights(out, expected, tiny_model_dir)
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.slow
def test_single_process_grad_cache_with_accumulation_equals_plain(tiny_model_dir, tmp_path):
    """`dr train` with --gradient_accumulation_steps 2: same weights and logged loss as the plain run."""
    data = write_jsonl(tmp_path / "train.jsonl", make_train_rows(4, n_negatives=4, seed=3))
    results = {}
    for name, extra in (("plain", []), ("gc", GC_FLAGS)):
        out = tmp_path / name
        flags = _flags(tiny_model_dir, data, out, 2) + ["--gradient_accumulation_steps", "2", *extra]
        run([sys.executable, "-m", "dr.train", *flags])
        results[name] = out
    expected = AutoModel.from_pretrained(results["plain"]).state_dict()
    _assert_same_weights(results["gc"], expected, tiny_model_dir)
    losses = {
        k: [
            e["loss"]
            for e in json.loads((v / "trainer_state.json").read_text())["log_history"]
            if "loss" in e
        ]
        for k, v in results.items()
    }
    assert losses["gc"] == pytest.approx(losses["plain"], rel=1e-5) and losses["plain"]


@pytest.mark.slow
def test_bf16_autocast_runs_in_the_chunks(tiny_model_dir, reference):  # noqa: F811
    """`--bf16` on the CPU: the chunk forwards run under autocast, the loss gradient stays float32.

    accelerate puts autocast into the model's wrapped `forward`, which GradCache bypasses, so it must enter
    autocast itself: then the step moves the weights a little away from the fp32 reference (bf16 encoders),
    but only a little (float32 scores). Without autocast the difference would be ~1e-6.
    """
    folder, data, expected = reference
    out = folder / "gc-bf16"
    run(
        [
            sys.executable,
            "-m",
            "dr.train",
            *_flags(tiny_model_dir, data, out, 2 * PER_DEVICE),
            *GC_FLAGS,
            "--bf16",
        ]
    )
    got = AutoModel.from_pretrained(out).state_dict()
    worst = max((got[k] - v).abs().max().item() for k, v in expected.items())
    assert 1e-4 < worst < 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_untied_grad_cache_equals_plain_over_several_steps(tiny_model_dir, tmp_path, stage):
    """3 SGD steps, untied encoders, one process: GradCache lands on the plain run's weights.

    ZeRO-3 overwrites gradient partitions in the first backward of a step and adds to them afterwards; a
    first backward that reached only the query encoder left the passage encoder adding to the previous
    step's gradients, which a single-step test cannot see (see dr.train.gradcache.backward_units).
    """
    data = write_jsonl(tmp_path / "train.jsonl", make_train_rows(12, n_negatives=4, seed=5))
    config = str(REPO / "configs" / "deepspeed" / f"zero{stage}.json")
    outs = {}
    for name, extra in (("plain", []), ("gc", GC_FLAGS)):
        outs[name] = tmp_path / name
        flags = _flags(tiny_model_dir, data, outs[name], 4) + ["--max_steps", "3", "--untie_encoder"]
        run(torchrun(1) + ["-m", "dr.train", *flags, "--deepspeed", config, *extra], timeout=300)
    for side in ("query_model", "passage_model"):
        expected = AutoModel.from_pretrained(outs["plain"] / side).state_dict()
        _assert_same_weights(outs["gc"] / side, expected, tiny_model_dir)


@pytest.fixture(scope="module")
def untied_ddp_reference(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A plain 2-rank DDP run with untied encoders: 2 SGD steps (data, output folder)."""
    folder = tmp_path_factory.mktemp("untied-ddp")
    data = write_jsonl(folder / "train.jsonl", make_train_rows(2 * WORLD * PER_DEVICE, n_negatives=4, seed=6))
    flags = _flags(tiny_model_dir, data, folder / "plain", PER_DEVICE) + [
        "--max_steps",
        "2",
        "--untie_encoder",
    ]
    run(torchrun(WORLD) + ["-m", "dr.train", *flags])
    return data, folder / "plain"


@pytest.mark.slow
@pytest.mark.parametrize("chunks", [("1", "2"), ("64", "64")], ids=["several-chunks", "one-chunk-each"])
def test_torchrun_ddp_untied_grad_cache_equals_plain(tiny_model_dir, untied_ddp_reference, tmp_path, chunks):
    """DDP's reducer allows one forward per backward, also when each encoder is one chunk (one backward
    pass per chunk, the last one synchronised); both encoders land on the plain run's weights."""
    data, plain = untied_ddp_reference
    out = tmp_path / "gc"
    flags = _flags(tiny_model_dir, data, out, PER_DEVICE) + ["--max_steps", "2", "--untie_encoder"]
    flags += ["--grad_cache", "--gc_q_chunk_size", chunks[0], "--gc_p_chunk_size", chunks[1]]
    run(torchrun(WORLD) + ["-m", "dr.train", *flags])
    for side in ("query_model", "passage_model"):
        expected = AutoModel.from_pretrained(plain / side).state_dict()
        _assert_same_weights(out / side, expected, tiny_model_dir)
