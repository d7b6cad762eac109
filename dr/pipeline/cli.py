"""`dr pipeline CONFIG [--set KEY=VALUE ...] [--force] [--dry_run] [--check]`: the command (see `dr.pipeline`)."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from dr.console import echo
from dr.eval.metrics import format_table
from dr.flags import add_bool
from dr.pipeline.check import check_stage_flags, fix_bool_choices
from dr.pipeline.config import add_override_flag, load_config
from dr.pipeline.fingerprint import plan
from dr.pipeline.runner import run_pipeline
from dr.pipeline.steps import Layout, build_steps, final_run, runs_made


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dr pipeline",
        description="train -> encode -> search -> convert (-> bm25 -> fuse -> rerank -> rerank_fuse) -> eval from one config",
    )
    parser.add_argument("config", help="pipeline config (YAML/JSON), see docs/pipeline.md")
    add_override_flag(parser)
    add_bool(parser, "--quiet", help="stage output to RUN_DIR/logs only")
    add_bool(parser, "--force", help="redo every stage (retrain, overwrite outputs)")
    add_bool(
        parser,
        "--dry_run",
        help="print the resolved config and, per stage, reuse or rerun (with the reason) and its command; "
        "run and write nothing",
    )
    add_bool(
        parser,
        "--check",
        help="validate the config and every stage's flags (each command's own parser), then exit; "
        "run and write nothing",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Exit status 0 ok, 2 bad config (`PipelineError`), 1 a stage failed (`StageFailed`)."""
    cfg = load_config(args.config, args.overrides)
    if args.check:
        fix_bool_choices(cfg)
        steps = build_steps(cfg)
        check_stage_flags(steps)
        echo(f"{args.config}: ok ({len(steps)} stages: {', '.join(s.name for s in steps)})")
        return 0
    if args.dry_run:
        echo(json.dumps(cfg, indent=2))
        fix_bool_choices(cfg)
        steps = build_steps(cfg)
        for decision in plan(steps, Layout(cfg["run_dir"]).stages, cfg["run_dir"], force=args.force):
            echo(f"{decision.line}\n  {shlex.join(decision.step.cmd)}")
        return 0
    metrics = run_pipeline(cfg, quiet=args.quiet, force=args.force)
    runs = runs_made(cfg)
    if len(runs) == 1:
        echo(format_table(metrics, title=Path(cfg["run_dir"]).name))
        return 0
    # One row per run; metrics.json (the last row's values) is the final run's.
    lay, final = Layout(cfg["run_dir"]), final_run(cfg)
    table = {
        run: json.loads((lay.metrics if run == final else lay.run_metrics(run)).read_text())
        for run in sorted(runs, key=lambda run: run == final)
    }
    echo(format_table(table, metrics=list(cfg["eval"]["metrics"]), title=Path(cfg["run_dir"]).name))
    echo(f"metrics.json: the {final} run")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`dr pipeline` for library callers and tests: the exit status."""
    from dr.cli import run_command

    return run_command("pipeline", argv)
