"""`dr encode`, the library half: embed a corpus or a query set into Arrow shards (see docs/encode.md).

The library half of `dr encode` (the command is `dr.encode.cli`): what to encode (`EncodeArguments`,
`Plan`), the model, the encode loop, and the resume checks; batches come from `dr.encode.batching`.
Rows are planned, written and resumed with `dr.row_ranges`: the input (after ``--max_rows``) is cut into
``num_shards`` contiguous ranges (flags or a SLURM job array); the chosen shard into one contiguous part
per rank, and each rank writes its own Arrow file, named by `dr.io.shards.OutputLayout`. A NaN or inf
vector is refused (exit 1, naming the row and its id) and nothing is written for that rank's file.

``--encoded_save_path X.pkl`` (Tevatron) writes Arrow with base ``X``: nothing is ever pickled.
Rows inside each file keep input order (batches are length-sorted only inside a window and put back).
A rerun skips rank files that are already complete and redoes the rest; ``--overwrite`` redoes all.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from dr import distributed as dist
from dr.encode.batching import BatchSettings, make_loader
from dr.errors import InputError, UsageError
from dr.flags import DataArguments, ModelArguments, to_jsonable
from dr.io.atomic import remove_stale_temporaries, write_json_atomic
from dr.io.corpus import TextCorpus, load_corpus
from dr.io.shards import (
    MANIFEST_FORMAT,
    VECTOR_FIELDS,
    OutputLayout,
    ShardError,
    ShardMeta,
    ShardWriter,
    edge_ids,
    read_manifest,
    read_meta,
)
from dr.model.precision import PRECISION_MODES, Precision, cast_for_inference, choose_precision, parse_bf16
from dr.model.text import tokenize
from dr.model.truncation import truncate
from dr.row_ranges import Part, RowParts, RowPlan, ShardingError, listed_checksum_status

logger = logging.getLogger("dr.encode")

_SAVE_SUFFIXES = (".pkl", ".pickle", ".arrow")
_DUPLICATE_CHECKS = ("input", "shard", "none")


class EncodeError(UsageError):
    """Invalid encode settings, or existing outputs that conflict with this run; the message says which."""


class NonFiniteVector(InputError):
    """The model produced NaN or inf for a row (exit 1): such a vector would poison every search score."""


@dataclass
class EncodeArguments:
    """Options of `dr encode` besides the model and data (Tevatron v1 spellings first, newer ones as aliases)."""

    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Accepted for Tevatron compatibility; outputs go to <output_dir>/corpus|query when no "
            "--encoded_save_path is given."
        },
    )
    encoded_save_path: str | None = field(
        default=None,
        metadata={
            "help": "Output base path. A .pkl/.arrow suffix is stripped: Arrow files <base>[...].arrow are "
            "written (never pickles). An existing folder or a trailing '/' means <folder>/corpus|query.",
            "aliases": ["--encode_output_path"],
        },
    )
    encode_is_qry: bool = field(
        default=False, metadata={"help": "Encode queries (else passages).", "aliases": ["--encode_is_query"]}
    )
    encode_num_shard: int | None = field(
        default=None,
        metadata={
            "help": "Split the input into this many contiguous shards (default: SLURM_ARRAY_TASK_COUNT, "
            "else 1).",
            "aliases": ["--dataset_number_of_shards"],
        },
    )
    encode_shard_index: int | None = field(
        default=None,
        metadata={
            "help": "Which shard to encode, 0-based (default: SLURM_ARRAY_TASK_ID when --encode_num_shard "
            "is given, which survives resubmitting one task; else SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN; "
            "else 0).",
            "aliases": ["--dataset_shard_index"],
        },
    )
    per_device_eval_batch_size: int = field(
        default=128, metadata={"help": "Texts per forward pass per rank."}
    )
    fp16: bool = field(default=False, metadata={"help": "float16 (needs a CUDA GPU); see --precision_mode."})
    bf16: str = field(
        default="false",
        metadata={
            "help": "bfloat16: true (--bf16 alone) | false | auto (bf16 where the GPU/CPU has it natively, "
            "e.g. AVX-512 BF16 or AMX; else float32, faster on CPUs that emulate bf16). See --precision_mode.",
            "nargs": "?",
            "const": "true",
        },
    )
    precision_mode: str = field(
        default="weights",
        metadata={
            "help": "How --bf16/--fp16 apply: weights (cast the model once; pooling and normalisation in "
            "float32; fastest) | autocast (float32 weights, torch.autocast per batch; slightly closer to "
            "float32 vectors).",
            "choices": PRECISION_MODES,
        },
    )
    num_threads: int | None = field(
        default=None,
        metadata={
            "help": "torch threads per rank on CPU. Default: OMP_NUM_THREADS in a single process; with "
            "several ranks on a node, this process's CPUs / local ranks (torchrun's OMP_NUM_THREADS=1 "
            "default is overridden; other values are kept)."
        },
    )
    dataloader_num_workers: int = field(
        default=1, metadata={"help": "Tokenizer worker processes per rank (0: tokenize in the main process)."}
    )
    embedding_dtype: str = field(
        default="float32", metadata={"help": "Stored vector type: float32 | float16."}
    )
    truncate_dim: int | None = field(
        default=None,
        metadata={
            "help": "Keep the first D dimensions of every vector (renormalised when the model normalises; "
            "for Matryoshka-trained models, docs/matryoshka.md); recorded in the shard metadata. Default: "
            "the model's saved truncate_dim, else whole vectors; 0: whole vectors whatever the model says."
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "Recompute and replace existing outputs."})
    id_field: str | None = field(
        default=None, metadata={"help": "Id field (default: docid/_id/query_id/qid/id)."}
    )
    text_field: str | None = field(
        default=None, metadata={"help": "Text field (default: text/contents; queries: query/text)."}
    )
    title_field: str | None = field(
        default=None, metadata={"help": "Title field joined before the text (default: 'title' when present)."}
    )
    max_rows: int | None = field(default=None, metadata={"help": "Use only the first N input rows (tests)."})
    window_batches: int = field(
        default=100,
        metadata={"help": "Length-sort windows of this many batches (1: sort within each batch)."},
    )
    sort_by_length: bool = field(
        default=True, metadata={"help": "Sort texts by token length inside each window (less padding)."}
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={"help": "Pad every batch to the max length (Tevatron v1 behaviour; benchmarks)."},
    )
    duplicate_check: str = field(
        default="input",
        metadata={
            "help": "Reject duplicate ids across the whole input | this shard | none (before encoding)."
        },
    )
    dataset_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Cache for the Arrow copy of the input.", "aliases": ["--data_cache_dir"]},
    )

    def __post_init__(self) -> None:
        try:
            self.bf16 = parse_bf16(self.bf16)  # a config file may give a YAML boolean
        except ValueError as err:
            raise EncodeError(str(err)) from None
        if self.fp16 and self.bf16 != "false":
            raise EncodeError("--fp16 and --bf16 are mutually exclusive")
        if self.precision_mode not in PRECISION_MODES:
            raise EncodeError(
                f"--precision_mode must be one of {PRECISION_MODES}, got {self.precision_mode!r}"
            )
        if self.num_threads is not None and self.num_threads < 1:
            raise EncodeError(f"--num_threads must be >= 1, got {self.num_threads}")
        if self.embedding_dtype not in ("float32", "float16"):
            raise EncodeError(f"--embedding_dtype must be float32 or float16, got {self.embedding_dtype!r}")
        if self.duplicate_check not in _DUPLICATE_CHECKS:
            raise EncodeError(
                f"--duplicate_check must be one of {_DUPLICATE_CHECKS}, got {self.duplicate_check!r}"
            )
        for name in ("per_device_eval_batch_size", "window_batches"):
            if getattr(self, name) < 1:
                raise EncodeError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.dataloader_num_workers < 0:
            raise EncodeError(f"--dataloader_num_workers must be >= 0, got {self.dataloader_num_workers}")
        if self.truncate_dim is not None and self.truncate_dim < 0:
            raise EncodeError(f"--truncate_dim must be >= 1 (or 0: whole vectors), got {self.truncate_dim}")
        if self.max_rows is not None and self.max_rows < 1:
            raise EncodeError(f"--max_rows must be >= 1, got {self.max_rows}")

    @property
    def side(self) -> str:
        return "query" if self.encode_is_qry else "passage"


# ---- planning: which shard, which rows, which files ---------------------------------------------------


def resolve_sharding(args: EncodeArguments, env: dict[str, str] | None = None) -> tuple[int, int]:
    """(num_shards, shard_index) from the flags, else from a SLURM job array, else (1, 0)
    (`dr.row_ranges.resolve_sharding`, with encode's flag names in its messages)."""
    from dr.row_ranges import resolve_sharding as resolve

    try:
        return resolve(
            args.encode_num_shard,
            args.encode_shard_index,
            env,
            ("--encode_num_shard", "--encode_shard_index"),
        )
    except ShardingError as err:
        raise EncodeError(str(err)) from None


def output_base(args: EncodeArguments) -> tuple[Path, str | None]:
    """The output base path and, when the Tevatron path had a pickle suffix, a note saying so."""
    default_name = "query" if args.encode_is_qry else "corpus"
    raw = args.encoded_save_path
    if raw is None:
        if args.output_dir is None:
            raise EncodeError("give --encoded_save_path (or --encode_output_path, or --output_dir)")
        return Path(args.output_dir) / default_name, None
    if raw.endswith(("/", os.sep)) or Path(raw).is_dir():
        return Path(raw) / default_name, None
    for suffix in _SAVE_SUFFIXES:
        if raw.endswith(suffix):
            base = Path(raw[: -len(suffix)])
            note = (
                f"{raw}: pickles are never written; writing Arrow files {base}[...].arrow"
                if suffix != ".arrow"
                else None
            )
            return base, note
    return Path(raw), None


@dataclass(frozen=True)
class Plan:
    """What this rank does: its rows (`dr.row_ranges.RowPlan`) and the shard's file names."""

    layout: OutputLayout
    rows: RowPlan

    @property
    def rank(self) -> int:
        return self.rows.rank

    @property
    def total_rows(self) -> int:
        return self.rows.total_rows

    @property
    def shard_range(self) -> tuple[int, int]:
        return self.rows.shard_range

    def rank_range(self, rank: int) -> tuple[int, int]:
        return self.rows.part(rank).range

    @property
    def own_range(self) -> tuple[int, int]:
        return self.rows.own.range


def make_plan(args: EncodeArguments, total_rows: int, rank: int, world: int) -> Plan:
    num, index = resolve_sharding(args)
    base, _ = output_base(args)
    return Plan(OutputLayout(base, num, index, world), RowPlan(total_rows, num, index, world, rank))


# ---- the model -------------------------------------------------------------------------------------------


def model_identity(name_or_path: str) -> str:
    """What shard metadata records as the model: an absolute path for local folders, else the hub name."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def load_encoder(model_args: ModelArguments, data_args: DataArguments, device: torch.device):
    """(BiEncoder in eval mode on `device`, tokenizer); flags override the saved dr_config.json."""
    from dr.model.check import check_tokenizer_fits
    from dr.model.encoder import BiEncoder
    from dr.model.text import load_tokenizer, resolve_append_eos

    overrides = {
        "pooling": model_args.pooling,
        "normalize": model_args.normalize,
        "append_eos": model_args.append_eos,
        "query_prefix": data_args.query_prefix,
        "passage_prefix": data_args.passage_prefix,
        "q_max_len": data_args.q_max_len,
        "p_max_len": data_args.p_max_len,
    }
    model = BiEncoder.from_pretrained(
        model_args.model_name_or_path,
        overrides=overrides,
        cache_dir=model_args.cache_dir,
        lora_name_or_path=model_args.lora_name_or_path,  # adapters are merged into the weights for encoding
        ignore_st_config=model_args.ignore_st_config,
        **({"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}),
    )
    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.tokenizer_name, model_args.cache_dir)
    check_tokenizer_fits(tokenizer, [model.query_encoder, model.passage_model], model_args.model_name_or_path)
    model.encoder_config.append_eos = resolve_append_eos(model.encoder_config, tokenizer)
    return model.to(device).eval(), tokenizer


def resolve_precision(args: EncodeArguments, device: torch.device) -> Precision:
    """The precision of this run (`dr.model.precision.choose_precision`); fp16 needs CUDA (CPU float16
    matmuls are slow or unsupported)."""
    try:
        return choose_precision(args.bf16, args.fp16, args.precision_mode, device.type)
    except ValueError as err:
        raise EncodeError(str(err)) from None


def set_threads(requested: int | None, device: torch.device, env: dict[str, str] | None = None) -> int:
    """Set torch's intra-op threads for this rank on CPU and return the number.

    Several ranks on one node must share its cores: torchrun sets OMP_NUM_THREADS=1 for every rank when
    the caller did not set it, which leaves cores idle on a machine with more cores than ranks, so that
    value is replaced by this process's CPUs / local ranks. Any other OMP_NUM_THREADS is the user's.
    """
    env = os.environ if env is None else env
    if device.type != "cpu":
        return torch.get_num_threads()
    local = int(env.get("LOCAL_WORLD_SIZE", "1"))
    omp = env.get("OMP_NUM_THREADS")
    if requested is None and local > 1 and omp in (None, "1"):
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        requested = max(1, cpus // local)
    if requested is not None:
        torch.set_num_threads(requested)
    return torch.get_num_threads()


# ---- encode + write ---------------------------------------------------------------------------------------


def encode_fn(model: Any, side: str):
    """The model's query or passage encoder, pooling and normalising in float32 (bf16/fp16 weights); cut
    to the first `encoder_config.truncate_dim` dimensions (renormalised when normalising) when set."""
    encode = partial(model.encode_query if side == "query" else model.encode_passage, float32=True)
    cfg = model.encoder_config
    if not cfg.truncate_dim:
        return encode
    return lambda batch: truncate(encode(batch), cfg.truncate_dim, cfg.normalize)


def resolve_truncate_dim(requested: int | None, saved: int | None, full_dim: int) -> int | None:
    """The prefix length this run keeps, or None for whole vectors: --truncate_dim (0: whole) > the model's
    saved truncate_dim > whole. Larger than the model's vectors is an `EncodeError`; equal is whole."""
    dim = saved if requested is None else requested or None
    if dim is None:
        return None
    if dim > full_dim:
        source = "--truncate_dim" if requested is not None else "the model's saved truncate_dim"
        raise EncodeError(f"{source} {dim} exceeds the model's vector size {full_dim}")
    return None if dim == full_dim else dim


def probe_dim(model: Any, tokenizer: Any, side: str, device: torch.device) -> int:
    """The vector size, by encoding one short text (robust to any backbone's config naming)."""
    batch = tokenize(tokenizer, ["dimension probe"], max_length=8)
    with torch.inference_mode():
        return int(encode_fn(model, side)({k: v.to(device) for k, v in batch.items()}).shape[-1])


def encode_range(
    model: Any,
    loader: DataLoader,
    writer: ShardWriter,
    side: str,
    device: torch.device,
    amp: Any,
    progress: Any,
    where: str = "input",
    first_row: int = 0,
) -> None:
    """Encode every window of `loader` and append it to `writer` in input order.

    A vector with NaN or inf (in the stored dtype: float16 overflows to inf) is refused before anything of
    its window is written: `NonFiniteVector` names the row (1-based, of `where`, the input) and its id.
    """
    encode = encode_fn(model, side)
    stored_dtype = np.float16 if writer.meta.dtype == "float16" else np.float32
    row = first_row
    for ids, batches in loader:
        window = np.empty((len(ids), writer.meta.dim), dtype=np.float32)
        for positions, batch in batches:
            with torch.inference_mode(), amp:
                reps = encode({k: v.to(device, non_blocking=True) for k, v in batch.items()})
            window[positions] = reps.float().cpu().numpy()
            progress.update(len(positions))
        stored = window.astype(stored_dtype, copy=False)
        check_finite(stored, ids, where, row, writer.path)
        writer.write(ids, stored)
        row += len(ids)


def check_finite(vectors: np.ndarray, ids: list[str], where: str, first_row: int, part: Path) -> None:
    """Raise `NonFiniteVector` for the first row of `vectors` that holds NaN or inf."""
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise NonFiniteVector(
            f"{where}: row {first_row + i + 1} (id {ids[i]!r}): the model produced a non-finite vector "
            f"(NaN or inf; {int(bad.sum())} of the {len(ids)} rows of its window); nothing was written for "
            f"{part.name.split('.tmp-')[0]}"
        )


# ---- resume: is an existing rank file complete and from this model? ----------------------------------------


def shard_check(expected: list[ShardMeta], corpus: TextCorpus) -> Callable[[Part, Path], str]:
    """The resume check of a rank file (`dr.row_ranges.PartCheck`): "" when complete, else why it must be
    redone (row count, edge ids, unreadable). Another model or settings raises: only --overwrite may
    replace vectors of another vector space."""

    def check(part: Part, path: Path) -> str:
        want = expected[part.index]
        try:
            found = read_meta(path)
            conflicts = found.differences(want, (*VECTOR_FIELDS, "side", "max_length"), ("", "this run:"))
            if conflicts:
                raise EncodeError(
                    f"{path} exists from a different model or settings: {', '.join(conflicts)}; "
                    "use --overwrite or another --encoded_save_path"
                )
            if found.count != want.count:
                return f"{found.count} rows, expected {want.count}"
            first, last = edge_ids(path)
            a, b = part.range
            ids = (
                (corpus.ids(a, a + 1)[0].as_py(), corpus.ids(b - 1, b)[0].as_py()) if b > a else (None, None)
            )
            if (first, last) != ids:
                return f"ids {first!r}..{last!r} differ from the input's {ids[0]!r}..{ids[1]!r}"
        except ShardError as err:
            return f"unreadable ({err})"
        return ""

    return check


def rank_parts(plan: Plan, expected: list[ShardMeta], corpus: TextCorpus) -> RowParts:
    """The shard's rank files as `dr.row_ranges.RowParts` (names from `OutputLayout`, checks above)."""
    return RowParts(plan.rows, lambda part: plan.layout.rank_file(part.index), shard_check(expected, corpus))


# ---- the driver --------------------------------------------------------------------------------------------


def open_input(data_args: DataArguments, args: EncodeArguments, prefix: str) -> TextCorpus:
    if not data_args.dataset_name:
        raise EncodeError("give --dataset_name (a hub dataset, a file, a glob or a folder)")
    corpus = load_corpus(
        data_args.dataset_name,
        args.side,
        split=data_args.dataset_split,
        config=data_args.dataset_config,
        prefix=prefix,
        id_field=args.id_field,
        text_field=args.text_field,
        title_field=args.title_field,
        cache_dir=args.dataset_cache_dir,
        limit=args.max_rows,
    )
    if len(corpus) == 0:
        raise EncodeError(f"{corpus.spec.describe()}: input is empty (no rows)")
    return corpus


def check_input(corpus: TextCorpus, plan: Plan, args: EncodeArguments, log: Any = None) -> None:
    """Identical on every rank, so all ranks fail together before anything is written."""
    empty = corpus.validate(*plan.shard_range)
    if empty and log is not None and plan.rank == 0:
        # Allowed (docs/encode.md): such a row is encoded from its prefix/title alone; said once, counted.
        log(f"{empty} of the shard's {plan.shard_range[1] - plan.shard_range[0]} rows have an empty text")
    if args.duplicate_check == "input":
        corpus.check_unique(0, len(corpus))
    elif args.duplicate_check == "shard":
        corpus.check_unique(*plan.shard_range)


def prepare_outputs(
    plan: Plan, args: EncodeArguments, expected: list[ShardMeta], corpus: TextCorpus, log: Any
) -> tuple[bool, bool]:
    """Check the existing outputs of every rank: (this rank must encode, some rank must encode).

    Conflicts (another model, another layout) raise on every rank alike, so all ranks fail together.
    """
    layout = plan.layout
    stale = layout.stale_files()
    if stale and not args.overwrite:
        names = ", ".join(p.name for p in stale[:3])
        raise EncodeError(
            f"{layout.base.parent}: outputs of another shard/rank layout exist ({names}); "
            f"a glob would mix them: use --overwrite or another --encoded_save_path"
        )
    if args.overwrite:
        return True, True
    parts = rank_parts(plan, expected, corpus)
    statuses = parts.statuses()
    mine = statuses[plan.rank]
    path = parts.path(plan.rows.own)
    if mine == "":
        try:
            manifest = read_manifest(layout.manifest)
        except ShardError:  # unreadable, or rank 0 is replacing it right now: no checksum to verify
            manifest = None
        mine = listed_checksum_status(path, manifest)
    if mine == "":
        log(f"{path.name} is complete ({expected[plan.rank].count} rows, same model): skipped")
    elif mine:
        log(f"{path.name}: redoing ({mine})")
    return mine != "", mine != "" or any(s != "" for s in statuses)


def clear_stale(plan: Plan, args: EncodeArguments, redo_any: bool) -> None:
    """Rank 0: drop other-layout files (--overwrite) and a manifest that no longer describes the files."""
    if plan.rank != 0:
        return
    if args.overwrite:
        for path in plan.layout.stale_files():
            path.unlink(missing_ok=True)
    if redo_any:
        plan.layout.manifest.unlink(missing_ok=True)
    remove_stale_temporaries(plan.layout.base.parent, plan.layout.manifest.name)
    remove_stale_temporaries(plan.layout.base.parent, plan.layout.config.name)


def write_manifest(plan: Plan, expected: list[ShardMeta], config: dict[str, Any], corpus: TextCorpus) -> None:
    """Rank 0, after every rank finished: describe the shard's files (with checksums), atomically."""
    parts = rank_parts(plan, expected, corpus)
    for part in plan.rows.parts:
        path = parts.path(part)
        meta = read_meta(path)
        if meta.count != expected[part.index].count:
            raise EncodeError(f"{path}: {meta.count} rows, expected {expected[part.index].count}")
    meta = expected[0]
    parts.write_manifest(
        plan.layout.manifest,
        {
            "format": MANIFEST_FORMAT,
            "version": 1,
            "side": meta.side,
            "model": meta.model,
            "pooling": meta.pooling,
            "normalize": meta.normalize,
            "dim": meta.dim,
            "truncate_dim": meta.truncate_dim,
            "dtype": meta.dtype,
            "max_length": meta.max_length,
            "num_shards": plan.layout.num_shards,
            "shard_index": plan.layout.shard_index,
            "world_size": plan.layout.world_size,
            "input": corpus.spec.describe(),
            "input_rows": plan.total_rows,
            "range": list(plan.shard_range),
            "rows": sum(e.count for e in expected),
            "glob": plan.layout.glob,
            "config": config,
        },
    )


@dataclass
class RankResult:
    """What rank 0 needs after every rank finished, to write the manifest."""

    plan: Plan
    expected: list[ShardMeta]
    config: dict[str, Any]
    corpus: TextCorpus


def run_encode(model_args: ModelArguments, data_args: DataArguments, args: EncodeArguments) -> RankResult:
    """Check inputs and existing outputs, then encode this rank's part of the chosen shard (if not done)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    log = logger.info
    device = dist.default_device()
    precision = resolve_precision(args, device)
    threads = set_threads(args.num_threads, device)
    _, pickle_note = output_base(args)
    if pickle_note and rank == 0:
        log(pickle_note)
    model, tokenizer = load_encoder(model_args, data_args, device)
    model, amp = cast_for_inference(model, precision, device.type)
    if rank == 0:
        log(f"precision: {precision.describe()}; {threads} torch threads per rank")
    # Pooling, normalize, prefixes and max lengths: flag > what `dr train` saved > default (resolved once).
    cfg = model.encoder_config
    query = args.encode_is_qry
    prefix = cfg.query_prefix if query else cfg.passage_prefix
    max_length = cfg.q_max_len if query else cfg.p_max_len
    corpus = open_input(data_args, args, prefix)
    plan = make_plan(args, len(corpus), rank, world)
    check_input(corpus, plan, args, log)
    # The whole vectors' size first; then `encode_fn` cuts to the resolved truncate_dim (None: whole).
    saved_truncate_dim, cfg.truncate_dim = cfg.truncate_dim, None
    full_dim = probe_dim(model, tokenizer, args.side, device)
    cfg.truncate_dim = resolve_truncate_dim(args.truncate_dim, saved_truncate_dim, full_dim)
    dim = cfg.truncate_dim or full_dim
    identity = model_identity(model_args.model_name_or_path)
    expected = [
        ShardMeta(
            identity,
            cfg.pooling,
            cfg.normalize,
            dim,
            args.embedding_dtype,
            max_length,
            args.side,
            b - a,
            truncate_dim=cfg.truncate_dim,
        )
        for a, b in (plan.rank_range(r) for r in range(world))
    ]
    start, stop = plan.own_range
    log(
        f"model {expected[rank].model} (pooling {cfg.pooling}, normalize {cfg.normalize}, dim {dim}"
        f"{f' of {full_dim}, truncated' if cfg.truncate_dim else ''}); "
        f"{args.side} input {corpus.spec.describe()}: {plan.total_rows} rows; shard {plan.layout.shard_index}/"
        f"{plan.layout.num_shards} rows [{plan.shard_range[0]}, {plan.shard_range[1]}); this rank rows "
        f"[{start}, {stop}) -> {plan.layout.rank_file(rank)}"
    )
    must_encode, redo_any = prepare_outputs(plan, args, expected, corpus, log)
    clear_stale(plan, args, redo_any)
    config = {
        "command": "dr encode",
        "world_size": world,
        **to_jsonable(model_args, data_args, args),
        "resolved": {
            "pooling": cfg.pooling,
            "normalize": cfg.normalize,
            "prefix": prefix,
            "max_length": max_length,
            "append_eos": cfg.append_eos,
            "dim": dim,
            "truncate_dim": cfg.truncate_dim,
            "precision": precision.as_dict(),
            "torch_threads": threads,
        },
    }
    if rank == 0:
        write_json_atomic(plan.layout.config, config)
    if must_encode:
        encode_own(model, tokenizer, corpus, plan, expected[rank], args, data_args, device, amp, log)
    return RankResult(plan, expected, config, corpus)


def encode_own(
    model, tokenizer, corpus, plan: Plan, meta: ShardMeta, args, data_args, device, amp, log=None
) -> None:
    """Encode this rank's rows into its file (`RowParts.write_part`: temporary name, renamed when complete)."""
    from tqdm import tqdm

    part = plan.rows.own
    start, stop = part.range
    settings = BatchSettings(
        meta.max_length,
        args.per_device_eval_batch_size,
        args.per_device_eval_batch_size * args.window_batches,
        data_args.pad_to_multiple_of,
        args.sort_by_length,
        args.pad_to_max_length,
        model.encoder_config.append_eos,
    )
    loader = make_loader(corpus, start, stop, tokenizer, settings, args.dataloader_num_workers)
    unit = "q" if meta.side == "query" else "psg"
    began, cpu_began = time.perf_counter(), _cpu_seconds()
    bar = tqdm(total=stop - start, unit=unit, disable=plan.rank != 0, mininterval=2.0, file=sys.stderr)

    def write(tmp: Path) -> None:
        with bar as progress, ShardWriter(tmp, meta) as writer:
            encode_range(
                model, loader, writer, meta.side, device, amp, progress, corpus.spec.describe(), start
            )

    path = RowParts(plan.rows, lambda p: plan.layout.rank_file(p.index)).write_part(part, write)
    seconds, cpu = time.perf_counter() - began, _cpu_seconds() - cpu_began
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log(
        f"wrote {stop - start} rows in {seconds:.1f}s ({(stop - start) / max(seconds, 1e-9):.1f} rows/s, "
        f"cpu {cpu:.1f}s, peak RSS {peak_mib:.0f} MiB) -> {path}"
    )


def _cpu_seconds() -> float:
    """CPU time of this process (all threads; tokenizer workers excluded): robust to a busy machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
