"""The cross-encoder: a Hugging Face sequence classifier with one output, the relevance logit of a pair.

`dr train --model_type cross_encoder` trains it (listwise over each query's group: `dr.train.losses.listwise`),
`dr rerank` scores a run's candidates with it, `dr score --teacher_type cross` makes it a teacher.

A saved model is a plain `AutoModelForSequenceClassification` folder (num_labels = 1, safetensors) plus its
tokenizer, so `sentence_transformers.CrossEncoder(path)` and `AutoModelForSequenceClassification` load it as
is; `dr_cross_encoder.json` (written last: its presence means the folder is complete) records how pairs were
tokenised in training (max length, truncation, prefixes), so reranking tokenises them the same way.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dr.errors import UsageError
from dr.io.atomic import write_json_atomic

CROSS_CONFIG_NAME = "dr_cross_encoder.json"
TRUNCATIONS = ("longest_first", "only_second")


@dataclass
class CrossEncoderConfig:
    """How a (query, passage) pair becomes tokens; saved as `dr_cross_encoder.json` next to the weights."""

    max_length: int = 256  # tokens of query + passage + special tokens
    truncation: str = "longest_first"  # what a too-long pair loses (only_second: the passage only)
    query_prefix: str = ""
    passage_prefix: str = ""

    def __post_init__(self) -> None:
        if self.max_length < 8:
            raise UsageError(f"a cross-encoder pair needs --max_length >= 8, got {self.max_length}")
        if self.truncation not in TRUNCATIONS:
            raise UsageError(f"--truncation must be one of {TRUNCATIONS}, got {self.truncation!r}")

    @classmethod
    def load(cls, model_dir: str | os.PathLike) -> CrossEncoderConfig | None:
        """The folder's saved settings, or None (not a dr cross-encoder folder: any HF classifier)."""
        path = Path(model_dir) / CROSS_CONFIG_NAME
        if not path.is_file():
            return None
        saved = json.loads(path.read_text(encoding="utf-8"))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})

    @classmethod
    def resolve(
        cls,
        model_dir: str | os.PathLike,
        overrides: dict[str, Any],
        defaults: CrossEncoderConfig | None = None,
    ) -> CrossEncoderConfig:
        """Flags (non-None `overrides`) > the folder's saved settings > `defaults` (the class's if None).

        `defaults` applies only to a folder dr did not write (any HF classifier), e.g. a longer pair limit."""
        saved = cls.load(model_dir) if Path(model_dir).is_dir() else None
        base = asdict(saved or defaults or cls())
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def fit_to(self, tokenizer_max_length: int | None) -> None:
        """Cap `max_length` at the tokenizer's limit (`model_max_length`; None or 0: no limit known)."""
        if tokenizer_max_length and tokenizer_max_length < self.max_length:
            self.max_length = tokenizer_max_length

    def save(self, model_dir: str | os.PathLike) -> None:
        write_json_atomic(
            Path(model_dir) / CROSS_CONFIG_NAME, {"model_type": "cross_encoder", **asdict(self)}
        )


