"""`dr train` / `python -m dr.train`: fine-tune a bi-encoder with in-batch + hard negatives, or a cross-encoder
(`--model_type cross_encoder`: listwise over each query's group, `dr/train/cross.py`).

Launch with plain `python` (one GPU or the CPU), `torchrun --nproc_per_node N` (DDP) or
`deepspeed --num_gpus N ... --deepspeed configs/deepspeed/zero2.json`. Flags: Tevatron's, see README.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from dr.flags import DataArguments, ModelArguments, dataclass_parser, to_dataclasses
from dr.train.args import DRTrainingArguments
from dr.train.checkpoints import resolve_resume

logger = logging.getLogger("dr.train")

ARGUMENT_TYPES = (ModelArguments, DataArguments, DRTrainingArguments)


def train(model_args: ModelArguments, data_args: DataArguments, training_args: DRTrainingArguments) -> None:
    """Check the run, load the data, build model, loss and trainer, train, and save the final model."""
    from transformers import set_seed

    from dr.train import build
    from dr.train.preflight import check_run
    from dr.train.trainer import BiEncoderTrainer

    check_run(model_args, data_args, training_args)
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    set_seed(training_args.seed)

    source = build.load_data(model_args, data_args, training_args)
    if training_args.model_type == "cross_encoder":  # same data, trainer and checkpoints; other parts
        from dr.train import cross as parts
        from dr.train.cross import CrossEncoderTrainer as trainer_class

        tokenizer, model = parts.load_model(model_args, data_args, training_args)
        loss_fn = parts.make_loss(training_args)
    else:
        parts, trainer_class = build, BiEncoderTrainer
        tokenizer, model = build.load_model(model_args, data_args)
        loss_fn = build.make_loss(training_args, model)
        build.set_truncate_dim(training_args, model)
    dataset = parts.make_dataset(source, model_args, data_args, training_args, model)
    resolved = parts.save_resolved_config(model_args, data_args, training_args, model)
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=parts.make_collator(tokenizer, data_args, training_args, model),
        loss_fn=loss_fn,
        resolved_config=resolved,
    )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    if training_args.process_index == 0:
        trainer.state.save_to_json(str(Path(training_args.output_dir) / "trainer_state.json"))  # loss curve
        if training_args.model_type == "bi_encoder":  # the card describes a sentence-embedding model
            from dr.model.card import write_training_card

            write_training_card(training_args.output_dir, model_args, data_args, resolved)  # README.md
        logger.info("saved the trained model to %s", training_args.output_dir)


def build_parser():
    """`dr train`'s flags: ModelArguments + DataArguments + DRTrainingArguments (Trainer flags included)."""
    return dataclass_parser(ARGUMENT_TYPES, prog="dr train", description=__doc__.split("\n\n")[0])


def run(args) -> int:
    """Prepare the launch, build the argument objects, train; the process group is left in every case."""
    from dr import distributed

    # DeepSpeed JIT-builds ops on start: a lock left by an interrupted build would hang it. One process per
    # node clears it (the others would race it for the lock a new build creates at the same path).
    if args.deepspeed and os.environ.get("LOCAL_RANK", "0") == "0":
        from dr.train.extension_locks import clear_stale_extension_locks

        clear_stale_extension_locks()
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
