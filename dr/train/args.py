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
from dr.train.losses import LOSSES, loss_entry

MODEL_TYPES = ("bi_encoder", "cross_encoder")
CROSS_ENCODER_LOSSES = ("listwise", "kl", "margin_mse")  # kl / margin_mse: distilling into the cross-encoder


@dataclass
class DRTrainingArguments(TrainingArguments):
    """`transformers.TrainingArguments` plus the contrastive-training options."""

    model_type: str = field(
        default="bi_encoder",
        metadata={
            "help": "bi_encoder (vectors, in-batch + hard negatives) | cross_encoder (a 1-output "
            "AutoModelForSequenceClassification scoring each (query, passage) pair; listwise softmax "
            "cross-entropy over each query's group, positive first; docs/rerank.md).",
            "choices": MODEL_TYPES,
        },
    )
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "cross_encoder: max tokens of a (query, passage) pair. Default: the starting folder's "
            "dr_cross_encoder.json, else 256. Bi-encoders use --q_max_len / --p_max_len."
        },
    )

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
    loss: str | None = field(
        default=None,
        metadata={
            "help": f"{' | '.join(LOSSES)} (dr/train/losses). kl: KL(teacher || student) over each query's own group; "
            "margin_mse: MSE of (positive - negative) score margins; both need a teacher 'score' on every "
            "passage (dr score). Default: kl when --distil_temperature is given (Tevatron v2's "
            "train_distil), else contrastive."
        },
    )
    distil_temperature: float | None = field(
        default=None,
        metadata={
            "help": "KL temperature: student and teacher scores are divided by it before the softmax. "
            "Default: --temperature (Tevatron v2's own default is 0.02, for --normalize students).",
            "aliases": ["--distill_temperature"],
        },
    )
    teacher_temperature: float | None = field(
        default=None,
        metadata={
            "help": "KL temperature of the teacher: its scores are divided by it, the student's by "
            "--distil_temperature. Default: --distil_temperature (one temperature for both, Tevatron's "
            "meaning). Cross-encoder logits want ~1, a cosine bi-encoder teacher the student's (docs/distill.md).",
        },
    )
    distill_weight: float | None = field(
        default=None,
        metadata={
            "help": "w in loss = (1 - w) * contrastive + w * distillation (kl / margin_mse only). Default 1.0: "
            "distillation alone, as Tevatron v2's train_distil."
        },
    )
    matryoshka_dims: str | None = field(
        default=None,
        metadata={
            "help": "Matryoshka training: comma-separated vector prefix lengths, e.g. 768,384,128,64; the "
            "--loss is summed over the prefixes (renormalised when --normalize), from one gather of the "
            "passages. Include the full size to keep training the whole vector. docs/matryoshka.md."
        },
    )
    matryoshka_weights: str | None = field(
        default=None,
        metadata={"help": "One weight per --matryoshka_dims entry, comma-separated (default 1 each)."},
    )
    truncate_dim: int | None = field(
        default=None,
        metadata={
            "help": "Save the model with this default vector size (dr_config.json and the "
            "sentence-transformers config): dr encode and SentenceTransformer(path) then keep the first "
            "D dimensions. One of --matryoshka_dims."
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
        self._check_model_type()
        self._resolve_loss()
        self._check_matryoshka()
        if self.report_to in (None, "all", ["all"]):
            self.report_to = "none"
        import torch

        if not torch.cuda.is_available() and not self.deepspeed:
            # accelerate treats a multi-process launch as distributed (gloo) only when told it is on the CPU.
            self.use_cpu = True
        cpu_deepspeed = not torch.cuda.is_available() and bool(self.deepspeed)
        with _bf16_allowed_on_cpu() if cpu_deepspeed and self.bf16 else contextlib.nullcontext():
            super().__post_init__()

    def _check_model_type(self) -> None:
        """--model_type and the flags that only one model type has."""
        if self.model_type not in MODEL_TYPES:
            raise UsageError(f"--model_type must be one of {', '.join(MODEL_TYPES)}, got {self.model_type!r}")
        if self.model_type == "bi_encoder":
            if self.max_length is not None:
                raise UsageError(
                    "--max_length is for --model_type cross_encoder (bi-encoders: --q_max_len/--p_max_len)"
                )
            if self.loss == "listwise":
                raise UsageError("--loss listwise is for --model_type cross_encoder")
            return
        if self.grad_cache:
            raise UsageError("--grad_cache caches representations, which a cross-encoder has none of: use "
                             "--gradient_checkpointing to save memory")  # fmt: skip
        if self.loss is not None and self.loss not in CROSS_ENCODER_LOSSES:
            raise UsageError(f"--model_type cross_encoder trains with --loss {' | '.join(CROSS_ENCODER_LOSSES)}, "
                             f"not {self.loss}")  # fmt: skip
        if self.max_length is not None and self.max_length < 8:
            raise UsageError(f"--max_length must be >= 8, got {self.max_length}")

    def _resolve_loss(self) -> None:
        """Fill --loss / --distill_weight defaults; refuse distillation flags a run would ignore."""
        if self.loss is None:
            plain = "listwise" if self.model_type == "cross_encoder" else "contrastive"
            self.loss = "kl" if self.distil_temperature is not None else plain
        if not loss_entry(self.loss).needs_teacher_scores:
            given = [
                f
                for f in ("distil_temperature", "teacher_temperature", "distill_weight")
                if getattr(self, f) is not None
            ]
            if given:
                raise UsageError(f"--{given[0]} needs a distillation loss (--loss kl or margin_mse)")
            return
        if self.distill_weight is None:
            self.distill_weight = 1.0
        if not 0.0 <= self.distill_weight <= 1.0:
            raise UsageError(f"--distill_weight must be in [0, 1], got {self.distill_weight}")
        for name in ("distil_temperature", "teacher_temperature"):
            value = getattr(self, name)
            if self.loss == "margin_mse" and value is not None:
                raise UsageError(f"--{name} is used by --loss kl only (margin_mse compares raw margins)")
            if value is not None and not value > 0:
                raise UsageError(f"--{name} must be > 0, got {value}")

    def _check_matryoshka(self) -> None:
        """Parse --matryoshka_dims / --matryoshka_weights now (a bad value is a UsageError before any
        loading); --truncate_dim must name one of the trained prefixes."""
        from dr.train.losses.matryoshka import parse_dims, parse_weights

        dims = parse_dims(self.matryoshka_dims)
        if self.matryoshka_weights and not dims:
            raise UsageError("--matryoshka_weights needs --matryoshka_dims")
        parse_weights(self.matryoshka_weights, len(dims))
        if self.truncate_dim is not None and self.truncate_dim not in dims:
            raise UsageError(
                f"--truncate_dim {self.truncate_dim} must be one of --matryoshka_dims "
                f"({self.matryoshka_dims or 'none given'}): only trained prefixes are good vectors alone"
            )


@contextlib.contextmanager
def _bf16_allowed_on_cpu() -> Iterator[None]:
    """Let `--bf16 --deepspeed` pass TrainingArguments' device check on a machine without a GPU.

    Still needed with transformers 5.25 (checked by `test_bf16_deepspeed_on_cpu_still_needs_the_patch` in
    tests/train/test_train.py, which fails once upstream accepts the combination): `TrainingArguments.__post_init__`
    raises "Your setup doesn't support bf16/gpu. You need to assign use_cpu ..." for `bf16` unless `use_cpu`
    is set or a bf16 GPU is found. A DeepSpeed run cannot set `use_cpu` (the same `__post_init__` then builds
    a plain CPU `PartialState` instead of DeepSpeed's), and DeepSpeed brings its own CPU accelerator, whose
    bf16 works. So the GPU probe answers yes for the one validation call, and only there.
    """
    from transformers import training_args

    saved = training_args.is_torch_bf16_gpu_available
    training_args.is_torch_bf16_gpu_available = lambda: True
    try:
        yield
    finally:
        training_args.is_torch_bf16_gpu_available = saved
