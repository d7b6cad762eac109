"""Teacher scores for a training file -> the same rows with "score" on every passage (`dr score`: score_cli).

The teacher is a cross-encoder (`--teacher_type cross`: any `AutoModelForSequenceClassification` folder, e.g.
one `dr train --model_type cross_encoder` wrote, whose `dr_cross_encoder.json` sets the pair defaults;
score = its logit for the (query, passage) pair: the single logit of a 1-label head, the positive-class
logit (label 1) of a 2-label head) or a bi-encoder (`--teacher_type bi`: any model `dr encode` takes;
score = q.p with its pooling / normalisation / prefixes / max lengths, through `dr.model.encoder.BiEncoder`).
Passages are `title + " " + text`, as training and encoding build them.

Distributed like `dr encode`: the input rows are cut into `--num_shards` contiguous shards (or a SLURM job
array's tasks), the shard into one contiguous range per rank (torchrun / deepspeed / srun); each rank writes
its rows, scored, to `<output>.parts/rows-<start>-<stop>.jsonl` (temporary name, renamed when complete),
so a rerun skips finished parts and redoes the rest (planning, atomic parts and resume: `dr.row_ranges`). When the parts cover every input row, rank 0 writes
`<output>` (rows in input order) and `<output>.manifest.json` (counts, parts, teacher), atomically; with a
job array the task that completes the cover does it. `--overwrite` starts from scratch.

Input: Tevatron-format JSONL (what `dr mine` writes); rows are passed through unchanged except "score".
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dr.errors import InputError, UsageError
from dr.io.atomic import atomic_path, write_json_atomic
from dr.row_ranges import (
    Part,
    RowParts,
    ShardingError,
    claim_folder,
    covering_parts,
    plan_rows,
    range_part_path,
)

logger = logging.getLogger("dr.score")

TEACHER_FILE = "teacher.json"
PASSAGE_FIELDS = ("positive_passages", "negative_passages")


class ScoreError(InputError):
    """Bad input rows (exit 1); the message names the file, the line and the field."""


class ScoreUsageError(UsageError):
    """Bad flags, or outputs of another input or teacher (exit 2)."""


# ---- input ---------------------------------------------------------------------------------------------
class JsonlRows:
    """Random access to the non-blank lines of a JSONL file by row number (byte offsets, one scan)."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise ScoreError(f"{path}: no such file")
        if path.suffix not in (".jsonl", ".json"):
            raise ScoreUsageError(f"{path}: dr score reads Tevatron-format JSONL (.jsonl); convert it first")
        self.path = path
        self.offsets: list[int] = []  # byte offset of each row
        self.lines: list[int] = []  # 1-based line number of each row, for messages
        with open(path, "rb") as f:
            position = 0
            for number, line in enumerate(f, 1):
                if line.strip():
                    self.offsets.append(position)
                    self.lines.append(number)
                position += len(line)
        if not self.offsets:
            raise ScoreError(f"{path}: no rows")

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, start: int, stop: int) -> list[dict[str, Any]]:
        """Rows [start, stop), parsed and checked."""
        rows = []
        with open(self.path, "rb") as f:
            for index in range(start, stop):
                f.seek(self.offsets[index])
                rows.append(self._check(self._parse(f.readline(), index), index))
        return rows

    def _where(self, index: int) -> str:
        return f"{self.path}: row {index + 1} (line {self.lines[index]})"

    def _parse(self, raw: bytes, index: int) -> Any:
        try:
            return json.loads(raw)
        except json.JSONDecodeError as err:
            raise ScoreError(f"{self._where(index)}: not valid JSON ({err.msg})") from err

    def _check(self, row: Any, index: int) -> dict[str, Any]:
        where = self._where(index)
        if not isinstance(row, dict):
            raise ScoreError(f"{where}: expected a JSON object, found {type(row).__name__}")
        if not isinstance(row.get("query"), str):
            raise ScoreError(f"{where}: field 'query' is missing or not a string")
        for name in PASSAGE_FIELDS:
            value = row.get(name, [] if name == "negative_passages" else None)
            if not isinstance(value, list) or (name == "positive_passages" and not value):
                raise ScoreError(f"{where}: field {name!r} must be a non-empty list of passages")
            for j, passage in enumerate(value):
                if not isinstance(passage, dict) or not isinstance(passage.get("text"), str):
                    raise ScoreError(f"{where}: field '{name}[{j}].text' is missing or not a string")
        return row


