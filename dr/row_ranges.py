"""Distributed work over row ranges: plan the parts, write each one atomically, resume, list them.

Every command that turns N input rows into output files works the same way (`dr encode`: Arrow shards;
`dr score`: JSONL parts; a reranker: run-file parts; an index builder: a faiss index per shard):

1. **Plan** (`resolve_sharding`, `plan_rows`): rows [0, N) are cut into ``num_shards`` contiguous shards
   (flags, or one shard per SLURM array task), and the chosen shard into one contiguous `Part` per rank
   (torchrun's RANK / WORLD_SIZE). Every row lands in exactly one part, also when there are more parts
   than rows (some parts are then empty, and still written: an empty part is a finished part).
2. **Resume** (`RowParts.status` / `part_done`): a part file under its final name is complete by
   construction (temporary name + rename), and the command's `check` verifies it further (row count, ids,
   the settings it was made with); anything else is redone. A check raises where reusing or replacing
   the file is not the run's call (other settings: the user chooses `--overwrite` or another output).
3. **Write** (`RowParts.write_part`): the writer fills a temporary file next to the final one, renamed
   when the writer returns; a failure part-way leaves no part file (and its leftovers are removed by the
   next attempt). `RowParts.run_own` is steps 2 and 3 for this rank's part, with progress and log lines.
4. **List** (`RowParts.write_manifest`): once every part is complete, one JSON manifest describes them
   (path, rank, rows, range, bytes, sha256 as the caller asks), written atomically and last, so its
   presence means the whole shard is done.

`claim_folder` records what a folder of parts is made from (input, model, settings), so that parts of
another configuration are refused instead of mixed in; `covering_parts` finds parts named by their row
range (`range_part_path`) that tile the input, whatever layout each was written with.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dr.errors import UsageError
from dr.io.atomic import atomic_path, remove_stale_temporaries, write_json_atomic
from dr.io.shards import file_sha256


class ShardingError(UsageError):
    """A shard index outside [0, num_shards), or a SLURM array that does not say its size (exit 2)."""


class ConfigConflict(UsageError):
    """Existing parts were made from another input or configuration; only --overwrite may replace them."""


# ---- planning --------------------------------------------------------------------------------------------


def split_range(start: int, stop: int, parts: int, index: int) -> tuple[int, int]:
    """The `index`-th of `parts` contiguous, near-equal sub-ranges of [start, stop) (sizes differ by <= 1)."""
    n = stop - start
    return start + n * index // parts, start + n * (index + 1) // parts


def resolve_sharding(
    num_shards: int | None,
    shard_index: int | None,
    env: Mapping[str, str] | None = None,
    flags: tuple[str, str] = ("--num_shards", "--shard_index"),
) -> tuple[int, int]:
    """(num_shards, shard_index) from the flags, else from a SLURM job array, else (1, 0).

    With no flags, the array's shape decides: COUNT shards, this task's shard is ID - MIN. With only the
    shard count given, the task id itself is the shard, so a resubmitted single task (``sbatch --array=7``:
    COUNT=1, MIN=7) still does shard 7. `flags` are the command's spellings of the two flags (messages).
    """
    env = os.environ if env is None else env
    num, index = num_shards, shard_index
    if num is None and index is None and "SLURM_ARRAY_TASK_ID" in env:
        if "SLURM_ARRAY_TASK_COUNT" not in env:
            raise ShardingError(
                f"SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; give {flags[0]}"
            )
        num = int(env["SLURM_ARRAY_TASK_COUNT"])
        index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        source = "SLURM_ARRAY_TASK_ID/COUNT/MIN"
    elif num is not None and index is None and "SLURM_ARRAY_TASK_ID" in env:
        index = int(env["SLURM_ARRAY_TASK_ID"])
        source = f"{flags[0]} and SLURM_ARRAY_TASK_ID"
    else:
        num, index = (1 if num is None else num), (0 if index is None else index)
        source = "/".join(flags)
    if num < 1 or not 0 <= index < num:
        raise ShardingError(f"shard index {index} is not in [0, {num}) ({source}); arrays must be contiguous")
    return num, index


@dataclass(frozen=True)
class Part:
    """Rows [start, stop) of the input, done by rank `index` of the shard's processes."""

    index: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def range(self) -> tuple[int, int]:
        return self.start, self.stop


