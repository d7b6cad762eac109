"""The stage graph of `dr pipeline`: train -> encode (corpus shards, queries) -> search -> convert -> eval,
with the optional second stages bm25 -> fuse -> rerank -> rerank_fuse (each on when its config section is a
mapping).

Every stage is its own subprocess (`python -m dr.<stage>` or `python -m torch.distributed.run --standalone
--nproc_per_node N -m dr.<stage>`), so the pipeline runs exactly the commands a user would type. This
module builds those commands from a resolved config, says which stages each one reads (`Step.upstream`)
and which config keys it depends on (`Step.config`, kept in its stage record), how to tell that its
outputs are complete (`Step.done`), and how to remove them before a rerun (`Step.invalidate`).
Whether a stage runs is decided by `dr.pipeline.fingerprint`; running it is `dr.pipeline.runner`.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dr.io.shards import OutputLayout, manifest_complete
from dr.model import DR_CONFIG_NAME
from dr.pipeline.config import ENCODE_KEYS, RUN_SUFFIX

DENSE = "dense"  # the name of the dense run (search + convert) among the runs the pipeline makes
# The optional second stages, in stage order: config section -> the name of the run it writes
# (run.<name>.trec, evaluated into metrics.<name>.json unless it is the final run).
SECOND_STAGE_RUNS = {"bm25": "bm25", "fuse": "fused", "rerank": "rerank", "rerank_fuse": "rerank_fused"}


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
    """One subprocess of the pipeline: what it runs, what it reads, how to tell its outputs are complete."""

    name: str
    cmd: list[str]
    done: Callable[[], bool]
    invalidate: Callable[[], None] = field(default=lambda: None)  # remove its outputs before a fresh run
    upstream: tuple[str, ...] = ()  # names of the steps whose outputs it reads
    config: dict[str, Any] = field(default_factory=dict)  # dotted config keys it depends on -> values


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
        self.stages = self.root / "stages"
        self.config = self.root / "config.json"
        self.bm25_index = self.root / "bm25-index"
        self.bm25_run = self.second_stage_run("bm25")
        self.fused_run = self.second_stage_run("fuse")
        self.rerank_run = self.second_stage_run("rerank")
        self.rerank_fused_run = self.second_stage_run("rerank_fuse")

    def converted_run(self, run_format: str) -> Path:
        return self.root / f"run.{RUN_SUFFIX[run_format]}"

    def run_metrics(self, run: str) -> Path:
        """metrics.<run>.json: the metrics of a run that is not the pipeline's final one."""
        return self.root / f"metrics.{run}.json"

    def second_stage_run(self, section: str) -> Path:
        """run.<name>.trec: the run the optional stage `section` (bm25, fuse, rerank, rerank_fuse) writes."""
        return self.root / f"run.{SECOND_STAGE_RUNS[section]}.trec"

    def stage_outputs(self, section: str) -> list[Path]:
        """What the optional stage `section` writes and a rerun of it removes: its run, the run's config
        sidecar, and for rerank the per-rank parts it resumes from."""
        run = self.second_stage_run(section)
        made = [run, _sidecar(run)]
        return made + [run.with_name(run.name + ".parts")] if section == "rerank" else made

    def stale_outputs(self, cfg: dict[str, Any]) -> list[Path]:
        """Outputs an earlier config's optional stages left that `cfg` does not make (a bm25, fused or
        reranked run whose section is off now; metrics.<run>.json of a run that is not evaluated separately
        any more). Left in place they would sit next to this run's results looking current."""
        off = [section for section in SECOND_STAGE_RUNS if cfg.get(section) is None]
        stale = [path for section in off for path in self.stage_outputs(section)]
        if "bm25" in off:  # its index outlives bm25's reruns (`dr bm25` reuses it while valid), not the stage
            stale.append(self.bm25_index)
        evaluated = set(runs_made(cfg)) - {final_run(cfg)}
        stale += [
            self.run_metrics(run) for run in (DENSE, *SECOND_STAGE_RUNS.values()) if run not in evaluated
        ]
        return stale


def final_run(cfg: dict[str, Any]) -> str:
    """The run the pipeline answers with (metrics.json): the last stage's: rerank_fused > rerank > fused > dense."""
    for section in ("rerank_fuse", "rerank", "fuse"):
        if cfg.get(section) is not None:
            return SECOND_STAGE_RUNS[section]
    return DENSE


def runs_made(cfg: dict[str, Any]) -> list[str]:
    """Every run a config makes, in stage order: dense, then bm25, fused, rerank, rerank_fused when on."""
    return [DENSE] + [run for section, run in SECOND_STAGE_RUNS.items() if cfg.get(section) is not None]


def _remove(*paths: Path) -> Callable[[], None]:
    def remove() -> None:
        for p in paths:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)

    return remove


