"""Which checkpoint `--resume_from_checkpoint` means, and the marker that makes a checkpoint complete.

A kill during saving leaves a `checkpoint-N` folder that looks like any other (a truncated safetensors,
no optimizer state); the Trainer's own "last checkpoint" is simply the highest N, so resuming crashed on
it. `BiEncoderTrainer._save_checkpoint` therefore writes `COMPLETE_MARKER` into the folder after
everything else (weights, optimizer, scheduler, RNG and trainer state), atomically. The rules:

- `latest` (also `true`, `last`, `yes`) takes the newest checkpoint that has the marker and logs the newer
  ones it skipped; with none complete it is an error that lists what it found.
- a checkpoint named by its path is used as given (a checkpoint of an older dr without the marker stays
  usable that way), with a warning when it has no marker.
- `false`, `none`, `no` or empty: no resume.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from dr.flags import ConfigError
from dr.io.atomic import write_json_atomic

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "dr_checkpoint_complete.json"
LATEST = ("latest", "true", "last", "yes")
NO_RESUME = ("", "false", "none", "no")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def mark_complete(folder: str | os.PathLike, step: int) -> None:
    """Write the completion marker (last, atomically): the folder now holds a whole checkpoint."""
    write_json_atomic(Path(folder) / COMPLETE_MARKER, {"global_step": int(step)})


def is_complete(folder: str | os.PathLike) -> bool:
    return (Path(folder) / COMPLETE_MARKER).is_file()


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir`, newest (highest N) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def wants_resume(value: str | None) -> bool:
    """Whether the flag asks for a resume at all (the strings `false`/`none`/`no` do not)."""
    return value is not None and value.strip().lower() not in NO_RESUME


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """The checkpoint folder to resume from, or None; see the module docstring for the rules."""
    if not wants_resume(value):
        return None
    if value.strip().lower() in LATEST:
        found = checkpoints(output_dir)
        complete = [p for p in found if is_complete(p)]
        if not complete:
            if not found:
                raise ConfigError(
                    f"--resume_from_checkpoint {value}: {output_dir} has no checkpoint-* folder to resume from "
                    "(leave the flag out to start from the beginning)"
                )
            names = ", ".join(p.name for p in found[:5])
            raise ConfigError(
                f"--resume_from_checkpoint {value}: no complete checkpoint in {output_dir} ({names} lack "
                f"{COMPLETE_MARKER}: interrupted while saving, or written by an older dr); name one by its "
                "path to use it anyway"
            )
        skipped = [p.name for p in found if p not in complete and found.index(p) < found.index(complete[0])]
        if skipped:
            logger.warning(
                "resuming from %s; skipped newer incomplete checkpoints (no %s): %s",
                complete[0].name,
                COMPLETE_MARKER,
                ", ".join(skipped),
            )
        else:
            logger.info("resuming from %s", complete[0])
        return str(complete[0])
    if not Path(value).is_dir():
        raise ConfigError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    if not is_complete(value):
        logger.warning(
            "%s has no %s: it may be incomplete (resuming from it as asked)", value, COMPLETE_MARKER
        )
    return value
