"""The sentence-transformers folder format, both ways: what a dr model folder adds so that
`SentenceTransformer(path)` encodes as `dr encode` does, and what dr reads from a sentence-transformers
folder so that `dr encode` encodes as `SentenceTransformer(path)` does.

Out (`write_st_files`): `modules.json` (Transformer -> Pooling [-> Normalize]), `1_Pooling/config.json`,
`2_Normalize/` when normalised, `sentence_bert_config.json` (max_seq_length = the passage max length),
`config_sentence_transformers.json` (the query / passage prefixes as the prompts "query" / "document",
which `encode_query` / `encode_document` apply; similarity "cosine" when normalised, else "dot";
`truncate_dim` when the model keeps a vector prefix).
Untied encoders become a `Router` whose "query" and "document" routes are the `query_model/` and
`passage_model/` folders (each gets a copy of the tokenizer files, as a Router route must hold its own).
A model that appends EOS to every text gets no sentence-transformers files: the package does not append
it, so its vectors would differ; `write_st_files` says so and removes stale ones.

In (`read_st_settings`): pooling, normalisation, prompts and truncate_dim of a folder that has `modules.json`, as
`EncoderConfig` field values. Modules dr cannot reproduce (Dense, max pooling, ...) are an `InputError`.

Pure JSON on both sides: no torch, no sentence-transformers needed (the tests check against the package).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dr.errors import InputError
from dr.io.atomic import write_json_atomic
from dr.model import DR_CONFIG_NAME
from dr.model.config import PASSAGE_SUBDIR, QUERY_SUBDIR, EncoderConfig

MODULES = "modules.json"
ST_CONFIG = "config_sentence_transformers.json"
TRANSFORMER_CONFIG = "sentence_bert_config.json"
ROUTER_CONFIG = "router_config.json"
POOLING_DIR, NORMALIZE_DIR = "1_Pooling", "2_Normalize"
# Every file / folder `write_st_files` may create at the top of a model folder (removed before rewriting).
ST_TOP_LEVEL = (MODULES, ST_CONFIG, TRANSFORMER_CONFIG, ROUTER_CONFIG, POOLING_DIR, NORMALIZE_DIR)

# dr pooling <-> sentence-transformers pooling mode (and its legacy `pooling_mode_*` boolean key).
_TO_ST_POOLING = {"cls": "cls", "mean": "mean", "last": "lasttoken"}
_FROM_ST_POOLING = {v: k for k, v in _TO_ST_POOLING.items()}
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# The module type names every sentence-transformers release since 3 resolves (newer ones map them on).
_TYPE = {
    "Transformer": "sentence_transformers.models.Transformer",
    "Pooling": "sentence_transformers.models.Pooling",
    "Normalize": "sentence_transformers.models.Normalize",
    "Router": "sentence_transformers.models.Router",
}
# Route names sentence-transformers uses for passages (`encode_document` tries them in this order).
_DOCUMENT_PROMPTS = ("document", "passage", "corpus")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "*.model",
    "chat_template.*",
)


# ---- out: a dr model folder -> also a sentence-transformers folder -------------------------------------
def st_unsupported_reason(config: EncoderConfig) -> str | None:
    """Why sentence-transformers cannot reproduce this model's vectors, or None when it can."""
    if config.append_eos:
        return (
            "the model appends EOS to every text (append_eos) and sentence-transformers does not, so its "
            "vectors would differ from dr encode's"
        )
    return None


