"""`~` in paths that no shell expanded: values from `--config` files, pipeline configs, `--flag=~/x`."""

from __future__ import annotations

import argparse
import os


def expand_home(args: argparse.Namespace) -> argparse.Namespace:
    """Expand a leading `~` in every string (or list of strings) of parsed arguments, in place.

    A shell expands `~/data` only where it stands alone as a word, so `--dataset_name=~/data`, YAML/JSON
    configs and the argv lists `dr pipeline` builds reach us verbatim; without this they would be taken for
    a hub name or a relative folder called "~". Hub names, metric names and formats never start with `~`.
    """
    for name, value in vars(args).items():
        if isinstance(value, str):
            setattr(args, name, expand_tilde(value))
        elif isinstance(value, list):
            setattr(args, name, [expand_tilde(v) if isinstance(v, str) else v for v in value])
    return args


def expand_tilde(value: str) -> str:
    """`~/x` or `~user/x` -> the absolute path; anything else unchanged."""
    return os.path.expanduser(value) if value.startswith("~") else value
