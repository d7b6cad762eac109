"""Rerank a run's top-K with a cross-encoder: inputs, the scoring of a range of queries, parts, publishing.

Rows are the run's queries, in the run's order. Like `dr score`, they are cut into `--num_shards` contiguous
shards (or a SLURM job array's tasks) and each shard into one contiguous range per rank (`dr.row_ranges`);
each rank writes its queries' reranked hits to `<output>.parts/rows-<start>-<stop>.tsv` (Tevatron lines,
temporary name renamed when complete), so a rerun skips finished parts and redoes the rest. When the parts
cover every query, rank 0 writes the run in `--run_format` and `<output>.config.json`, atomically.

Why the result does not depend on the ranks: a query's K candidates are batched among themselves (longest
first, `dr.encode.batching.sort_and_batch`), never with another query's, so every batch, its padding and
therefore every logit are the same whichever rank or window scored the query. Hits are then ordered by the
one tie rule (`dr.ranking.sort_hits`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dr.errors import InputError, UsageError
from dr.io.atomic import write_json_atomic
from dr.io.runs import Run, read_run, write_run
from dr.ranking import sort_hits
from dr.row_ranges import (
    Part,
    RowParts,
    ShardingError,
    claim_folder,
    covering_parts,
    plan_rows,
    range_part_path,
)

logger = logging.getLogger("dr.rerank")

PART_SUFFIX = ".tsv"
SETTINGS_FILE = "rerank.json"  # in the parts folder: what its parts were made from


class RerankInputError(InputError):
    """A candidate docid missing from the corpus, a run query missing from the queries (exit 1)."""


# ---- inputs -------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """What every rank needs: the run's queries (in run order) with their top-K docids, the query texts,
    the corpus and each docid's row in it."""

    qids: list[str]
    candidates: dict[str, list[str]]
    query_text: dict[str, str]
    corpus: Any  # dr.io.corpus.TextCorpus
    row_of: dict[str, int]


def read_candidates(path: str, fmt: str, depth: int) -> dict[str, list[str]]:
    """qid -> the docids of its first `depth` hits, best first (the run's own order: the tie rule for
    scored formats, the rank column for MS MARCO)."""
    run, _ = read_run(path, fmt, flag="--input_run_format")
    return {qid: [docid for docid, _ in hits[:depth]] for qid, hits in run.rankings.items()}


def candidate_rows(corpus: Any, wanted: set[str]) -> dict[str, int]:
    """docid -> corpus row, for the `wanted` docids found in the corpus (the others are absent). Found in
    Arrow, so a corpus of millions never becomes a Python dict of every docid on every rank."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = corpus.ids(0, len(corpus))
    found = pc.is_in(ids, value_set=pa.array(sorted(wanted), type=ids.type))
    rows = pc.indices_nonzero(found).to_pylist()
    return dict(zip(ids.filter(found).to_pylist(), rows))


def load_inputs(args: argparse.Namespace) -> Inputs:
    """Read run, queries and corpus, and check that every candidate and query is known (before any part
    is written: a bad input leaves nothing behind)."""
    from dr.io.corpus import load_corpus

    candidates = read_candidates(args.run, args.input_run_format, args.depth)
    queries = load_corpus(args.queries, "query", split=args.query_split)
    queries.validate(0, len(queries))
    queries.check_unique(0, len(queries))
    qids, texts = queries.records(0, len(queries))
    query_text = dict(zip(qids, texts))
    missing = next((qid for qid in candidates if qid not in query_text), None)
    if missing is not None:
        raise RerankInputError(f"{args.run}: query {missing!r} is not in --queries {args.queries}")
    corpus = load_corpus(args.corpus, "passage")
    corpus.validate(0, len(corpus))
    corpus.check_unique(0, len(corpus))
    row_of = candidate_rows(corpus, {d for docids in candidates.values() for d in docids})
    for qid, docids in candidates.items():
        unknown = next((d for d in docids if d not in row_of), None)
        if unknown is not None:
            raise RerankInputError(
                f"{args.run}: docid {unknown!r} (a candidate of query {qid!r}) is not in --corpus {args.corpus}"
            )
    return Inputs(list(candidates), candidates, query_text, corpus, row_of)


# ---- the model ----------------------------------------------------------------------------------------


@dataclass
class Reranker:
    """The cross-encoder ready to score: classifier, tokenizer, pair settings, device, precision."""

    model: Any
    tokenizer: Any
    cfg: Any  # dr.model.cross_encoder.CrossEncoderConfig
    device: Any
    precision: Any  # dr.model.precision.Precision
    forward_context: Any
    batch_size: int

    def rerank(self, query: str, docids: list[str], passages: list[str]) -> list[tuple[str, float]]:
        """One query's candidates, scored and ordered by the tie rule (the batches hold this query only)."""
        from dr.model.cross_encoder import score_pairs

        scores = score_pairs(
            self.model, self.tokenizer, [query] * len(passages), passages, self.cfg, self.batch_size,
            self.device, self.forward_context,
        )  # fmt: skip
        return sort_hits(zip(docids, scores))


