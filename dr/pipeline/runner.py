"""Running the stages of `dr pipeline`: subprocesses, logs, timeouts, signals, and the reuse/rerun loop.

Each stage runs as its own subprocess in the pipeline's process group (killing the group stops every stage
process), its output tee-d to RUN_DIR/logs/<stage>.log. `Runner.run` follows the plan of
`dr.pipeline.fingerprint`: a reused stage is skipped; before a stage reruns, the records of every stage
downstream of it and its own are deleted first (a kill from then on leaves no record describing outputs it
did not produce), then the downstream outputs and, unless it resumes a stopped run with the same
fingerprint, its own; its record is written only after its outputs are complete. RUN_DIR/config.json is
removed when anything reruns and written again only after the whole run succeeded.
"""

from __future__ import annotations

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
from pathlib import Path
from typing import Any

from dr.console import echo
from dr.errors import InputError
from dr.io.atomic import write_json_atomic
from dr.pipeline.check import check_stage_flags, fix_bool_choices
from dr.pipeline.fingerprint import (
    Decision,
    dependents,
    make_record,
    now,
    plan,
    record_path,
    running_path,
    write_record,
)
from dr.pipeline.progress import StageProgress
from dr.pipeline.steps import DENSE, Layout, Step, build_steps, final_run

DEFAULT_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


class StageFailed(InputError):
    """A stage exited with an error or left incomplete outputs; the message names the stage and its log."""


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
                    log(
                        f"{name}: exited; a process it left behind still holds its output: not waiting for it"
                    )
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

    def run(self, steps: list[Step]) -> list[Decision]:
        """Reuse every step whose record matches its fingerprint and rerun the others (see the module
        docstring for the order of removals); returns the plan it followed."""
        stages = self.layout.stages
        decisions = plan(steps, stages, self.layout.root, force=self.force)
        if any(d.rerun for d in decisions):
            self.layout.config.unlink(missing_ok=True)  # no longer describes every output
            # Records of stages this config does not have (another num_shards, train: null now).
            current = {record_path(stages, s.name) for s in steps} | {
                running_path(stages, s.name) for s in steps
            }
            for path in stages.glob("*.json") if stages.is_dir() else []:
                if path not in current:
                    path.unlink()
            for path in self.layout.stale_outputs(self.cfg):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        for decision in decisions:
            step = decision.step
            if not decision.rerun:
                if decision.adopt is not None:
                    write_record(record_path(stages, step.name), {"finished": now(), **decision.adopt})
                    running_path(stages, step.name).unlink(missing_ok=True)
                    self.log(f"{step.name}: skip ({decision.reason})")
                else:
                    self.log(f"{step.name}: skip (outputs complete)")
                continue
            self.log(decision.line)
            later = dependents(steps, step.name)
            for other in [*later, step]:
                record_path(stages, other.name).unlink(missing_ok=True)
            for other in later:
                running_path(stages, other.name).unlink(missing_ok=True)
                other.invalidate()
            if not decision.resume:
                step.invalidate()
            record = make_record(step, decision.fingerprint, decision.payload, started=now())
            write_record(running_path(stages, step.name), record)
            self.log(f"{step.name}: start: {shlex.join(step.cmd)}")
            started = time.monotonic()
            self._execute(step)
            if not step.done():
                raise StageFailed(
                    f"{step.name}: finished but its outputs are incomplete (see {self._log_path(step)})"
                )
            seconds = round(time.monotonic() - started, 1)
            record.update(argv=list(step.cmd), finished=now(), seconds=seconds)
            write_record(record_path(stages, step.name), record)
            running_path(stages, step.name).unlink(missing_ok=True)
            self.log(f"{step.name}: done in {seconds:.1f} s")
        return decisions

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


def run_pipeline(cfg: dict[str, Any], quiet: bool = False, force: bool = False) -> dict[str, Any]:
    """Run (or resume) the pipeline described by a resolved config; return the metrics."""
    fix_bool_choices(cfg)
    steps = build_steps(cfg)
    check_stage_flags(steps)  # every stage's flags, before the first stage runs
    runner = Runner(cfg, quiet=quiet, force=force)
    runner.layout.logs.mkdir(parents=True, exist_ok=True)
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
    # Only now does the whole config describe every output (each stage record carries its own part).
    write_json_atomic(runner.layout.config, cfg)
    metrics = json.loads(runner.layout.metrics.read_text())
    if cfg.get("train") is not None and (runner.layout.model / "README.md").is_file():
        from dr.model.card import update_card_metrics  # the model card reports what this run measured

        # The card describes the bi-encoder: its own (dense) run, not a fused or reranked one.
        dense = runner.layout.run_metrics(DENSE)
        own = json.loads(dense.read_text()) if final_run(cfg) != DENSE else metrics
        dataset = (cfg.get("encode") or {}).get("corpus")
        update_card_metrics(runner.layout.model, own, dataset=str(dataset) if dataset else None)
    runner.log(f"finished in {time.monotonic() - started:.1f} s; metrics: {runner.layout.metrics}")
    return metrics
