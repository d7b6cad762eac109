"""`dr train` / `python -m dr.train`: fine-tune a bi-encoder with in-batch + hard negatives.

Launch with plain `python` (one GPU or the CPU), `torchrun --nproc_per_node N` (DDP) or
`deepspeed --num_gpus N ... --deepspeed configs/deepspeed/zero2.json`. Flags: Tevatron's, see README.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from dr.flags import ConfigError, DataArguments, ModelArguments, dataclass_parser, to_dataclasses
from dr.model import DR_CONFIG_NAME
from dr.train.args import DRTrainingArguments
from dr.train.checkpoints import resolve_resume, wants_resume

logger = logging.getLogger("dr.train")

ARGUMENT_TYPES = (ModelArguments, DataArguments, DRTrainingArguments)


def _check_precision(args: DRTrainingArguments) -> None:
    """Refuse --fp16 without a CUDA GPU: accelerate would silently train in float32 on the CPU."""
    import torch

    if args.fp16 and not torch.cuda.is_available():
        raise ConfigError("--fp16 needs a CUDA GPU; on CPU drop --fp16 (or use --bf16)")


def _check_output_dir(args: DRTrainingArguments) -> None:
    """Refuse to train over an existing model unless told to replace it or resume (`--resume_from_checkpoint
    false` is no resume); refuse an output folder that cannot be written, before any work."""
    out = Path(args.output_dir)
    _check_writable(out)
    if not out.is_dir() or args.overwrite_output_dir or wants_resume(args.resume_from_checkpoint):
        return
    if (out / DR_CONFIG_NAME).exists() or any(out.glob("checkpoint-*")):
        raise ConfigError(
            f"--output_dir {out} already holds a model or checkpoints: pass --overwrite_output_dir to replace "
            "it or --resume_from_checkpoint to continue"
        )


def _check_writable(out: Path) -> None:
    """`--output_dir` must be (or be creatable as) a writable folder. Checked by creating a probe file where
    the folder exists (root ignores permission bits but not a read-only mount), else by its nearest
    existing parent, which must be a writable folder (a path below a regular file fails for root too)."""
    import tempfile

    from dr.errors import InputError

    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"--output_dir {out}: cannot create it: {parent} is not a folder")
    try:
        if parent == out:
            with tempfile.TemporaryFile(dir=out):
                pass
        elif not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(f"{parent} is not writable")
    except OSError as err:
        raise InputError(f"--output_dir {out}: cannot write there: {err.strerror or err}") from err


def train(model_args: ModelArguments, data_args: DataArguments, training_args: DRTrainingArguments) -> None:
    """Build data, model and trainer from parsed arguments, train, and save the final model."""
    from transformers import set_seed

    from dr.flags import to_jsonable
    from dr.model.check import check_model_source, check_tokenizer_fits
    from dr.model.encoder import BiEncoder
    from dr.model.text import load_tokenizer, resolve_append_eos
    from dr.train.collator import TrainCollator
    from dr.train.groups import TrainGroups, load_train_groups
    from dr.train.trainer import BiEncoderTrainer

    _check_precision(training_args)
    _check_output_dir(training_args)
    distilling = training_args.loss != "contrastive"
    if distilling and data_args.train_n_passages < 2:
        raise ConfigError(f"--loss {training_args.loss} needs negatives to distil over: --train_n_passages >= 2")
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    check_model_source(model_args.model_name_or_path, cache_dir=model_args.cache_dir)  # before the data
    set_seed(training_args.seed)

    with training_args.main_process_first(desc="loading training data"):
        source = load_train_groups(
            data_args.dataset_name,
            split=data_args.dataset_split,
            config=data_args.dataset_config,
            group_size=data_args.train_n_passages,
            cache_dir=model_args.cache_dir,
            need_scores=distilling,
        )
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
        negatives_x_device=training_args.negatives_x_device,
        cache_dir=model_args.cache_dir,
        lora=model_args.lora_settings(),
        lora_name_or_path=model_args.lora_name_or_path,
        merge_lora=False,  # keep adapters separate and trainable; encoding merges them
        ignore_st_config=model_args.ignore_st_config,
        **({"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}),
    )
    check_tokenizer_fits(tokenizer, [model.query_encoder, model.passage_model], model_args.model_name_or_path)
    if distilling:
        from dr.train.distill import DistillationLoss

        if training_args.loss == "kl":  # defaults to the model's --temperature; dr_train_args.json records it
            training_args.distil_temperature = training_args.distil_temperature or model.encoder_config.temperature
        model.loss_fn = DistillationLoss(
            training_args.loss,
            weight=training_args.distill_weight,
            distill_temperature=training_args.distil_temperature or 1.0,  # (unused by margin_mse)
            temperature=model.encoder_config.temperature,
            gather_across_devices=training_args.negatives_x_device,
        )
    # Decided once, saved in dr_config.json: encoding then tokenises exactly as training did.
    model.encoder_config.append_eos = resolve_append_eos(model.encoder_config, tokenizer)
    # Prefixes as resolved (flag > the starting dr folder's dr_config.json > none), like every other setting.
    dataset = TrainGroups(
        source,
        data_args.train_n_passages,
        training_args.seed,
        model.encoder_config.query_prefix,
        model.encoder_config.passage_prefix,
    )
    resolved = to_jsonable(model_args, data_args, training_args)
    resolved["encoder_config"] = vars(model.encoder_config)
    if training_args.process_index == 0:
        from dr.io.atomic import write_json_atomic
        from dr.train.trainer import RESOLVED_CONFIG_NAME

        write_json_atomic(Path(training_args.output_dir) / RESOLVED_CONFIG_NAME, resolved)
    if distilling:
        logger.info(
            "loss: %.3g * contrastive + %.3g * %s (KL temperature %g)",
            1 - model.loss_fn.weight,
            model.loss_fn.weight,
            training_args.loss,
            model.loss_fn.distill_temperature,
        )
    logger.info(
        "training %s (%s pooling, normalize=%s) on %d queries x %d passages; world size %d, gathered negatives %s",
        model_args.model_name_or_path,
        model.encoder_config.pooling,
        model.encoder_config.normalize,
        len(dataset),
        data_args.train_n_passages,
        training_args.world_size,
        training_args.negatives_x_device,
    )
    trainer = BiEncoderTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=TrainCollator(
            tokenizer,
            model.encoder_config.q_max_len,
            model.encoder_config.p_max_len,
            data_args.pad_to_multiple_of,
            model.encoder_config.append_eos,
            teacher_scores=distilling,
        ),
        resolved_config=resolved,
    )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    if training_args.process_index == 0:
        trainer.state.save_to_json(str(Path(training_args.output_dir) / "trainer_state.json"))  # loss curve
        from dr.model.card import write_training_card

        write_training_card(training_args.output_dir, model_args, data_args, resolved)  # README.md
        logger.info("saved the trained model to %s", training_args.output_dir)


def build_parser():
    """`dr train`'s flags: ModelArguments + DataArguments + DRTrainingArguments (Trainer flags included)."""
    return dataclass_parser(ARGUMENT_TYPES, prog="dr train", description=__doc__.split("\n\n")[0])


def run(args) -> int:
    """Prepare the launch, build the argument objects, train; the process group is left in every case."""
    from dr import distributed

    extra = distributed.prepare_launch(deepspeed=bool(args.deepspeed), bf16=bool(args.bf16))
    model_args, data_args, training_args = to_dataclasses(args, ARGUMENT_TYPES, **extra)
    # The Trainer (accelerate) joins the launcher's group itself; we only leave it (see process_group).
    with distributed.process_group(join=False):
        train(model_args, data_args, training_args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`dr train` for library callers and tests: the exit status (2 bad flags, 1 bad data)."""
    from dr.cli import run_command

    return run_command("train", argv)