def _dotted(prefix: str, section: dict[str, Any] | None) -> dict[str, Any]:
    """{"depth": 10} -> {"search.depth": 10}, one level of nesting flattened (encode.corpus_flags.x)."""
    out: dict[str, Any] = {}
    for key, value in (section or {}).items():
        if isinstance(value, dict):
            out.update(_dotted(f"{prefix}.{key}", value))
        else:
            out[f"{prefix}.{key}"] = value
    return out


def build_steps(cfg: dict[str, Any]) -> list[Step]:
    """All steps of a run, in order, with their exact commands."""
    lay = Layout(cfg["run_dir"])
    procs = cfg["processes"]
    model_flags = dict(cfg["model"])
    steps: list[Step] = []
    enc = dict(cfg["encode"])
    shared = {k: v for k, v in enc.items() if k not in ENCODE_KEYS}
    encode_config = {**_dotted("encode", shared), "processes.encode": procs["encode"]}
    if cfg["train"] is not None:
        steps.append(_train_step(cfg, lay, model_flags))
        encoder_flags = {"model_name_or_path": str(lay.model)}  # pooling etc. come from its dr_config.json
        encoder_upstream: tuple[str, ...] = ("train",)
    else:
        encoder_flags = model_flags
        encoder_upstream = ()
        encode_config = {**_dotted("model", model_flags), **encode_config}
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
        config = {
            **encode_config,
            "encode.num_shards": n_shards,
            "encode.corpus": enc["corpus"],
            "encode.corpus_split": enc.get("corpus_split"),
            **_dotted("encode.corpus_flags", enc.get("corpus_flags")),
        }
        steps.append(
            _encode_step(f"encode_corpus[{i}/{n_shards}]", flags, w_enc, layout, encoder_upstream, config)
        )
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
    qconfig = {
        **encode_config,
        "encode.queries": enc["queries"],
        "encode.queries_split": enc.get("queries_split"),
        **_dotted("encode.query_flags", enc.get("query_flags")),
    }
    steps.append(_encode_step("encode_queries", qflags, w_enc, query_layout, encoder_upstream, qconfig))
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
            upstream=tuple(s.name for s in steps if s.name.startswith("encode_")),
            config={  # the shard layout is part of its --passage_reps / --query_reps globs
                **_dotted("search", cfg["search"]),
                "processes.search": procs["search"],
                "encode.num_shards": n_shards,
                "processes.encode": w_enc,
            },
        )
    )
    run_format = cfg["eval"]["run_format"]
    converted = lay.converted_run(run_format)
    steps.append(
        Step(
            "convert",
            launch_prefix("dr.convert", 1)
            + flags_to_argv({"input": str(lay.run), "output": str(converted), "to": run_format}),
            done=converted.is_file,
            invalidate=_remove(converted),
            upstream=("search",),
            config={"eval.run_format": run_format},
        )
    )
    # Every run the pipeline makes -> (its file, the stage that writes it); each is evaluated, the final
    # one (the pipeline's answer) into metrics.json by the stage `eval`, the others into metrics.<run>.json.
    runs = {DENSE: (converted, "convert")}
    steps += _second_stage_steps(cfg, lay, runs)
    final = final_run(cfg)
    for name in sorted(runs, key=lambda run: run == final):  # the final run's evaluation last
        path, producer = runs[name]
        output = lay.metrics if name == final else lay.run_metrics(name)
        eval_flags = {
            "qrels": cfg["eval"]["qrels"],
            "run": str(path),
            "metrics": list(cfg["eval"]["metrics"]),
            "output": str(output),
        }
        steps.append(
            Step(
                "eval" if name == final else f"eval_{name}",
                launch_prefix("dr.evaluate", 1) + flags_to_argv(eval_flags),
                done=output.is_file,
                invalidate=_remove(output),
                upstream=(producer,),
                config={**_dotted("eval", cfg["eval"]), "eval.run": name},
            )
        )
    return steps


def _train_step(cfg: dict[str, Any], lay: Layout, model_flags: dict[str, Any]) -> Step:
    """`dr train` into RUN_DIR/model; resumes from the newest checkpoint when one exists (the runner
    calls `invalidate` instead when the checkpoints were written under another fingerprint)."""
    flags = {**model_flags, **cfg["train"], "output_dir": str(lay.model)}
    base = launch_prefix("dr.train", cfg["processes"]["train"]) + flags_to_argv(flags)
    config = {
        **_dotted("model", model_flags),
        **_dotted("train", cfg["train"]),
        "processes.train": cfg["processes"]["train"],
    }
    step = Step("train", base, done=(lay.model / DR_CONFIG_NAME).is_file, config=config)
    if any(lay.model.glob("checkpoint-*")) and "resume_from_checkpoint" not in flags:
        step.cmd = base + ["--resume_from_checkpoint", "latest"]

    def invalidate() -> None:  # train afresh, not resume, and never trust the old marker
        shutil.rmtree(lay.model, ignore_errors=True)
        step.cmd = list(base)

    step.invalidate = invalidate
    return step


