"""`kl`: KL(teacher || student) over each query's own group, mixed with the contrastive loss
(`--distill_weight`, default distillation alone, as Tevatron v2's `train_distil`)."""

from __future__ import annotations

import functools

import torch
from torch import nn

from dr.train.losses.base import LossSettings
from dr.train.losses.distill_mix import DistillationLoss


def kl(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, teacher_temperature: float | None = None
) -> torch.Tensor:
    """KL(teacher || student) over each query's own group, mean over queries.

    Args:
        student: (B, n) raw student scores q.p of each query's group (positive first).
        teacher: (B, n) teacher scores of the same passages.
        temperature: the student's scores are divided by it before the softmax (`--distil_temperature`).
        teacher_temperature: the teacher's scores are divided by it (`--teacher_temperature`); None: the
            same as `temperature` (Tevatron's one temperature for both).

    Why two temperatures: the target is softmax(teacher / T_t). A teacher on another scale than the
    student (cross-encoder logits spread over ~10 units against cosines over ~0.2) divided by the
    student's T ~ 0.05 gives a nearly one-hot target, which carries little beyond the hard label; its
    own T_t (~1 for logits) keeps the soft ranking of the negatives.

    No T^2 factor. Hinton et al. multiply by T^2 so that soft-target gradients keep their size when a
    *high* temperature (T >> 1) shrinks them by ~1/T^2 next to a hard-label loss at T = 1. Here the
    temperature is a score scale (cosine scores need T ~ 0.01-0.05), the gradient with respect to the
    scores is (p_student - p_teacher) / T like the contrastive loss's (p - y) / --temperature, so equal
    temperatures keep both terms of the mix on one scale; and Tevatron v2's `train_distil` applies no
    factor either, so its recipes (e.g. --distil_temperature 0.02) mean the same objective here.
    """
    with torch.autocast(student.device.type, enabled=False):
        log_student = torch.log_softmax(student.float() / temperature, dim=-1)  # (B, n)
        t_teacher = temperature if teacher_temperature is None else teacher_temperature
        log_teacher = torch.log_softmax(teacher.float() / t_teacher, dim=-1)  # (B, n)
        # sum_j p_t (log p_t - log p_s), mean over the B queries; log targets: exact where p_t underflows
        return nn.functional.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)


def build(settings: LossSettings) -> DistillationLoss:
    """The registry's builder: the student at --distil_temperature (default: --temperature), the teacher at
    --teacher_temperature (default: the student's), --distill_weight."""
    temperature = settings.distill_temperature or settings.temperature
    teacher_temperature = settings.teacher_temperature or temperature
    if not (temperature > 0 and teacher_temperature > 0):
        raise ValueError(f"distillation temperatures must be > 0, got {temperature}, {teacher_temperature}")
    return DistillationLoss(
        "kl",
        functools.partial(kl, temperature=temperature, teacher_temperature=teacher_temperature),
        weight=settings.distill_weight,
        temperature=settings.temperature,
        gather_across_devices=settings.gather_across_devices,
    )