@dataclass(frozen=True)
class RowPlan:
    """Which rows this process does: the input's size, the chosen shard, the ranks and this rank."""

    total_rows: int
    num_shards: int = 1
    shard_index: int = 0
    world_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if self.total_rows < 0 or self.num_shards < 1 or self.world_size < 1:
            raise ValueError(f"a plan needs rows >= 0 and at least one shard and rank: {self}")
        if not (0 <= self.shard_index < self.num_shards and 0 <= self.rank < self.world_size):
            raise ValueError(f"shard index and rank must lie in [0, num_shards) and [0, world_size): {self}")

    @property
    def shard_range(self) -> tuple[int, int]:
        return split_range(0, self.total_rows, self.num_shards, self.shard_index)

    def part(self, index: int) -> Part:
        return Part(index, *split_range(*self.shard_range, self.world_size, index))

    @property
    def parts(self) -> list[Part]:
        """Every rank's part of the shard, in rank (= row) order."""
        return [self.part(r) for r in range(self.world_size)]

    @property
    def own(self) -> Part:
        return self.part(self.rank)


def plan_rows(
    total_rows: int,
    num_shards: int | None = None,
    shard_index: int | None = None,
    world_size: int = 1,
    rank: int = 0,
    env: Mapping[str, str] | None = None,
    flags: tuple[str, str] = ("--num_shards", "--shard_index"),
) -> RowPlan:
    """The plan of this process: sharding from the flags or SLURM (`resolve_sharding`), then its rank."""
    num, index = resolve_sharding(num_shards, shard_index, env, flags)
    return RowPlan(total_rows, num, index, world_size, rank)


# ---- parts on disk: status, atomic writes, the manifest ---------------------------------------------------

PartCheck = Callable[[Part, Path], str]
"""Why an existing part file must be redone ("" = it is complete); raises where it may not be replaced."""


def _exists(part: Part, path: Path) -> str:
    return ""


OwnWriter = Callable[[Path, Part, Callable[[int], Any]], str]
"""``write(tmp, part, advance) -> what it did`` (`RowParts.run_own`): fills `tmp` with the part's rows."""


class RowParts:
    """The parts of a plan as files: where each goes, whether it is done, writing one, and the manifest.

    Args:
        plan: the rows of the shard and of each rank.
        path_of: the file of a part (the command's naming; e.g. `dr.io.shards.OutputLayout.rank_file`).
        check: verifies an existing part file (see `PartCheck`); by default a file under its final name is
            complete, as the atomic rename guarantees for files this class wrote.
    """

    def __init__(
        self, plan: RowPlan, path_of: Callable[[Part], Path], check: PartCheck | None = None
    ) -> None:
        self.plan = plan
        self.path_of = path_of
        self.check = check or _exists

    def path(self, part: Part) -> Path:
        return Path(self.path_of(part))

    def status(self, part: Part) -> str | None:
        """None when the part has no file, "" when its file is complete, else why it must be redone."""
        path = self.path(part)
        if not path.is_file():
            return None
        return self.check(part, path)

    def part_done(self, part: Part) -> bool:
        return self.status(part) == ""

    def statuses(self) -> list[str | None]:
        """`status` of every rank's part (identical on every rank, so all ranks decide alike)."""
        return [self.status(part) for part in self.plan.parts]

    def write_part(self, part: Part, writer: Callable[[Path], Any]) -> Path:
        """Run `writer(temporary_path)`, then rename the file to the part's name; return that name.

        Leftovers of an earlier interrupted attempt are removed first. If `writer` raises, the temporary
        file is removed and the error propagates: a part file exists only when it was written completely.
        """
        path = self.path(part)
        remove_stale_temporaries(path.parent, path.name)
        with atomic_path(path) as tmp:
            writer(tmp)
        return path

    def run_own(
        self,
        write: OwnWriter,
        tag: str,
        unit: tuple[str, str] = ("row", "rows"),
        progress: bool = True,
        note: str = "",
    ) -> bool:
        """Do this rank's part (`plan.own`) unless a complete one is there; return whether it was written.

        The one driver of a command that turns its rows into a part file (`dr score`, `dr rerank`): a
        complete part is skipped, an incomplete one is said to be redone (why: the `check`), then
        ``write(tmp, part, advance)`` fills the temporary file (`write_part`), calling ``advance(n)`` as n
        rows are done (the progress bar, shown where `progress`), and returns what it did for the log line
        (e.g. "12 pairs"). Messages go to stderr tagged `tag`, the rows named by `unit` (singular, plural);
        `note` follows the time (e.g. the precision).
        """
        from tqdm import tqdm

        part = self.plan.own
        path = self.path(part)
        status = self.status(part)
        if status == "":
            print(f"{tag}: {path.name} is complete ({part.rows} {unit[1]}): skipped", file=sys.stderr)
            return False
        if status:
            print(f"{tag}: {path.name}: redoing ({status})", file=sys.stderr)
        began, done = time.perf_counter(), ""
        bar = tqdm(total=part.rows, unit=unit[0], desc=tag, disable=not progress)

        def fill(tmp: Path) -> None:
            nonlocal done
            done = write(tmp, part, bar.update)

        try:
            self.write_part(part, fill)
        finally:
            bar.close()
        print(
            f"{tag}: {unit[1]} [{part.start}, {part.stop}) of {self.plan.total_rows}: {done} in "
            f"{time.perf_counter() - began:.1f}s{note} -> {path}",
            file=sys.stderr,
        )
        return True

    def record(
        self, part: Part, fields: Iterable[str] = ("path", "rank", "rows", "range", "bytes", "sha256")
    ) -> dict:
        """What a manifest says about one part (the fields asked for, in that order)."""
        path = self.path(part)
        values: dict[str, Callable[[], Any]] = {
            "path": lambda: path.name,
            "rank": lambda: part.index,
            "rows": lambda: part.rows,
            "range": lambda: list(part.range),
            "bytes": lambda: path.stat().st_size,
            "sha256": lambda: file_sha256(path),
        }
        return {name: values[name]() for name in fields}

    def write_manifest(
        self,
        path: str | os.PathLike,
        fields: Mapping[str, Any],
        parts_key: str = "files",
        part_fields: Iterable[str] = ("path", "rank", "rows", "range", "bytes", "sha256"),
    ) -> dict[str, Any]:
        """Write `fields` plus ``parts_key``: one `record` per part, atomically; return what was written.

        Call it once every part is complete (after the ranks agreed): the manifest is the mark that the
        whole shard is done, so it is written last.
        """
        part_fields = tuple(part_fields)
        manifest = {**fields, parts_key: [self.record(part, part_fields) for part in self.plan.parts]}
        write_json_atomic(path, manifest)
        return manifest


