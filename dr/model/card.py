"""The model card (README.md) of a model folder `dr train` writes, in Hugging Face's conventions.

YAML front matter (what the hub indexes: base model, library, tags, datasets, pipeline tag), then what a
reader needs to reuse or reproduce the model: how it encodes, how to load it, the training command and its
resolved arguments, the data, and, once `dr pipeline` evaluated it, the metrics (`update_card_metrics`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from dr.io.atomic import write_text_atomic

CARD_NAME = "README.md"
TAGS = ["sentence-transformers", "feature-extraction", "sentence-similarity", "dr"]
_METRICS_START, _METRICS_END = "<!-- dr:metrics:start -->", "<!-- dr:metrics:end -->"
_NO_METRICS = "Not evaluated yet (`dr pipeline` fills this section in when it evaluates the model)."


def write_model_card(
    model_dir: str | os.PathLike,
    *,
    base_model: str,
    encoder_config: Mapping[str, Any],
    command: str | None,
    arguments: Mapping[str, Any],
    dataset: str | None = None,
    st_files: bool = True,
) -> Path:
    """Write `<model_dir>/README.md` (atomically) and return its path.

    `dataset` goes into the front matter only when it looks like a hub dataset name (`owner/name`, not a
    local path): the hub links that field. `st_files`: whether the folder holds sentence-transformers files.
    """
    meta: dict[str, Any] = {"base_model": base_model, "library_name": "sentence-transformers", "tags": TAGS}
    if dataset and _is_hub_name(dataset):
        meta["datasets"] = [dataset]
    meta["pipeline_tag"] = "sentence-similarity"
    cfg = dict(encoder_config)
    normalize = bool(cfg.get("normalize"))
    settings = [
        ("pooling", cfg.get("pooling")),
        ("normalize", normalize),
        ("similarity", "cosine" if normalize else "dot product"),
        ("query prefix", repr(cfg.get("query_prefix", ""))),
        ("passage prefix", repr(cfg.get("passage_prefix", ""))),
        ("query / passage max tokens", f"{cfg.get('q_max_len')} / {cfg.get('p_max_len')}"),
        ("separate query and passage encoders", bool(cfg.get("untie_encoder"))),
    ]
    usage = (
        "```python\nfrom sentence_transformers import SentenceTransformer\n\n"
        'model = SentenceTransformer("path/to/this/folder")\n'
        'queries = model.encode_query(["what about apples"])  # applies the query prefix\n'
        'passages = model.encode_document(["Apples are ..."])  # applies the passage prefix\n'
        "scores = model.similarity(queries, passages)\n```\n"
        if st_files
        else "This folder has no sentence-transformers files (see docs/interop.md); load it with dr.\n"
    )
    body = [
        f"# {Path(model_dir).name}",
        "",
        f"A bi-encoder fine-tuned from `{base_model}` with [dr](https://github.com/) (dense retrieval).",
        "",
        "## How it encodes",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in settings],
        "",
        "## Usage",
        "",
        usage,
        "With dr: `dr encode --model_name_or_path path/to/this/folder ...` (settings from `dr_config.json`).",
        "",
        "## Training",
        "",
        *(["```bash", command, "```"] if command else ["Started from Python; the arguments are below."]),
        "",
        "Data: " + (f"`{dataset}`" if dataset else "not recorded") + ".",
        "",
        "<details><summary>Resolved arguments</summary>",
        "",
        "```json",
        json.dumps(dict(arguments), indent=2, sort_keys=True, default=str),
        "```",
        "",
        "</details>",
        "",
        "## Evaluation",
        "",
        _METRICS_START,
        _NO_METRICS,
        _METRICS_END,
        "",
    ]
    text = "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + "\n".join(body)
    path = Path(model_dir) / CARD_NAME
    write_text_atomic(path, text)
    return path


def write_training_card(
    output_dir: str | os.PathLike, model_args: Any, data_args: Any, resolved: Mapping[str, Any]
) -> Path:
    """The card of a model `dr train` just saved (`resolved`: the arguments it records in dr_train_args.json)."""
    return write_model_card(
        output_dir,
        base_model=model_args.model_name_or_path,
        encoder_config=resolved.get("encoder_config", {}),
        command=_command_line(),
        arguments=resolved,
        dataset=data_args.dataset_name,
        st_files=(Path(output_dir) / "modules.json").is_file(),
    )


def _command_line(argv: list[str] | None = None) -> str | None:
    """This process's command line as `dr train ...` / `python -m dr.train ...`, or None (called from Python)."""
    argv = sys.argv if argv is None else argv
    if "train" in argv[:2] and Path(argv[0]).name in ("dr", "cli.py", "__main__.py"):
        return "dr train " + shlex.join(argv[argv.index("train") + 1 :])
    if Path(argv[0]).as_posix().endswith("dr/train/__main__.py"):
        return "python -m dr.train " + shlex.join(argv[1:])
    return None


def update_card_metrics(
    model_dir: str | os.PathLike, metrics: Mapping[str, Any], dataset: str | None = None
) -> Path:
    """Replace the card's Evaluation section with `metrics` ({name: value}; what `dr eval` reports) as a
    table, and record them in the front matter (`dr_metrics`, with `dataset` when given). Calling it again
    replaces the earlier metrics. A folder without a card gets a minimal one."""
    path = Path(model_dir) / CARD_NAME
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    meta, body = _split(text)
    if _METRICS_START not in body:
        body = body.rstrip("\n") + f"\n\n## Evaluation\n\n{_METRICS_START}\n{_METRICS_END}\n"
    rows = [f"| {name} | {_value(value)} |" for name, value in metrics.items()]
    table = "\n".join(
        ([f"On `{dataset}`:", ""] if dataset else []) + ["| metric | value |", "|---|---|", *rows]
    )
    start, end = body.index(_METRICS_START), body.index(_METRICS_END)
    body = body[: start + len(_METRICS_START)] + "\n" + table + "\n" + body[end:]
    meta["dr_metrics"] = (
        {"dataset": dataset, **{k: _plain(v) for k, v in metrics.items()}}
        if dataset
        else {k: _plain(v) for k, v in metrics.items()}
    )
    write_text_atomic(path, "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n" + body)
    return path


def _split(text: str) -> tuple[dict[str, Any], str]:
    """(front matter, body) of a card; ({}, text) when it has no front matter."""
    match = re.match(r"---\n(.*?)\n---\n", text, flags=re.DOTALL)
    if not match:
        return {}, text
    return yaml.safe_load(match.group(1)) or {}, text[match.end() :]


def _is_hub_name(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not Path(name).exists()


def _plain(value: Any) -> Any:
    """A YAML-safe scalar (numpy numbers become Python numbers)."""
    return value.item() if hasattr(value, "item") else value


def _value(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
