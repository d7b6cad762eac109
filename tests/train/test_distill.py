"""Knowledge distillation: the KL / margin-MSE losses by hand, 2 ranks vs one process through `dr train`,
`dr score` (distributed, resumable), bad teacher scores, and a student that learns from a teacher."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from dr.train.losses import LossSettings, build_loss
from dr.train.losses.contrastive import ContrastiveLoss
from dr.train.losses.kl import kl
from dr.train.losses.margin_mse import margin_mse
from tests.helpers import as_flags, make_train_rows, run, write_jsonl

B, N, D = 3, 4, 5  # 3 queries x (1 positive + 3 hard negatives), 5-dim vectors


def _loss(name: str, weight: float = 1.0, distill_temperature: float | None = None, temperature: float = 1.0):
    """The registered loss `name` (what `--loss name` trains with)."""
    return build_loss(name, LossSettings(temperature, False, weight, distill_temperature))


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
    loss = _loss("kl", distill_temperature=temperature)(q, p, group_size=N, teacher_scores=teacher).loss
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
    loss = _loss("margin_mse")(q, p, group_size=N, teacher_scores=teacher).loss
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
    mixed = _loss(kind, weight=0.4, distill_temperature=0.7 if kind == "kl" else None, temperature=0.5)
    out = mixed(q, p, teacher_scores=teacher, passage_keys=passage_keys, positive_keys=positive_keys)
    loss = out.loss
    grads = torch.autograd.grad(loss, (q, p))
    contrastive = ContrastiveLoss(temperature=0.5)(
        q, p, passage_keys=passage_keys, positive_keys=positive_keys
    ).loss
    own = torch.stack([q[i] @ p[i * N : (i + 1) * N].T for i in range(B)])  # (B, N)
    distill = kl(own, teacher, 0.7) if kind == "kl" else margin_mse(own, teacher)
    reference = 0.6 * contrastive + 0.4 * distill
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    for got, want in zip(grads, torch.autograd.grad(reference, (q, p))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert (
        int(out.counts["masked_false_negatives"]) == 1
    )  # the contrastive part still masks the false negative
    assert out.terms["distill"].item() == pytest.approx(distill.item(), rel=1e-6)
    assert out.terms["contrastive"].item() == pytest.approx(contrastive.item(), rel=1e-6)


def test_own_group_duplicate_of_a_positive_keeps_the_distillation_finite():
    """A hard negative with the positive's docid is masked (-inf) in the contrastive term only: the
    teacher scored it, so the KL over the group must still see its (finite) score."""
    q, p, teacher = _batch(3)
    passage_keys = torch.arange(B * N)
    passage_keys[1] = 0  # query 0's first negative is its own positive document
    positive_keys = torch.tensor([[0], [N], [2 * N]])
    out = _loss("kl", weight=0.5)(
        q, p, teacher_scores=teacher, passage_keys=passage_keys, positive_keys=positive_keys
    )
    assert torch.isfinite(out.loss)


def test_distillation_needs_teacher_scores_of_the_group_shape():
    q, p, teacher = _batch()
    with pytest.raises(ValueError, match="teacher scores"):
        _loss("kl")(q, p)
    with pytest.raises(ValueError, match="do not match"):
        _loss("kl")(q, p, teacher_scores=teacher[:, :2])


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
    values = {
        "model_name_or_path": model_dir,
        "dataset_name": data,
        "output_dir": out,
        "per_device_train_batch_size": 2,
        "train_n_passages": 3,
        "max_steps": 1,
        "save_strategy": "no",
        "q_max_len": 16,
        "p_max_len": 32,
        "loss": "kl",
    }
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
def test_bad_teacher_scores_are_one_line_errors_naming_row_and_field(tiny_model_dir, tmp_path, how, capsys):
    from dr.train.cli import main

    rows, field = _corrupt(scored_rows(4), how)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "out"
    assert main(_train_flags(tiny_model_dir, data, out)) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dr train: error:")]
    assert len(errors) == 1, errors
    assert f"{data}: row 3 (line 3): field '" in errors[0] and field in errors[0], errors[0]
    assert how != "missing" or "dr score" in errors[0]  # says where scores come from
    assert not (out / "dr_config.json").exists() and not (out / "model.safetensors").exists()


def test_bad_score_exits_1_without_traceback(tiny_model_dir, tmp_path):
    rows, _ = _corrupt(scored_rows(4), "nan")
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    proc = run(
        [sys.executable, "-m", "dr.train", *_train_flags(tiny_model_dir, data, tmp_path / "o")], check=False
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "must be finite" in proc.stderr


def test_contrastive_training_ignores_scores_and_refuses_distillation_flags(tiny_model_dir, tmp_path):
    from dr.train.cli import main

    data = write_jsonl(tmp_path / "train.jsonl", scored_rows(4))
    assert (
        main(_train_flags(tiny_model_dir, data, tmp_path / "o", loss="contrastive", distill_weight=0.5)) == 2
    )
    assert main(_train_flags(tiny_model_dir, data, tmp_path / "o", distill_weight=1.5)) == 2
    assert main(_train_flags(tiny_model_dir, data, tmp_path / "o", train_n_passages=1)) == 2


TEVATRON_TRAIN_DISTIL = """--do_train --output_dir OUT --model_name_or_path intfloat/e5-base-unsupervised
  --dataset_name rlhn/default-680K-bge-reranker-v2-gemma --attn_implementation eager --query_prefix query:_
  --passage_prefix passage:_ --bf16 --pooling mean --normalize --temperature 0.01 --distil_temperature 0.02
  --per_device_train_batch_size 16 --gradient_checkpointing --train_group_size 16 --learning_rate 2e-5
  --query_max_len 350 --passage_max_len 350 --num_train_epochs 5 --logging_steps 5 --overwrite_output_dir
  --gradient_accumulation_steps 4"""  # Tevatron v2's train_distil example (its --deepspeed flag aside)


def test_tevatron_train_distil_command_parses_to_its_objective(tmp_path):
    """Its flags, unchanged, mean: KL only over the group, T = 0.02, the e5 settings."""
    from dr.flags import DataArguments, ModelArguments, parse_flags, to_dataclasses
    from dr.train.args import DRTrainingArguments
    from dr.train.cli import build_parser

    def parse(argv: list[str]) -> tuple:
        extra = {"use_cpu": True} if not torch.cuda.is_available() else {}  # what prepare_launch decides
        types = (ModelArguments, DataArguments, DRTrainingArguments)
        return to_dataclasses(parse_flags(build_parser(), argv), types, **extra)

    argv = [a.replace("OUT", str(tmp_path)).replace(":_", ": ") for a in TEVATRON_TRAIN_DISTIL.split()]
    model, data, train = parse(argv)
    assert (train.loss, train.distill_weight, train.distil_temperature) == ("kl", 1.0, 0.02)
    assert (model.attn_implementation, model.pooling, model.normalize, model.temperature) == (
        "eager",
        "mean",
        True,
        0.01,
    )
    assert (data.train_n_passages, data.q_max_len, data.query_prefix) == (16, 350, "query: ")
    assert DRTrainingArguments(output_dir=str(tmp_path)).loss == "contrastive"
    *_, other = parse(
        ["--model_name_or_path", "m", "--output_dir", str(tmp_path), "--distill_temperature", "0.5"]
    )
    assert (other.loss, other.distil_temperature) == ("kl", 0.5)  # the alias spelling
    with pytest.raises(ValueError, match="kl only"):  # margin_mse has no temperature: not silently ignored
        DRTrainingArguments(output_dir=str(tmp_path), loss="margin_mse", distil_temperature=0.5)


def test_collator_aligns_teacher_scores_with_the_served_group(tiny_model_dir):
    """The served group is (positive, sampled negatives...): the scores follow choose_group's indices."""
    import datasets

    from dr.model.text import load_tokenizer
    from dr.train.collator import TrainCollator
    from dr.train.groups import TevatronGroups, TrainGroups

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