def listed_checksum_status(path: Path, manifest: Mapping[str, Any] | None, key: str = "files") -> str:
    """ "" when the manifest does not list `path` or lists it with the same sha256, else why not."""
    entry = next((f for f in (manifest or {}).get(key, []) if f.get("path") == path.name), None)
    if entry is None or "sha256" not in entry or file_sha256(path) == entry["sha256"]:
        return ""
    return "sha256 differs from the manifest"


# ---- a folder of parts made from one configuration -----------------------------------------------------


def claim_folder(
    folder: Path,
    marker: str,
    identity: Mapping[str, Any],
    overwrite: bool,
    what: str = "another configuration",
    output_flag: str = "--output",
) -> None:
    """Make `folder` hold parts of `identity` (input, model, settings), recorded in ``folder/marker``.

    An existing folder of the same identity is kept (its parts are resumed); one of another identity is a
    `ConfigConflict` unless `overwrite`, which deletes the folder first. `what` names the other
    configuration in the message (e.g. "another input or teacher"), `output_flag` the command's output flag.
    """
    path = folder / marker
    if overwrite and folder.exists():
        shutil.rmtree(folder)
    if path.is_file():
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            found = None  # unreadable: cannot vouch for the parts either
        if found != dict(identity):
            raise ConfigConflict(
                f"{folder} holds parts of {what} ({found}); use --overwrite or another {output_flag}"
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, dict(identity))


# ---- parts named by their row range (any layout may have written them) -----------------------------------


def range_part_path(folder: Path, part: Part, suffix: str) -> Path:
    """``folder/rows-<start>-<stop><suffix>`` (9-digit numbers): the name says which rows, not which rank."""
    return folder / f"rows-{part.start:09d}-{part.stop:09d}{suffix}"


def covering_parts(folder: Path, total: int, suffix: str) -> list[tuple[int, int, Path]] | None:
    """Range-named parts that tile [0, total) (longer parts first), or None while rows are missing.

    Runs with different shard counts or world sizes may have left parts of different sizes; any chain of
    adjacent parts from 0 to `total` is a cover.
    """
    found: dict[int, list[tuple[int, Path]]] = {}
    for path in folder.glob(f"rows-*-*{suffix}"):
        try:
            start, stop = (int(x) for x in path.name[: -len(suffix) or None].split("-")[1:3])
        except ValueError:
            continue
        found.setdefault(start, []).append((stop, path))

    def cover(position: int) -> list[tuple[int, int, Path]] | None:  # depth-first
        if position == total:
            return []
        for stop, path in sorted(
            (c for c in found.get(position, []) if position < c[0] <= total), reverse=True
        ):
            rest = cover(stop)
            if rest is not None:
                return [(position, stop, path), *rest]
        return None

    return cover(0)
