"""One command-line convention for every `dr` command: flags, `--config` files, booleans, aliases.

Every command builds an `argparse.ArgumentParser` (`build_parser()`; train and encode use
`transformers.HfArgumentParser`, an ArgumentParser over dataclasses) and `parse_flags` reads argv with it:

- `--config FILE` (YAML or JSON mapping of flag -> value, either spelling) gives defaults that flags
  override: command line > config file > defaults;
- booleans are `--flag`, `--flag true|false|yes|no|1|0` everywhere (`add_bool`), as HfArgumentParser does,
  so `dr pipeline` and config files write them one way for every command;
- unknown flags or keys and invalid values raise `ConfigError` (a `UsageError`: exit status 2);
- a leading `~` in any value is expanded (values from files and `--flag=~/x` reach us unexpanded).

The flag dataclasses shared by every command that loads a model (`ModelArguments`, `DataArguments`) live
here too; Tevatron's v1 spellings come first, the newer ones are aliases.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dr.errors import UsageError
from dr.io.paths import expand_home, expand_tilde
from dr.model import POOLINGS


class ConfigError(UsageError):
    """A flag or config-file value is unknown or invalid; the message names it (exit status 2)."""


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
    ignore_st_config: bool = field(
        default=False,
        metadata={
            "help": "Do not read pooling / normalize / prompts from a sentence-transformers folder "
            "(modules.json) without dr_config.json, and let flags contradict them (see docs/interop.md)."
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
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel passed to from_pretrained (eager | sdpa | flash_attention_2)."},
    )
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
    query_prefix: str | None = field(
        default=None,
        metadata={
            "help": "Text prepended to every query (e.g. 'query: '). Default: the model's dr_config.json, "
            "else none; an empty string clears a saved prefix."
        },
    )
    passage_prefix: str | None = field(
        default=None,
        metadata={
            "help": "Text prepended to every passage (e.g. 'passage: '). Default: the model's "
            "dr_config.json, else none; an empty string clears a saved prefix."
        },
    )
    pad_to_multiple_of: int = field(
        default=8, metadata={"help": "Pad batches to a multiple of this (tensor cores)."}
    )

    def __post_init__(self) -> None:
        for name in ("train_n_passages", "q_max_len", "p_max_len", "pad_to_multiple_of"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")


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


def str_to_bool(value: str | bool) -> bool:
    """`true/false`, `yes/no`, `1/0`, `on/off` (any case) -> bool; anything else is a usage error."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on", "y", "t"):
        return True
    if text in ("false", "no", "0", "off", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def bool_choice(value: bool, choices: Any) -> str | None:
    """The choice a YAML 1.1 boolean was written as (`no`, `off`, `false`, `none` / `yes`, `on`, `true`),
    or None when no choice is such a word."""
    words = ("no", "false", "off", "none") if value is False else ("yes", "true", "on")
    names = [str(c) for c in choices]
    return next((w for w in words if w in names), None)


def add_bool(
    parser: argparse.ArgumentParser | Any, *names: str, default: bool = False, help: str = ""
) -> None:
    """A boolean flag in the one spelling every command accepts: `--flag`, `--flag true|false`."""
    parser.add_argument(*names, type=str_to_bool, nargs="?", const=True, default=default, help=help)


def dataclass_parser(
    dataclass_types: tuple[type, ...], prog: str, description: str = ""
) -> argparse.ArgumentParser:
    """An `HfArgumentParser` over flag dataclasses (imported here: transformers is heavy)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types, prog=prog, description=description)
    parser.dataclass_types_ = dataclass_types  # for `to_dataclasses`
    return parser


def parse_flags(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse argv (and an optional `--config FILE`) with `parser`; see the module docstring.

    Precedence: command line > config file > defaults. Unknown flags or config keys raise `ConfigError`
    naming them, as does any value argparse rejects (instead of printing the usage and exiting).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    own_config_flag = any("--config" in action.option_strings for action in parser._actions)
    config_path, argv = (None, argv) if own_config_flag else _split_config_flag(argv)
    if config_path:
        values = load_config_file(expand_tilde(config_path))
        aliases = {}
        for action in parser._actions:  # map every spelling (train_group_size, ...) to its dest
            for opt in action.option_strings:
                aliases[opt.lstrip("-")] = action.dest
            aliases.setdefault(action.dest, action.dest)
        unknown = [k for k in values if k not in aliases or k in ("help", "h")]
        if unknown:
            raise ConfigError(f"--config {config_path}: unknown keys {unknown}")
        values = {aliases[k]: v for k, v in values.items()}
        for action in parser._actions:  # YAML reads `save_strategy: no` as false: give back the word
            if action.dest in values and isinstance(values[action.dest], bool) and action.choices:
                word = bool_choice(values[action.dest], action.choices)
                if word is None:
                    raise ConfigError(
                        f"--config {config_path}: {action.dest}: YAML read the value as the boolean "
                        f"{str(values[action.dest]).lower()}; choose one of {list(action.choices)} (quote it)"
                    )
                values[action.dest] = word
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
    return expand_home(parsed)


def to_dataclasses(
    args: argparse.Namespace, dataclass_types: tuple[type, ...], **extra: Any
) -> tuple[Any, ...]:
    """Build each flag dataclass from the parsed namespace (their `__post_init__` validates the values).

    `extra` are values for fields that are not flags (e.g. what `dr.distributed.prepare_launch` decided).
    """
    outputs = []
    for dtype in dataclass_types:
        keys = {f.name for f in fields(dtype) if f.init}
        values = {k: v for k, v in vars(args).items() if k in keys}
        values.update({k: v for k, v in extra.items() if k in keys})
        outputs.append(dtype(**values))
    return tuple(outputs)


def parse_dataclasses(
    dataclass_types: tuple[type, ...], argv: list[str] | None = None, prog: str = "dr"
) -> tuple[Any, ...]:
    """argv (and `--config FILE`) -> one instance of each flag dataclass: `parse_flags` + `to_dataclasses`,
    for library callers that want the argument objects of `dr train` / `dr encode` without running them."""
    return to_dataclasses(parse_flags(dataclass_parser(dataclass_types, prog), argv), dataclass_types)


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
