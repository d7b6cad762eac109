"""Validate a whole pipeline config before its first stage runs.

Without this a wrong type surfaced as a TypeError traceback (`run_dir: [1, 2]`), and a bad value of a late
stage (`search.depth: -1`) only after training and encoding had run for minutes. Two passes:
- `check_types`: every known key has the type it must have (strings, integers, mappings, lists), and the
  optional second stages fit together (`check_second_stages`: fuse needs bm25, no key the pipeline sets);
- `check_stage_flags`: each stage's command line is parsed, in this process, by that command's own parser
  (`dr.cli.COMMANDS[...].build_parser()` + `dr.flags.parse_flags`), so an unknown flag, a bad choice or a
  bad number is reported naming the stage, and nothing has run yet.
YAML 1.1 reads `no`/`yes`/`off`/`on` as booleans; for a choice flag (`save_strategy: no`) the boolean is
mapped back to the choice it spells (`fix_bool_choices`) instead of failing with "invalid choice: 'false'".
"""

from __future__ import annotations

import importlib
from typing import Any

from dr.errors import UsageError
from dr.flags import bool_choice

# Which command parses which config section (model flags go to train and encode alike).
_SECTION_COMMANDS = {
    "model": ("train", "encode"),
    "train": ("train",),
    "search": ("search",),
    "bm25": ("bm25",),
    "fuse": ("fuse",),
    "rerank": ("rerank",),
    "rerank_fuse": ("fuse",),
}
_ENCODE_FLAG_SECTIONS = ("corpus_flags", "query_flags")
# Flags of the second stages that the pipeline sets itself (inputs from the encode section, outputs in
# RUN_DIR, formats); a config that sets one would silently lose it, so it is an error instead.
_FUSE_FLAGS = {"runs", "run_formats", "save_ranking_to", "run_format", "format"}  # both fusion stages
PIPELINE_FLAGS = {
    "bm25": {"corpus", "queries", "query_split", "index_dir", "save_ranking_to", "run_format", "format"},
    "fuse": _FUSE_FLAGS,
    "rerank_fuse": _FUSE_FLAGS,
    "rerank": {
        "run", "run_file", "input_run_format", "corpus", "queries", "query_split", "save_ranking_to",
        "run_format", "format", "num_shards", "shard_index", "overwrite",
    },
}  # fmt: skip


class ConfigTypeError(UsageError):
    """A pipeline config value of the wrong type or a stage flag its command rejects (exit status 2)."""


