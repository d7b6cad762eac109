"""`dr train --model_type cross_encoder`: the parts that differ from the bi-encoder's.

The same data (Tevatron JSONL or BEIR folders -> `TrainGroups`: a query, its positive first, then its
served negatives), launchers, precision flags, checkpoints and resume as the bi-encoder: the trainer is
`BiEncoderTrainer` with another forward (`CrossEncoderTrainer.compute_loss`), and `CrossEncoder` saves and
loads weights through the same two methods (`save`, `load_weights`). What differs:
- the collator tokenises each (query, passage) pair of a group together (`CrossCollator`),
- the model scores every pair (`dr.model.cross_encoder.CrossEncoder`: one logit each),
- the loss is listwise over each query's group (`dr.train.losses.listwise`); `--loss kl|margin_mse`
  distils teacher scores into those logits instead. Nothing is gathered across ranks (no in-batch
  negatives), so `--negatives_x_device` does not apply and 2 ranks equal one process on the global batch
  with no factor (see the loss module).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dr.flags import DataArguments, ModelArguments
from dr.model.cross_encoder import CrossEncoder, CrossEncoderConfig, tokenize_pairs
from dr.model.text import pad_rows
from dr.train.args import DRTrainingArguments
from dr.train.collator import teacher_scores_tensor
from dr.train.groups import TrainGroups, TrainItem
from dr.train.losses.kl import kl
from dr.train.losses.listwise import ListwiseLoss
from dr.train.losses.margin_mse import margin_mse
from dr.train.trainer import BiEncoderTrainer

logger = logging.getLogger("dr.train")


@dataclass
class CrossCollator:
    """TrainItems -> {"pairs": tokens (B*n, L) grouped per query, positive first, "group_size": n}, plus
    "teacher_scores" (B, n) float32 when a distillation loss is configured."""

    tokenizer: Any
    cfg: CrossEncoderConfig
    pad_to_multiple_of: int | None = 8
    teacher_scores: bool = False

    def __call__(self, items: list[TrainItem]) -> dict[str, Any]:
        group_size = len(items[0].passages)
        if any(len(item.passages) != group_size for item in items):
            raise ValueError("training groups of different sizes in one batch")
        queries = [item.query for item in items for _ in item.passages]
        passages = [p for item in items for p in item.passages]
        encoded = tokenize_pairs(self.tokenizer, queries, passages, self.cfg)
        rows = [{key: encoded[key][i] for key in encoded} for i in range(len(queries))]
        batch: dict[str, Any] = {
            "pairs": pad_rows(rows, self.tokenizer, self.cfg.max_length, self.pad_to_multiple_of),
            "group_size": group_size,
        }
        if self.teacher_scores:
            batch["teacher_scores"] = teacher_scores_tensor(items)
        return batch


class CrossEncoderTrainer(BiEncoderTrainer):
    """`BiEncoderTrainer` whose forward scores pairs; saving, resuming and logging are inherited."""

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """Pair logits through the DDP / DeepSpeed wrapper, then the listwise (or distillation) loss."""
        out = model(pairs=inputs["pairs"])
        result = self.loss_fn(
            out["scores"], group_size=inputs["group_size"], teacher_scores=inputs.get("teacher_scores")
        )
        self.loss_log.add(result)
        return (result.loss, out) if return_outputs else result.loss


# ---- the parts `dr train` composes (cf. dr/train/build.py for the bi-encoder) -----------------------------


def load_model(
    model_args: ModelArguments, data_args: DataArguments, args: DRTrainingArguments
) -> tuple[Any, CrossEncoder]:
    """(tokenizer, trainable cross-encoder): flags > the starting folder's dr_cross_encoder.json > defaults."""
    from dr.model.text import load_tokenizer

    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.tokenizer_name, model_args.cache_dir)
    overrides = {
        "max_length": args.max_length,
        "query_prefix": data_args.query_prefix,
        "passage_prefix": data_args.passage_prefix,
    }
    extra = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    model = CrossEncoder.from_pretrained(
        model_args.model_name_or_path, overrides, model_args.cache_dir, **extra
    )
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and model.cross_config.max_length > limit:
        model.cross_config.max_length = limit  # positions beyond the model's table would fail in the forward
    return tokenizer, model


def make_loss(args: DRTrainingArguments) -> ListwiseLoss:
    """listwise, or a distillation term on the pair logits mixed with it (--distill_weight). The KL
    temperatures default to 1 (logits are the scores) and are written back into `args`."""
    if args.loss == "listwise":
        return ListwiseLoss()
    if args.loss == "kl":
        args.distil_temperature = args.distil_temperature or 1.0
        args.teacher_temperature = args.teacher_temperature or args.distil_temperature
        term = functools.partial(
            kl, temperature=args.distil_temperature, teacher_temperature=args.teacher_temperature
        )
    else:
        term = margin_mse
    weight = 1.0 if args.distill_weight is None else args.distill_weight
    logger.info("loss: %.3g * listwise + %.3g * %s", 1 - weight, weight, args.loss)
    return ListwiseLoss(term, weight, name=args.loss)


def make_dataset(
    source: Any,
    model_args: ModelArguments,
    data_args: DataArguments,
    args: DRTrainingArguments,
    model: CrossEncoder,
) -> TrainGroups:
    """The training groups as text without prefixes: the collator adds the model's (`tokenize_pairs`)."""
    dataset = TrainGroups(source, data_args.train_n_passages, args.seed, "", "")
    logger.info(
        "training cross-encoder %s (pairs of <= %d tokens) on %d queries x %d passages; world size %d",
        model_args.model_name_or_path,
        model.cross_config.max_length,
        len(dataset),
        data_args.train_n_passages,
        args.world_size,
    )
    return dataset


def make_collator(
    tokenizer: Any, data_args: DataArguments, args: DRTrainingArguments, model: CrossEncoder
) -> CrossCollator:
    from dr.train.losses import loss_entry

    return CrossCollator(
        tokenizer,
        model.cross_config,
        data_args.pad_to_multiple_of,
        loss_entry(args.loss).needs_teacher_scores,
    )


def save_resolved_config(
    model_args: ModelArguments, data_args: DataArguments, args: DRTrainingArguments, model: CrossEncoder
) -> dict[str, Any]:
    """Every flag as resolved plus the pair settings, written by the main process now (and with every
    checkpoint by the trainer)."""
    from dr.flags import to_jsonable
    from dr.io.atomic import write_json_atomic
    from dr.train.trainer import RESOLVED_CONFIG_NAME

    resolved = to_jsonable(model_args, data_args, args)
    resolved["cross_encoder_config"] = asdict(model.cross_config)
    if args.process_index == 0:
        write_json_atomic(Path(args.output_dir) / RESOLVED_CONFIG_NAME, resolved)
    return resolved