# ---- teachers ------------------------------------------------------------------------------------------
class CrossTeacher:
    """score(query, passage) = the classifier's relevance logit (see the module docstring)."""

    def __init__(self, args: argparse.Namespace, device: Any, precision: Any) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from dr.model.cross_encoder import CrossEncoderConfig
        from dr.model.precision import cast_for_inference

        self.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path)
        model = AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path).to(device).eval()
        labels = model.config.num_labels
        if labels not in (1, 2):
            raise ScoreUsageError(
                f"{args.model_name_or_path}: a cross-encoder teacher needs 1 or 2 labels, it has {labels}"
            )
        self.column = 0 if labels == 1 else 1
        # A folder `dr train --model_type cross_encoder` wrote says how its pairs were tokenised (length,
        # truncation, prefixes): the defaults here, so its scores are those of the model as trained. Any
        # other classifier gets the whole pair up to 512 tokens (the usual BERT limit), longest_first.
        overrides = {"max_length": args.max_length, "truncation": args.truncation}
        self.pairs = CrossEncoderConfig.resolve(
            args.model_name_or_path, overrides, defaults=CrossEncoderConfig(max_length=512)
        )
        self.pairs.fit_to(self.tokenizer.model_max_length)
        self.model, self.forward_context = cast_for_inference(model, precision, device.type)
        self.device = device
        self.settings = {
            "num_labels": labels,
            "max_length": self.pairs.max_length,
            "truncation": self.pairs.truncation,
        }
        if self.pairs.query_prefix or self.pairs.passage_prefix:
            self.settings["prefixes"] = [self.pairs.query_prefix, self.pairs.passage_prefix]
        add_precision(self.settings, precision)

    def score_pairs(self, queries: list[str], passages: list[str], batch_size: int) -> list[float]:
        """Every pair's logit, in input order: pairs tokenised together (`--truncation` decides what is cut),
        then batched longest first by token count (`dr.model.cross_encoder.score_pairs`, as `dr rerank`)."""
        from dr.model.cross_encoder import score_pairs

        return score_pairs(self.model, self.tokenizer, queries, passages, self.pairs, batch_size, self.device,
                           self.forward_context, column=self.column)  # fmt: skip


def add_precision(settings: dict[str, Any], precision: Any) -> None:
    """Record bf16 in a teacher's identity (scores differ from float32's, so parts must not mix); float32,
    the default, adds nothing, so parts scored before `--bf16` existed still resume."""
    if precision.half:
        settings["precision"] = precision.dtype