def _encode_step(
    name: str,
    flags: dict[str, Any],
    nproc: int,
    layout: OutputLayout,
    upstream: tuple[str, ...],
    config: dict[str, Any],
) -> Step:
    cmd = launch_prefix("dr.encode", nproc) + flags_to_argv(flags)
    step = Step(name, cmd, done=lambda: manifest_complete(layout), upstream=upstream, config=config)

    def invalidate() -> None:
        # Delete this shard's files (any layout): `dr encode` without --overwrite would otherwise keep
        # rank files of the old model, and a glob over the folder would mix layouts.
        for path in [
            layout.manifest,
            layout.config,
            *(layout.rank_file(r) for r in range(layout.world_size)),
            *layout.stale_files(),
        ]:
            path.unlink(missing_ok=True)
        if "--overwrite" not in step.cmd:
            step.cmd.append("--overwrite")

    step.invalidate = invalidate
    return step


def _query_split(enc: dict[str, Any]) -> str:
    """The split of the evaluation queries, as `dr encode --dataset_split` reads it (its default: train);
    passed explicitly because `dr rerank`'s own default is test."""
    return enc.get("queries_split") or "train"


def _second_stage_steps(cfg: dict[str, Any], lay: Layout, runs: dict[str, tuple[Path, str]]) -> list[Step]:
    """bm25, fuse, rerank and rerank_fuse, each when its config section is on; adds the runs they write to
    `runs`.

    They read the same corpus and queries as the encode section names; the flags a stage's section may not
    set (inputs, outputs, formats) are refused by `dr.pipeline.check`. The new runs are written as TREC.
    """
    enc = cfg["encode"]
    inputs = {"corpus": enc["corpus"], "queries": enc["queries"], "query_split": _query_split(enc)}
    inputs_config = {
        "encode.corpus": enc["corpus"],
        "encode.queries": enc["queries"],
        "encode.queries_split": enc.get("queries_split"),
    }

    def stage(section: str, module: str, flags: dict[str, Any], nproc: int = 1, **step: Any) -> Step:
        """The step of `section`, which writes run.<name>.trec (registered in `runs`) and removes it,
        its sidecar (and rerank's parts) before a fresh run."""
        run = lay.second_stage_run(section)
        runs[SECOND_STAGE_RUNS[section]] = (run, section)
        flags = {**flags, "save_ranking_to": str(run), "run_format": "trec"}
        return Step(
            section,
            launch_prefix(module, nproc) + flags_to_argv(flags),
            done=run.is_file,
            invalidate=_remove(*lay.stage_outputs(section)),
            **step,
        )

    steps: list[Step] = []
    if cfg.get("bm25") is not None:
        # the index is reused by `dr bm25` itself while corpus and settings hold
        flags = {**cfg["bm25"], **inputs, "index_dir": str(lay.bm25_index)}
        steps.append(
            stage("bm25", "dr.bm25", flags, config={**_dotted("bm25", cfg["bm25"]), **inputs_config})
        )
    first_stage = (lay.run, "tevatron", "search")  # the run the reranker reads: dense, or fused below
    if cfg.get("fuse") is not None:
        flags = {
            **cfg["fuse"],
            "runs": [str(lay.run), str(lay.bm25_run)],  # --weights are in this order: dense, bm25
            "run_formats": ["tevatron", "trec"],
        }
        steps.append(
            stage("fuse", "dr.fuse", flags, upstream=("search", "bm25"), config=_dotted("fuse", cfg["fuse"]))
        )
        first_stage = (lay.fused_run, "trec", "fuse")
    source, source_format, source_stage = first_stage
    if cfg.get("rerank") is not None:
        nproc = cfg["processes"]["rerank"]
        flags = {
            **cfg["rerank"],
            "run_file": str(source),  # torchrun reads `--run` as its own `--run-path`
            "input_run_format": source_format,
            **inputs,
        }
        config = {
            **_dotted("rerank", cfg["rerank"]),
            **inputs_config,
            "processes.rerank": nproc,
            "rerank.input": source_stage,
        }
        # A rerun under another fingerprint starts afresh (invalidate); a stopped one with the same
        # fingerprint keeps its parts (the runner does not invalidate it) and `dr rerank` resumes from them.
        steps.append(stage("rerank", "dr.rerank", flags, nproc, upstream=(source_stage,), config=config))
    if cfg.get("rerank_fuse") is not None:
        # The cross-encoder's scores fused with those of the run it reranked: the two rank the same
        # candidates, and each knows what the other misses (bench/RESULTS.md, SciFact).
        flags = {
            **cfg["rerank_fuse"],
            "runs": [str(lay.rerank_run), str(source)],  # --weights are in this order: reranked, its input
            "run_formats": ["trec", source_format],
        }
        config = {**_dotted("rerank_fuse", cfg["rerank_fuse"]), "rerank_fuse.input": source_stage}
        steps.append(stage("rerank_fuse", "dr.fuse", flags, upstream=("rerank", source_stage), config=config))
    return steps


def _sidecar(run: Path) -> Path:
    """`<run>.config.json`, which `dr bm25`, `dr fuse` and `dr rerank` write next to their run."""
    return run.with_name(run.name + ".config.json")
