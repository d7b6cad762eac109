"""Matryoshka training and truncated encoding (docs/matryoshka.md).

- the loss: the weighted sum of the plain loss (contrastive, distillation mixes) on truncated, renormalised
  prefixes, by hand; every prefix cut from the one gathered passage matrix (one collective); 2 ranks equal
  1 process with hard negatives;
- `dr encode --truncate_dim D`: the first D dims of the full vectors, renormalised; the shard metadata and
  manifest record it; the model's saved truncate_dim is the default;
- `dr search` refuses shards of mixed dimensions, naming them;
- the sentence-transformers config carries truncate_dim, and `SentenceTransformer(path)` gives the
  truncated vectors.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from dr.errors import UsageError
from dr.io.shards import ShardMeta, read_meta, write_shard
from dr.train.losses import LossSettings, build_loss
from dr.train.losses import contrastive as contrastive_module
from dr.train.losses.contrastive import ContrastiveLoss
from dr.train.losses.matryoshka import MatryoshkaLoss, parse_dims, parse_weights
from tests.helpers import REPO, command, run, torchrun
from tests.train.test_loss import GROUP, SETTINGS, _hand, make_global_keys

DIMS, WEIGHTS = (6, 4, 2), (1.0, 0.5, 0.25)


def _prefix(rows: list[list[float]], dim: int, normalize: bool) -> list[list[float]]:
    """The first `dim` numbers of each row, scaled to unit length when `normalize` (plain Python)."""
    out = []
    for row in rows:
        head = row[:dim]
        norm = math.sqrt(sum(x * x for x in head)) if normalize else 1.0
        out.append([x / norm for x in head])
    return out


def _scores(q: list[list[float]], p: list[list[float]]) -> list[list[float]]:
    return [[sum(a * b for a, b in zip(qi, pj)) for pj in p] for qi in q]


# ---- the loss, by hand -------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("name", ["contrastive", "kl", "margin_mse"])
def test_loss_is_the_weighted_sum_of_the_plain_loss_on_prefixes(name, normalize):
    torch.manual_seed(3)
    q, p = torch.randn(2, 6, dtype=torch.float64), torch.randn(2 * GROUP, 6, dtype=torch.float64)
    if normalize:  # what a normalising model hands the loss
        q, p = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(p, dim=-1)
    teacher = torch.randn(2, GROUP) * 2
    settings = dataclasses.replace(
        SETTINGS, matryoshka_dims=DIMS, matryoshka_weights=WEIGHTS, normalize=normalize
    )
    loss_fn = build_loss(name, settings)
    assert isinstance(loss_fn, MatryoshkaLoss)
    out = loss_fn(q.float(), p.float(), group_size=GROUP, teacher_scores=teacher)
    expected, parts = 0.0, {}
    for dim, weight in zip(DIMS, WEIGHTS):
        s = _scores(_prefix(q.tolist(), dim, normalize), _prefix(p.tolist(), dim, normalize))
        parts[dim] = _hand(name, s, teacher.double().tolist(), GROUP)
        expected += weight * parts[dim]
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert {k: v.item() for k, v in out.terms.items()} == pytest.approx(
        {f"dim_{d}": v for d, v in parts.items()}, rel=1e-5
    )


def test_pure_distillation_prefixes_gather_nothing(monkeypatch):
    """With --distill_weight 1 the plain loss gathers nothing; the Matryoshka sum must not either."""
    monkeypatch.setattr(contrastive_module, "is_initialized", lambda: True)
    monkeypatch.setattr(contrastive_module, "get_world_size", lambda: 2)
    monkeypatch.setattr(contrastive_module, "all_gather_with_grad", _refuse)
    settings = dataclasses.replace(SETTINGS, distill_weight=1.0, matryoshka_dims=(4, 2), normalize=True)
    unit = torch.nn.functional.normalize
    q, p, teacher = (
        unit(torch.randn(2, 4), dim=-1),
        unit(torch.randn(2 * GROUP, 4), dim=-1),
        torch.randn(2, GROUP),
    )
    out = build_loss("kl", settings)(q, p, group_size=GROUP, teacher_scores=teacher)
    plain = dataclasses.replace(settings, matryoshka_dims=())
    expected = sum(
        build_loss("kl", plain)(
            torch.nn.functional.normalize(q[:, :d], dim=-1),
            torch.nn.functional.normalize(p[:, :d], dim=-1),
            group_size=GROUP,
            teacher_scores=teacher,
        ).loss
        for d in (4, 2)
    )
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def _hand_cross_entropy(s: list[list[float]], labels: list[int], temperature: float) -> float:
    """Mean over rows of -s[label]/T + log sum_j exp(s_j/T)."""
    total = 0.0
    for row, label in zip(s, labels):
        scaled = [x / temperature for x in row]
        top = max(scaled)
        total += -scaled[label] + top + math.log(sum(math.exp(x - top) for x in scaled))
    return total / len(s)


def _refuse(*_args):
    raise AssertionError("gathered")


def test_every_prefix_is_cut_from_the_one_gathered_matrix(monkeypatch):
    """Rank 1 of 2, simulated: one passage gather and one key gather for all prefixes, and the loss is the
    hand computation over the gathered batch (this rank's queries labelled after rank 0's)."""
    torch.manual_seed(5)
    other_p = torch.randn(2 * GROUP, 6)
    other_keys = torch.arange(100, 100 + 2 * GROUP)
    calls = {"passages": 0, "keys": 0}

    def gather_passages(x):
        calls["passages"] += 1
        return torch.cat([other_p, x])

    def gather_keys(x):
        calls["keys"] += 1
        return torch.cat([other_keys, x])

    for attr, value in {
        "is_initialized": lambda: True,
        "get_world_size": lambda: 2,
        "get_rank": lambda: 1,
        "all_gather_with_grad": gather_passages,
        "all_gather_tensor": gather_keys,
    }.items():
        monkeypatch.setattr(contrastive_module, attr, value)
    q = torch.nn.functional.normalize(torch.randn(2, 6), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(2 * GROUP, 6), dim=-1)
    other_p.copy_(torch.nn.functional.normalize(other_p, dim=-1))
    keys = torch.arange(2 * GROUP)
    positive_keys = keys[::GROUP, None]
    loss_fn = MatryoshkaLoss(ContrastiveLoss(0.5, gather_across_devices=True), DIMS, WEIGHTS, normalize=True)
    out = loss_fn(q, p, group_size=GROUP, passage_keys=keys, positive_keys=positive_keys)
    assert calls == {"passages": 1, "keys": 1}
    everything = torch.cat([other_p, p]).double().tolist()
    expected = 0.0
    for dim, weight in zip(DIMS, WEIGHTS):
        s = _scores(_prefix(q.double().tolist(), dim, True), _prefix(everything, dim, True))
        # rank 1's queries are queries 2, 3 of the global batch: their positives are rows (2 + i) * GROUP
        expected += weight * _hand_cross_entropy(s, [(2 + i) * GROUP for i in range(2)], 0.5)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_flags_are_checked():
    assert parse_dims("32,16,8") == (32, 16, 8)
    assert parse_weights(None, 3) == (1.0, 1.0, 1.0)
    for bad in ("32,x", "0,8", "8,8"):
        with pytest.raises(UsageError, match="--matryoshka_dims"):
            parse_dims(bad)
    with pytest.raises(UsageError, match="2 weights for 3"):
        parse_weights("1,1", 3)
    with pytest.raises(ValueError, match="exceed the model's vector size 6"):
        MatryoshkaLoss(ContrastiveLoss(), (8, 4))(torch.randn(2, 6), torch.randn(4, 6))


def test_training_flags(tmp_path):
    from dr.train.args import DRTrainingArguments

    args = DRTrainingArguments(output_dir=str(tmp_path), matryoshka_dims="32,8", truncate_dim=8)
    settings = LossSettings.from_args(args, 0.05, normalize=True)
    assert settings.matryoshka_dims == (32, 8) and settings.matryoshka_weights == (1.0, 1.0)
    with pytest.raises(UsageError, match="--truncate_dim 4 must be one of --matryoshka_dims"):
        DRTrainingArguments(output_dir=str(tmp_path), matryoshka_dims="32,8", truncate_dim=4)
    with pytest.raises(UsageError, match="--matryoshka_weights needs --matryoshka_dims"):
        DRTrainingArguments(output_dir=str(tmp_path), matryoshka_weights="1")


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_hard_negatives(tiny_model_dir, tmp_path):
    """The Matryoshka loss through DDP on 2 ranks (gathered negatives, masked duplicate positive) gives
    the loss and gradients of one process on the global batch."""
    from safetensors.torch import load_file

    from dr.model.encoder import BiEncoder
    from dr.model.text import load_tokenizer
    from tests.train.test_loss import make_global_batch

    dims = "32,16,8"
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = BiEncoder.from_pretrained(
        str(tiny_model_dir), {"pooling": "mean", "temperature": 0.5, "normalize": True}
    )
    queries, passages, group = make_global_batch()
    q = dict(tokenizer(queries, padding="max_length", max_length=16, return_tensors="pt"))
    p = dict(tokenizer(passages, padding="max_length", max_length=16, return_tensors="pt"))
    reps = model(query=q, passage=p)
    keys = dict(zip(("passage_keys", "positive_keys"), make_global_keys()))
    loss_fn = MatryoshkaLoss(ContrastiveLoss(0.5), parse_dims(dims), [1.0, 0.5, 1 / 3], normalize=True)
    loss = loss_fn(reps["q_reps"], reps["p_reps"], group_size=group, **keys).loss
    loss.backward()
    reference = {"loss": loss.detach().reshape(1)}
    reference.update({f"grad.{n}": prm.grad for n, prm in model.named_parameters() if prm.grad is not None})

    out = tmp_path / "matryoshka.safetensors"
    worker = str(REPO / "tests" / "dist_loss_worker.py")
    run(
        torchrun(2) + [worker, str(tiny_model_dir), str(out), "gather", dims],
        timeout=240,
        PYTHONPATH=str(REPO),
    )
    distributed = load_file(out)
    assert distributed["loss"].item() == pytest.approx(reference["loss"].item(), rel=1e-5)
    assert set(distributed) == set(reference)
    for name, grad in reference.items():
        torch.testing.assert_close(
            distributed[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


# ---- dr encode --truncate_dim, the model's truncate_dim, sentence-transformers ------------------------------
@pytest.fixture(scope="module")
def normalized_model(tiny_model_dir, tmp_path_factory):
    from tests.model.test_st_format import save_dr_model

    return save_dr_model(
        tiny_model_dir, tmp_path_factory.mktemp("mrl") / "model", pooling="mean", normalize=True
    )


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_truncate_dim_vectors_are_renormalised_prefixes_recorded_in_metadata(normalized_model, tmp_path):
    from tests.model.test_st_format import dr_encode

    full = dr_encode(normalized_model, tmp_path / "full", "passage")
    cut = dr_encode(normalized_model, tmp_path / "cut", "passage", "--truncate_dim", "8")
    assert full.shape == (8, 32) and cut.shape == (8, 8)
    np.testing.assert_allclose(cut, _unit(full[:, :8]), rtol=1e-5, atol=1e-6)
    meta = read_meta(next((tmp_path / "cut").glob("emb-passage*.arrow")))
    assert (meta.dim, meta.truncate_dim) == (8, 8)
    assert read_meta(next((tmp_path / "full").glob("emb-passage*.arrow"))).truncate_dim is None
    manifest = json.loads(next((tmp_path / "cut").glob("*manifest*.json")).read_text())
    assert (manifest["dim"], manifest["truncate_dim"]) == (8, 8)


def test_truncate_dim_of_a_plain_model_is_the_prefix(tiny_model_dir, tmp_path):
    from tests.model.test_st_format import dr_encode, save_dr_model

    model = save_dr_model(tiny_model_dir, tmp_path / "model", pooling="cls", normalize=False)
    full = dr_encode(model, tmp_path / "full", "query")
    cut = dr_encode(model, tmp_path / "cut", "query", "--truncate_dim", "5")
    np.testing.assert_allclose(cut, full[:, :5], rtol=1e-5, atol=1e-6)


def test_truncate_dim_larger_than_the_model_is_a_usage_error(normalized_model, tmp_path, capsys):
    from tests.model.test_st_format import dr_encode

    with pytest.raises(AssertionError):
        dr_encode(normalized_model, tmp_path, "passage", "--truncate_dim", "64")
    assert "--truncate_dim 64 exceeds the model's vector size 32" in capsys.readouterr().err


def test_saved_truncate_dim_reaches_dr_encode_and_sentence_transformers(tiny_model_dir, tmp_path):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    from tests.model.test_st_format import PASSAGES, QUERIES, dr_encode, save_dr_model

    model = save_dr_model(tiny_model_dir, tmp_path / "model", pooling="mean", normalize=True, truncate_dim=8)
    assert json.loads((model / "config_sentence_transformers.json").read_text())["truncate_dim"] == 8
    assert json.loads((model / "dr_config.json").read_text())["truncate_dim"] == 8
    passages = dr_encode(model, tmp_path / "p", "passage")  # the model's truncate_dim is the default
    queries = dr_encode(model, tmp_path / "q", "query")
    assert passages.shape == (8, 8)
    full = dr_encode(model, tmp_path / "full", "passage", "--truncate_dim", "0")  # 0: whole vectors
    assert full.shape == (8, 32)
    st = SentenceTransformer(str(model), device="cpu")
    # sentence-transformers cuts after its Normalize module without renormalising: the same direction,
    # and with its cosine similarity the same scores; normalize_embeddings=True gives dr's vectors.
    st_passages = st.encode_document(PASSAGES, convert_to_numpy=True)
    assert st_passages.shape == (8, 8)
    np.testing.assert_allclose(_unit(st_passages), passages, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(st_passages, full[:, :8], rtol=1e-4, atol=1e-5)
    st_queries = st.encode_query(QUERIES, convert_to_numpy=True, normalize_embeddings=True)
    np.testing.assert_allclose(st_queries, queries, rtol=1e-4, atol=1e-5)


# ---- search refuses mixed dimensions ------------------------------------------------------------------------
def _shard(path, dim: int, side: str = "passage", truncate_dim: int | None = None) -> str:
    meta = ShardMeta("enc", "mean", True, dim, "float32", 32, side, 3, truncate_dim=truncate_dim)
    write_shard(
        path,
        meta,
        [f"{side[0]}{i}" for i in range(3)],
        _unit(np.random.default_rng(0).random((3, dim))).astype(np.float32),
    )
    return str(path)


def test_search_refuses_shards_of_mixed_dimensions_naming_them(tmp_path, capsys):
    search = command("search")
    full = _shard(tmp_path / "corpus.00.arrow", 32)
    cut = _shard(tmp_path / "corpus.01.arrow", 8, truncate_dim=8)
    _shard(tmp_path / "queries.arrow", 8, side="query", truncate_dim=8)
    argv = ["--query_reps", str(tmp_path / "queries.arrow"), "--passage_reps", str(tmp_path / "corpus.*.arrow"),
            "--save_ranking_to", str(tmp_path / "run.txt"), "--quiet"]  # fmt: skip
    assert search(argv) == 1
    err = capsys.readouterr().err
    assert cut in err and full in err and "dim=8 vs 32" in err and "--truncate_dim" in err
    (tmp_path / "corpus.00.arrow").unlink()  # passages all truncated: searchable with truncated queries
    assert search(argv) == 0
    _shard(tmp_path / "queries.arrow", 32, side="query")
    assert search(argv) == 1
    err = capsys.readouterr().err
    assert "query reps have dim 32 but passage reps have dim 8 (truncated" in err and "--truncate_dim" in err


def test_old_shards_without_truncate_dim_still_read(tmp_path):
    path = _shard(tmp_path / "a.arrow", 4)
    assert read_meta(path).truncate_dim is None
    assert b"dr.truncate_dim" not in ShardMeta("m", "cls", False, 4, "float32", 8, "query", 1).to_arrow()


# ---- dr train end to end ------------------------------------------------------------------------------------
def _train(model_dir, data, out, *extra: str) -> list[dict]:
    from tests.train.test_train import _train as train

    flags = [
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--train_n_passages",
        "2",
        "--pooling",
        "mean",
    ]
    flags += [
        "--normalize",
        "--temperature",
        "0.05",
        "--matryoshka_dims",
        "32,8",
        "--matryoshka_weights",
        "1,0.5",
    ]
    assert train(model_dir, data, out, *flags, *extra) == 0
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


@pytest.mark.slow
def test_train_saves_truncate_dim_and_logs_each_prefix_plain_and_gradcache(tiny_model_dir, tmp_path):
    from tests.helpers import make_train_rows, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", make_train_rows(8, n_negatives=3))
    plain = _train(tiny_model_dir, data, tmp_path / "plain", "--truncate_dim", "8")
    cached = _train(
        tiny_model_dir,
        data,
        tmp_path / "gc",
        "--grad_cache",
        "--gc_q_chunk_size",
        "1",
        "--gc_p_chunk_size",
        "2",
    )
    steps = [e for e in plain if "loss" in e]
    assert steps and all("loss_dim_32" in e and "loss_dim_8" in e for e in steps)
    first = steps[0]
    assert first["loss"] == pytest.approx(first["loss_dim_32"] + 0.5 * first["loss_dim_8"], rel=1e-4)
    gc_first = next(e for e in cached if "loss" in e)
    assert gc_first["loss"] == pytest.approx(first["loss"], rel=1e-4)  # GradCache: the same loss
    model = tmp_path / "plain"
    assert json.loads((model / "dr_config.json").read_text())["truncate_dim"] == 8
    assert json.loads((model / "config_sentence_transformers.json").read_text())["truncate_dim"] == 8
    assert "truncate_dim" not in json.loads(
        (tmp_path / "gc" / "config_sentence_transformers.json").read_text()
    )