def load_reranker(args: argparse.Namespace, device: Any) -> Reranker:
    """The classifier in eval mode on `device`, in the precision `--bf16` asks (auto: bf16 where native)."""
    from transformers import AutoTokenizer

    from dr.model.cross_encoder import CrossEncoderConfig, load_classifier
    from dr.model.precision import cast_for_inference, choose_precision, parse_bf16

    overrides = {"max_length": args.max_length, "truncation": args.truncation}
    cfg = CrossEncoderConfig.resolve(args.model_name_or_path, overrides)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path)
    cfg.fit_to(tokenizer.model_max_length)
    try:
        precision = choose_precision(parse_bf16(args.bf16), False, "autocast", device.type)
    except ValueError as err:
        raise UsageError(str(err)) from err
    model = load_classifier(args.model_name_or_path).to(device).eval()
    model, context = cast_for_inference(model, precision, device.type)
    return Reranker(model, tokenizer, cfg, device, precision, context, args.batch_size)


# ---- a rank's queries -> its part -----------------------------------------------------------------------


def part_path(parts_dir: Path, part: Part) -> Path:
    return range_part_path(parts_dir, part, PART_SUFFIX)


def part_qids(path: Path) -> list[str]:
    """The query ids of a part file, in order of first appearance."""
    seen: dict[str, None] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                seen.setdefault(line.split("\t", 1)[0], None)
    return list(seen)


def make_part_check(qids: list[str]):
    """Resume check (`dr.row_ranges.PartCheck`): a part holds exactly its range's queries, in order."""

    def check(part: Part, path: Path) -> str:
        found = part_qids(path)
        expected = qids[part.start : part.stop]
        return (
            "" if found == expected else f"{len(found)} queries, expected {len(expected)} ({expected[:1]}...)"
        )

    return check


def write_part(
    tmp: Path, inputs: Inputs, reranker: Reranker, start: int, stop: int, advance: Callable[[int], Any]
) -> int:
    """Rerank queries [start, stop) of the run into `tmp` (Tevatron lines), calling `advance(1)` after
    each query; return the pairs scored."""
    from dr.io.runs import format_score

    pairs = 0
    with open(tmp, "w", encoding="utf-8") as out:
        for qid in inputs.qids[start:stop]:
            docids = inputs.candidates[qid]
            _, passages = inputs.corpus.records_at([inputs.row_of[d] for d in docids])
            hits = reranker.rerank(inputs.query_text[qid], docids, passages)
            out.writelines(f"{qid}\t{docid}\t{format_score(score)}\n" for docid, score in hits)
            pairs += len(docids)
            advance(1)
    return pairs


