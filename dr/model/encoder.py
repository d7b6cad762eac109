"""The bi-encoder: a Hugging Face encoder (or two, untied) + pooling + optional L2 normalisation.

`BiEncoder.forward(query=..., passage=...)` returns both sides' representations, so that DDP / DeepSpeed wrap
one module whose forward covers everything with parameters; the training loss is the trainer's
(`dr.train.losses`). Encoding-only callers use `encode_query` / `encode_passage`.

A saved model is a plain Hugging Face folder (safetensors) plus `dr_config.json` (pooling, normalize,
prefixes, max lengths) so that `dr encode` needs no repeated flags. Untied encoders are saved as
`query_model/` and `passage_model/` subfolders; the tokenizer and `dr_config.json` sit at the top.
The folder is also a sentence-transformers folder (`dr.model.st_format`), and a sentence-transformers
folder's pooling, normalisation and prompts are read when it has no dr_config.json.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, PreTrainedTokenizerBase

from dr.errors import UsageError
from dr.model import DR_CONFIG_NAME, POOLINGS
from dr.model.check import check_model_source
from dr.model.config import PASSAGE_SUBDIR, QUERY_SUBDIR, EncoderConfig
from dr.model.st_format import remove_st_files, write_st_files

logger = logging.getLogger("dr.model")

ADAPTER_CONFIG = "adapter_config.json"
# The settings a sentence-transformers folder declares (dr.model.st_format.read_st_settings), with the
# flag that sets each one (for messages).
ST_SETTINGS = {
    "pooling": "--pooling",
    "normalize": "--normalize",
    "query_prefix": "--query_prefix",
    "passage_prefix": "--passage_prefix",
}
_warned_defaults: set[str] = set()  # sources already warned about (once per process)


def check_st_flags(source: str, st_settings: Mapping[str, Any], flags: Mapping[str, Any] | None) -> None:
    """Refuse a flag that contradicts what a sentence-transformers folder declares (UsageError naming
    both): encoding it another way would silently give vectors unlike the model's own."""
    for key, flag in ST_SETTINGS.items():
        given = (flags or {}).get(key)
        if key in st_settings and given is not None and given != st_settings[key]:
            raise UsageError(
                f"{flag} {given!r} contradicts {source}'s sentence-transformers config ({key} "
                f"{st_settings[key]!r}); drop {flag}, or pass --ignore_st_config to use the flag"
            )


