"""Contrastive (InfoNCE) loss over in-batch and hard negatives, optionally gathered across devices.

Layout: each query contributes a group of n passages, positive first, then its hard negatives:

    passages = [p(q0)+, p(q0)-, ..., p(q0)-, p(q1)+, ..., p(q_{B-1})-]      (B*n rows)

Every query is scored against every passage of the (global) batch; its label is the row of its own
positive. Other queries' positives and negatives are extra (in-batch) negatives -- except passages that
are in fact positives of the query (same docid), which are masked out when docid keys are given.
"""

from __future__ import annotations

import torch
from torch import nn

from dr.distributed import all_gather_tensor, all_gather_with_grad, get_rank, get_world_size, is_initialized


class ContrastiveLoss(nn.Module):
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

    After each call `last_masked` holds how many (query, passage) pairs were masked as false negatives.
    """

    def __init__(self, temperature: float = 1.0, gather_across_devices: bool = False) -> None:
        super().__init__()
        self.temperature = temperature
        self.gather_across_devices = gather_across_devices
        self.last_masked = torch.zeros((), dtype=torch.long)

    def forward(
        self,
        q_reps: torch.Tensor,
        p_reps: torch.Tensor,
        passage_keys: torch.Tensor | None = None,
        positive_keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar loss (mean over local queries).

        Args:
            q_reps: (B, d) local queries.
            p_reps: (B*n, d) local passages, grouped per query, positive first.
            passage_keys: (B*n,) integer docid keys of the passages (see `dr.train.collator.id_key`).
            positive_keys: (B, P) keys of each query's positives, padded with -1. With `passage_keys`,
                in-batch passages that are positives of a query are masked from its negatives.
        """
        scores, labels, passage_keys = self.similarities(q_reps, p_reps, passage_keys)
        return self.cross_entropy(scores, labels, passage_keys, positive_keys)

    def similarities(
        self, q_reps: torch.Tensor, p_reps: torch.Tensor, passage_keys: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Raw float32 scores q.p of the local queries against all (gathered) passages.

        Returns (scores (B, W*B*n) before the temperature, labels (B,) = column of each query's own
        positive, i.e. the first column of its own group, passage_keys gathered like the passages).
        """
        n_local_queries = q_reps.shape[0]
        if p_reps.shape[0] % n_local_queries:
            raise ValueError(
                f"{p_reps.shape[0]} passages do not split into groups for {n_local_queries} queries"
            )
        group_size = p_reps.shape[0] // n_local_queries
        rank_offset = 0
        if self.gather_across_devices and is_initialized() and get_world_size() > 1:
            p_reps = all_gather_with_grad(p_reps)  # (W*B*n, d), rank-major
            if passage_keys is not None:
                passage_keys = all_gather_tensor(passage_keys)  # (W*B*n,)
            rank_offset = get_rank() * n_local_queries
        # Scores in float32 even under fp16/bf16 autocast: softmax over thousands of candidates is
        # sensitive to rounding, and GradCache (which scores cached float32 vectors) must agree exactly.
        with torch.autocast(q_reps.device.type, enabled=False):
            scores = q_reps.float() @ p_reps.float().T  # (B, W*B*n)
        query_index = torch.arange(n_local_queries, device=q_reps.device) + rank_offset  # (B,) global
        labels = query_index * group_size  # (B,) row of each query's positive in the global layout
        return scores, labels, passage_keys

    def cross_entropy(
        self,
        scores: torch.Tensor,
        labels: torch.Tensor,
        passage_keys: torch.Tensor | None = None,
        positive_keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean cross-entropy of `similarities`' raw scores / temperature, false negatives masked."""
        n_local_queries = scores.shape[0]
        with torch.autocast(scores.device.type, enabled=False):
            scores = scores / self.temperature  # (B, W*B*n)
        if passage_keys is not None and positive_keys is not None:
            is_positive = (passage_keys[None, :, None] == positive_keys[:, None, :]).any(-1)  # (B, W*B*n)
            is_positive[torch.arange(n_local_queries), labels] = False  # keep each query's own target
            scores = scores.masked_fill(is_positive, float("-inf"))
            self.last_masked = is_positive.sum().detach()
        return nn.functional.cross_entropy(scores, labels)
