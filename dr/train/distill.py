"""Knowledge distillation from teacher scores: KL and margin-MSE losses, mixed with the contrastive loss.

Each training query comes with a teacher score for every passage of its own group (positive first, then
the served negatives: `TrainCollator` builds the (B, n) tensor in the order of `TrainItem.passages`).
The student's scores of that group are its raw similarities s = q.p (float32, before `--temperature`),
taken from the same score matrix the contrastive loss uses, so the plain path and GradCache (which calls
the loss on cached representations) differentiate the same function.

    loss = (1 - w) * contrastive + w * distill           w = --distill_weight

Which terms gather across ranks, and why no world-size factor is needed:
- the contrastive term scores the local queries against the passages of every rank (gathered with
  autograd, `ContrastiveLoss`); see there why the gather needs no factor;
- the distillation term is per local query: a query's own group lives on its own rank, and so do its
  teacher scores, so nothing is gathered for it. Each rank takes the mean over its B local queries and
  DDP / DeepSpeed average the gradients over the W ranks: (1/W) sum_r mean_r = the mean over all W*B
  queries, i.e. exactly the single-process loss on the global batch;
- with w = 1 the contrastive term is skipped entirely (no gather, no B x W*B*n matrix).
"""

from __future__ import annotations

import torch
from torch import nn

from dr.train.loss import ContrastiveLoss

DISTILL_LOSSES = ("kl", "margin_mse")


def kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) over each query's own group, mean over queries.

    Args:
        student: (B, n) raw student scores q.p of each query's group (positive first).
        teacher: (B, n) teacher scores of the same passages.
        temperature: both score sets are divided by it before the softmax.

    No T^2 factor. Hinton et al. multiply by T^2 so that soft-target gradients keep their size when a
    *high* temperature (T >> 1) shrinks them by ~1/T^2 next to a hard-label loss at T = 1. Here the
    temperature is a score scale (cosine scores need T ~ 0.01-0.05), the gradient with respect to the
    scores is (p_student - p_teacher) / T like the contrastive loss's (p - y) / --temperature, so equal
    temperatures keep both terms of the mix on one scale; and Tevatron v2's `train_distil` applies no
    factor either, so its recipes (e.g. --distil_temperature 0.02) mean the same objective here.
    """
    with torch.autocast(student.device.type, enabled=False):
        log_student = torch.log_softmax(student.float() / temperature, dim=-1)  # (B, n)
        log_teacher = torch.log_softmax(teacher.float() / temperature, dim=-1)  # (B, n)
        # sum_j p_t (log p_t - log p_s), mean over the B queries; log targets: exact where p_t underflows
        return nn.functional.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)


def margin_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between student and teacher margins (positive - each negative).

    Args:
        student: (B, n) raw student scores, positive first; n >= 2.
        teacher: (B, n) teacher scores of the same passages.

    Margins of raw scores (Hofstätter et al. 2020): no temperature. The mean is over the B*(n-1)
    (query, negative) pairs. The student's scores must live on the teacher's scale (dot products vs
    cross-encoder logits do; a normalised student's cosines in [-1, 1] usually do not: use `kl` there).
    """
    if student.shape[-1] < 2:
        raise ValueError("margin_mse needs at least one negative per query (--train_n_passages >= 2)")
    with torch.autocast(student.device.type, enabled=False):
        student, teacher = student.float(), teacher.float()
        student_margins = student[:, :1] - student[:, 1:]  # (B, n-1)
        teacher_margins = teacher[:, :1] - teacher[:, 1:]  # (B, n-1)
        return nn.functional.mse_loss(student_margins, teacher_margins)


class DistillationLoss(ContrastiveLoss):
    """(1 - w) * contrastive + w * distillation (see the module docstring); a drop-in for `ContrastiveLoss`.

    Args:
        kind: "kl" or "margin_mse".
        weight: w in [0, 1].
        distill_temperature: the KL temperature (unused by margin_mse).
        temperature, gather_across_devices: of the contrastive term, as in `ContrastiveLoss`.

    After each call `last_contrastive` / `last_distill` hold the detached terms (for the log).
    """

    def __init__(
        self,
        kind: str,
        weight: float = 1.0,
        distill_temperature: float = 1.0,
        temperature: float = 1.0,
        gather_across_devices: bool = False,
    ) -> None:
        super().__init__(temperature=temperature, gather_across_devices=gather_across_devices)
        if kind not in DISTILL_LOSSES:
            raise ValueError(f"distillation loss must be one of {DISTILL_LOSSES}, got {kind!r}")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"distillation weight must be in [0, 1], got {weight}")
        if not distill_temperature > 0:
            raise ValueError(f"distillation temperature must be > 0, got {distill_temperature}")
        self.kind = kind
        self.weight = weight
        self.distill_temperature = distill_temperature
        self.last_contrastive = torch.zeros(())
        self.last_distill = torch.zeros(())

    def forward(
        self,
        q_reps: torch.Tensor,
        p_reps: torch.Tensor,
        passage_keys: torch.Tensor | None = None,
        positive_keys: torch.Tensor | None = None,
        teacher_scores: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar loss (mean over local queries); `teacher_scores` is (B, n), aligned with the groups."""
        n_queries = q_reps.shape[0]
        if teacher_scores is None:
            raise ValueError(f"--loss {self.kind} needs teacher scores in the batch ('score' on every passage)")
        if p_reps.shape[0] != teacher_scores.numel() or teacher_scores.shape[0] != n_queries:
            raise ValueError(
                f"teacher scores of shape {tuple(teacher_scores.shape)} do not match {n_queries} queries x "
                f"{p_reps.shape[0] // max(n_queries, 1)} passages"
            )
        group_size = teacher_scores.shape[1]
        contrastive = torch.zeros((), device=q_reps.device)
        if self.weight < 1.0:
            scores, labels, passage_keys = self.similarities(q_reps, p_reps, passage_keys)  # (B, W*B*n)
            columns = labels[:, None] + torch.arange(group_size, device=labels.device)  # (B, n) own group
            own = scores.gather(1, columns)  # (B, n): the same float32 scores as the contrastive term
            contrastive = self.cross_entropy(scores, labels, passage_keys, positive_keys)
        else:  # pure distillation: only each query's own group, nothing gathered
            with torch.autocast(q_reps.device.type, enabled=False):
                groups = p_reps.float().view(n_queries, group_size, -1)  # (B, n, d)
                own = torch.einsum("bd,bnd->bn", q_reps.float(), groups)  # (B, n)
        if self.kind == "kl":
            distill = kl(own, teacher_scores, self.distill_temperature)
        else:
            distill = margin_mse(own, teacher_scores)
        self.last_contrastive, self.last_distill = contrastive.detach(), distill.detach()
        if self.weight == 1.0:
            return distill
        return (1.0 - self.weight) * contrastive + self.weight * distill
