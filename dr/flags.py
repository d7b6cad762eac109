"""Command-line / config-file arguments for every `dr` command that loads a model.

Flags follow Tevatron's reference commands (v1 spellings) and accept the newer spellings as aliases, so a
Tevatron user can paste their command and only change the program name. Arguments are dataclasses parsed
by `transformers.HfArgumentParser`; `--config FILE` (YAML or JSON) provides defaults that flags override.
Each field is documented where it is declared and validated in `__post_init__` with an error naming it.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

from dr.io.paths import expand_home

POOLINGS = ("cls", "mean", "last")


class ConfigError(ValueError):
    """A flag or config-file value is unknown or invalid; the message names it."""


@dataclass
class ModelArguments:
    """Which encoder to start from and how a sequence becomes one vector."""

    model_name_or_path: str = field(
        metadata={"help": "Hugging Face model name or local folder (a `dr train` output folder works too)."}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's own."})
    pooling: str | None = field(
        default=None,
        metadata={
            "help": "cls | mean | last (last non-padding token, for decoder backbones). Default: the model's "
            "dr_config.json if it has one, else cls (Tevatron's default for BERT)."
        },
    )
    normalize: bool | None = field(
        default=None,
        metadata={
            "help": "L2-normalise vectors (cosine similarity). Default: dr_config.json, else false.",
            "nargs": "?",
            "const": True,
        },
    )
    append_eos: bool | None = field(
        default=None,
        metadata={
            "help": "End every query and passage with the tokenizer's EOS token. Default: dr_config.json, "
            "else on for --pooling last (decoder backbones: the pooled state is then the EOS token's) "
            "unless the tokenizer already ends texts with EOS.",
            "nargs": "?",
            "const": True,
        },
    )
    untie_encoder: bool = field(
        default=False,
        metadata={"help": "Separate query and passage encoders (both start from the same weights)."},
    )
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Scores are divided by this before the softmax. 1.0 = plain dot product (Tevatron v1); "
            "use ~0.01-0.05 with --normalize."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded hub models are cached."})
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (PEFT) instead of all weights."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated module names to adapt (e.g. q_proj,k_proj,v_proj,o_proj for decoders, "
            "query,key,value for BERT). Default: PEFT's choice for the architecture."
        },
    )
    lora_name_or_path: str | None = field(
        default=None,
        metadata={"help": "LoRA adapters to load on top of --model_name_or_path (merged for encoding)."},
    )

    def __post_init__(self) -> None:
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ConfigError(f"--pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature must be > 0, got {self.temperature}")
        if self.lora_r < 1 or not 0 <= self.lora_dropout < 1:
            raise ConfigError(
                f"--lora_r must be >= 1 and --lora_dropout in [0, 1), got {self.lora_r}, {self.lora_dropout}"
            )

    def lora_settings(self) -> dict[str, Any] | None:
        """Settings for new adapters (None without --lora)."""
        if not self.lora:
            return None
        targets = (
            [m.strip() for m in self.lora_target_modules.split(",")] if self.lora_target_modules else None
        )
        return {
            "r": self.lora_r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": targets,
        }


@dataclass
class DataArguments:
    """Where the text comes from and how it is cut into token sequences."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset (e.g. Tevatron/msmarco-passage, optionally /SPLIT) or local data: a JSONL/"
            "Parquet file, a glob, a folder of such files, or a BEIR-style folder (corpus.jsonl + queries + qrels).",
            "aliases": ["--train_dir", "--dataset_path"],
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to read (train, dev, test, ...)."})
    train_n_passages: int = field(
        default=8,
        metadata={
            "help": "Passages per query in a training group: 1 positive + (n-1) negatives.",
            "aliases": ["--train_group_size"],
        },
    )
    q_max_len: int | None = field(
        default=None,
        metadata={
            "help": "Maximum query length in tokens. Default: the model's dr_config.json, else 32.",
            "aliases": ["--query_max_len"],
        },
    )
    p_max_len: int | None = field(
        default=None,
        metadata={
            "help": "Maximum passage length in tokens. Default: the model's dr_config.json, else 128.",
            "aliases": ["--passage_max_len"],
        },
    )
    query_prefix: str = field(
        default="", metadata={"help": "Text prepended to every query (e.g. 'query: ')."}
    )
    passage_prefix: str = field(
        default="", metadata={"help": "Text prepended to every passage (e.g. 'passage: ')."}
    )
    pad_to_multiple_of: int = field(
        default=8, metadata={"help": "Pad batches to a multiple of this (tensor cores)."}
    )

    def __post_init__(self) -> None:
        for name in ("train_n_passages", "q_max_len", "p_max_len", "pad_to_multiple_of"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")


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
            raise ConfigError(
                f"--gc_q_chunk_size and --gc_p_chunk_size must be >= 1, got {self.gc_q_chunk_size}, {self.gc_p_chunk_size}"
            )
        if self.report_to in (None, "all", ["all"]):
            self.report_to = "none"
        import torch

        if not torch.cuda.is_available() and not self.deepspeed:
            # accelerate treats a multi-process launch as distributed (gloo) only when told it is on the CPU.
            self.use_cpu = True
        if self.deepspeed:
            _single_process_rendezvous()
        cpu_deepspeed = not torch.cuda.is_available() and bool(self.deepspeed)
        if cpu_deepspeed and self.accelerator_config is None:
            _configure_deepspeed_on_cpu()
            self.accelerator_config = {"use_configured_state": True}
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


def _single_process_rendezvous() -> None:
    """torch.distributed variables for a DeepSpeed run started without a launcher (plain `python`).

    DeepSpeed looks for MPI unless RANK/WORLD_SIZE/... are set; a launcher sets them, so only an
    unlaunched run gets a one-process rendezvous on a free local port.
    """
    import os
    import socket

    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }.items():
        os.environ.setdefault(key, value)


