"""`--teacher_temperature`: the KL target is softmax(teacher / T_t), the student's softmax(s / T_s).

Checked by hand (values and gradients), against the one-temperature default (Tevatron's meaning), through
the flags (defaults written back, refused where a loss would ignore it), and for why it exists: a teacher
of cross-encoder logits at the student's temperature gives a nearly one-hot target.
"""

from __future__ import annotations

import math

import pytest
import torch

from dr.errors import UsageError
from dr.train.losses import LossSettings, build_loss
from dr.train.losses.kl import kl

B, N, D = 2, 4, 5


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _hand_kl(
    s: list[list[float]], t: list[list[float]], t_student: float, t_teacher: float
) -> tuple[float, list]:
    """(KL(teacher || student) mean over queries, dKL/ds) in float64, by the formula in docs/distill.md."""
    total, grads = 0.0, []
    for si, ti in zip(s, t):
        ps = _softmax([x / t_student for x in si])
        pt = _softmax([x / t_teacher for x in ti])
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
        grads.append([(b - a) / (t_student * len(s)) for a, b in zip(pt, ps)])
    return total / len(s), grads


@pytest.mark.parametrize(("t_student", "t_teacher"), [(0.05, 1.0), (0.5, 2.0), (1.0, 0.25)])
def test_kl_target_uses_the_teacher_temperature_values_and_gradients(t_student, t_teacher):
    torch.manual_seed(0)
    student = (torch.randn(B, N, dtype=torch.float64) * 0.2).float().requires_grad_()
    teacher = torch.randn(B, N) * 4  # logit scale
    loss = kl(student, teacher, t_student, teacher_temperature=t_teacher)
    loss.backward()
    s = student.detach().double().tolist()
    expected, grads = _hand_kl(s, teacher.double().tolist(), t_student, t_teacher)
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    torch.testing.assert_close(
        student.grad.double(), torch.tensor(grads, dtype=torch.float64), rtol=1e-4, atol=1e-6
    )
    # the student's own temperature on the teacher would be another objective
    other, _ = _hand_kl(s, teacher.double().tolist(), t_student, t_student)
    assert abs(other - expected) > 1e-3


def test_default_teacher_temperature_is_the_students():
    torch.manual_seed(1)
    student, teacher = torch.randn(B, N), torch.randn(B, N)
    assert kl(student, teacher, 0.3).item() == kl(student, teacher, 0.3, teacher_temperature=0.3).item()
    q, p = torch.randn(B, D), torch.randn(B * N, D)
    one = build_loss("kl", LossSettings(0.7, False, 1.0, 0.3))(
        q, p, group_size=N, teacher_scores=teacher
    ).loss
    both = build_loss("kl", LossSettings(0.7, False, 1.0, 0.3, 0.3))(
        q, p, group_size=N, teacher_scores=teacher
    ).loss
    apart = build_loss("kl", LossSettings(0.7, False, 1.0, 0.3, 3.0))(
        q, p, group_size=N, teacher_scores=teacher
    ).loss
    assert one.item() == both.item()
    assert abs(apart.item() - one.item()) > 1e-3


def test_logit_teacher_at_the_students_temperature_is_nearly_one_hot():
    """The reason for the flag: logits spread over ~8 units / 0.05 -> all mass on the top passage."""
    logits = [[9.0, 4.0, 2.5, 1.0]]
    target_same = _softmax([x / 0.05 for x in logits[0]])
    target_own = _softmax([x / 1.0 for x in logits[0]])
    assert target_same[0] > 1 - 1e-12
    assert target_own[1] > 1e-3  # the negatives keep a graded share
    student = torch.tensor([[0.9, 0.4, 0.3, 0.1]])
    same = kl(student, torch.tensor(logits), 0.05).item()
    own = kl(student, torch.tensor(logits), 0.05, teacher_temperature=1.0).item()
    assert same == pytest.approx(_hand_kl(student.double().tolist(), logits, 0.05, 0.05)[0], abs=1e-6)
    assert own == pytest.approx(_hand_kl(student.double().tolist(), logits, 0.05, 1.0)[0], rel=1e-4)
    assert own > 100 * same  # the graded target asks more of the student than the near one-hot one


def test_flag_defaults_are_written_back_and_misuse_is_refused(tmp_path):
    from types import SimpleNamespace

    from dr.train.args import DRTrainingArguments
    from dr.train.build import make_loss

    model = SimpleNamespace(encoder_config=SimpleNamespace(temperature=0.05, normalize=True))
    args = DRTrainingArguments(output_dir=str(tmp_path), loss="kl", use_cpu=True)
    make_loss(args, model)
    assert (args.distil_temperature, args.teacher_temperature) == (0.05, 0.05)  # Tevatron's meaning
    args = DRTrainingArguments(
        output_dir=str(tmp_path), distil_temperature=0.02, teacher_temperature=1.0, use_cpu=True
    )
    loss = make_loss(args, model)
    assert (args.loss, args.distil_temperature, args.teacher_temperature) == ("kl", 0.02, 1.0)
    assert loss.term.keywords == {"temperature": 0.02, "teacher_temperature": 1.0}
    with pytest.raises(UsageError, match="teacher_temperature"):
        DRTrainingArguments(output_dir=str(tmp_path), teacher_temperature=1.0, use_cpu=True)  # contrastive
    with pytest.raises(UsageError, match="kl only"):
        DRTrainingArguments(
            output_dir=str(tmp_path), loss="margin_mse", teacher_temperature=1.0, use_cpu=True
        )
    with pytest.raises(UsageError, match="> 0"):
        DRTrainingArguments(output_dir=str(tmp_path), loss="kl", teacher_temperature=0.0, use_cpu=True)
