"""`contrastive`: InfoNCE over in-batch and hard negatives, optionally gathered across devices.

Layout: each query contributes a group of n passages, positive first, then its hard negatives:

    passages = [p(q0)+, p(q0)-, ..., p(q0)-, p(q1)+, ..., p(q_{B-1})-]      (B*n rows)

Every query is scored against every passage of the (global) batch; its label is the row of its own
positive. Other queries' positives and negatives are extra (in-batch) negatives -- except passages that
are in fact positives of the query (same docid), which are masked out when docid keys are given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dr.distributed import all_gather_tensor, all_gather_with_grad, get_rank, get_world_size, is_initialized
from dr.train.losses.base import LossOutput, LossSettings, TrainLoss, group_size_of

MASKED = "masked_false_negatives"  # the count `LossOutput.counts` carries when docid keys are given


@dataclass
class Candidates:
    """What the local queries are scored against, after the (one) gather.

    `reps` (W*B*n, d) gathered passages (B*n local ones when not gathering), `keys` their docid keys or
    None, `labels` (B,) the column of each local query's positive, `group_size` n passages per query.
    """

    reps: torch.Tensor
    keys: torch.Tensor | None
    labels: torch.Tensor
    group_size: int


class ContrastiveLoss(TrainLoss):
    """Cross-entropy of each local query over all (gathered) passages.

    Args:
        temperature: scores are divided by it before the softmax.
        gather_across_devices: score local queries against the passages of every rank.

    Why no world-size factor: each rank's loss is the mean over its B local queries, and passages are
    gathered *with autograd*, so rank r's passages receive gradient from the queries of every rank (the
    backward of the gather sums them). DDP / DeepSpeed then average gradients over the W ranks, i.e.
    the parameter gradient is (1/W) * sum_r d(mean_r)/d(theta) = d(mean over all W*B queries)/d(theta):
    exactly the single-process loss on the global batch. (Gathering *without* autograd and splicing the
    local slice back would lose the other ranks' contributions and need a x W correction instead.)

    With docid keys, `counts["masked_false_negatives"]` of the output is how many (query, passage) pairs
    were masked as false negatives.
    """

    def __init__(self, temperature: float = 1.0, gather_across_devices: bool = False) -> None:
        super().__init__()
        self.temperature = temperature
        self.gather_across_devices = gather_across_devices

    def forward(
        self,
        q_reps: torch.Tensor,
        p_reps: torch.Tensor,
        group_size: int | None = None,
        teacher_scores: torch.Tensor | None = None,
        passage_keys: torch.Tensor | None = None,
        positive_keys: torch.Tensor | None = None,
    ) -> LossOutput:
        """Mean over local queries; `teacher_scores` are ignored (see `TrainLoss` for the arguments).

        With `passage_keys` and `positive_keys`, in-batch passages that are positives of a query are
        masked from its negatives.
        """
        batch = self.gather(q_reps, p_reps, group_size, passage_keys)
        return self.loss_on(q_reps, batch, teacher_scores, positive_keys)

    def gather(
        self,
        q_reps: torch.Tensor,
        p_reps: torch.Tensor,
        group_size: int | None = None,
        passage_keys: torch.Tensor | None = None,
    ) -> Candidates:
        """The passages (and keys) the local queries are scored against: every rank's when gathering.

        The loss's only collective; a caller that scores several views of the same batch (the Matryoshka
        prefixes) gathers once and calls `loss_on` per view.
        """
        n_local_queries = q_reps.shape[0]
        group_size = group_size_of(q_reps, p_reps, group_size)
        rank_offset = 0
        if self.gather_across_devices and is_initialized() and get_world_size() > 1:
            p_reps = all_gather_with_grad(p_reps)  # (W*B*n, d), rank-major
            if passage_keys is not None:
                passage_keys = all_gather_tensor(passage_keys)  # (W*B*n,)
            rank_offset = get_rank() * n_local_queries
        query_index = torch.arange(n_local_queries, device=q_reps.device) + rank_offset  # (B,) global
        labels = query_index * group_size  # (B,) row of each query's positive in the global layout
        return Candidates(p_reps, passage_keys, labels, group_size)

    def loss_on(
        self,
        q_reps: torch.Tensor,
        batch: Candidates,
        teacher_scores: torch.Tensor | None = None,
        positive_keys: torch.Tensor | None = None,
    ) -> LossOutput:
        """The loss of the local queries against `gather`'s candidates (no collective)."""
        loss, masked = self.cross_entropy(
            self.scores(q_reps, batch.reps), batch.labels, batch.keys, positive_keys
        )
        return LossOutput(loss, counts={} if masked is None else {MASKED: masked})

    @staticmethod
    def scores(q_reps: torch.Tensor, p_reps: torch.Tensor) -> torch.Tensor:
        """Raw float32 scores q.p (B, W*B*n), before the temperature."""
        # Float32 even under fp16/bf16 autocast: softmax over thousands of candidates is sensitive to
        # rounding, and GradCache (which scores cached float32 vectors) must agree exactly.
        with torch.autocast(q_reps.device.type, enabled=False):
            return q_reps.float() @ p_reps.float().T

    def similarities(
        self,
        q_reps: torch.Tensor,
        p_reps: torch.Tensor,
        group_size: int | None = None,
        passage_keys: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Raw float32 scores q.p of the local queries against all (gathered) passages.

        Returns (scores (B, W*B*n) before the temperature, labels (B,) = column of each query's own
        positive, i.e. the first column of its own group, passage_keys gathered like the passages).
        """
        batch = self.gather(q_reps, p_reps, group_size, passage_keys)
        return self.scores(q_reps, batch.reps), batch.labels, batch.keys

    def cross_entropy(
        self,
        scores: torch.Tensor,
        labels: torch.Tensor,
        passage_keys: torch.Tensor | None = None,
        positive_keys: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean cross-entropy of `similarities`' raw scores / temperature with false negatives masked,
        the detached count of masked pairs or None when no keys were given)."""
        n_local_queries = scores.shape[0]
        masked = None
        with torch.autocast(scores.device.type, enabled=False):
            scores = scores / self.temperature  # (B, W*B*n)
        if passage_keys is not None and positive_keys is not None:
            is_positive = (passage_keys[None, :, None] == positive_keys[:, None, :]).any(-1)  # (B, W*B*n)
            is_positive[torch.arange(n_local_queries), labels] = False  # keep each query's own target
            scores = scores.masked_fill(is_positive, float("-inf"))
            masked = is_positive.sum().detach()
        return nn.functional.cross_entropy(scores, labels), masked


def build(settings: LossSettings) -> ContrastiveLoss:
    """The registry's builder: --temperature, --negatives_x_device."""
    return ContrastiveLoss(settings.temperature, settings.gather_across_devices)