@dataclass
class Plan:
    """This rank's share: the inputs, its parts, the reranker and what the parts folder records."""

    inputs: Inputs
    parts: RowParts
    parts_dir: Path
    reranker: Reranker
    identity: dict[str, Any]
    tag: str
    progress: bool


def identity_of(args: argparse.Namespace, reranker: Reranker) -> dict[str, Any]:
    """What the parts are made from; a rerun with anything else must not reuse them."""
    from dr.encode.run import model_identity

    run = Path(args.run)
    return {
        "model": model_identity(args.model_name_or_path),
        "pairs": asdict(reranker.cfg),
        "precision": reranker.precision.dtype,
        "run": str(run.resolve()),
        "run_bytes": run.stat().st_size,
        "input_run_format": args.input_run_format,
        "depth": args.depth,
        "queries": str(Path(args.queries).resolve()),
        "query_split": args.query_split,
        "corpus": str(Path(args.corpus).resolve()),
    }


def setup_rank(args: argparse.Namespace, rank: int, world: int) -> Plan:
    """Check the inputs, plan this rank's queries, load the model; rank 0 claims the parts folder."""
    from dr import distributed as dist

    inputs = load_inputs(args)
    try:
        rows = plan_rows(len(inputs.qids), args.num_shards, args.shard_index, world, rank)
    except ShardingError as err:
        raise UsageError(str(err)) from err
    reranker = load_reranker(args, dist.default_device())
    parts_dir = Path(str(args.save_ranking_to) + ".parts")
    identity = identity_of(args, reranker)
    if rank == 0:
        claim_folder(parts_dir, SETTINGS_FILE, identity, args.overwrite, "another run, model or setting",
                     "--save_ranking_to")  # fmt: skip
    parts = RowParts(rows, lambda part: part_path(parts_dir, part), make_part_check(inputs.qids))
    tag = f"dr rerank [rank {rank}/{world}]" if world > 1 else "dr rerank"
    return Plan(inputs, parts, parts_dir, reranker, identity, tag, progress=rank == 0)


def rerank_own_part(args: argparse.Namespace, plan: Plan) -> None:
    """Rerank this rank's queries into its part file, unless a complete one is there (`RowParts.run_own`)."""

    def write(tmp: Path, part: Part, advance: Callable[[int], Any]) -> str:
        pairs = write_part(tmp, plan.inputs, plan.reranker, part.start, part.stop, advance)
        return f"{pairs} pairs"

    plan.parts.run_own(
        write, plan.tag, ("query", "queries"), plan.progress, f" ({plan.reranker.precision.describe()})"
    )


def publish(args: argparse.Namespace, plan: Plan) -> bool:
    """Rank 0: when the parts cover every query, write the run (run order of queries) and its config."""
    total = len(plan.inputs.qids)
    parts = covering_parts(plan.parts_dir, total, PART_SUFFIX)
    if parts is None:
        print(
            f"dr rerank: not every query of {args.run} is reranked yet (other shards running?); the job that "
            "completes the parts writes the output",
            file=sys.stderr,
        )
        return False
    rankings: dict[str, list[tuple[str, float]]] = {}
    for _, _, path in parts:
        if path.stat().st_size:
            rankings.update(read_run(path, "tevatron")[0].rankings)
    if list(rankings) != plan.inputs.qids:
        raise UsageError(f"{plan.parts_dir}: parts hold {len(rankings)} queries, the run {total}")
    run = Run(rankings)
    write_run(args.save_ranking_to, run, args.run_format, args.run_tag)
    write_json_atomic(
        str(args.save_ranking_to) + ".config.json",
        {
            "args": vars(args),
            "made_from": plan.identity,
            "num_queries": total,
            "num_hits": run.num_hits(),
            "parts": [{"path": p.name, "range": [a, b]} for a, b, p in parts],
        },
    )
    print(
        f"dr rerank: wrote {total} queries ({run.num_hits()} hits) to {args.save_ranking_to}", file=sys.stderr
    )
    return True
