"""`dr.row_ranges`: planning covers every row once, parts are written atomically, resume redoes only what
is missing or broken, parts of another configuration are refused, the manifest lists the parts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dr.errors import UsageError
from dr.row_ranges import (
    ConfigConflict,
    Part,
    RowParts,
    RowPlan,
    ShardingError,
    claim_folder,
    covering_parts,
    listed_checksum_status,
    plan_rows,
    range_part_path,
    resolve_sharding,
    split_range,
)

# ---- planning -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [0, 1, 2, 5, 7, 90, 101])
@pytest.mark.parametrize("shards", [1, 2, 3, 8])
@pytest.mark.parametrize("world", [1, 2, 3, 16])
def test_every_row_lands_in_exactly_one_part(rows, shards, world):
    """Whatever the rows, array tasks and ranks (more parts than rows included): the parts of all shards,
    in order, are contiguous and tile [0, rows) exactly once; part sizes differ by at most one."""
    covered: list[int] = []
    for shard in range(shards):
        plans = [RowPlan(rows, shards, shard, world, rank) for rank in range(world)]
        parts = plans[0].parts
        assert [p.own for p in plans] == parts  # every rank agrees on the plan and finds its own part
        assert [p.index for p in parts] == list(range(world))
        sizes = [p.rows for p in parts]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 0
        for part in parts:
            covered.extend(range(part.start, part.stop))
    assert covered == list(range(rows))


def test_split_range_is_near_equal_and_contiguous():
    assert [split_range(10, 17, 3, i) for i in range(3)] == [(10, 12), (12, 14), (14, 17)]
    assert [split_range(0, 2, 4, i) for i in range(4)] == [(0, 0), (0, 1), (1, 1), (1, 2)]


def test_sharding_from_flags_slurm_array_or_resubmitted_task():
    assert resolve_sharding(None, None, env={}) == (1, 0)
    assert resolve_sharding(4, 2, env={}) == (4, 2)
    array = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "4"}
    assert resolve_sharding(None, None, env=array) == (3, 1)  # --array=4-6: task 5 is shard 1
    resubmitted = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "1", "SLURM_ARRAY_TASK_MIN": "7"}
    assert resolve_sharding(8, None, env=resubmitted) == (8, 7)  # the task id is the shard
    plan = plan_rows(100, None, None, world_size=2, rank=1, env=array)
    assert (plan.num_shards, plan.shard_index, plan.shard_range, plan.own.range) == (3, 1, (33, 66), (49, 66))
    with pytest.raises(ShardingError, match=r"shard index 3 is not in \[0, 3\) \(--n/--i\)") as err:
        resolve_sharding(3, 3, env={}, flags=("--n", "--i"))
    assert isinstance(err.value, UsageError)  # exit 2
    with pytest.raises(ShardingError, match="SLURM_ARRAY_TASK_COUNT is not; give --num_shards"):
        resolve_sharding(None, None, env={"SLURM_ARRAY_TASK_ID": "0"})


# ---- parts on disk --------------------------------------------------------------------------------------


def _lines_check(part: Part, path: Path) -> str:
    """A part is complete when it holds one line per row (what dr score checks)."""
    lines = path.read_text().count("\n")
    return "" if lines == part.rows else f"{lines} rows, expected {part.rows}"


def _parts(folder: Path, plan: RowPlan) -> RowParts:
    return RowParts(plan, lambda part: range_part_path(folder, part, ".txt"), _lines_check)


def _work(parts: RowParts, done: list[Part]) -> None:
    """A job: every rank's part that is not done is written (one line per row); `done` records which."""
    for part in parts.plan.parts:
        if not parts.part_done(part):
            done.append(part)
            parts.write_part(
                part,
                lambda tmp, p=part: tmp.write_text("".join(f"row {r}\n" for r in range(p.start, p.stop))),
            )


def test_resume_skips_complete_parts_and_redoes_missing_or_corrupt_ones(tmp_path):
    parts = _parts(tmp_path, RowPlan(10, world_size=3))
    done: list[Part] = []
    _work(parts, done)
    assert [p.range for p in done] == [(0, 3), (3, 6), (6, 10)]
    assert parts.statuses() == ["", "", ""]
    paths = [parts.path(p) for p in parts.plan.parts]
    mtime = paths[0].stat().st_mtime_ns
    paths[1].unlink()  # lost
    paths[2].write_text("row 6\nrow 7\n")  # truncated by some other tool
    assert parts.statuses() == ["", None, "2 rows, expected 4"]
    done.clear()
    _work(parts, done)
    assert [p.range for p in done] == [(3, 6), (6, 10)]  # the complete part is not redone
    assert paths[0].stat().st_mtime_ns == mtime
    assert [len(p.read_text().splitlines()) for p in paths] == [3, 3, 4]
    done.clear()
    _work(parts, done)
    assert done == []


