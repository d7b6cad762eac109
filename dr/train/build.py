"""The parts `dr train` composes, each built from the parsed arguments: data, model, loss, collator, and
the resolved configuration saved next to the outputs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dr.errors import UsageError
from dr.flags import DataArguments, ModelArguments
from dr.model.encoder import BiEncoder
from dr.train.args import DRTrainingArguments
from dr.train.collator import TrainCollator
from dr.train.groups import TrainGroups, load_train_groups
from dr.train.losses import LossSettings, TrainLoss, build_loss, loss_entry

logger = logging.getLogger("dr.train")


def load_data(model_args: ModelArguments, data_args: DataArguments, args: DRTrainingArguments) -> Any:
    """The training groups (the main process first: it fills the datasets cache the others then read);
    with teacher scores where --loss needs them."""
    with args.main_process_first(desc="loading training data"):
        return load_train_groups(
            data_args.dataset_name,
            split=data_args.dataset_split,
            config=data_args.dataset_config,
            group_size=data_args.train_n_passages,
            cache_dir=model_args.cache_dir,
            need_scores=loss_entry(args.loss).needs_teacher_scores,
        )


def load_model(model_args: ModelArguments, data_args: DataArguments) -> tuple[Any, BiEncoder]:
    """(tokenizer, trainable bi-encoder): flags > the starting folder's dr_config.json > defaults."""
    from dr.model.check import check_tokenizer_fits
    from dr.model.text import load_tokenizer, resolve_append_eos

    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.tokenizer_name, model_args.cache_dir)
    overrides = {
        "pooling": model_args.pooling,
        "normalize": model_args.normalize,
        "untie_encoder": model_args.untie_encoder or None,
        "temperature": model_args.temperature,
        "query_prefix": data_args.query_prefix,
        "passage_prefix": data_args.passage_prefix,
        "q_max_len": data_args.q_max_len,
        "p_max_len": data_args.p_max_len,
        "append_eos": model_args.append_eos,
    }
    model = BiEncoder.from_pretrained(
        model_args.model_name_or_path,
        overrides,
        cache_dir=model_args.cache_dir,
        lora=model_args.lora_settings(),
        lora_name_or_path=model_args.lora_name_or_path,
        merge_lora=False,  # keep adapters separate and trainable; encoding merges them
        ignore_st_config=model_args.ignore_st_config,
        **({"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}),
    )
    check_tokenizer_fits(tokenizer, [model.query_encoder, model.passage_model], model_args.model_name_or_path)
    # Decided once, saved in dr_config.json: encoding then tokenises exactly as training did.
    model.encoder_config.append_eos = resolve_append_eos(model.encoder_config, tokenizer)
    return tokenizer, model


def make_loss(args: DRTrainingArguments, model: BiEncoder) -> TrainLoss:
    """--loss from the registry. The KL temperatures default to the model's --temperature (student) and to
    the student's (teacher), and are written back into `args`, so dr_train_args.json records the values used."""
    settings = LossSettings.from_args(args, model.encoder_config.temperature, model.encoder_config.normalize)
    if args.loss == "kl":
        args.distil_temperature = settings.distill_temperature = (
            args.distil_temperature or settings.temperature
        )
        args.teacher_temperature = settings.teacher_temperature = (
            args.teacher_temperature or args.distil_temperature
        )
    if loss_entry(args.loss).needs_teacher_scores:
        kl_temperature = (
            f" (KL temperatures: student {args.distil_temperature:g}, teacher {args.teacher_temperature:g})"
            if args.loss == "kl"
            else ""
        )
        weight = settings.distill_weight
        logger.info("loss: %.3g * contrastive + %.3g * %s%s", 1 - weight, weight, args.loss, kl_temperature)
    if settings.matryoshka_dims:
        hidden = getattr(model.config, "hidden_size", None)
        too_wide = [d for d in settings.matryoshka_dims if isinstance(hidden, int) and d > hidden]
        if too_wide:
            raise UsageError(f"--matryoshka_dims {too_wide} exceed the model's vector size {hidden}")
        logger.info(
            "Matryoshka: the loss summed over prefixes %s with weights %s%s",
            list(settings.matryoshka_dims),
            list(settings.matryoshka_weights),
            " (each renormalised)" if settings.normalize else "",
        )
    return build_loss(args.loss, settings)


def set_truncate_dim(args: DRTrainingArguments, model: BiEncoder) -> None:
    """--truncate_dim into the model's settings: saved in dr_config.json and the sentence-transformers
    config, so encoding keeps that prefix by default (a starting model's saved value is kept otherwise)."""
    if args.truncate_dim is not None:
        model.encoder_config.truncate_dim = args.truncate_dim


def make_dataset(
    source: Any,
    model_args: ModelArguments,
    data_args: DataArguments,
    args: DRTrainingArguments,
    model: BiEncoder,
) -> TrainGroups:
    """Items with the prefixes as resolved (flag > the starting dr folder's dr_config.json > none)."""
    dataset = TrainGroups(
        source,
        data_args.train_n_passages,
        args.seed,
        model.encoder_config.query_prefix,
        model.encoder_config.passage_prefix,
    )
    logger.info(
        "training %s (%s pooling, normalize=%s) on %d queries x %d passages; world size %d, gathered negatives %s",
        model_args.model_name_or_path,
        model.encoder_config.pooling,
        model.encoder_config.normalize,
        len(dataset),
        data_args.train_n_passages,
        args.world_size,
        args.negatives_x_device,
    )
    return dataset


def make_collator(
    tokenizer: Any, data_args: DataArguments, args: DRTrainingArguments, model: BiEncoder
) -> TrainCollator:
    """Tokens at the model's resolved lengths and EOS rule; teacher scores where --loss needs them."""
    return TrainCollator(
        tokenizer,
        model.encoder_config.q_max_len,
        model.encoder_config.p_max_len,
        data_args.pad_to_multiple_of,
        model.encoder_config.append_eos,
        teacher_scores=loss_entry(args.loss).needs_teacher_scores,
    )


def save_resolved_config(
    model_args: ModelArguments, data_args: DataArguments, args: DRTrainingArguments, model: BiEncoder
) -> dict[str, Any]:
    """Every flag as resolved plus the model's settings; written by the main process now (and saved again
    with every checkpoint by the trainer), so a run's folder says what made it."""
    from dr.flags import to_jsonable
    from dr.io.atomic import write_json_atomic
    from dr.train.trainer import RESOLVED_CONFIG_NAME

    resolved = to_jsonable(model_args, data_args, args)
    resolved["encoder_config"] = vars(model.encoder_config)
    if args.process_index == 0:
        write_json_atomic(Path(args.output_dir) / RESOLVED_CONFIG_NAME, resolved)
    return resolved
