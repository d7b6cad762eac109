"""`dr pipeline CONFIG`: train -> encode -> search -> convert (-> bm25 -> fuse -> rerank -> rerank_fuse) -> eval from one
file, each stage a subprocess; the second stages in parentheses are optional config sections.

One job per module: `config` (load, `${VAR}` expansion, `--set` overrides, schema), `check` (types and
every stage's flags before anything runs), `steps` (the stage graph and the commands), `fingerprint`
(stage fingerprints, records and the reuse/rerun plan), `runner` (subprocesses, logs, timeouts, signals),
`progress` (one console line per stage in quiet mode), `cli` (the command). docs/pipeline.md has the
config schema and the reuse rule. The names below are re-exported for `dr demo` and the tests.
"""

from dr.pipeline.check import check_stage_flags, fix_bool_choices
from dr.pipeline.config import (
    PipelineError,
    add_override_flag,
    apply_override,
    expand_value,
    load_config,
    resolve_config,
    set_dotted,
)
from dr.pipeline.runner import Runner, StageFailed, run_pipeline
from dr.pipeline.steps import Layout, Step, build_steps, flags_to_argv

__all__ = [
    "Layout",
    "PipelineError",
    "Runner",
    "StageFailed",
    "Step",
    "add_override_flag",
    "apply_override",
    "build_steps",
    "check_stage_flags",
    "expand_value",
    "fix_bool_choices",
    "flags_to_argv",
    "load_config",
    "resolve_config",
    "run_pipeline",
    "set_dotted",
]