# ---- 2 ranks vs one process through `dr train` (one SGD step: tests/train/test_train_distributed.py's method) ----
LOSSES = {"kl": ["--loss", "kl", "--distill_weight", "0.5"], "margin_mse": ["--loss", "margin_mse"]}


def _randomly_scored_rows() -> list[dict]:
    """4 queries x (1 positive + 4 negatives) with teacher scores that disagree with the data's labels in
    places (so the distillation gradient is not the contrastive one)."""
    import random

    rng = random.Random(11)
    rows = make_train_rows(4, n_negatives=4, seed=3)
    for row in rows:
        for passage in row["positive_passages"] + row["negative_passages"]:
            passage["score"] = round(rng.uniform(-3, 3), 3)
    return rows


@pytest.fixture(scope="module")
def distill_reference(tiny_model_dir, tmp_path_factory):
    """{loss: (folder, data, weights after one single-process step on the global batch of 4)}."""
    from transformers import AutoModel

    from tests.train.test_train_distributed import PER_DEVICE, WORLD, _flags

    folder = tmp_path_factory.mktemp("distill-equivalence")
    data = write_jsonl(folder / "train.jsonl", _randomly_scored_rows())
    cache: dict[str, tuple] = {}

    def get(loss: str) -> tuple:
        if loss not in cache:
            out = folder / f"ref-{loss}"
            flags = _flags(tiny_model_dir, data, out, WORLD * PER_DEVICE) + LOSSES[loss]
            run([sys.executable, "-m", "dr.train", *flags])
            cache[loss] = (folder, data, AutoModel.from_pretrained(out).state_dict())
        return cache[loss]

    return get


