"""Knowledge distillation: the KL / margin-MSE losses by hand, 2 ranks vs one process through `dr train`,
`dr score` (distributed, resumable), bad teacher scores, and a student that learns from a teacher."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from dr.distill import DistillationLoss, kl, margin_mse
from dr.loss import ContrastiveLoss
from tests.helpers import as_flags, make_train_rows, run, write_jsonl

B, N, D = 3, 4, 5  # 3 queries x (1 positive + 3 hard negatives), 5-dim vectors


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    q = torch.randn(B, D, dtype=torch.float64).float().requires_grad_()
    p = torch.randn(B * N, D).requires_grad_()
    teacher = torch.randn(B, N) * 3
    return q, p, teacher


def _own_scores(q: torch.Tensor, p: torch.Tensor) -> list[list[float]]:
    """s[i][j] = q_i . p_{i*N+j}, by hand in float64."""
    qd, pd = q.detach().double(), p.detach().double()
    return [[float(qd[i] @ pd[i * N + j]) for j in range(N)] for i in range(B)]


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _chain(q: torch.Tensor, p: torch.Tensor, ds: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dq, dL/dp) from dL/ds for s[i][j] = q_i . p_{i*N+j}."""
    gq, gp = torch.zeros(B, D, dtype=torch.float64), torch.zeros(B * N, D, dtype=torch.float64)
    for i in range(B):
        for j in range(N):
            gq[i] += ds[i][j] * p.detach().double()[i * N + j]
            gp[i * N + j] += ds[i][j] * q.detach().double()[i]
    return gq, gp


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_kl_equals_hand_computation_values_and_gradients(temperature):
    q, p, teacher = _batch()
    loss = DistillationLoss("kl", weight=1.0, distill_temperature=temperature)(q, p, teacher_scores=teacher)
    loss.backward()
    s, expected, ds = _own_scores(q, p), 0.0, []
    for i in range(B):
        ps = _softmax([x / temperature for x in s[i]])
        pt = _softmax([float(x) / temperature for x in teacher[i]])
        expected += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps)) / B
        ds.append([(b - a) / (temperature * B) for a, b in zip(pt, ps)])  # d KL / d s = (p_s - p_t) / (T B)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    gq, gp = _chain(q, p, ds)
    torch.testing.assert_close(q.grad.double(), gq, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(p.grad.double(), gp, rtol=1e-4, atol=1e-6)
    assert kl(torch.tensor(s), torch.tensor(s), temperature).abs().item() < 1e-6  # a perfect student: 0


def test_margin_mse_equals_hand_computation_values_and_gradients():
    q, p, teacher = _batch(1)
    loss = DistillationLoss("margin_mse", weight=1.0)(q, p, teacher_scores=teacher)
    loss.backward()
    s, t = _own_scores(q, p), teacher.double().tolist()
    pairs = B * (N - 1)
    expected, ds = 0.0, [[0.0] * N for _ in range(B)]
    for i in range(B):
        for j in range(1, N):
            diff = (s[i][0] - s[i][j]) - (t[i][0] - t[i][j])
            expected += diff**2 / pairs
            ds[i][0] += 2 * diff / pairs
            ds[i][j] -= 2 * diff / pairs
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    gq, gp = _chain(q, p, ds)
    torch.testing.assert_close(q.grad.double(), gq, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(p.grad.double(), gp, rtol=1e-4, atol=1e-6)
    assert margin_mse(torch.tensor(t) + 7.0, torch.tensor(t)).item() < 1e-9  # margins ignore a shift


@pytest.mark.parametrize("kind", ["kl", "margin_mse"])
def test_mix_is_weighted_sum_with_the_contrastive_loss_on_in_batch_negatives(kind):
    """w = 0.4: 0.6 * the full contrastive loss (every passage of the batch, temperature 0.5) + 0.4 * the
    own-group distillation; values and gradients against the two losses computed separately."""
    q, p, teacher = _batch(2)
    passage_keys = torch.arange(B * N)
    passage_keys[N + 2] = 0  # query 1's second hard negative is query 0's positive
    positive_keys = torch.tensor([[0], [N], [2 * N]])
    mixed = DistillationLoss(kind, weight=0.4, distill_temperature=0.7, temperature=0.5)
    loss = mixed(q, p, passage_keys, positive_keys, teacher_scores=teacher)
    grads = torch.autograd.grad(loss, (q, p))
    contrastive = ContrastiveLoss(temperature=0.5)(q, p, passage_keys, positive_keys)
    own = torch.stack([q[i] @ p[i * N : (i + 1) * N].T for i in range(B)])  # (B, N)
    distill = kl(own, teacher, 0.7) if kind == "kl" else margin_mse(own, teacher)
    reference = 0.6 * contrastive + 0.4 * distill
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    for got, want in zip(grads, torch.autograd.grad(reference, (q, p))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert int(mixed.last_masked) == 1  # the contrastive part still masks the false negative
    assert mixed.last_distill.item() == pytest.approx(distill.item(), rel=1e-6)


def test_own_group_duplicate_of_a_positive_keeps_the_distillation_finite():
    """A hard negative with the positive's docid is masked (-inf) in the contrastive term only: the
    teacher scored it, so the KL over the group must still see its (finite) score."""
    q, p, teacher = _batch(3)
    passage_keys = torch.arange(B * N)
    passage_keys[1] = 0  # query 0's first negative is its own positive document
    positive_keys = torch.tensor([[0], [N], [2 * N]])
    loss = DistillationLoss("kl", weight=0.5)(q, p, passage_keys, positive_keys, teacher_scores=teacher)
    assert torch.isfinite(loss)


def test_distillation_needs_teacher_scores_of_the_group_shape():
    q, p, teacher = _batch()
    with pytest.raises(ValueError, match="teacher scores"):
        DistillationLoss("kl")(q, p)
    with pytest.raises(ValueError, match="do not match"):
        DistillationLoss("kl")(q, p, teacher_scores=teacher[:, :2])


# ---- bad data -------------------------------------------------------------------------------------------
def scored_rows(n_queries: int, n_negatives: int = 3, seed: int = 0) -> list[dict]:
    """`make_train_rows` with a perfect teacher: score 10 for the positive, 0..-k for the negatives."""
    rows = make_train_rows(n_queries, n_negatives=n_negatives, seed=seed)
    for row in rows:
        row["positive_passages"][0]["score"] = 10.0
        for j, passage in enumerate(row["negative_passages"]):
            passage["score"] = -float(j)
    return rows


def _train_flags(model_dir: Path, data: Path, out: Path, **extra: object) -> list[str]:
    values = dict(
        model_name_or_path=model_dir,
        dataset_name=data,
        output_dir=out,
        per_device_train_batch_size=2,
        train_n_passages=3,
        max_steps=1,
        save_strategy="no",
        q_max_len=16,
        p_max_len=32,
        loss="kl",
    )
    values.update(extra)
    return as_flags(**values)


def _corrupt(rows: list[dict], how: str) -> tuple[list[dict], str]:
    """Break row 3 (JSONL line 3); return the rows and the expected field in the message."""
    passage = rows[2]["negative_passages"][1]
    if how == "missing":
        del passage["score"]
        for p in rows[2]["negative_passages"] + rows[2]["positive_passages"]:  # one shape per row ...
            p.pop("score", None)
        return rows, "positive_passages[0].score' is missing"
    if how == "string":
        passage["score"] = "high"
        return rows, "negative_passages[1].score' must be a number"
    passage["score"] = float("nan")
    return rows, "negative_passages[1].score' must be finite"


@pytest.mark.parametrize("how", ["missing", "string", "nan"])
def test_bad_teacher_scores_are_one_line_errors_naming_row_and_field(tiny_model_dir, tmp_path, how, caplog):
    from dr.train import main

    rows, field = _corrupt(scored_rows(4), how)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "out"
    assert main(_train_flags(tiny_model_dir, data, out)) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert f"{data}: row 3 (line 3): field '" in errors[0] and field in errors[0], errors[0]
    assert how != "missing" or "dr score" in errors[0]  # says where scores come from
    assert not (out / "dr_config.json").exists() and not (out / "model.safetensors").exists()


def test_bad_score_exits_1_without_traceback(tiny_model_dir, tmp_path):
    rows, _ = _corrupt(scored_rows(4), "nan")
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    proc = run([sys.executable, "-m", "dr.train", *_train_flags(tiny_model_dir, data, tmp_path / "o")], check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "must be finite" in proc.stderr


def test_contrastive_training_ignores_scores_and_refuses_distillation_flags(tiny_model_dir, tmp_path):
    from dr.train import main

    data = write_jsonl(tmp_path / "train.jsonl", scored_rows(4))
    assert main(_train_flags(tiny_model_dir, data, tmp_path / "o", loss="contrastive", distill_weight=0.5)) == 2
    assert main(_train_flags(tiny_model_dir, data, tmp_path / "o", distill_weight=1.5)) == 2
    assert main(_train_flags(tiny_model_dir, data, tmp_path / "o", train_n_passages=1)) == 2


def test_tevatron_spelling_distil_temperature_implies_kl(tmp_path):
    from dr.arguments import DRTrainingArguments

    args = DRTrainingArguments(output_dir=str(tmp_path), distil_temperature=0.02)
    assert (args.loss, args.distill_weight) == ("kl", 1.0)
    assert DRTrainingArguments(output_dir=str(tmp_path)).loss == "contrastive"


def test_collator_aligns_teacher_scores_with_the_served_group(tiny_model_dir):
    """The served group is (positive, sampled negatives...): the scores follow choose_group's indices."""
    from dr.collator import TrainCollator
    from dr.data import TevatronGroups, TrainGroups
    from dr.model import load_tokenizer

    import datasets

    rows = scored_rows(4, n_negatives=5)
    for row in rows:  # distinct scores per negative, recognisable from its docid
        for passage in row["negative_passages"]:
            passage["score"] = float(len(passage["docid"]) + hash(passage["docid"]) % 97)
    groups = TrainGroups(TevatronGroups(datasets.Dataset.from_list(rows)), group_size=3, seed=5)
    score_of = {p["docid"]: p["score"] for r in rows for p in r["positive_passages"] + r["negative_passages"]}
    items = [groups[(1, i)] for i in range(4)]
    batch = TrainCollator(load_tokenizer(str(tiny_model_dir)), 16, 32, teacher_scores=True)(items)
    expected = [[score_of[d] for d in item.passage_ids] for item in items]
    assert batch["teacher_scores"].dtype == torch.float32
    assert batch["teacher_scores"].tolist() == expected
