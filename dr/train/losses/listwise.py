"""`listwise`: the cross-encoder's loss. Softmax cross-entropy over each query's group of pair scores,
the positive first (Nogueira et al.'s "localized contrastive estimation"; Gao et al. 2021, LCE).

Unlike the bi-encoder losses it is called on pair scores, not representations:

    loss_fn(scores, group_size=n, teacher_scores=None) -> LossOutput

- `scores` (B*n,) float32: the cross-encoder's logit of every (query, passage) pair of this rank's batch,
  grouped per query, positive first (the `TrainCollator` layout);
- `teacher_scores` (B, n) or None: with a distillation term (`--loss kl|margin_mse` on a cross-encoder),
  the mix (1 - w) * listwise + w * distill over the same (B, n) scores, as for the bi-encoder.

No gather and no world-size factor: a group lives on one rank (a pair's score depends on its own query
and passage only, there are no in-batch negatives to share). Each rank takes the mean over its B queries,
DDP / DeepSpeed average the gradients over the W ranks: (1/W) sum_r mean_r = the mean over all W*B queries,
the single-process loss on the global batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dr.train.losses.base import LossOutput, LossSettings, TrainLoss

DistillTerm = Callable[
    [torch.Tensor, torch.Tensor], torch.Tensor
]  # (student (B, n), teacher (B, n)) -> scalar


def listwise_cross_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Mean over queries of -log softmax(scores)[positive]; `scores` (B, n) with the positive in column 0."""
    with torch.autocast(scores.device.type, enabled=False):
        labels = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)  # (B,)
        return nn.functional.cross_entropy(scores.float(), labels)


class ListwiseLoss(TrainLoss):
    """(1 - w) * listwise + w * distillation on a cross-encoder's (B, n) group scores (see the module).

    Args:
        term: a distillation term (`kl.kl` / `margin_mse.margin_mse` with their settings bound), or None.
        weight: w in [0, 1]; ignored without a term.
        name: the loss's name, for messages.
    """

    def __init__(self, term: DistillTerm | None = None, weight: float = 0.0, name: str = "listwise") -> None:
        super().__init__()
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"distillation weight must be in [0, 1], got {weight}")
        self.term = term
        self.weight = weight if term is not None else 0.0
        self.name = name

    def forward(  # type: ignore[override]
        self, scores: torch.Tensor, group_size: int, teacher_scores: torch.Tensor | None = None, **_: object
    ) -> LossOutput:
        if scores.ndim != 1 or scores.shape[0] % group_size:
            raise ValueError(f"{tuple(scores.shape)} pair scores do not split into groups of {group_size}")
        groups = scores.view(-1, group_size)  # (B, n): each query's group, positive first
        out = LossOutput(torch.zeros((), device=scores.device))
        listwise = None
        if self.weight < 1.0:
            listwise = listwise_cross_entropy(groups)
            out.terms["listwise"] = listwise.detach()
        if self.term is None:
            out.loss = listwise
            return out
        if teacher_scores is None or teacher_scores.shape != groups.shape:
            got = None if teacher_scores is None else tuple(teacher_scores.shape)
            raise ValueError(
                f"--loss {self.name} needs teacher scores of shape {tuple(groups.shape)}, got {got}"
            )
        distill = self.term(groups, teacher_scores)
        out.terms["distill"] = distill.detach()
        out.loss = distill if self.weight == 1.0 else (1.0 - self.weight) * listwise + self.weight * distill
        return out


def build(settings: LossSettings) -> ListwiseLoss:
    """The registry's builder: plain listwise cross-entropy (no settings: logits are the scores)."""
    return ListwiseLoss()