def write_st_files(
    model_dir: str | os.PathLike, config: EncoderConfig | None = None, dim: int | None = None
) -> str | None:
    """Make a dr model folder loadable by `SentenceTransformer(model_dir)`; None when done, else the reason
    it cannot be (any earlier sentence-transformers files are then removed, so none contradicts the model).

    `config` defaults to the folder's dr_config.json, `dim` (the hidden size) to its config.json. The
    weights and tokenizer must already be in the folder (untied: `query_model/`, `passage_model/`).
    """
    folder = Path(model_dir)
    if config is None:
        config = EncoderConfig.load(folder)
        if config is None:
            raise InputError(f"{folder}: no {DR_CONFIG_NAME}: not a dr model folder")
    remove_st_files(folder)
    reason = st_unsupported_reason(config)
    if reason is not None:
        return reason
    untied = (folder / QUERY_SUBDIR).is_dir() and (folder / PASSAGE_SUBDIR).is_dir()
    encoder_dirs = [folder / QUERY_SUBDIR, folder / PASSAGE_SUBDIR] if untied else [folder]
    dim = dim or _hidden_size(encoder_dirs[0])
    if untied:
        for sub, max_len in zip(encoder_dirs, (config.q_max_len, config.p_max_len)):
            _copy_tokenizer_files(folder, sub)
            write_json_atomic(sub / TRANSFORMER_CONFIG, {"max_seq_length": max_len, "do_lower_case": False})
        write_json_atomic(
            folder / ROUTER_CONFIG,
            {
                "types": {QUERY_SUBDIR: _TYPE["Transformer"], PASSAGE_SUBDIR: _TYPE["Transformer"]},
                "structure": {"query": [QUERY_SUBDIR], "document": [PASSAGE_SUBDIR]},
                "parameters": {"default_route": "document", "allow_empty_key": True},
            },
        )
    else:
        # One Transformer for both sides: its max length is the passages' (queries longer than
        # q_max_len tokens are truncated later than dr truncates them; see docs/interop.md).
        write_json_atomic(
            folder / TRANSFORMER_CONFIG, {"max_seq_length": config.p_max_len, "do_lower_case": False}
        )
    modules = [{"idx": 0, "name": "0", "path": "", "type": _TYPE["Router" if untied else "Transformer"]}]
    modules.append({"idx": 1, "name": "1", "path": POOLING_DIR, "type": _TYPE["Pooling"]})
    pooling = _TO_ST_POOLING[config.pooling]
    # Legacy keys (read by every release) and no `pooling_mode`: newer releases convert the legacy keys.
    pooling_config: dict[str, Any] = {"word_embedding_dimension": dim}
    pooling_config.update({key: mode == pooling for key, mode in _LEGACY_POOLING_KEYS.items()})
    pooling_config["include_prompt"] = True  # dr pools over the prefix tokens too
    (folder / POOLING_DIR).mkdir(exist_ok=True)
    write_json_atomic(folder / POOLING_DIR / "config.json", pooling_config)
    if config.normalize:
        modules.append({"idx": 2, "name": "2", "path": NORMALIZE_DIR, "type": _TYPE["Normalize"]})
        (folder / NORMALIZE_DIR).mkdir(exist_ok=True)
    st_config: dict[str, Any] = {
        "model_type": "SentenceTransformer",
        "prompts": {"query": config.query_prefix, "document": config.passage_prefix},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine" if config.normalize else "dot",
    }
    if config.truncate_dim:
        # sentence-transformers cuts after its Normalize module and does not renormalise: "cosine" scores
        # (and encode(normalize_embeddings=True) vectors) equal dr's renormalised prefixes.
        st_config["truncate_dim"] = config.truncate_dim
    write_json_atomic(folder / ST_CONFIG, st_config)
    write_json_atomic(folder / MODULES, modules)  # last: modules.json is what makes it a ST folder
    return None


def remove_st_files(model_dir: str | os.PathLike) -> None:
    """Remove the sentence-transformers files `write_st_files` writes at the top of `model_dir`."""
    folder = Path(model_dir)
    for name in ST_TOP_LEVEL:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _hidden_size(encoder_dir: Path) -> int:
    """The hidden size from a Hugging Face config.json (encoder or decoder spellings)."""
    config = json.loads((encoder_dir / "config.json").read_text(encoding="utf-8"))
    config = config.get("text_config", config)
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        if isinstance(config.get(key), int):
            return config[key]
    raise InputError(f"{encoder_dir / 'config.json'}: no hidden size (hidden_size, d_model, n_embd or dim)")


def _copy_tokenizer_files(source: Path, target: Path) -> None:
    for pattern in _TOKENIZER_FILES:
        for path in source.glob(pattern):
            shutil.copy2(path, target / path.name)