def _configure_deepspeed_on_cpu() -> None:
    """Create accelerate's (singleton) DeepSpeed state with the gloo backend.

    TrainingArguments would otherwise ask accelerate for a DeepSpeed state without naming a backend, which
    on a machine without GPUs silently becomes a one-process run (world size 1 on every rank).
    """
    import os

    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML or JSON mapping of flag name -> value."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:
        raise ConfigError(f"--config {path}: cannot parse: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag -> value, got {type(data).__name__}")
    return data


def _split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take `--config FILE` / `--config=FILE` out of argv."""
    rest, config = [], None
    it = iter(range(len(argv)))
    for i in it:
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file path")
            config = argv[i + 1]
            next(it, None)
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return config, rest


def parse_args(dataclass_types: tuple[type, ...], argv: list[str] | None = None) -> tuple[Any, ...]:
    """Parse flags (and an optional `--config FILE`) into the given dataclasses.

    Precedence: command line > config file > dataclass defaults. Unknown flags or config keys raise
    `ConfigError` naming them; invalid values raise the dataclass's own `ConfigError`/`ValueError`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path, argv = _split_config_flag(argv)
    parser = HfArgumentParser(dataclass_types)
    if config_path:
        values = load_config_file(config_path)
        known = {f.name for dc in dataclass_types for f in fields(dc)}
        aliases = {}
        for action in parser._actions:  # map alias spellings (train_group_size, ...) to field names
            for opt in action.option_strings:
                aliases[opt.lstrip("-")] = action.dest
        unknown = [k for k in values if k not in known and k not in aliases]
        if unknown:
            raise ConfigError(f"--config {config_path}: unknown keys {unknown}")
        values = {aliases.get(k, k): v for k, v in values.items()}
        parser.set_defaults(**values)
        for action in parser._actions:  # a value from the file satisfies a required flag
            if action.dest in values:
                action.required = False

    def fail(message: str) -> None:  # argparse would print the whole usage and exit 2
        raise ConfigError(message)

    parser.error = fail  # type: ignore[method-assign]
    parsed, unknown_args = parser.parse_known_args(argv)
    if unknown_args:
        raise ConfigError(f"unknown arguments: {unknown_args}")
    expand_home(parsed)
    outputs = []
    for dtype in dataclass_types:
        keys = {f.name for f in fields(dtype) if f.init}
        outputs.append(dtype(**{k: v for k, v in vars(parsed).items() if k in keys}))
    return tuple(outputs)


def to_jsonable(*dataclasses_: Any) -> dict[str, Any]:
    """The resolved arguments as one flat JSON-friendly dict (saved next to every output)."""
    out: dict[str, Any] = {}
    for dc in dataclasses_:
        d = dc.to_dict() if hasattr(dc, "to_dict") else {f.name: getattr(dc, f.name) for f in fields(dc)}
        for k, v in d.items():
            if k.startswith("_") or "token" in k and "hub" in k:
                continue
            out[k] = v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)
    return out
