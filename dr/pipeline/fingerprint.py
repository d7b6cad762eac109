"""Stage fingerprints and records: which stages of a run directory can be reused and which must rerun.

A stage's fingerprint is a SHA-256 over what decides its outputs:
- its command: the module (`dr.train`, ...), the number of processes and its flags, less the flags in
  `IGNORED_FLAGS` (logging/progress, and `--resume_from_checkpoint` / `--overwrite`, which the pipeline
  itself adds to continue a stopped stage). The interpreter path and `env` are not part of it.
- its external inputs: every flag value that names an existing file or folder outside the run directory
  (datasets, qrels, a model folder, a DeepSpeed config) by content: a file by its size and SHA-256, a folder
  by a hash over its files' relative paths, sizes and SHA-256s (hidden members, `.git` or `.cache`, left
  out). Content, not mtime, so a dataset copied again does not retrain anything; the hashes are cached by
  file identity (`dr.io.content_hash`), so an unchanged input is read once, not on every run.
- the fingerprints of the stages it reads (`Step.upstream`), so a change reaches everything downstream.

When a stage's outputs are complete, its record RUN_DIR/stages/<stage>.json is written (atomically); while
it runs, RUN_DIR/stages/<stage>.running.json holds the fingerprint it is producing. `plan` compares them
with the current config: a stage is reused when its record's fingerprint matches, no upstream stage
reruns and its outputs are complete; otherwise it reruns, and the reason names what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dr.io.atomic import write_json_atomic
from dr.io.content_hash import ContentHashes
from dr.io.shards import file_sha256
from dr.pipeline.steps import Step

# Flags that do not change a stage's result: logging/progress, download caches (their folders change
# whenever anything is downloaded), and the two the pipeline adds to continue a stopped stage
# (`--resume_from_checkpoint latest` for train, `--overwrite` for encode).
IGNORED_FLAGS = frozenset(
    {
        "resume_from_checkpoint",
        "overwrite",
        "logging_steps",
        "logging_first_step",
        "logging_strategy",
        "logging_dir",
        "log_level",
        "report_to",
        "disable_tqdm",
        "run_name",
        "verbose",
        "cache_dir",
        "data_cache_dir",
        "dataset_cache_dir",
    }
)
RECORD_VERSION = 2  # 2: inputs by content (1 fingerprinted folders and large files by mtime)


def _json_safe(value: Any) -> Any:
    """The value as it reads back from JSON (tuples -> lists, dates -> strings), for comparisons."""
    return json.loads(json.dumps(value, default=str))


def split_command(cmd: list[str]) -> tuple[str, int, list[str]]:
    """(module, processes, flags) of `python [-m torch.distributed.run ... --nproc_per_node N] -m MODULE ...`;
    a command without `-m` is (its second word, 1, the rest)."""
    if "-m" not in cmd:
        return (cmd[1] if len(cmd) > 1 else cmd[0], 1, cmd[2:])
    at = len(cmd) - 1 - cmd[::-1].index("-m")
    nproc = int(cmd[cmd.index("--nproc_per_node") + 1]) if "--nproc_per_node" in cmd[:at] else 1
    return cmd[at + 1], nproc, cmd[at + 2 :]


def result_flags(flags: list[str]) -> list[str]:
    """The flags with those in `IGNORED_FLAGS` (and their values) left out."""
    out: list[str] = []
    skipping = False
    for token in flags:
        if token.startswith("--"):
            skipping = token[2:].split("=", 1)[0] in IGNORED_FLAGS
        if not skipping:
            out.append(token)
    return out


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def path_fingerprint(path: Path, hashes: ContentHashes | None = None) -> dict[str, Any]:
    """A file: its size and SHA-256; a folder: a hash over its non-hidden files' relative paths, sizes and
    SHA-256s (hidden members such as `.git` or a download `.cache` are not read by the loaders and change
    on their own)."""
    hashes = hashes or ContentHashes(cache_file=None)
    if path.is_file():
        return {"kind": "file", "size": path.stat().st_size, "sha256": hashes.sha256(path)}
    return _folder_fingerprint(path, lambda m: f"{m.stat().st_size}\0{hashes.sha256(m)}", hidden=False)


def v1_path_fingerprint(path: Path) -> dict[str, Any]:
    """How record version 1 fingerprinted an input (a file over 64 MiB, and every folder member, by size and
    mtime). Kept only to recognise a version-1 record whose inputs are untouched, so that upgrading dr
    rewrites the record instead of rerunning the stage."""
    st = path.stat()
    if path.is_file():
        if st.st_size > 64 * 1024 * 1024:
            return {"kind": "file", "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return {"kind": "file", "size": st.st_size, "sha256": file_sha256(path)}
    return _folder_fingerprint(path, _size_and_mtime, hidden=True)


def _size_and_mtime(member: Path) -> str:
    st = member.stat()
    return f"{st.st_size}\0{st.st_mtime_ns}"


def _folder_fingerprint(path: Path, member_key: Callable[[Path], str], hidden: bool) -> dict[str, Any]:
    """A folder's fingerprint: SHA-256 over ``relative path \\0 member_key(member)`` of its files in sorted
    walk order (members whose key cannot be read, such as dangling links, are left out; hidden files and
    folders too unless `hidden`)."""
    digest = hashlib.sha256()
    count = 0
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if hidden or not d.startswith("."))
        for name in sorted(f for f in files if hidden or not f.startswith(".")):
            member = Path(folder) / name
            try:
                key = member_key(member)
            except OSError:
                continue
            digest.update(f"{member.relative_to(path).as_posix()}\0{key}\n".encode())
            count += 1
    return {"kind": "folder", "files": count, "members_sha256": digest.hexdigest()}


def input_paths(flags: list[str], run_dir: Path) -> list[Path]:
    """Flag values that name an existing file or folder outside the run directory (the stage's external
    inputs; what it reads inside the run directory is covered by its upstream stages' fingerprints)."""
    found: list[Path] = []
    for token in flags:
        if token.startswith("-") or not token or "*" in token:
            continue
        path = Path(token).absolute()
        try:
            exists = path.exists()
        except OSError:  # a value too long to be a path
            continue
        if exists and not _inside(path, run_dir) and path not in found:
            found.append(path)
    return found


class Fingerprinter:
    """Computes stage fingerprints, fingerprinting each input path once per pipeline invocation."""

    def __init__(self, run_dir: str | os.PathLike, hashes: ContentHashes | None = None) -> None:
        self.run_dir = Path(run_dir).absolute()
        self.hashes = hashes or ContentHashes()
        self._paths: dict[tuple[Path, int], dict[str, Any]] = {}

    def inputs(self, flags: list[str], version: int = RECORD_VERSION) -> dict[str, Any]:
        out = {}
        for path in input_paths(flags, self.run_dir):
            if (path, version) not in self._paths:
                made = (
                    path_fingerprint(path, self.hashes)
                    if version == RECORD_VERSION
                    else v1_path_fingerprint(path)
                )
                self._paths[path, version] = made
            out[str(path)] = self._paths[path, version]
        return out

    def payload(self, step: Step, upstream: dict[str, str], version: int = RECORD_VERSION) -> dict[str, Any]:
        """Everything the fingerprint covers, plus the stage's config keys (recorded, not hashed: they
        reach the command as flags) so a rerun can name the key that changed. `version=1`: the payload
        an older dr recorded (inputs by `v1_path_fingerprint`)."""
        module, nproc, flags = split_command(step.cmd)
        kept = result_flags(flags)
        return {
            "stage": step.name,
            "module": module,
            "processes": nproc,
            "flags": kept,
            "inputs": self.inputs(kept, version),
            "upstream": dict(upstream),
        }


def fingerprint_of(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# ---- records ----------------------------------------------------------------------------------------
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def record_path(stages_dir: Path, name: str) -> Path:
    return stages_dir / f"{_safe(name)}.json"


def running_path(stages_dir: Path, name: str) -> Path:
    return stages_dir / f"{_safe(name)}.running.json"


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object at path, or None when it is missing or unreadable (then the stage reruns)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def make_record(step: Step, fingerprint: str, payload: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "version": RECORD_VERSION,
        "stage": step.name,
        "fingerprint": fingerprint,
        "argv": list(step.cmd),
        **payload,
        "config": _json_safe(step.config),
        **extra,
    }


def write_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---- the plan ---------------------------------------------------------------------------------------
@dataclass
class Decision:
    """Reuse or rerun one step, and why."""

    step: Step
    fingerprint: str
    payload: dict[str, Any]
    rerun: bool
    reason: str = ""
    resume: bool = False  # rerun on top of the outputs of a stopped run with the same fingerprint
    adopt: dict[str, Any] | None = None  # reuse: the running marker to turn into the record
    causes: set[str] = field(default_factory=set)  # the stages whose own change makes this one rerun

    @property
    def line(self) -> str:
        word = "rerun" if self.rerun else "reuse"
        return f"{self.step.name}: {word}" + (f" ({self.reason})" if self.reason else "")


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def describe_change(old: dict[str, Any], new: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """What differs between a stage's record and its current payload, in words (config keys first)."""
    reasons = []
    old_config, new_config = old.get("config") or {}, _json_safe(config)
    for key in sorted(set(old_config) | set(new_config)):
        if old_config.get(key) != new_config.get(key):
            reasons.append(f"{key}: {_short(old_config.get(key))} -> {_short(new_config.get(key))}")
    old_inputs, new_inputs = old.get("inputs") or {}, new["inputs"]
    for path in sorted(set(old_inputs) | set(new_inputs)):
        if old_inputs.get(path) != new_inputs.get(path):
            what = {(True, True): "changed", (False, True): "added", (True, False): "removed"}
            reasons.append(f"input {path} {what[path in old_inputs, path in new_inputs]}")
    if not reasons and (old.get("flags"), old.get("module"), old.get("processes")) != (
        new["flags"],
        new["module"],
        new["processes"],
    ):
        reasons.append("command changed")
    return reasons


def plan(
    steps: list[Step], stages_dir: Path, run_dir: str | os.PathLike, force: bool = False
) -> list[Decision]:
    """Decide, for every step in order, reuse or rerun; reads the run directory and writes nothing there
    (content hashes it computed go to the hash cache, `dr.io.content_hash`)."""
    printer = Fingerprinter(run_dir)
    decisions: dict[str, Decision] = {}
    v1_prints: dict[str, str] = {}  # stages whose version-1 record still matches: their v1 fingerprint
    for step in steps:
        upstream = {u: decisions[u].fingerprint for u in step.upstream if u in decisions}
        payload = printer.payload(step, upstream)
        fp = fingerprint_of(payload)
        complete = step.done()  # always asked once before a run (callers count on it)
        record = read_json(record_path(stages_dir, step.name))
        running = read_json(running_path(stages_dir, step.name))
        causes = set().union(*(decisions[u].causes for u in upstream if decisions[u].rerun))
        decision = Decision(step, fp, payload, rerun=True, causes=causes)
        own: list[str] = []
        if force:
            own = ["--force"]
        elif record is None:
            same_run = running is not None and running.get("fingerprint") == fp and not causes
            if same_run and complete:  # killed between its last output and its record
                decision.rerun, decision.adopt = False, running
                decision.reason = "outputs completed before the previous run was stopped; record written now"
            elif same_run:
                decision.resume = True
                own = ["no stage record: stopped mid-way with the same fingerprint, resuming"]
            else:
                own = ["no stage record: a new run directory, a stopped run or one made by an older dr"]
        elif record.get("fingerprint") != fp and record.get("version", 1) < RECORD_VERSION:
            v1_upstream = {u: v1_prints.get(u, "") for u in upstream}
            v1 = fingerprint_of(printer.payload(step, v1_upstream, version=1))
            if v1 == record.get("fingerprint"):
                # Made by an older dr from these very inputs (their mtimes untouched): keep the outputs and
                # rewrite the record in today's format, instead of retraining after an upgrade.
                v1_prints[step.name] = v1
                if not complete:
                    own = ["outputs incomplete"]
                elif not causes:
                    kept = {key: record[key] for key in ("started", "finished") if key in record}
                    decision.rerun = False
                    decision.adopt = make_record(step, fp, payload, **kept, upgraded_from_version=1)
                    decision.reason = "record made by an older dr, inputs untouched; record upgraded"
            else:
                own = [
                    "stage record made by an older dr (which fingerprinted inputs by mtime), inputs changed since"
                ]
        elif record.get("fingerprint") != fp:
            own = describe_change(record, payload, step.config)
            upstream_changed = [u for u in upstream if (record.get("upstream") or {}).get(u) != upstream[u]]
            if not own and not causes:
                own = (
                    [f"upstream {', '.join(upstream_changed)} changed"]
                    if upstream_changed
                    else ["fingerprint changed"]
                )
        elif not complete:
            own = ["outputs incomplete"]
        elif not causes:
            decision.rerun = False
        if own:
            decision.causes = causes | {step.name}
        if decision.rerun:
            parts = list(own)
            inherited = sorted(causes - {step.name}, key=[s.name for s in steps].index)
            if inherited:
                parts.append(f"upstream {', '.join(inherited)} changed")
            decision.reason = "; ".join(parts)
        decisions[step.name] = decision
    printer.hashes.save()
    return list(decisions.values())


def dependents(steps: list[Step], name: str) -> list[Step]:
    """Every step that reads `name`'s outputs, directly or through others, in run order."""
    affected = {name}
    out = []
    for step in steps:
        if affected & set(step.upstream):
            affected.add(step.name)
            out.append(step)
    return out