class BiTeacher:
    """score(query, passage) = q.p of a bi-encoder, encoded exactly as `dr encode` would."""

    def __init__(self, args: argparse.Namespace, device: Any, precision: Any) -> None:
        from dr.encode.run import load_encoder
        from dr.flags import DataArguments, ModelArguments
        from dr.model.precision import cast_for_inference

        model_args = ModelArguments(
            model_name_or_path=args.model_name_or_path,
            tokenizer_name=args.tokenizer_name,
            pooling=args.pooling,
            normalize=args.normalize,
            ignore_st_config=getattr(args, "ignore_st_config", False),
        )
        data_args = DataArguments(q_max_len=args.q_max_len, p_max_len=args.p_max_len)
        model, self.tokenizer = load_encoder(model_args, data_args, device)  # flags override dr_config
        self.model, self.forward_context = cast_for_inference(model, precision, device.type)
        cfg = self.model.encoder_config
        self.config = cfg
        self.q_max_len, self.p_max_len = cfg.q_max_len, cfg.p_max_len
        self.device = device
        self.settings = {
            "pooling": cfg.pooling,
            "normalize": cfg.normalize,
            "q_max_len": self.q_max_len,
            "p_max_len": self.p_max_len,
            "query_prefix": cfg.query_prefix,
            "passage_prefix": cfg.passage_prefix,
        }
        add_precision(self.settings, precision)

    def _encode_all(self, texts: list[str], max_length: int, encode: Any, batch_size: int) -> Any:
        """float32 (len(texts), d) on the CPU, encoded as `dr encode` batches texts
        (`dr.encode.batching.length_sorted_batches`: similar token lengths together, longest first)."""
        import torch

        from dr.encode.batching import BatchSettings, length_sorted_batches

        settings = BatchSettings(max_length, batch_size, append_eos=bool(self.config.append_eos))
        out = None
        for positions, batch in length_sorted_batches(texts, self.tokenizer, settings):
            with self.forward_context:
                vectors = encode({k: v.to(self.device) for k, v in batch.items()}).float().cpu()
            if out is None:
                out = torch.empty(len(texts), vectors.shape[1], dtype=torch.float32)
            out[torch.as_tensor(positions)] = vectors
        return out

    def score_pairs(self, queries: list[str], passages: list[str], batch_size: int) -> list[float]:
        """q.p of every pair, in input order. Each distinct query and passage text is encoded once: a
        window's rows share queries (one per group) and often passages (mined negatives recur)."""
        import torch

        if not queries:
            return []
        cfg = self.config
        q_texts, p_texts = list(dict.fromkeys(queries)), list(dict.fromkeys(passages))
        with torch.inference_mode():
            q = self._encode_all([cfg.query_prefix + t for t in q_texts], self.q_max_len, self.model.encode_query,
                                 batch_size)  # fmt: skip
            p = self._encode_all([cfg.passage_prefix + t for t in p_texts], self.p_max_len,
                                 self.model.encode_passage, batch_size)  # fmt: skip
        q_row = {t: i for i, t in enumerate(q_texts)}
        p_row = {t: i for i, t in enumerate(p_texts)}
        q = q[torch.tensor([q_row[t] for t in queries])]
        p = p[torch.tensor([p_row[t] for t in passages])]
        return (q * p).sum(-1).tolist()


def load_teacher(args: argparse.Namespace, device: Any) -> CrossTeacher | BiTeacher:
    """The teacher `--teacher_type` names, in the precision `--bf16` asks (float32 unless asked: teacher
    scores are training targets; bf16 autocast is faster on GPUs and on CPUs with AMX / AVX-512 BF16: on SciFact
    with AMX, `dr score` scored ~27 pairs/s in float32 and `dr rerank` ~77 pairs/s in bf16, 2 ranks each)."""
    from dr.model.precision import choose_precision, parse_bf16

    try:
        precision = choose_precision(parse_bf16(args.bf16), False, "autocast", device.type)
    except ValueError as err:
        raise ScoreUsageError(str(err)) from err
    teacher = CrossTeacher if args.teacher_type == "cross" else BiTeacher
    return teacher(args, device, precision)


def teacher_identity(args: argparse.Namespace, teacher: CrossTeacher | BiTeacher) -> dict[str, Any]:
    """What a part was scored with; a rerun with anything else must not reuse the parts."""
    from dr.encode.run import model_identity

    return {"type": args.teacher_type, "model": model_identity(args.model_name_or_path), **teacher.settings}


# ---- scoring a range -----------------------------------------------------------------------------------
def score_rows(rows: list[dict[str, Any]], teacher: CrossTeacher | BiTeacher, batch_size: int) -> int:
    """Set "score" on every passage of `rows` in place (pairs batched across rows); return the pair count."""
    from dr.train.groups import passage_text

    pairs = [
        (row["query"], passage) for row in rows for name in PASSAGE_FIELDS for passage in row.get(name) or []
    ]
    scores = teacher.score_pairs([q for q, _ in pairs], [passage_text(p) for _, p in pairs], batch_size)
    for (_, passage), value in zip(pairs, scores):
        passage["score"] = float(value)
    return len(pairs)


PART_SUFFIX = ".jsonl"


def part_path(parts_dir: Path, start: int, stop: int) -> Path:
    """Where rows [start, stop) are written, scored (`dr.row_ranges.range_part_path`)."""
    return range_part_path(parts_dir, Part(0, start, stop), PART_SUFFIX)


