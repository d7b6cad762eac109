"""`dr train`'s own flags: `transformers.TrainingArguments` plus the contrastive-training options.

Constructing them has no side effect on the process: what a launch needs (environment variables,
accelerate's DeepSpeed state on CPU) is `dr.distributed.prepare_launch`, called by `dr train` first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from transformers import TrainingArguments

from dr.errors import UsageError


@dataclass
class DRTrainingArguments(TrainingArguments):
    """`transformers.TrainingArguments` plus the contrastive-training options."""

    negatives_x_device: bool = field(
        default=True,
        metadata={
            "help": "Score each query against the passages of all ranks (global in-batch negatives). "
            "On by default so N devices train exactly like one device with N times the batch; "
            "--negatives_x_device false keeps negatives per device (Tevatron's default)."
        },
    )
    mask_false_negatives: bool = field(
        default=True,
        metadata={
            "help": "Mask, for each query, in-batch passages (gathered ones included) whose docid is one of "
            "the query's positives: they are not negatives. The masked count is logged."
        },
    )
    grad_cache: bool = field(
        default=False,
        metadata={
            "help": "GradCache: compute representations in chunks without a graph, the loss and its gradient "
            "on the full (gathered) batch, then back-propagate chunk by chunk. Same gradients, less memory."
        },
    )
    gc_q_chunk_size: int = field(default=4, metadata={"help": "Queries per GradCache chunk."})
    gc_p_chunk_size: int = field(default=32, metadata={"help": "Passages per GradCache chunk."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow writing into an output_dir that already holds a model or checkpoints."},
    )

    def __post_init__(self) -> None:
        # Our batches are dicts of tokenised query/passage groups, not model-named columns.
        self.remove_unused_columns = False
        self.label_names = []
        if self.gc_q_chunk_size < 1 or self.gc_p_chunk_size < 1:
            raise UsageError(
                f"--gc_q_chunk_size and --gc_p_chunk_size must be >= 1, got {self.gc_q_chunk_size}, {self.gc_p_chunk_size}"
            )
        if self.report_to in (None, "all", ["all"]):
            self.report_to = "none"
        import torch

        if not torch.cuda.is_available() and not self.deepspeed:
            # accelerate treats a multi-process launch as distributed (gloo) only when told it is on the CPU.
            self.use_cpu = True
        cpu_deepspeed = not torch.cuda.is_available() and bool(self.deepspeed)
        with _bf16_allowed_on_cpu() if cpu_deepspeed and self.bf16 else contextlib.nullcontext():
            super().__post_init__()


@contextlib.contextmanager
def _bf16_allowed_on_cpu() -> Iterator[None]:
    """Let `--bf16 --deepspeed` pass TrainingArguments' device check on a machine without a GPU.

    The check accepts bf16 without a GPU only with `use_cpu`, which a DeepSpeed run cannot set (DeepSpeed
    brings its own CPU accelerator, whose bf16 works). Scoped to the one validation call.
    """
    from transformers import training_args

    saved = training_args.is_torch_bf16_gpu_available
    training_args.is_torch_bf16_gpu_available = lambda: True
    try:
        yield
    finally:
        training_args.is_torch_bf16_gpu_available = saved
