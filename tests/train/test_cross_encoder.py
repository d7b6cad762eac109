"""`dr train --model_type cross_encoder`: the listwise loss by hand, the saved folder (loadable by
transformers, sentence-transformers, `dr score --teacher_type cross` and `dr rerank`), resume, flags, and
2 ranks == one process on the global batch (one SGD step, hard negatives in the groups)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from dr.errors import UsageError
from dr.train.losses import build_loss
from dr.train.losses.base import LossSettings
from dr.train.losses.kl import kl
from dr.train.losses.listwise import ListwiseLoss
from tests.helpers import as_flags, command, make_train_rows, run, torchrun, write_jsonl
from tests.rerank.test_rerank import make_cross_encoder

train = command("train")
PER_DEVICE, WORLD, GROUP = 2, 2, 3


# ---- the loss -----------------------------------------------------------------------------------------


def test_listwise_loss_equals_hand_computation_values_and_gradients():
    torch.manual_seed(0)
    scores = (torch.randn(2 * GROUP) * 2).requires_grad_()  # 2 queries x (positive + 2 hard negatives)
    out = build_loss("listwise", LossSettings())(scores, group_size=GROUP)
    out.loss.backward()
    s = scores.detach().double().tolist()
    expected, grads = 0.0, []
    for i in range(2):
        group = s[i * GROUP : (i + 1) * GROUP]
        log_z = math.log(sum(math.exp(x) for x in group))
        expected += (log_z - group[0]) / 2  # the positive is the first of its own group, never another's
        p = [math.exp(x - log_z) for x in group]
        grads += [(pj - (j == 0)) / 2 for j, pj in enumerate(p)]
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(
        scores.grad.double(), torch.tensor(grads, dtype=torch.float64), rtol=1e-5, atol=1e-7
    )
    assert out.terms["listwise"].item() == pytest.approx(expected, rel=1e-6)
    from dr.train.losses import LOSSES

    assert [n for n, e in LOSSES.items() if e.pair_scores] == ["listwise"]  # its hand test is this one


def test_distilling_into_a_cross_encoder_mixes_kl_over_the_logits():
    torch.manual_seed(1)
    scores, teacher = torch.randn(2 * GROUP), torch.randn(2, GROUP) * 3
    term = lambda s, t: kl(s, t, 1.0, teacher_temperature=2.0)
    mixed = ListwiseLoss(term, 0.25, name="kl")(scores, group_size=GROUP, teacher_scores=teacher).loss
    plain = ListwiseLoss()(scores, group_size=GROUP).loss
    assert mixed.item() == pytest.approx(
        0.75 * plain.item() + 0.25 * term(scores.view(2, GROUP), teacher).item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="teacher scores"):
        ListwiseLoss(term, 0.25, name="kl")(scores, group_size=GROUP)


def test_cross_encoder_flags_are_checked(tmp_path):
    from dr.train.args import DRTrainingArguments

    def make(**kw):
        return DRTrainingArguments(output_dir=str(tmp_path), use_cpu=True, **kw)

    assert make(model_type="cross_encoder").loss == "listwise"
    assert make(model_type="cross_encoder", distil_temperature=1.0).loss == "kl"
    assert make().loss == "contrastive"
    for bad in (
        {"model_type": "cross_encoder", "grad_cache": True},
        {"model_type": "cross_encoder", "loss": "contrastive"},
        {"model_type": "bi_encoder", "loss": "listwise"},
        {"max_length": 64},
        {"model_type": "poly_encoder"},
    ):
        with pytest.raises(UsageError):
            make(**bad)


# ---- training through the command ------------------------------------------------------------------------


def _flags(start: Path, data: Path, out: Path, batch: int, **extra: object) -> list[str]:
    values = {
        "model_type": "cross_encoder", "model_name_or_path": start, "dataset_name": data, "output_dir": out,
        "per_device_train_batch_size": batch, "train_n_passages": GROUP, "learning_rate": 0.5, "optim": "sgd", "max_steps": 1,
        "max_grad_norm": 0, "save_strategy": "no", "max_length": 40, "logging_steps": 1, "seed": 7, "report_to": "none",
    }  # fmt: skip
    values.update(extra)
    return as_flags(**values)


@pytest.fixture(scope="module")
def start_dir(tmp_path_factory) -> Path:
    return make_cross_encoder(tmp_path_factory.mktemp("ce-start"), seed=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Exactly the global batch: WORLD * PER_DEVICE queries, each with 4 hard negatives to draw 2 from."""
    folder = tmp_path_factory.mktemp("ce-data")
    return write_jsonl(folder / "train.jsonl", make_train_rows(WORLD * PER_DEVICE, n_negatives=4, seed=3))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(folder).state_dict()