def load_classifier(source: str, cache_dir: str | None = None, **kwargs: Any) -> nn.Module:
    """An `AutoModelForSequenceClassification` with one output. A plain encoder folder (no head yet) gets a
    fresh one-output head; a classifier folder with another number of labels is refused (a 2-label head's
    logits are not one relevance score to train listwise)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(source, cache_dir=cache_dir)
    has_head = any(
        a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or [])
    )
    if has_head and config.num_labels != 1:
        raise UsageError(
            f"{source}: a cross-encoder needs a 1-label classifier, this one has {config.num_labels}"
        )
    return AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=1, cache_dir=cache_dir, **kwargs
    )


class CrossEncoder(nn.Module):
    """Trainable cross-encoder: `forward(pairs=tokens)` -> {"scores": (rows,) float32 logits}.

    One module wrapping the classifier, so DDP / DeepSpeed wrap everything with parameters and the trainer
    owns the loss, as for the bi-encoder.
    """

    def __init__(self, model: nn.Module, cross_config: CrossEncoderConfig) -> None:
        super().__init__()
        self.model = model
        self.cross_config = cross_config

    @classmethod
    def from_pretrained(
        cls, source: str, overrides: dict[str, Any] | None = None, cache_dir: str | None = None, **kwargs: Any
    ) -> CrossEncoder:
        return cls(
            load_classifier(source, cache_dir, **kwargs), CrossEncoderConfig.resolve(source, overrides or {})
        )

    @property
    def config(self) -> Any:
        """The classifier's Hugging Face config (the Trainer reads it)."""
        return self.model.config

    def forward(self, pairs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tokenised pairs (rows, L) -> their relevance logits (rows,), float32 for the loss."""
        return {"scores": self.model(**pairs).logits[:, 0].float()}

    # ---- gradient checkpointing (called by the Trainer) ---------------------------------------------
    supports_gradient_checkpointing = True

    def gradient_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        self.model.gradient_checkpointing_enable(*args, **kwargs)

    def activation_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        getattr(self.model, "activation_checkpointing_enable", self.model.gradient_checkpointing_enable)(
            *args, **kwargs
        )

    # ---- saving / loading weights -------------------------------------------------------------------
    def save(
        self,
        output_dir: str | os.PathLike,
        state_dict: dict[str, torch.Tensor] | None = None,
        tokenizer: Any = None,
    ) -> None:
        """The classifier folder + tokenizer, staged in `<output_dir>/.saving` and moved into place, then
        `dr_cross_encoder.json` last. `state_dict` (keys prefixed `model.`: what DeepSpeed ZeRO-3 gathers)
        defaults to the module's own."""
        output_dir = Path(output_dir)
        staging = output_dir / ".saving"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        state_dict = self.state_dict() if state_dict is None else state_dict
        own = {k[len("model.") :]: v for k, v in state_dict.items() if k.startswith("model.")}
        self.model.save_pretrained(staging, state_dict=own, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (output_dir / CROSS_CONFIG_NAME).unlink(missing_ok=True)
        for item in sorted(staging.iterdir()):
            dest = output_dir / item.name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(item, dest)
        staging.rmdir()
        self.cross_config.save(output_dir)

    def load_weights(self, model_dir: str | os.PathLike) -> None:
        """Load weights saved by `save` into this module in place (used on resume)."""
        from transformers import AutoModelForSequenceClassification

        saved = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1)
        self.model.load_state_dict(saved.state_dict())


# ---- inference --------------------------------------------------------------------------------------------


def tokenize_pairs(
    tokenizer: Any, queries: Sequence[str], passages: Sequence[str], cfg: CrossEncoderConfig
) -> dict[str, list[list[int]]]:
    """Unpadded pair tokens (prefixes added), truncated as in training."""
    return tokenizer(
        [cfg.query_prefix + q for q in queries],
        [cfg.passage_prefix + p for p in passages],
        truncation=cfg.truncation,
        max_length=cfg.max_length,
        return_attention_mask=False,
    )


def score_pairs(
    model: nn.Module,
    tokenizer: Any,
    queries: Sequence[str],
    passages: Sequence[str],
    cfg: CrossEncoderConfig,
    batch_size: int,
    device: Any,
    forward_context: AbstractContextManager | None = None,
    column: int = 0,
) -> list[float]:
    """The classifier's logit of every (query, passage) pair, in input order; pairs batched longest first
    (`dr.encode.batching.sort_and_batch`), each forward in `forward_context` (e.g. bf16 autocast).
    `column` picks the relevance logit of a head with several outputs (1: a 2-label head's positive class)."""
    from dr.encode.batching import BatchSettings, sort_and_batch

    if not queries:
        return []
    encoded = tokenize_pairs(tokenizer, queries, passages, cfg)
    scores = [0.0] * len(queries)
    for positions, batch in sort_and_batch(encoded, tokenizer, BatchSettings(cfg.max_length, batch_size)):
        with torch.inference_mode(), forward_context or nullcontext():
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits  # (b, labels)
        for i, value in zip(positions.tolist(), logits[:, column].float().cpu().tolist()):
            scores[i] = value
    return scores