GC = ["--grad_cache", "--gc_q_chunk_size", "1", "--gc_p_chunk_size", "3"]
ZERO2 = ["--deepspeed", str(Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / "zero2.json")]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("loss", "extra"),
    [
        pytest.param("kl", [], id="kl-ddp"),
        pytest.param("margin_mse", [], id="margin_mse-ddp"),
        pytest.param("kl", ZERO2, id="kl-zero2"),
        pytest.param("kl", GC, id="kl-gradcache-ddp"),
        pytest.param("margin_mse", GC + ZERO2, id="margin_mse-gradcache-zero2"),
    ],
)
def test_two_ranks_distillation_step_equals_one_process(tiny_model_dir, distill_reference, loss, extra):
    import shutil

    from tests.helpers import torchrun
    from tests.train.test_train_distributed import PER_DEVICE, WORLD, _assert_same_weights, _flags

    folder, data, expected = distill_reference(loss)
    out = folder / f"{loss}-{len(extra)}"
    flags = _flags(tiny_model_dir, data, out, PER_DEVICE) + LOSSES[loss] + extra
    run(torchrun(WORLD) + ["-m", "dr.train", *flags], timeout=400)
    _assert_same_weights(out, expected, tiny_model_dir)
    shutil.rmtree(out, ignore_errors=True)


# ---- dr score --------------------------------------------------------------------------------------------
def make_cross_encoder(folder: Path, tiny_model_dir: Path, num_labels: int = 1) -> Path:
    """A randomly initialised BertForSequenceClassification built from a config, with the tiny tokenizer."""
    import shutil

    from transformers import BertConfig, BertForSequenceClassification

    folder.mkdir(parents=True, exist_ok=True)
    config = BertConfig.from_pretrained(str(tiny_model_dir), num_labels=num_labels)
    torch.manual_seed(1)
    BertForSequenceClassification(config).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model_dir / name).exists():
            shutil.copy(tiny_model_dir / name, folder / name)
    return folder


def _score_cmd(teacher: Path, kind: str, data: Path, out: Path, *extra: str) -> list[str]:
    flags = as_flags(
        model_name_or_path=teacher, teacher_type=kind, dataset_name=data, output=out, batch_size=5
    )
    return ["-m", "dr.score.cli", *flags, "--window_rows", "2", *extra]


