"""Refusals `dr train` makes before any work: flags that cannot run here, outputs it must not overwrite."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from dr.errors import InputError
from dr.flags import ConfigError, DataArguments, ModelArguments
from dr.model import DR_CONFIG_NAME
from dr.model.cross_encoder import CROSS_CONFIG_NAME
from dr.train.args import DRTrainingArguments
from dr.train.checkpoints import wants_resume
from dr.train.losses import loss_entry


def check_run(model_args: ModelArguments, data_args: DataArguments, args: DRTrainingArguments) -> None:
    """Every check below, cheapest first; the model source last (it may look up the hub cache)."""
    from dr.model.check import check_model_source

    check_precision(args)
    check_output_dir(args)
    check_loss_data(data_args, args)
    check_model_source(model_args.model_name_or_path, cache_dir=model_args.cache_dir)  # before the data


def check_precision(args: DRTrainingArguments) -> None:
    """Refuse --fp16 without a CUDA GPU: accelerate would silently train in float32 on the CPU."""
    import torch

    if args.fp16 and not torch.cuda.is_available():
        raise ConfigError("--fp16 needs a CUDA GPU; on CPU drop --fp16 (or use --bf16)")


def check_loss_data(data_args: DataArguments, args: DRTrainingArguments) -> None:
    """The groups must be as large as --loss needs (a distillation loss needs negatives to distil over)."""
    entry = loss_entry(args.loss)
    if data_args.train_n_passages < entry.min_group_size:
        what = "negatives to distil over" if entry.needs_teacher_scores else "larger groups"
        raise ConfigError(f"--loss {args.loss} needs {what}: --train_n_passages >= {entry.min_group_size}")


def check_output_dir(args: DRTrainingArguments) -> None:
    """Refuse to train over an existing model unless told to replace it or resume (`--resume_from_checkpoint
    false` is no resume); refuse an output folder that cannot be written, before any work."""
    out = Path(args.output_dir)
    check_writable(out)
    if not out.is_dir() or args.overwrite_output_dir or wants_resume(args.resume_from_checkpoint):
        return
    if (out / DR_CONFIG_NAME).exists() or (out / CROSS_CONFIG_NAME).exists() or any(out.glob("checkpoint-*")):
        raise ConfigError(
            f"--output_dir {out} already holds a model or checkpoints: pass --overwrite_output_dir to replace "
            "it or --resume_from_checkpoint to continue"
        )


def check_writable(out: Path) -> None:
    """`--output_dir` must be (or be creatable as) a writable folder. Checked by creating a probe file where
    the folder exists (root ignores permission bits but not a read-only mount), else by its nearest
    existing parent, which must be a writable folder (a path below a regular file fails for root too)."""
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
