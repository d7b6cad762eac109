"""`margin_mse`: MSE of (positive - negative) score margins against the teacher's (Hofstätter et al. 2020),
mixed with the contrastive loss (`--distill_weight`, default distillation alone)."""

from __future__ import annotations

import torch
from torch import nn

from dr.train.losses.base import LossSettings
from dr.train.losses.distill_mix import DistillationLoss


def margin_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between student and teacher margins (positive - each negative).

    Args:
        student: (B, n) raw student scores, positive first; n >= 2.
        teacher: (B, n) teacher scores of the same passages.

    Margins of raw scores: no temperature. The mean is over the B*(n-1) (query, negative) pairs. The
    student's scores must live on the teacher's scale (dot products vs cross-encoder logits do; a
    normalised student's cosines in [-1, 1] usually do not: use `kl` there).
    """
    if student.shape[-1] < 2:
        raise ValueError("margin_mse needs at least one negative per query (--train_n_passages >= 2)")
    with torch.autocast(student.device.type, enabled=False):
        student, teacher = student.float(), teacher.float()
        student_margins = student[:, :1] - student[:, 1:]  # (B, n-1)
        teacher_margins = teacher[:, :1] - teacher[:, 1:]  # (B, n-1)
        return nn.functional.mse_loss(student_margins, teacher_margins)


def build(settings: LossSettings) -> DistillationLoss:
    """The registry's builder: --distill_weight (raw margins: no temperature for the distillation term)."""
    return DistillationLoss(
        "margin_mse",
        margin_mse,
        weight=settings.distill_weight,
        temperature=settings.temperature,
        gather_across_devices=settings.gather_across_devices,
    )