def test_a_failure_mid_part_leaves_no_part_file(tmp_path):
    parts = _parts(tmp_path, RowPlan(4))
    part = parts.plan.own

    def crash(tmp: Path) -> None:
        tmp.write_text("row 0\nrow 1\n")
        raise RuntimeError("killed mid-part")

    with pytest.raises(RuntimeError, match="killed mid-part"):
        parts.write_part(part, crash)
    assert list(tmp_path.iterdir()) == [] and parts.status(part) is None
    # A leftover of a process killed outright (no cleanup) is removed by the next attempt.
    leftover = tmp_path / (parts.path(part).name + ".tmp-deadbeef")
    leftover.write_text("row 0\n")
    assert parts.status(part) is None
    parts.write_part(part, lambda tmp: tmp.write_text("a\nb\nc\nd\n"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [parts.path(part).name]
    assert parts.part_done(part)


def test_run_own_writes_skips_or_redoes_this_ranks_part_and_says_which(tmp_path, capsys):
    """The driver `dr score` and `dr rerank` share: this rank's part only, resumed, progress counted."""
    parts = _parts(tmp_path, RowPlan(10, world_size=2, rank=1))
    calls: list[tuple[int, int]] = []

    def write(tmp: Path, part: Part, advance) -> str:
        calls.append(part.range)
        for r in range(part.start, part.stop):
            with open(tmp, "a") as out:
                out.write(f"row {r}\n")
            advance(1)
        return f"{part.rows} things"

    assert parts.run_own(write, "tag", ("query", "queries"), progress=False, note=" (fp32)")
    path = parts.path(parts.plan.own)
    assert calls == [(5, 10)] and path.read_text().count("\n") == 5  # rank 1's rows, nobody else's
    assert parts.status(parts.plan.part(0)) is None
    said = capsys.readouterr().err
    assert "tag: queries [5, 10) of 10: 5 things in " in said and f"s (fp32) -> {path}" in said
    assert not parts.run_own(write, "tag", ("query", "queries"), progress=False)
    assert calls == [(5, 10)]  # complete: not redone
    assert f"tag: {path.name} is complete (5 queries): skipped" in capsys.readouterr().err
    path.write_text("row 5\n")  # truncated
    assert parts.run_own(write, "tag", progress=False)
    assert calls == [(5, 10), (5, 10)] and path.read_text().count("\n") == 5
    assert f"tag: {path.name}: redoing (1 rows, expected 5)" in capsys.readouterr().err


def test_changed_configuration_is_refused_unless_overwrite(tmp_path):
    folder = tmp_path / "out.parts"
    config = {"model": "m1", "input_rows": 10}
    claim_folder(folder, "config.json", config, overwrite=False)
    parts = _parts(folder, RowPlan(10))
    _work(parts, [])
    claim_folder(folder, "config.json", dict(config), overwrite=False)  # same configuration: resumed
    assert parts.part_done(parts.plan.own)
    with pytest.raises(ConfigConflict, match="holds parts of another teacher .*--overwrite or another --out"):
        claim_folder(folder, "config.json", {**config, "model": "m2"}, False, "another teacher", "--out")
    assert parts.part_done(parts.plan.own)  # refused: nothing deleted
    claim_folder(folder, "config.json", {**config, "model": "m2"}, overwrite=True)
    assert parts.status(parts.plan.own) is None  # replaced: the old parts are gone
    assert json.loads((folder / "config.json").read_text())["model"] == "m2"


def test_manifest_lists_parts_and_a_changed_part_is_detected(tmp_path):
    parts = _parts(tmp_path, RowPlan(5, num_shards=2, shard_index=1, world_size=2))
    _work(parts, [])
    manifest = parts.write_manifest(tmp_path / "m.json", {"format": "test", "rows": 3})
    assert json.loads((tmp_path / "m.json").read_text()) == manifest
    assert [(f["rank"], f["rows"], f["range"]) for f in manifest["files"]] == [(0, 1, [2, 3]), (1, 2, [3, 5])]
    first = parts.path(parts.plan.part(0))
    assert (
        manifest["files"][0]["path"] == first.name and manifest["files"][0]["bytes"] == first.stat().st_size
    )
    assert listed_checksum_status(first, manifest) == ""
    first.write_text("row X\n")  # same line count, other content: only the checksum can tell
    assert parts.part_done(parts.plan.part(0))
    assert listed_checksum_status(first, manifest) == "sha256 differs from the manifest"
    short = parts.write_manifest(tmp_path / "s.json", {}, parts_key="parts", part_fields=("path", "range"))
    assert short["parts"] == [
        {"path": first.name, "range": [2, 3]},
        {"path": manifest["files"][1]["path"], "range": [3, 5]},
    ]


def test_covering_parts_mix_layouts_and_wait_for_missing_rows(tmp_path):
    for start, stop in [(0, 4), (4, 10), (0, 2), (2, 4), (10, 12)]:  # two world sizes left parts behind
        range_part_path(tmp_path, Part(0, start, stop), ".jsonl").write_text("")
    (tmp_path / "rows-x-y.jsonl").write_text("")  # not a part name: ignored
    cover = covering_parts(tmp_path, 12, ".jsonl")
    assert [(a, b) for a, b, _ in cover] == [(0, 4), (4, 10), (10, 12)]  # longer parts first
    assert covering_parts(tmp_path, 14, ".jsonl") is None