def _assert_same_weights(got: Path, expected: dict[str, torch.Tensor], start: Path) -> None:
    initial = _weights(start)
    moved = max((expected[k] - initial[k]).abs().max().item() for k in expected)
    assert moved > 1e-3, "the reference step did not change the weights: the comparison would be vacuous"
    found = _weights(got)
    for name, tensor in expected.items():
        torch.testing.assert_close(found[name], tensor, rtol=0, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_trained_folder_loads_everywhere_and_scores_as_trained(start_dir, data, tmp_path):
    out = tmp_path / "ce"
    assert (
        train(_flags(start_dir, data, out, 2, max_steps=2, learning_rate=1e-3, query_prefix="query: ")) == 0
    )
    saved = json.loads((out / "dr_cross_encoder.json").read_text())
    assert (saved["model_type"], saved["max_length"], saved["query_prefix"]) == (
        "cross_encoder",
        40,
        "query: ",
    )
    from sentence_transformers import CrossEncoder as STCrossEncoder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dr.train.groups import passage_text

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.num_labels == 1
    tokenizer = AutoTokenizer.from_pretrained(out)

    def logit(query: str, passage: str) -> float:
        with torch.no_grad():
            enc = tokenizer(query, passage, truncation="longest_first", max_length=40, return_tensors="pt")
            return model(**enc).logits[0, 0].item()

    st = STCrossEncoder(str(out), device="cpu")
    pair = ("what about apple", "apple story")
    assert st.predict([pair], activation_fn=torch.nn.Identity())[0] == pytest.approx(logit(*pair), abs=1e-5)
    state = json.loads((out / "trainer_state.json").read_text())
    assert [e for e in state["log_history"] if "loss_listwise" in e]
    # the teacher path: dr score --teacher_type cross tokenises pairs as training did (prefix, max length)
    scored = tmp_path / "scored.jsonl"
    score = command("score")
    assert score(["--model_name_or_path", str(out), "--teacher_type", "cross", "--dataset_name", str(data),
                  "--output", str(scored)]) == 0  # fmt: skip
    row = json.loads(scored.read_text().splitlines()[0])
    positive = row["positive_passages"][0]
    assert positive["score"] == pytest.approx(
        logit("query: " + row["query"], passage_text(positive)), abs=1e-5
    )
    assert all(isinstance(p["score"], float) for p in row["positive_passages"] + row["negative_passages"])
    # an existing cross-encoder folder is not silently trained over
    assert train(_flags(start_dir, data, out, 2)) == 2


def test_distilling_a_teacher_into_a_cross_encoder_through_the_command(start_dir, tmp_path):
    """`--loss kl` on a cross-encoder: teacher scores are read, the KL temperatures default to 1 (logits)."""
    from tests.train.test_distill import scored_rows

    data = write_jsonl(tmp_path / "scored.jsonl", scored_rows(4))
    out = tmp_path / "distilled"
    assert train(_flags(start_dir, data, out, 2, loss="kl", distill_weight=0.5, learning_rate=1e-3)) == 0
    resolved = json.loads((out / "dr_train_args.json").read_text())
    assert (resolved["loss"], resolved["distil_temperature"], resolved["teacher_temperature"]) == (
        "kl",
        1.0,
        1.0,
    )
    logged = [
        e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss_distill" in e
    ]
    assert logged and "loss_listwise" in logged[0]
    unscored = write_jsonl(tmp_path / "unscored.jsonl", make_train_rows(4))
    assert train(_flags(start_dir, unscored, tmp_path / "no", 2, loss="kl")) == 1  # scores needed, named


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(start_dir, data, tmp_path):
    steps = {"max_steps": 3, "learning_rate": 0.1}
    assert train(_flags(start_dir, data, tmp_path / "full", 1, **steps)) == 0
    partial = tmp_path / "partial"
    assert train(_flags(start_dir, data, partial, 1, save_strategy="steps", save_steps=2, **steps)) == 0
    assert (partial / "checkpoint-2").is_dir()
    import shutil

    for item in partial.iterdir():  # keep only the checkpoint, as after a kill at step 2
        if item.name != "checkpoint-2":
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    resumed = _flags(
        start_dir, data, partial, 1, save_strategy="no", resume_from_checkpoint="latest", **steps
    )
    assert train(resumed) == 0
    expected = _weights(tmp_path / "full")
    got = _weights(partial)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_the_global_batch(start_dir, data, tmp_path):
    """A large SGD step: a fresh head scores all pairs nearly alike, so the gradients are small."""
    lr = {"learning_rate": 50}
    ref = tmp_path / "ref"
    run([sys.executable, "-m", "dr.train", *_flags(start_dir, data, ref, WORLD * PER_DEVICE, **lr)])
    expected = _weights(ref)
    ddp = tmp_path / "ddp"
    run(torchrun(WORLD) + ["-m", "dr.train", *_flags(start_dir, data, ddp, PER_DEVICE, **lr)], timeout=400)
    _assert_same_weights(ddp, expected, start_dir)
    # control: half the batch on one process is another step, and the comparison notices
    half = tmp_path / "half"
    run([sys.executable, "-m", "dr.train", *_flags(start_dir, data, half, PER_DEVICE, **lr)])
    with pytest.raises(AssertionError):
        _assert_same_weights(half, expected, start_dir)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_equals_one_process(start_dir, data, tmp_path, stage):
    """DeepSpeed ZeRO (2 ranks) == one process; ZeRO-3 also gathers the sharded weights to save them."""
    from tests.helpers import REPO

    lr = {"learning_rate": 50}
    ref = tmp_path / "ref"
    run([sys.executable, "-m", "dr.train", *_flags(start_dir, data, ref, WORLD * PER_DEVICE, **lr)])
    out = tmp_path / f"zero{stage}"
    config = str(REPO / "configs" / "deepspeed" / f"zero{stage}.json")
    flags = _flags(start_dir, data, out, PER_DEVICE, **lr) + ["--deepspeed", config]
    run(torchrun(WORLD) + ["-m", "dr.train", *flags], timeout=400)
    _assert_same_weights(out, _weights(ref), start_dir)
