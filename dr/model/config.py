"""A model folder's dr settings (`EncoderConfig`, saved as `dr_config.json`) and the names of its parts.

Torch-free and apart from `dr.model.encoder`, so that the model (`encoder`) and the sentence-transformers
files (`st_format`) both read them without importing each other.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from dr.errors import InputError
from dr.io.atomic import write_json_atomic
from dr.model import DR_CONFIG_NAME, POOLINGS

# Untied encoders are saved in these subfolders of the model folder (tokenizer and dr_config.json on top).
QUERY_SUBDIR, PASSAGE_SUBDIR = "query_model", "passage_model"


@dataclass
class EncoderConfig:
    """How text becomes a vector; saved as `dr_config.json` next to the weights."""

    pooling: str = "cls"
    normalize: bool = False
    untie_encoder: bool = False
    temperature: float = 1.0
    query_prefix: str = ""
    passage_prefix: str = ""
    q_max_len: int = 32
    p_max_len: int = 128
    # End every text with the EOS token (within the max length). None: decide from the tokenizer
    # (`resolve_append_eos`); `dr train` saves the decision, so encoding tokenises as training did.
    append_eos: bool | None = None
    # Keep only the first truncate_dim dimensions of every vector (renormalised when normalising): the
    # default of `dr encode --truncate_dim`, set by `dr train --truncate_dim` for Matryoshka models.
    truncate_dim: int | None = None

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise InputError(f"{DR_CONFIG_NAME}: pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.truncate_dim is not None and (
            not isinstance(self.truncate_dim, int) or self.truncate_dim < 1
        ):
            raise InputError(
                f"{DR_CONFIG_NAME}: truncate_dim must be an integer >= 1, got {self.truncate_dim!r}"
            )

    @classmethod
    def load(cls, model_dir: str | os.PathLike) -> EncoderConfig | None:
        """The folder's dr_config.json, or None for a plain Hugging Face model."""
        path = Path(model_dir) / DR_CONFIG_NAME
        if not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def resolve(
        cls,
        saved: EncoderConfig | None,
        flags: Mapping[str, Any] | None = None,
        st_settings: Mapping[str, Any] | None = None,
    ) -> EncoderConfig:
        """The one precedence rule, for training and encoding alike: flag > saved dr_config.json >
        sentence-transformers settings (`st_format.read_st_settings`) > default.

        A flag left unset is None and inherits; an explicit value wins, including an empty prefix (`""`
        clears a prefix the model was saved with). Unknown keys are ignored. (Flags that contradict the
        sentence-transformers settings are refused before this, by `check_st_flags`.)
        """
        values = dict(st_settings or {})
        values.update(asdict(saved) if saved else {})
        values.update({k: v for k, v in (flags or {}).items() if v is not None})
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def save(self, model_dir: str | os.PathLike) -> None:
        """Write dr_config.json atomically: it is the marker of a complete model (written last)."""
        write_json_atomic(Path(model_dir) / DR_CONFIG_NAME, asdict(self))
