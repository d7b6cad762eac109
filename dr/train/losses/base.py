"""The one interface every training loss implements, and what it returns.

A loss is an `nn.Module` called by the trainer (never by the model) as

    loss_fn(q_reps, p_reps, group_size=n, teacher_scores=..., passage_keys=..., positive_keys=...) -> LossOutput

- `q_reps` (B, d): this rank's queries; `p_reps` (B*n, d): this rank's passages, grouped per query, each
  group positive first then its hard negatives (the `TrainCollator` layout);
- `group_size` n: passages per query (None: B*n / B, which must divide);
- `teacher_scores` (B, n) float32 or None: a teacher's score of every passage of each query's own group;
- `passage_keys` (B*n,) / `positive_keys` (B, P): docid keys (`dr.train.collator.id_key`) when in-batch
  false negatives are to be masked, else None.

A loss may gather across ranks (with autograd: see `contrastive` for why that needs no world-size factor);
the trainer only averages the returned scalar over gradient-accumulation steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dr.errors import UsageError


@dataclass
class LossOutput:
    """A scalar loss plus what the training log shows about it.

    `terms`: detached scalar parts of the loss (e.g. the contrastive and distillation terms of a mix); the
    log shows their mean over steps and ranks. `counts`: detached integer tallies (e.g. masked false
    negatives); the log shows their sum over steps and ranks.
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class LossSettings:
    """Everything a registered loss may be built from (each takes what it needs).

    Args:
        temperature: contrastive scores are divided by it (the model's resolved `--temperature`).
        gather_across_devices: score local queries against every rank's passages (`--negatives_x_device`).
        distill_weight: w in (1 - w) * contrastive + w * distillation (`--distill_weight`).
        distill_temperature: the KL temperature of the student (`--distil_temperature`; None: `temperature`).
        teacher_temperature: the KL temperature of the teacher (`--teacher_temperature`; None: the student's).
        matryoshka_dims: vector prefixes the loss is summed over (`--matryoshka_dims`; empty: none).
        matryoshka_weights: one weight per prefix (`--matryoshka_weights`; empty: 1.0 each).
        normalize: the model normalises its vectors (so prefixes are renormalised).
    """

    temperature: float = 1.0
    gather_across_devices: bool = False
    distill_weight: float = 1.0
    distill_temperature: float | None = None
    teacher_temperature: float | None = None
    matryoshka_dims: tuple[int, ...] = ()
    matryoshka_weights: tuple[float, ...] = ()
    normalize: bool = False

    @classmethod
    def from_args(cls, args: Any, temperature: float, normalize: bool = False) -> LossSettings:
        """From `DRTrainingArguments` (its --loss defaults already resolved), the model's temperature and
        whether it normalises."""
        dims = parse_dims(getattr(args, "matryoshka_dims", None))
        return cls(
            temperature=temperature,
            gather_across_devices=bool(args.negatives_x_device),
            distill_weight=1.0 if args.distill_weight is None else args.distill_weight,
            distill_temperature=args.distil_temperature,
            teacher_temperature=getattr(args, "teacher_temperature", None),
            matryoshka_dims=dims,
            matryoshka_weights=parse_weights(getattr(args, "matryoshka_weights", None), len(dims))
            if dims
            else (),
            normalize=normalize,
        )


def group_size_of(q_reps: torch.Tensor, p_reps: torch.Tensor, group_size: int | None = None) -> int:
    """Passages per query, checked against the shapes: (B, d) queries need (B * n, d) passages."""
    n_queries = q_reps.shape[0]
    if group_size is None:
        if p_reps.shape[0] % n_queries:
            raise ValueError(f"{p_reps.shape[0]} passages do not split into groups for {n_queries} queries")
        return p_reps.shape[0] // n_queries
    if p_reps.shape[0] != n_queries * group_size:
        raise ValueError(
            f"{p_reps.shape[0]} passages do not split into groups of {group_size} for {n_queries} queries"
        )
    return group_size


class TrainLoss(nn.Module):
    """Base class of the registered losses: documents the call (see the module docstring)."""

    def forward(
        self,
        q_reps: torch.Tensor,
        p_reps: torch.Tensor,
        group_size: int | None = None,
        teacher_scores: torch.Tensor | None = None,
        passage_keys: torch.Tensor | None = None,
        positive_keys: torch.Tensor | None = None,
    ) -> LossOutput:
        raise NotImplementedError


def parse_dims(text: str | None, flag: str = "--matryoshka_dims") -> tuple[int, ...]:
    """'384,256,128' -> (384, 256, 128); None or '' -> (). Each must be an integer >= 1, none repeated."""
    if not text:
        return ()
    try:
        dims = tuple(int(part) for part in str(text).split(","))
    except ValueError:
        raise UsageError(
            f"{flag} must be comma-separated integers, e.g. 384,256,128,64; got {text!r}"
        ) from None
    if any(d < 1 for d in dims) or len(set(dims)) != len(dims):
        raise UsageError(f"{flag} must be distinct integers >= 1, got {text!r}")
    return dims


def parse_weights(text: str | None, n_dims: int, flag: str = "--matryoshka_weights") -> tuple[float, ...]:
    """'1,0.5,0.5' -> one weight >= 0 per Matryoshka dim; None or '' -> 1.0 each."""
    if not text:
        return (1.0,) * n_dims
    try:
        weights = tuple(float(part) for part in str(text).split(","))
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if len(weights) != n_dims:
        raise UsageError(f"{flag} gives {len(weights)} weights for {n_dims} --matryoshka_dims")
    if any(not w >= 0 for w in weights) or not sum(weights) > 0:
        raise UsageError(f"{flag} must be numbers >= 0, not all 0; got {text!r}")
    return weights