def _need(value: Any, types: type | tuple[type, ...], key: str, what: str) -> None:
    """`value` (None: absent) is of `types`; a YAML boolean never counts as a number."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, types):
        raise ConfigTypeError(f"{key}: expected {what}, got {type(value).__name__} ({value!r})")


def check_types(data: dict[str, Any]) -> None:
    """Type-check the known keys of a raw config (before paths and defaults are derived from them)."""
    _need(data.get("run_dir"), str, "run_dir", "a path (string)")
    for section in ("model", "search", "eval", "encode", "env", "processes"):
        _need(data.get(section), dict, section, "a mapping")
    _need(data.get("train"), dict, "train", "a mapping of dr train flags, or null (zero-shot)")
    _need(data.get("stage_timeout_s"), (int, float), "stage_timeout_s", "a number of seconds, or null")
    if isinstance(data.get("stage_timeout_s"), (int, float)) and data["stage_timeout_s"] <= 0:
        raise ConfigTypeError(
            f"stage_timeout_s: expected a positive number or null, got {data['stage_timeout_s']}"
        )
    encode = data.get("encode") or {}
    for key in ("corpus", "queries", "corpus_split", "queries_split"):
        _need(encode.get(key), str, f"encode.{key}", "a string")
    _need(encode.get("num_shards"), int, "encode.num_shards", "an integer >= 1")
    if isinstance(encode.get("num_shards"), int) and encode["num_shards"] < 1:
        raise ConfigTypeError(f"encode.num_shards: expected an integer >= 1, got {encode['num_shards']}")
    for key in _ENCODE_FLAG_SECTIONS:
        _need(encode.get(key), dict, f"encode.{key}", "a mapping of dr encode flags")
    evaluation = data.get("eval") or {}
    _need(evaluation.get("qrels"), str, "eval.qrels", "a path (string)")
    _need(evaluation.get("run_format"), str, "eval.run_format", "a string")
    metrics = evaluation.get("metrics")
    if metrics is not None and (
        not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics)
    ):
        raise ConfigTypeError(f"eval.metrics: expected a list of metric names, got {metrics!r}")
    for key, value in (data.get("env") or {}).items():
        if isinstance(value, (dict, list)):
            raise ConfigTypeError(f"env.{key}: expected a string, got {type(value).__name__}")
    check_second_stages(data)


def check_second_stages(data: dict[str, Any]) -> None:
    """The optional sections bm25, fuse, rerank and rerank_fuse: each a mapping of its command's flags or
    null (off), none setting a flag the pipeline sets, fuse only with bm25 (it fuses the dense and the bm25
    run), rerank_fuse only with rerank (it fuses the reranked run with the run rerank read)."""
    for section, reserved in PIPELINE_FLAGS.items():
        flags = data.get(section)
        _need(flags, dict, section, f"a mapping of dr {section} flags, or null (off)")
        taken = sorted(set(flags or {}) & reserved)
        if taken:
            raise ConfigTypeError(
                f"{section}: {taken} are set by the pipeline (inputs from the encode section, outputs in "
                "run_dir); remove them"
            )
    fuse, rerank = data.get("fuse"), data.get("rerank")
    if fuse is not None and data.get("bm25") is None:
        raise ConfigTypeError(
            "fuse: needs a bm25 section (fuse combines the dense run with the bm25 run); add `bm25: {}` "
            "or remove fuse"
        )
    if data.get("rerank_fuse") is not None and rerank is None:
        raise ConfigTypeError(
            "rerank_fuse: needs a rerank section (it fuses the reranked run with the run rerank read); add "
            "rerank or remove rerank_fuse"
        )
    for section in ("fuse", "rerank_fuse"):
        flags = data.get(section) or {}
        if flags.get("normalize") is not None and flags.get("method", "rrf") != "linear":
            raise ConfigTypeError(f"{section}.normalize: applies to method: linear only (rrf fuses ranks)")
    if rerank is not None and not rerank.get("model_name_or_path"):
        raise ConfigTypeError("rerank.model_name_or_path: required (the cross-encoder's folder)")
    split = (data.get("encode") or {}).get("corpus_split")
    if split not in (None, "train") and (data.get("bm25") is not None or rerank is not None):
        raise ConfigTypeError(
            f"encode.corpus_split: {split!r}: dr bm25 and dr rerank read a corpus's train split only; "
            "use a corpus file or folder"
        )


def _parser(command: str):
    from dr.cli import COMMANDS

    return importlib.import_module(COMMANDS[command][0]).build_parser()


def _choice_action(parser: Any, key: str) -> Any:
    for action in parser._actions:  # argparse has no public lookup by flag name
        if action.dest == key or f"--{key}" in action.option_strings:
            return action if action.choices else None
    return None


def _fix_section(flags: dict[str, Any] | None, commands: tuple[str, ...], label: str, parsers: dict) -> None:
    for key, value in list((flags or {}).items()):
        if not isinstance(value, bool):
            continue
        for command in commands:
            parser = parsers.setdefault(command, _parser(command))
            action = _choice_action(parser, key)
            if action is None:
                continue
            choice = bool_choice(value, action.choices)
            if choice is None:
                raise ConfigTypeError(
                    f"{label}.{key}: YAML read the value as the boolean {str(value).lower()}; choose one of "
                    f"{list(action.choices)} (quote it, e.g. '{key}: \"no\"')"
                )
            flags[key] = choice


def fix_bool_choices(cfg: dict[str, Any]) -> None:
    """Map YAML booleans of choice flags back to the word they were written as (`no` -> "no"), in place."""
    parsers: dict[str, Any] = {}
    for section, commands in _SECTION_COMMANDS.items():
        _fix_section(cfg.get(section), commands, section, parsers)
    encode = cfg.get("encode") or {}
    shared = {k: v for k, v in encode.items() if not isinstance(v, dict)}
    _fix_section(shared, ("encode",), "encode", parsers)
    encode.update({k: v for k, v in shared.items() if k in encode})
    for key in _ENCODE_FLAG_SECTIONS:
        _fix_section(encode.get(key), ("encode",), f"encode.{key}", parsers)


_MODULE_COMMANDS = {
    "dr.train": "train",
    "dr.encode": "encode",
    "dr.search": "search",
    "dr.convert": "convert",
    "dr.evaluate": "eval",
    "dr.bm25": "bm25",
    "dr.fuse": "fuse",
    "dr.rerank": "rerank",
}


def check_stage_flags(steps: list[Any]) -> None:
    """Parse every step's flags with its command's parser, without running it; the first error names the
    step (so `search.depth: -1` fails before training starts)."""
    from dr.flags import parse_flags

    parsers: dict[str, Any] = {}
    for step in steps:
        at = len(step.cmd) - 1 - step.cmd[::-1].index("-m")  # the last `-m MODULE` (after torchrun's)
        command = _MODULE_COMMANDS[step.cmd[at + 1]]
        parser = parsers.setdefault(command, _parser(command))
        try:
            parse_flags(parser, step.cmd[at + 2 :])
        except UsageError as err:
            raise ConfigTypeError(f"stage {step.name} (dr {command}): {err}") from err