def _model_settings(
    source: str, flags: Mapping[str, Any] | None, ignore_st_config: bool, cache_dir: str | None
) -> EncoderConfig:
    """The EncoderConfig of `source` (folder or hub name) under `flags` (see `EncoderConfig.resolve`).

    A sentence-transformers config is read only where there is no dr_config.json (dr writes both, in
    agreement; dr_config.json wins). A source with neither gets the defaults, with a warning, once.
    """
    from dr.model.st_format import read_st_settings

    saved = EncoderConfig.load(source) if Path(source).is_dir() else None
    st_settings = None
    if saved is None and not ignore_st_config:
        st_settings = read_st_settings(source, cache_dir=cache_dir)
        if st_settings is not None:
            check_st_flags(source, st_settings, flags)
    config = EncoderConfig.resolve(saved, flags, st_settings)
    unset = [k for k in ("pooling", "normalize") if (flags or {}).get(k) is None]
    if saved is None and st_settings is None and unset and source not in _warned_defaults:
        _warned_defaults.add(source)
        if int(os.environ.get("RANK", "0")) == 0:
            logger.warning(
                "%s has no pooling information (no %s, no sentence-transformers modules.json%s): using "
                "%s pooling, normalize %s; give --pooling / --normalize to choose",
                source,
                DR_CONFIG_NAME,
                ", ignored by --ignore_st_config" if ignore_st_config else "",
                config.pooling,
                config.normalize,
            )
    return config


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Reduce token states (B, L, d) to one vector per sequence (B, d)."""
    if pooling == "cls":
        return hidden[:, 0]  # (B, d)
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, d)
    if pooling == "last":
        # Right padding (what load_tokenizer sets): the last real token is at len-1. A left-padded row
        # ends with a real token at L-1. Chosen per row, on the device (no host sync per batch).
        lengths = attention_mask.sum(1)  # (B,)
        last = torch.where(attention_mask[:, -1].bool(), attention_mask.shape[1] - 1, lengths - 1)  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, d)
    raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")


def _encoder_dirs(model_dir: Path) -> tuple[Path, Path | None]:
    """(query encoder folder, passage encoder folder or None when tied) of a saved model."""
    if (model_dir / QUERY_SUBDIR).is_dir() and (model_dir / PASSAGE_SUBDIR).is_dir():
        return model_dir / QUERY_SUBDIR, model_dir / PASSAGE_SUBDIR
    return model_dir, None


class BiEncoder(nn.Module):
    """Query/passage encoder(s) with pooling and normalisation."""

    # The Trainer must not pass `num_items_in_batch`: our loss is a per-batch mean (see dr/train/trainer.py).
    accepts_loss_kwargs = False

    def __init__(
        self,
        query_encoder: nn.Module,
        passage_encoder: nn.Module | None,
        config: EncoderConfig,
    ) -> None:
        super().__init__()
        self.query_encoder = query_encoder
        # Registered only when untied, so tied weights appear once in parameters() and state_dict().
        self.passage_encoder = passage_encoder
        self.encoder_config = config

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path: str,
        overrides: dict[str, Any] | None = None,
        cache_dir: str | None = None,
        lora: dict[str, Any] | None = None,
        lora_name_or_path: str | None = None,
        merge_lora: bool = True,
        ignore_st_config: bool = False,
        **hf_kwargs: Any,
    ) -> BiEncoder:
        """Load a `dr` output folder or any Hugging Face encoder.

        `overrides` (e.g. pooling, normalize from the command line) win over the saved dr_config.json;
        `None` values are ignored. For a plain HF model the defaults of `EncoderConfig` fill the rest.
        LoRA: a folder saved with adapters (or `lora_name_or_path`) is loaded on its base model and, with
        `merge_lora` (encoding), merged into plain weights; `lora` settings add fresh trainable adapters.
        A sentence-transformers folder's pooling / normalize / prompts fill what dr_config.json would;
        `ignore_st_config` skips them (and lets flags contradict them).
        """
        check_model_source(model_name_or_path, cache_dir=cache_dir)
        config = _model_settings(model_name_or_path, overrides, ignore_st_config, cache_dir)
        q_dir, p_dir = _encoder_dirs(Path(model_name_or_path))
        q_source = str(q_dir) if Path(model_name_or_path).is_dir() else model_name_or_path

        def load(source: str, adapter_subdir: str) -> nn.Module:
            adapters = str(Path(lora_name_or_path) / adapter_subdir) if lora_name_or_path else None
            return load_encoder(source, adapters, lora, merge_lora, cache_dir=cache_dir, **hf_kwargs)

        query_encoder = load(q_source, QUERY_SUBDIR if p_dir is not None else "")
        passage_encoder = None
        if p_dir is not None:
            passage_encoder = load(str(p_dir), PASSAGE_SUBDIR)
            config.untie_encoder = True
        elif config.untie_encoder:
            passage_encoder = load(q_source, "")
        return cls(query_encoder, passage_encoder, config)

    @property
    def config(self) -> Any:
        """The backbone's Hugging Face config (what the Trainer / DeepSpeed "auto" sizing inspect)."""
        return self.query_encoder.config

    @property
    def passage_model(self) -> nn.Module:
        return self.passage_encoder if self.passage_encoder is not None else self.query_encoder

    # ---- encoding -----------------------------------------------------------------------------------
    def _encode(
        self, encoder: nn.Module, batch: dict[str, torch.Tensor], float32: bool = False
    ) -> torch.Tensor:
        hidden = encoder(**batch, return_dict=True).last_hidden_state  # (B, L, d)
        if float32:  # a model cast to bf16/fp16 for encoding: pool and normalise at full precision
            hidden = hidden.float()
        reps = pool(hidden, batch["attention_mask"], self.encoder_config.pooling)  # (B, d)
        if self.encoder_config.normalize:
            reps = nn.functional.normalize(reps, p=2, dim=-1)
        return reps

    def encode_query(self, batch: dict[str, torch.Tensor], float32: bool = False) -> torch.Tensor:
        """Tokenised queries -> (B, d) vectors (`float32`: pooled and normalised in float32)."""
        return self._encode(self.query_encoder, batch, float32)

    def encode_passage(self, batch: dict[str, torch.Tensor], float32: bool = False) -> torch.Tensor:
        """Tokenised passages -> (B, d) vectors (`float32`: pooled and normalised in float32)."""
        return self._encode(self.passage_model, batch, float32)

    def forward(
        self,
        query: dict[str, torch.Tensor],
        passage: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Training forward: B queries and B*n passages -> {"q_reps": (B, d), "p_reps": (B*n, d)}.

        The representations keep their graph: the trainer's loss (`dr.train.losses`) is computed on them
        and back-propagated through this forward, so DDP / DeepSpeed see one module with every parameter.
        """
        return {"q_reps": self.encode_query(query), "p_reps": self.encode_passage(passage)}

    # ---- gradient checkpointing (called by the Trainer) ---------------------------------------------
    supports_gradient_checkpointing = True

    def activation_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """Trade compute for memory in every encoder (the Trainer calls this for --gradient_checkpointing)."""
        self._enable_checkpointing("activation_checkpointing_enable", *args, **kwargs)

    def gradient_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """The name transformers < 5 calls (and 5.x still accepts); same as `activation_checkpointing_enable`."""
        self._enable_checkpointing("gradient_checkpointing_enable", *args, **kwargs)

    def _enable_checkpointing(self, method: str, *args: Any, **kwargs: Any) -> None:
        # Forward to the encoder's method of the same name: each spelling has its own keyword names.
        for encoder in {id(m): m for m in (self.query_encoder, self.passage_model)}.values():
            getattr(encoder, method, encoder.gradient_checkpointing_enable)(*args, **kwargs)
            if hasattr(encoder, "enable_input_require_grads"):
                encoder.enable_input_require_grads()

    # ---- saving / loading weights -------------------------------------------------------------------
    def save(
        self,
        output_dir: str | os.PathLike,
        state_dict: dict[str, torch.Tensor] | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        """Write the model as Hugging Face folder(s) + tokenizer + dr_config.json, and the files that make
        it a sentence-transformers folder too (`dr.model.st_format`; none for a model it cannot reproduce).

        Everything is written into `<output_dir>/.saving` first and moved into place afterwards, with
        dr_config.json last: a folder with dr_config.json is always a complete model.
        `state_dict` (keys prefixed `query_encoder.` / `passage_encoder.`) is what DeepSpeed ZeRO-3
        gathers; by default the module's own.
        """
        output_dir = Path(output_dir)
        staging = output_dir / ".saving"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        state_dict = self.state_dict() if state_dict is None else state_dict
        parts = {"query_encoder.": self.query_encoder}
        if self.passage_encoder is not None:
            parts["passage_encoder."] = self.passage_encoder
        for prefix, encoder in parts.items():
            sub = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            target = staging
            if self.passage_encoder is not None:
                target = staging / (QUERY_SUBDIR if prefix == "query_encoder." else PASSAGE_SUBDIR)
            encoder.save_pretrained(target, state_dict=sub, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
            reason = write_st_files(staging, self.encoder_config, dim=_hidden_size(self.query_encoder))
            if reason:
                logger.warning("%s: no sentence-transformers files: %s", output_dir, reason)
        (output_dir / DR_CONFIG_NAME).unlink(missing_ok=True)
        _remove_stale_layout(output_dir, untied=self.passage_encoder is not None)
        remove_st_files(output_dir)
        for item in sorted(staging.iterdir()):
            dest = output_dir / item.name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(item, dest)
        self.encoder_config.save(output_dir)
        staging.rmdir()

    def load_weights(self, model_dir: str | os.PathLike) -> None:
        """Load weights saved by `save` into this module in place (used on resume)."""
        q_dir, p_dir = _encoder_dirs(Path(model_dir))
        _load_into(self.query_encoder, q_dir)
        if self.passage_encoder is not None:
            if p_dir is None:
                raise ValueError(f"{model_dir}: checkpoint has tied weights but the model is untied")
            _load_into(self.passage_encoder, p_dir)


def _hidden_size(encoder: nn.Module) -> int | None:
    """The encoder's hidden size from its Hugging Face config (None: let st_format read config.json)."""
    config = getattr(encoder, "config", None)
    size = getattr(config, "hidden_size", None) if config is not None else None
    return size if isinstance(size, int) else None


def _load_into(encoder: nn.Module, folder: Path) -> None:
    """Copy a saved encoder's weights (full, or LoRA adapters only) into `encoder`."""
    if (folder / ADAPTER_CONFIG).is_file():
        from peft import load_peft_weights, set_peft_model_state_dict

        set_peft_model_state_dict(encoder, load_peft_weights(str(folder)))
    else:
        encoder.load_state_dict(AutoModel.from_pretrained(str(folder)).state_dict())


def _remove_stale_layout(output_dir: Path, untied: bool) -> None:
    """Drop weights of the other layout (tied vs untied) left by an earlier save into the same folder."""
    if untied:
        for pattern in ("config.json", "model*.safetensors", "model.safetensors.index.json", "adapter_*"):
            for path in output_dir.glob(pattern):
                path.unlink()
    else:
        for sub in (QUERY_SUBDIR, PASSAGE_SUBDIR):
            shutil.rmtree(output_dir / sub, ignore_errors=True)


def load_encoder(
    source: str,
    adapters: str | None = None,
    new_lora: dict[str, Any] | None = None,
    merge: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """A Hugging Face encoder, with LoRA adapters loaded (from `source` itself or `adapters`) or added.

    A folder holding `adapter_config.json` is an adapter-only save: its base model is read from there.
    """
    adapter_dir = adapters or (source if (Path(source) / ADAPTER_CONFIG).is_file() else None)
    if adapter_dir is None:
        encoder = AutoModel.from_pretrained(source, **kwargs)
    else:
        from peft import PeftModel

        base = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
        encoder = AutoModel.from_pretrained(source if adapters else base, **kwargs)
        encoder = PeftModel.from_pretrained(encoder, adapter_dir, is_trainable=not merge)
        if merge:
            return encoder.merge_and_unload()
    if new_lora is not None:
        from peft import LoraConfig, TaskType, get_peft_model

        encoder = get_peft_model(encoder, LoraConfig(task_type=TaskType.FEATURE_EXTRACTION, **new_lora))
    return encoder
