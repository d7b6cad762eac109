"""Text -> token tensors: the one place, used by training (the collator) and encoding alike.

- `load_tokenizer`: the model's tokenizer, padding on the right, with a pad token;
- `resolve_append_eos`: whether texts end with EOS (last-token pooling on decoder backbones);
- `tokenize_unpadded`: token ids per text, truncated, EOS appended when asked;
- `pad_rows`: tokenized rows -> padded tensors (the tokenizer's own `pad`, at a width rounded up to
  `pad_multiple` but never beyond `max_length`);
- `tokenize`: the two together.
Same text, same settings -> the same tensors in `dr train` and `dr encode`, so a model encodes exactly as
it was trained.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from transformers import AutoTokenizer

from dr.model.check import check_model_source, check_tokenizer, check_tokenizer_files

if TYPE_CHECKING:
    from dr.model.config import EncoderConfig


def resolve_append_eos(config: EncoderConfig, tokenizer: Any) -> bool:
    """Whether texts get an EOS token appended: the saved/flag value, else yes for last-token pooling.

    Last-token pooling reads the final hidden state; decoder retrievers (RepLLaMA, E5-Mistral) end every
    text with EOS so that state is the same "summary" token for every input. Tokenizers that already end
    sequences with EOS, or have none, get nothing appended.
    """
    if config.append_eos is not None:
        return config.append_eos
    if config.pooling != "last" or tokenizer.eos_token_id is None:
        return False
    probe = tokenizer("probe")["input_ids"]
    return not (probe and probe[-1] == tokenizer.eos_token_id)


def tokenize_unpadded(
    tokenizer: Any, texts: list[str], max_length: int, append_eos: bool
) -> dict[str, list[list[int]]]:
    """Token ids (and token type ids where the tokenizer makes them) per text, truncated to `max_length`
    including the EOS token that `append_eos` adds; padding is the caller's."""
    if not append_eos:
        return dict(tokenizer(texts, truncation=True, max_length=max_length, return_attention_mask=False))
    enc = tokenizer(texts, truncation=True, max_length=max_length - 1, return_attention_mask=False)
    out = {key: [list(row) for row in enc[key]] for key in enc}
    for i, ids in enumerate(out["input_ids"]):
        ids.append(tokenizer.eos_token_id)
        if "token_type_ids" in out:
            out["token_type_ids"][i].append(out["token_type_ids"][i][-1] if out["token_type_ids"][i] else 0)
    return out


def load_tokenizer(model_name_or_path: str, tokenizer_name: str | None = None, cache_dir: str | None = None):
    """The tokenizer saved with the model (or `tokenizer_name`), padding on the right; adds a pad token
    if the model has none. A missing source or a degenerate tokenizer is a `ModelError` (dr/model/check.py)."""
    check_model_source(model_name_or_path, cache_dir=cache_dir)
    check_tokenizer_files(model_name_or_path, tokenizer_name)
    if tokenizer_name:
        check_model_source(tokenizer_name, "tokenizer", cache_dir=cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name or model_name_or_path, cache_dir=cache_dir)
    check_tokenizer(tokenizer, tokenizer_name or model_name_or_path)
    if tokenizer.pad_token is None:  # decoder backbones (last-token pooling) often have no pad token
        tokenizer.pad_token = tokenizer.eos_token
    # LLM tokenizers often pad on the left (for generation). A plain forward numbers positions 0..L-1
    # whatever the mask, so left padding would shift every real token's position by the padding (absolute
    # position embeddings change the vector with the batch's longest text). Right padding keeps the real
    # tokens at 0..n-1 under any position scheme; `pool` finds the last real token from the mask.
    tokenizer.padding_side = "right"
    return tokenizer


def pad_rows(
    rows: list[dict[str, list[int]]],
    tokenizer: Any,
    max_length: int,
    pad_multiple: int | None = 8,
    pad_to_max_length: bool = False,
) -> dict[str, Any]:
    """Pad tokenized rows (right padding) into tensors with an attention mask.

    Width: the longest row (or `max_length` with `pad_to_max_length`), rounded up to `pad_multiple`
    (tensor cores like multiples of 8), but never beyond `max_length`: rounding must not add columns the
    truncation already ruled out.
    """
    longest = max(len(r["input_ids"]) for r in rows)
    width = max_length if pad_to_max_length else longest
    if pad_multiple:
        width = math.ceil(width / pad_multiple) * pad_multiple
    width = min(width, max(max_length, longest))
    return dict(tokenizer.pad(rows, padding="max_length", max_length=width, return_tensors="pt"))


def tokenize(
    tokenizer: Any,
    texts: list[str],
    max_length: int,
    append_eos: bool = False,
    pad_multiple: int | None = 8,
    pad_to_max_length: bool = False,
) -> dict[str, Any]:
    """Texts -> padded tensors (`tokenize_unpadded` then `pad_rows`)."""
    enc = tokenize_unpadded(tokenizer, texts, max_length, append_eos)
    rows = [{key: enc[key][i] for key in enc} for i in range(len(texts))]
    return pad_rows(rows, tokenizer, max_length, pad_multiple, pad_to_max_length)