def _scores(path: Path) -> list[tuple[str, list[float]]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [
        (r["query_id"], [p["score"] for p in r["positive_passages"] + r["negative_passages"]]) for r in rows
    ]


@pytest.fixture(scope="module")
def score_input(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("score")
    return write_jsonl(folder / "train.jsonl", make_train_rows(7, n_negatives=3, seed=2))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cross", "bi"])
def test_score_two_ranks_equal_one_process_and_resume(tiny_model_dir, score_input, tmp_path, kind):
    from tests.helpers import torchrun

    teacher = make_cross_encoder(tmp_path / "ce", tiny_model_dir) if kind == "cross" else tiny_model_dir
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    run([sys.executable, *_score_cmd(teacher, kind, score_input, one)])
    run(torchrun(2) + _score_cmd(teacher, kind, score_input, two))
    expected = _scores(one)
    assert [q for q, _ in expected] == [str(i) for i in range(7)]  # input order
    assert all(len(s) == 4 and all(isinstance(x, float) for x in s) for _, s in expected)
    assert len({x for _, s in expected for x in s}) > 20  # real, distinct scores
    got = _scores(two)
    assert [q for q, _ in got] == [q for q, _ in expected]
    for (_, a), (_, b) in zip(got, expected):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    # The rows are passed through: only "score" was added.
    source = [json.loads(line) for line in score_input.read_text().splitlines()]
    stripped = [json.loads(line) for line in two.read_text().splitlines()]
    for row in stripped:
        for p in row["positive_passages"] + row["negative_passages"]:
            p.pop("score")
    assert stripped == source
    manifest = json.loads((tmp_path / "two.jsonl.manifest.json").read_text())
    assert (manifest["rows"], manifest["passages_scored"], len(manifest["parts"])) == (7, 28, 2)

    # Resume: a part lost (a rank killed before its rename) is redone, the other one is skipped.
    parts = sorted((tmp_path / "two.jsonl.parts").glob("rows-*.jsonl"))
    parts[1].unlink()
    two.unlink()
    proc = run(torchrun(2) + _score_cmd(teacher, kind, score_input, two))
    assert "is complete (3 rows): skipped" in proc.stderr
    assert _scores(two) == got  # no duplicates, same order
    # Another teacher must not reuse the parts.
    other = make_cross_encoder(tmp_path / "ce2", tiny_model_dir, num_labels=2) if kind == "cross" else teacher
    if kind == "cross":
        proc = run([sys.executable, *_score_cmd(other, kind, score_input, two)], check=False)
        assert proc.returncode == 2 and "another input or teacher" in proc.stderr


@pytest.mark.parametrize("kind", ["cross", "bi"])
def test_score_bf16_is_close_to_float32_and_never_reuses_float32_parts(
    tiny_model_dir, score_input, tmp_path, kind
):
    """`--bf16` scores under bf16 autocast: close to float32's (not equal), and a rerun with another precision
    is refused on the parts folder rather than mixing float32 and bf16 rows in one scored file."""
    from dr.score.cli import main

    teacher = make_cross_encoder(tmp_path / "ce", tiny_model_dir) if kind == "cross" else tiny_model_dir
    f32, b16 = tmp_path / "f32.jsonl", tmp_path / "b16.jsonl"
    assert main(_score_cmd(teacher, kind, score_input, f32)[2:]) == 0
    assert main(_score_cmd(teacher, kind, score_input, b16, "--bf16")[2:]) == 0
    expected, got = _scores(f32), _scores(b16)
    flat = [x for _, s in expected for x in s]
    spread = max(flat) - min(flat)
    deltas = [abs(a - b) for (_, sa), (_, sb) in zip(expected, got) for a, b in zip(sa, sb)]
    assert max(deltas) < 0.05 * spread + 1e-3  # bf16 keeps ~3 significant digits
    assert max(deltas) > 0  # and it did run in bf16
    manifest = json.loads((tmp_path / "b16.jsonl.manifest.json").read_text())
    assert manifest["teacher"]["precision"] == "bfloat16"
    assert "precision" not in json.loads((tmp_path / "f32.jsonl.manifest.json").read_text())["teacher"]
    f32.unlink()  # a float32 rerun over the bf16 parts folder: refused, nothing published
    assert main(_score_cmd(teacher, kind, score_input, b16)[2:]) == 2


def test_bi_teacher_scores_each_pair_as_its_own_forward(tiny_model_dir):
    """Distinct texts are encoded once, length-sorted and padded together: each score still equals q.p of
    the query and the passage encoded alone, recurring queries and passages included, in input order."""
    from dr.score.cli import build_parser
    from dr.score.run import load_teacher, score_rows
    from dr.train.groups import passage_text
    from tests.helpers import TOPICS

    rows = make_train_rows(5, n_negatives=3, seed=4)
    rows[3]["query"] = rows[0]["query"]  # a recurring query
    passages = [p for row in rows for p in row["positive_passages"] + row["negative_passages"]]
    for k, p in enumerate(passages):  # lengths 8..11 tokens in no order: the sort reorders the batches
        p["text"] += " " + " ".join(TOPICS[: k * 7 % 4])
    rows[4]["negative_passages"][1] = dict(rows[1]["positive_passages"][0])  # a recurring passage
    args = build_parser().parse_args(as_flags(model_name_or_path=tiny_model_dir, teacher_type="bi",
                                              dataset_name="x", output="y", p_max_len=12))  # fmt: skip
    teacher = load_teacher(args, torch.device("cpu"))
    assert score_rows(rows, teacher, batch_size=3) == 20
    model, tok = teacher.model, teacher.tokenizer
    with torch.inference_mode():
        for row in rows:
            q = model.encode_query(dict(tok([row["query"]], truncation=True, max_length=teacher.q_max_len,
                                            return_tensors="pt")))[0]  # fmt: skip
            for p in row["positive_passages"] + row["negative_passages"]:
                batch = tok([passage_text(p)], truncation=True, max_length=12, return_tensors="pt")
                assert p["score"] == pytest.approx(float(q @ model.encode_passage(dict(batch))[0]), abs=1e-5)


def test_score_bad_rows_exit_1_and_publish_nothing(tiny_model_dir, tmp_path):
    from dr.score.cli import main

    rows = make_train_rows(3)
    del rows[1]["positive_passages"][0]["text"]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    assert (
        main(
            as_flags(
                model_name_or_path=tiny_model_dir,
                teacher_type="bi",
                dataset_name=data,
                output=tmp_path / "out.jsonl",
            )
        )
        == 1
    )
    assert not (tmp_path / "out.jsonl").exists()


# ---- a student learns from a teacher ---------------------------------------------------------------------
def _noisy_label_rows(seed: int = 0) -> list[dict]:
    """60 training queries, each of the 30 topics twice, 1 + 3 passages each. The first copy of a topic is
    labelled correctly; in the second the labelled positive is about another topic and the passage about
    the query's topic sits among the negatives (a mislabelled pair, as mined data has). The teacher ranks
    perfectly: 10 for the passage about the query's topic, 0 for the others."""
    import random

    from tests.helpers import FILLER, TOPICS

    rng = random.Random(seed)

    def passage(topic: str, tag: str, score: float) -> dict:
        words = [topic] * 2 + rng.sample(FILLER, 4)
        rng.shuffle(words)
        return {"docid": f"{topic}-{tag}", "title": "", "text": " ".join(words), "score": score}

    rows = []
    for i in range(60):
        topic = TOPICS[i % 30]
        true = passage(topic, f"{i}p", 10.0)
        others = [
            passage(t, f"{i}n{j}", 0.0)
            for j, t in enumerate(rng.sample([t for t in TOPICS if t != topic], 3))
        ]
        positive, negatives = ([true], others) if i < 30 else ([others[0]], [true, *others[1:]])
        rows.append(
            {
                "query_id": str(i),
                "query": f"what about {topic}",
                "positive_passages": positive,
                "negative_passages": negatives,
            }
        )
    return rows


def _top1_accuracy(model_dir: Path) -> float:
    """Each topic's query against 2 unseen passages per topic: how often the best passage has its topic."""
    import random

    from dr.model.encoder import BiEncoder
    from dr.model.text import load_tokenizer
    from tests.helpers import FILLER, TOPICS

    rng = random.Random(9)
    docs = []
    for topic in TOPICS:
        for _ in range(2):
            words = [topic] * 2 + rng.sample(FILLER, 4)
            rng.shuffle(words)
            docs.append((topic, " ".join(words)))
    tokenizer, model = load_tokenizer(str(model_dir)), BiEncoder.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        q = model.encode_query(
            dict(tokenizer([f"what about {t}" for t in TOPICS], padding=True, return_tensors="pt"))
        )
        p = model.encode_passage(dict(tokenizer([d for _, d in docs], padding=True, return_tensors="pt")))
    best = (q @ p.T).argmax(1).tolist()
    return sum(docs[j][0] == topic for j, topic in zip(best, TOPICS)) / len(TOPICS)


@pytest.mark.slow
def test_student_distilled_from_a_perfect_teacher_beats_contrastive_only(tiny_model_dir, tmp_path):
    """Same student, data, seed and steps (45); only --loss differs. Measured: top-1 accuracy contrastive 0.87, kl 1.0."""
    data = write_jsonl(tmp_path / "train.jsonl", _noisy_label_rows())
    accuracy = {}
    for loss in ("contrastive", "kl"):
        out = tmp_path / loss
        flags = _train_flags(
            tiny_model_dir,
            data,
            out,
            loss=loss,
            per_device_train_batch_size=4,
            train_n_passages=4,
            max_steps=-1,
            num_train_epochs=3,
            learning_rate=3e-3,
            normalize="true",
            temperature=0.05,
            pooling="mean",
            seed=3,
            q_max_len=16,
            p_max_len=16,
        )
        run([sys.executable, "-m", "dr.train", *flags])
        accuracy[loss] = _top1_accuracy(out)
    assert accuracy["kl"] >= 0.9 and accuracy["kl"] >= accuracy["contrastive"] + 0.1, accuracy
