"""Knowledge distillation from teacher scores, mixed with the contrastive loss.

Each training query comes with a teacher score for every passage of its own group (positive first, then
the served negatives: `TrainCollator` builds the (B, n) tensor in the order of `TrainItem.passages`).
The student's scores of that group are its raw similarities s = q.p (float32, before `--temperature`),
taken from the same score matrix the contrastive loss uses, so the plain path and GradCache (which calls
the loss on cached representations) differentiate the same function.

    loss = (1 - w) * contrastive + w * distill           w = --distill_weight

The distillation term is a function of the (B, n) student and teacher scores: `kl.kl` or
`margin_mse.margin_mse` (their modules register the mix under their names).

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

from collections.abc import Callable

import torch

from dr.train.losses.base import LossOutput, group_size_of
from dr.train.losses.contrastive import MASKED, Candidates, ContrastiveLoss

DistillTerm = Callable[
    [torch.Tensor, torch.Tensor], torch.Tensor
]  # (student (B, n), teacher (B, n)) -> scalar


class DistillationLoss(ContrastiveLoss):
    """(1 - w) * contrastive + w * distillation (see the module docstring).

    Args:
        name: the distillation loss's registry name (for messages and the log).
        term: the distillation term, (student (B, n), teacher (B, n)) -> scalar.
        weight: w in [0, 1].
        temperature, gather_across_devices: of the contrastive term, as in `ContrastiveLoss`.

    The output's `terms` hold the detached "contrastive" (when w < 1) and "distill" parts.
    """

    def __init__(
        self,
        name: str,
        term: DistillTerm,
        weight: float = 1.0,
        temperature: float = 1.0,
        gather_across_devices: bool = False,
    ) -> None:
        super().__init__(temperature=temperature, gather_across_devices=gather_across_devices)
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"distillation weight must be in [0, 1], got {weight}")
        self.name = name
        self.term = term
        self.weight = weight

    def gather(
        self,
        q_reps: torch.Tensor,
        p_reps: torch.Tensor,
        group_size: int | None = None,
        passage_keys: torch.Tensor | None = None,
    ) -> Candidates:
        """`ContrastiveLoss.gather` when the contrastive term is used (w < 1); with w = 1 the local
        passages as they are: each query's own group is on its own rank, nothing is gathered."""
        if self.weight < 1.0:
            return super().gather(q_reps, p_reps, group_size, passage_keys)
        group_size = group_size_of(q_reps, p_reps, group_size)
        labels = torch.arange(q_reps.shape[0], device=q_reps.device) * group_size
        return Candidates(p_reps, passage_keys, labels, group_size)

    def loss_on(
        self,
        q_reps: torch.Tensor,
        batch: Candidates,
        teacher_scores: torch.Tensor | None = None,
        positive_keys: torch.Tensor | None = None,
    ) -> LossOutput:
        """Mean over local queries; `teacher_scores` (B, n) are required, aligned with the groups."""
        n_queries, group_size = q_reps.shape[0], batch.group_size
        if teacher_scores is None:
            raise ValueError(
                f"--loss {self.name} needs teacher scores in the batch ('score' on every passage)"
            )
        if tuple(teacher_scores.shape) != (n_queries, group_size):
            raise ValueError(
                f"teacher scores of shape {tuple(teacher_scores.shape)} do not match {n_queries} queries x "
                f"{group_size} passages"
            )
        out = LossOutput(torch.zeros((), device=q_reps.device))
        if self.weight < 1.0:
            scores = self.scores(q_reps, batch.reps)
            columns = batch.labels[:, None] + torch.arange(group_size, device=batch.labels.device)  # (B, n)
            own = scores.gather(1, columns)  # (B, n): the same float32 scores as the contrastive term
            contrastive, masked = self.cross_entropy(scores, batch.labels, batch.keys, positive_keys)
            out.terms["contrastive"] = contrastive.detach()
            if masked is not None:
                out.counts[MASKED] = masked
        else:  # pure distillation: only each query's own group, nothing gathered
            with torch.autocast(q_reps.device.type, enabled=False):
                groups = batch.reps.float().view(n_queries, group_size, -1)  # (B, n, d)
                own = torch.einsum("bd,bnd->bn", q_reps.float(), groups)  # (B, n)
        distill = self.term(own, teacher_scores)
        out.terms["distill"] = distill.detach()
        out.loss = (
            distill if self.weight == 1.0 else (1.0 - self.weight) * contrastive + self.weight * distill
        )
        return out