# ---- in: a sentence-transformers folder -> EncoderConfig values -----------------------------------------
def read_st_settings(source: str | os.PathLike, cache_dir: str | None = None) -> dict[str, Any] | None:
    """Pooling, normalize and prefixes that a sentence-transformers model declares (only the fields it
    declares: an empty prompt says nothing), or None when `source` has no modules.json.

    `source` is a local folder or a hub name (its small config files are fetched like the weights are).
    A module or setting dr cannot reproduce is an `InputError` naming it.
    """
    where = str(source)
    modules = _read_json(source, MODULES, cache_dir)
    if modules is None:
        return None
    if not isinstance(modules, list):
        raise InputError(f"{where}/{MODULES}: expected a list of modules")
    settings: dict[str, Any] = {"normalize": False}
    pooling_seen = False
    for entry in modules:
        kind = str(entry.get("type", "")).rsplit(".", 1)[-1] if isinstance(entry, dict) else ""
        path = str(entry.get("path", "")) if isinstance(entry, dict) else ""
        if kind == "Transformer":
            continue
        if kind == "Router":
            _check_router(source, path, cache_dir)
        elif kind == "Pooling" and not pooling_seen:
            settings["pooling"] = _read_pooling(source, path, cache_dir)
            pooling_seen = True
        elif kind == "Normalize":
            settings["normalize"] = True
        else:
            raise InputError(
                f"{where}/{MODULES}: module {entry.get('type') if isinstance(entry, dict) else entry!r} "
                f"({path or 'top level'}) has no dr equivalent; dr pools a transformer's states (cls, mean, "
                "last) and optionally normalises (pass --ignore_st_config to encode with flags / defaults)"
            )
    st_config = _read_json(source, ST_CONFIG, cache_dir) or {}
    prompts = st_config.get("prompts") or {}
    if isinstance(prompts, Mapping):
        if prompts.get("query"):
            settings["query_prefix"] = prompts["query"]
        document = next((prompts[name] for name in _DOCUMENT_PROMPTS if prompts.get(name)), None)
        if document:
            settings["passage_prefix"] = document
    truncate_dim = st_config.get("truncate_dim")
    if truncate_dim is not None:
        if not isinstance(truncate_dim, int) or isinstance(truncate_dim, bool) or truncate_dim < 1:
            raise InputError(
                f"{where}/{ST_CONFIG}: truncate_dim must be an integer >= 1, got {truncate_dim!r}"
            )
        settings["truncate_dim"] = truncate_dim
    return settings


def _read_pooling(source: str | os.PathLike, path: str, cache_dir: str | None) -> str:
    """The dr pooling of a Pooling module's config (new `pooling_mode` or legacy `pooling_mode_*` keys)."""
    name = f"{path}/config.json" if path else "config.json"
    config = _read_json(source, name, cache_dir) or {}
    mode = config.get("pooling_mode")
    if mode is None:
        active = [m for key, m in _LEGACY_POOLING_KEYS.items() if config.get(key)]
        mode = active if len(active) != 1 else active[0]
        mode = mode or "mean"  # what sentence-transformers assumes when no key is set
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if not isinstance(mode, str) or mode not in _FROM_ST_POOLING:
        raise InputError(
            f"{source}/{name}: pooling {mode!r} has no dr equivalent (dr has "
            f"{', '.join(_FROM_ST_POOLING)}); pass --ignore_st_config and --pooling to choose one"
        )
    if mode == "mean" and config.get("include_prompt") is False:
        raise InputError(
            f"{source}/{name}: include_prompt false (prompt tokens left out of the mean) has no dr "
            "equivalent; pass --ignore_st_config to pool over the whole text"
        )
    return _FROM_ST_POOLING[mode]


def _check_router(source: str | os.PathLike, path: str, cache_dir: str | None) -> None:
    """A Router dr can load: the layout dr writes for untied encoders (query_model/ + passage_model/)."""
    name = f"{path}/{ROUTER_CONFIG}" if path else ROUTER_CONFIG
    config = _read_json(source, name, cache_dir) or {}
    structure = config.get("structure") or {}
    if path or structure.get("query") != [QUERY_SUBDIR] or structure.get("document") != [PASSAGE_SUBDIR]:
        raise InputError(
            f"{source}/{name}: dr reads a Router only in the layout it writes itself (query route "
            f"[{QUERY_SUBDIR}], document route [{PASSAGE_SUBDIR}]); pass --ignore_st_config to skip it"
        )


def _read_json(source: str | os.PathLike, name: str, cache_dir: str | None) -> Any:
    """A JSON file of a local folder or hub repository, or None where it has none."""
    path = Path(source) / name
    if Path(source).is_dir():
        if not path.is_file():
            return None
    else:
        try:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

            path = Path(hf_hub_download(str(source), name, cache_dir=cache_dir))
        except (EntryNotFoundError, LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
            return None  # no such file (or offline and not cached): the model declares nothing here
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{source}/{name}: not valid JSON ({err})") from None
