"""`--matryoshka_dims`: a training loss summed over vector prefixes (Matryoshka representation learning).

    loss = sum_k w_k * L(q[:, :d_k], p[:, :d_k])          d_k = --matryoshka_dims, w_k = --matryoshka_weights

L is the `--loss` (contrastive, or a distillation mix), each prefix renormalised when the model
normalises (`dr.model.truncation.truncate`, the rule `dr encode --truncate_dim` applies), so the first d_k
coordinates of a vector are a good d_k-dimensional vector by themselves.

Gathering: the passages are gathered once, at full width (`ContrastiveLoss.gather`, the loss's only
collective); every prefix is cut from that one gathered matrix. A prefix of a gathered row is the gathered
prefix of the row, and the gather keeps autograd, so each prefix term is exactly the single-process term
on the global batch, and 2 ranks train like 1 process (see `contrastive` for why no world-size factor).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from dr.errors import UsageError
from dr.model.truncation import truncate
from dr.train.losses.base import LossOutput, LossSettings, TrainLoss, parse_dims, parse_weights  # noqa: F401 - re-exported
from dr.train.losses.contrastive import ContrastiveLoss


class MatryoshkaLoss(TrainLoss):
    """The weighted sum of `inner` over the prefixes `dims` of the query and passage vectors.

    Args:
        inner: the loss of each prefix: a `ContrastiveLoss` (or a subclass: the distillation mixes), whose
            `gather` / `loss_on` split lets every prefix share one gather.
        dims: prefix lengths (any order; one >= the vector size means the whole vector).
        weights: one per dim (default 1.0 each).
        normalize: renormalise each prefix to unit length (the model normalises its vectors).

    The output's `terms` hold each prefix's detached loss as `dim_<d>`; its `counts` (masked false
    negatives) are the first prefix's: masking depends on docids only, the same for every prefix.
    """

    def __init__(
        self,
        inner: ContrastiveLoss,
        dims: Sequence[int],
        weights: Sequence[float] | None = None,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        weights = [1.0] * len(dims) if weights is None or not len(weights) else list(weights)
        if not dims or len(weights) != len(dims):
            raise ValueError(f"{len(dims)} Matryoshka dims but {len(weights)} weights")
        if any(d < 1 for d in dims) or any(not w >= 0 for w in weights):
            raise ValueError(f"Matryoshka dims must be >= 1 and weights >= 0, got {list(dims)}, {weights}")
        self.inner = inner
        self.dims = [int(d) for d in dims]
        self.weights = [float(w) for w in weights]
        self.normalize = normalize

    def forward(
        self,
        q_reps: torch.Tensor,
        p_reps: torch.Tensor,
        group_size: int | None = None,
        teacher_scores: torch.Tensor | None = None,
        passage_keys: torch.Tensor | None = None,
        positive_keys: torch.Tensor | None = None,
    ) -> LossOutput:
        """Sum over the prefixes of `inner`'s loss (see `TrainLoss` for the arguments)."""
        width = q_reps.shape[-1]
        too_wide = [d for d in self.dims if d > width]
        if too_wide:
            raise ValueError(f"Matryoshka dims {too_wide} exceed the model's vector size {width}")
        batch = self.inner.gather(q_reps, p_reps, group_size, passage_keys)  # the one collective
        out = LossOutput(torch.zeros((), device=q_reps.device))
        for i, (dim, weight) in enumerate(zip(self.dims, self.weights)):
            prefix = dataclasses.replace(batch, reps=truncate(batch.reps, dim, self.normalize))
            part = self.inner.loss_on(
                truncate(q_reps, dim, self.normalize), prefix, teacher_scores, positive_keys
            )
            out.loss = part.loss * weight if i == 0 else out.loss + part.loss * weight
            out.terms[f"dim_{dim}"] = part.loss.detach()
            if i == 0:
                out.counts.update(part.counts)
        return out


def wrap(inner: TrainLoss, settings: LossSettings, name: str) -> MatryoshkaLoss:
    """`inner` (the `--loss name` as built) summed over `settings.matryoshka_dims`."""
    if not isinstance(inner, ContrastiveLoss):
        raise UsageError(
            f"--matryoshka_dims works with the bi-encoder losses built on contrastive, not --loss {name}"
        )
    return MatryoshkaLoss(inner, settings.matryoshka_dims, settings.matryoshka_weights, settings.normalize)
