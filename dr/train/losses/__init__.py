"""Training losses, chosen by name (`--loss`): one small module per loss.

The trainer, not the model, owns the loss: the `BiEncoder` returns representations, the trainer (plain
step and GradCache alike) calls `loss_fn(q_reps, p_reps, group_size=..., teacher_scores=...,
passage_keys=..., positive_keys=...)` and gets a `LossOutput` (scalar loss + logged terms and counts).
`base` documents the interface. The cross-encoder's `listwise` (`pair_scores` in its entry) is called on
pair scores instead, `loss_fn(scores, group_size=..., teacher_scores=...)` (`listwise`, `dr/train/cross.py`).

Adding a loss: a module with the loss class and a `build(settings: LossSettings)` function, and one
`LOSSES` entry here; `--loss NAME` then selects it, and `dr train` checks the data it needs.
`--matryoshka_dims` wraps the chosen loss (`matryoshka`: the sum over vector prefixes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dr.errors import UsageError
from dr.train.losses import contrastive, kl, listwise, margin_mse
from dr.train.losses.base import LossOutput, LossSettings, TrainLoss


@dataclass(frozen=True)
class LossEntry:
    """A registered loss: how to build it and what its batches must carry."""

    build: Callable[[LossSettings], TrainLoss]
    needs_teacher_scores: bool = False  # every passage needs a teacher 'score' (dr score)
    min_group_size: int = 1  # --train_n_passages at least this
    pair_scores: bool = False  # called on a cross-encoder's pair scores, not on representations (`listwise`)


LOSSES: dict[str, LossEntry] = {
    "contrastive": LossEntry(contrastive.build),
    "kl": LossEntry(kl.build, needs_teacher_scores=True, min_group_size=2),
    "margin_mse": LossEntry(margin_mse.build, needs_teacher_scores=True, min_group_size=2),
    "listwise": LossEntry(listwise.build, min_group_size=2, pair_scores=True),  # --model_type cross_encoder
}


def loss_entry(name: str) -> LossEntry:
    """The registry entry of `--loss name`; an unknown name is a UsageError listing the known ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise UsageError(f"--loss must be one of {', '.join(LOSSES)}, got {name!r}") from None


def build_loss(name: str, settings: LossSettings) -> TrainLoss:
    """The loss registered as `name`, built from `settings`; summed over vector prefixes when
    `settings.matryoshka_dims` is set (`matryoshka`)."""
    loss = loss_entry(name).build(settings)
    if settings.matryoshka_dims:
        from dr.train.losses import matryoshka

        loss = matryoshka.wrap(loss, settings, name)
    return loss


__all__ = ["LOSSES", "LossEntry", "LossOutput", "LossSettings", "TrainLoss", "build_loss", "loss_entry"]
