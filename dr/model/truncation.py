"""Matryoshka prefixes: the first `dim` coordinates of vectors, renormalised when the model normalises.

One rule for training (`dr.train.losses.matryoshka` scores prefixes) and encoding (`dr encode
--truncate_dim`), so a truncated shard holds exactly the vectors the Matryoshka loss trained.
"""

from __future__ import annotations

import torch


def truncate(vectors: torch.Tensor, dim: int | None, normalize: bool) -> torch.Tensor:
    """The first `dim` coordinates of each row of `vectors` (..., d); unit length again when `normalize`.

    `dim` None or >= d returns `vectors` unchanged (a prefix of everything is the vector itself). The
    renormalisation is what the model's own L2 step would do to the shorter vector: a unit vector's prefix
    is shorter than 1, and cosine scores need unit vectors. Differentiable (the loss back-propagates it).
    """
    if dim is None or dim >= vectors.shape[-1]:
        return vectors
    prefix = vectors[..., :dim]
    return torch.nn.functional.normalize(prefix, p=2, dim=-1) if normalize else prefix


def check_dim(dim: int, hidden: int, flag: str) -> None:
    """Refuse a prefix length outside [1, hidden] (ValueError naming `flag`; callers turn it into theirs)."""
    if not 1 <= dim <= hidden:
        raise ValueError(f"{flag} {dim} is outside 1..{hidden} (the model's vector size)")