def _line_count(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _check_part(part: Part, path: Path) -> str:
    """Resume check of a part file (`dr.row_ranges.PartCheck`): one non-blank line per row."""
    lines = _line_count(path)
    return "" if lines == part.rows else f"{lines} rows, expected {part.rows}"


# ---- the driver ----------------------------------------------------------------------------------------
def prepare_parts_dir(parts_dir: Path, expected: dict[str, Any], overwrite: bool) -> None:
    """Rank 0: create the parts folder for this input and teacher (or check that an existing one matches)."""
    claim_folder(parts_dir, TEACHER_FILE, expected, overwrite, "another input or teacher", "--output")


def setup_rank(args: argparse.Namespace, rank: int, world: int) -> SimpleNamespace:
    """Plan this rank's rows, index the input and load the teacher; rank 0 prepares the parts folder."""
    from dr import distributed as dist

    source = JsonlRows(Path(args.dataset_name))
    total = len(source)
    try:
        rows = plan_rows(total, args.num_shards, args.shard_index, world, rank)
    except ShardingError as err:
        raise ScoreUsageError(str(err)) from err
    parts_dir = Path(str(args.output) + ".parts")
    teacher = load_teacher(args, dist.default_device())
    expected = {
        "teacher": teacher_identity(args, teacher),
        "input": str(source.path.resolve()),
        "input_bytes": source.path.stat().st_size,
        "input_rows": total,
    }
    if rank == 0:
        prepare_parts_dir(parts_dir, expected, args.overwrite)
    tag = f"dr score [rank {rank}/{world}]" if world > 1 else "dr score"
    parts = RowParts(rows, lambda part: range_part_path(parts_dir, part, PART_SUFFIX), _check_part)
    return SimpleNamespace(
        source=source,
        total=total,
        parts_dir=parts_dir,
        parts=parts,
        teacher=teacher,
        identity=expected["teacher"],
        tag=tag,
        progress=rank == 0,  # one bar (rank 0's), as dr encode
    )


def score_own_part(args: argparse.Namespace, plan: SimpleNamespace) -> None:
    """Score this rank's rows into its part file, unless a complete one is there (`RowParts.run_own`)."""

    def write(tmp: Path, part: Part, advance: Callable[[int], Any]) -> str:
        pairs = 0
        with open(tmp, "w", encoding="utf-8") as out:
            for window in range(part.start, part.stop, args.window_rows):
                rows = plan.source.read(window, min(window + args.window_rows, part.stop))
                pairs += score_rows(rows, plan.teacher, args.batch_size)
                out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
                advance(len(rows))
        return f"{pairs} pairs"

    plan.parts.run_own(write, plan.tag, ("row", "rows"), plan.progress)


def publish(args: argparse.Namespace, plan: SimpleNamespace) -> bool:
    """Rank 0: when the parts cover the input, write the output in input order and its manifest."""
    parts = covering_parts(plan.parts_dir, plan.total, PART_SUFFIX)
    if parts is None:
        print(
            f"dr score: not every row of {args.dataset_name} is scored yet (other shards running?); the job "
            "that completes the parts writes the output",
            file=sys.stderr,
        )
        return False
    output = Path(args.output)
    rows = passages = 0
    with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for _, _, path in parts:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        row = json.loads(line)
                        rows += 1
                        passages += sum(len(row.get(name) or []) for name in PASSAGE_FIELDS)
                        out.write(line if line.endswith("\n") else line + "\n")
    if rows != plan.total:
        output.unlink(missing_ok=True)
        raise ScoreUsageError(f"{plan.parts_dir}: parts hold {rows} rows, the input {plan.total}")
    write_json_atomic(
        Path(str(output) + ".manifest.json"),
        {
            "format": "dr.score",
            "version": 1,
            "input": str(Path(args.dataset_name).resolve()),
            "output": str(output.resolve()),
            "rows": rows,
            "passages_scored": passages,
            "teacher": plan.identity,
            "parts": [{"path": p.name, "range": [a, b]} for a, b, p in parts],
        },
    )
    print(f"dr score: wrote {rows} rows ({passages} scored passages) to {output}", file=sys.stderr)
    return True
