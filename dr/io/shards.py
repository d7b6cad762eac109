"""The embedding-shard format shared by `dr encode` (writer) and `dr search` (reader).

One shard is an Arrow IPC *file* (random access, memory-mappable) with two columns:

    id          string | large_string, no nulls
    embedding   fixed_size_list<float16 | float32>[dim], no nulls

and schema metadata (all values are UTF-8 strings, keys prefixed with ``dr.``):

    dr.format_version  exactly "1"
    dr.model           model path or name that produced the vectors (non-empty)
    dr.pooling         cls | mean | last
    dr.normalize       a boolean: true/false in any case, 1/0, yes/no (written "true" | "false")
    dr.dim             vector dimension, decimal digits, >= 1
    dr.dtype           float16 | float32 (the element type of `embedding`)
    dr.max_length      tokenizer max length used, decimal digits, >= 1
    dr.side            query | passage
    dr.count           number of rows in the file, decimal digits
    dr.truncate_dim    optional: the vectors are the first `dim` dimensions of the model's vectors
                       (`dr encode --truncate_dim`, renormalised when dr.normalize); absent: whole vectors

docs/formats.md is the full contract (with a recipe to write a shard with plain pyarrow); anything it does
not allow is refused with a one-line `ShardError` naming the file and the field. It opens without `dr`:
``pyarrow.ipc.open_file(path).read_all()`` or polars' ``pl.read_ipc(path)``. Files are written under a
temporary name and renamed when complete (`dr.io.atomic`), so a file under its final name is always whole.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from pyarrow import ipc

from dr.errors import InputError
from dr.io.atomic import atomic_path, read_tagged_json
from dr.model import POOLINGS  # a constant only: dr.model imports no torch

FORMAT_VERSION = "1"
# Vectors from shards that differ in these cannot be mixed; the encoder fields decide the vector space.
ENCODER_FIELDS = ("model", "pooling", "normalize")
VECTOR_FIELDS = (*ENCODER_FIELDS, "dim", "dtype", "truncate_dim")
OPTIONAL_FIELDS = ("truncate_dim",)  # may be absent from a shard's metadata (written only when set)
_DTYPES = {"float16": (np.float16, pa.float16()), "float32": (np.float32, pa.float32())}
SIDES = ("query", "passage")
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_DIGITS = re.compile(r"^[0-9]+$")


class ShardError(InputError):
    """A shard file is unreadable, truncated, or does not match the expected format/metadata."""


@dataclass(frozen=True)
class ShardMeta:
    """What produced the vectors in a shard; stored as Arrow schema metadata."""

    model: str
    pooling: str
    normalize: bool
    dim: int
    dtype: str  # "float16" | "float32"
    max_length: int
    side: str  # "query" | "passage"
    count: int
    truncate_dim: int | None = None  # set: the vectors are the model's first `dim` dims (== truncate_dim)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ShardError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.side not in ("query", "passage"):
            raise ShardError(f"side must be 'query' or 'passage', got {self.side!r}")
        if self.dim <= 0 or self.count < 0:
            raise ShardError(f"dim must be > 0 and count >= 0, got dim={self.dim}, count={self.count}")
        if self.truncate_dim is not None and self.truncate_dim != self.dim:
            raise ShardError(f"truncate_dim {self.truncate_dim} differs from dim {self.dim}")

    def to_arrow(self) -> dict[bytes, bytes]:
        meta = {"format_version": FORMAT_VERSION, **asdict(self)}
        meta = {k: v for k, v in meta.items() if not (k in OPTIONAL_FIELDS and v is None)}
        return {f"dr.{k}".encode(): _encode_value(v).encode() for k, v in meta.items()}

    @classmethod
    def from_arrow(cls, metadata: dict[bytes, bytes] | None, source: str) -> ShardMeta:
        """Parse and validate `dr.*` schema metadata (see the module docstring for what is allowed)."""
        try:
            raw = {k.decode(): v.decode() for k, v in (metadata or {}).items() if k.startswith(b"dr.")}
        except UnicodeDecodeError as err:
            raise ShardError(f"{source}: dr.* schema metadata is not UTF-8: {err}") from None
        required = [f for f in (*cls.__dataclass_fields__, "format_version") if f not in OPTIONAL_FIELDS]
        missing = [f"dr.{f}" for f in required if f"dr.{f}" not in raw]
        if missing:
            raise ShardError(f"{source}: not a dr embedding shard (schema metadata lacks {missing})")
        if raw["dr.format_version"] != FORMAT_VERSION:
            raise ShardError(
                f"{source}: dr.format_version {raw['dr.format_version']!r} is not supported "
                f"(this dr reads format {FORMAT_VERSION!r})"
            )
        if not raw["dr.model"]:
            raise ShardError(f"{source}: dr.model is empty (the model that produced the vectors)")
        return cls(
            model=raw["dr.model"],
            pooling=_choice(raw, "pooling", POOLINGS, source),
            normalize=_boolean(raw, "normalize", source),
            dim=_integer(raw, "dim", 1, source),
            dtype=_choice(raw, "dtype", tuple(_DTYPES), source),
            max_length=_integer(raw, "max_length", 1, source),
            side=_choice(raw, "side", SIDES, source),
            count=_integer(raw, "count", 0, source),
            truncate_dim=_integer(raw, "truncate_dim", 1, source) if "dr.truncate_dim" in raw else None,
        )

    def differences(
        self, other: ShardMeta, fields: tuple[str, ...] = VECTOR_FIELDS, labels: tuple[str, str] = ("", "")
    ) -> list[str]:
        """`field=ours vs theirs` for each of `fields` in which two shards' metadata disagree (the one
        comparison behind encode's resume check and search's shard and query/passage checks)."""
        mine, theirs = (f"{label} " if label else "" for label in labels)
        return [
            f"{f}={mine}{getattr(self, f)!r} vs {theirs}{getattr(other, f)!r}"
            for f in fields
            if getattr(self, f) != getattr(other, f)
        ]


def _choice(raw: dict[str, str], field: str, allowed: tuple[str, ...], source: str) -> str:
    value = raw[f"dr.{field}"]
    if value not in allowed:
        raise ShardError(f"{source}: dr.{field} {value!r} is not one of {', '.join(allowed)}")
    return value


def _boolean(raw: dict[str, str], field: str, source: str) -> bool:
    """Any unambiguous spelling of a boolean; anything else is an error, never silently false."""
    value = raw[f"dr.{field}"]
    if value.strip().lower() not in _BOOLEANS:
        raise ShardError(
            f"{source}: dr.{field} {value!r} is not a boolean (true/false, 1/0, yes/no; any case)"
        )
    return _BOOLEANS[value.strip().lower()]


def _integer(raw: dict[str, str], field: str, minimum: int, source: str) -> int:
    """Plain decimal digits (not "8.0", "+8", "8_0", which `int()` would take or half-take)."""
    value = raw[f"dr.{field}"]
    if not _DIGITS.match(value) or int(value) < minimum:
        raise ShardError(f"{source}: dr.{field} {value!r} is not an integer >= {minimum}")
    return int(value)


def _encode_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def shard_schema(meta: ShardMeta) -> pa.Schema:
    """The Arrow schema of a shard with `meta` attached."""
    value_type = _DTYPES[meta.dtype][1]
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(value_type, meta.dim), nullable=False),
        ],
        metadata=meta.to_arrow(),
    )


class ShardWriter:
    """Stream (id, embedding) batches into one shard file; the file appears under its final name on close.

    Rows are buffered and written as record batches of `rows_per_batch`, so memory stays bounded whatever
    the shard size. `meta.count` is the number of rows promised; `close()` fails if a different number
    was written (and then nothing is left under the final name).

    Use as a context manager::

        with ShardWriter(path, meta) as writer:
            writer.write(ids, vectors)   # list[str], float array (n, dim)
    """

    def __init__(self, path: str | os.PathLike, meta: ShardMeta, rows_per_batch: int = 8192) -> None:
        self.path = Path(path)
        self.meta = meta
        self.schema = shard_schema(meta)
        self.rows_per_batch = rows_per_batch
        self._np_dtype = _DTYPES[meta.dtype][0]
        self._pending_ids: list[str] = []
        self._pending_vecs: list[np.ndarray] = []
        self._pending_rows = 0
        self.rows_written = 0
        self._atomic = atomic_path(self.path)
        self._tmp: Path | None = None
        self._sink: pa.OSFile | None = None
        self._writer: ipc.RecordBatchFileWriter | None = None

    def __enter__(self) -> ShardWriter:  # noqa: PYI034 - final class; Self needs Python 3.11
        self._tmp = self._atomic.__enter__()
        self._sink = pa.OSFile(str(self._tmp), "wb")
        self._writer = ipc.new_file(self._sink, self.schema)
        return self

    def write(self, ids: list[str], vectors: np.ndarray) -> None:
        """Append rows; `vectors` has shape (len(ids), dim) and is cast to the shard dtype."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.meta.dim or vectors.shape[0] != len(ids):
            raise ShardError(
                f"{self.path}: expected vectors of shape ({len(ids)}, {self.meta.dim}), got {vectors.shape}"
            )
        self._pending_ids.extend(ids)
        self._pending_vecs.append(vectors.astype(self._np_dtype, copy=False))
        self._pending_rows += len(ids)
        if self._pending_rows >= self.rows_per_batch:
            self._flush()

    def _flush(self) -> None:
        if not self._pending_rows:
            return
        flat = np.ascontiguousarray(np.concatenate(self._pending_vecs)).reshape(-1)
        values = pa.array(flat, type=_DTYPES[self.meta.dtype][1])
        embedding = pa.FixedSizeListArray.from_arrays(values, self.meta.dim)
        batch = pa.record_batch([pa.array(self._pending_ids, pa.string()), embedding], schema=self.schema)
        self._writer.write_batch(batch)
        self.rows_written += self._pending_rows
        self._pending_ids, self._pending_vecs, self._pending_rows = [], [], 0

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._flush()
            self._writer.close()
            self._sink.close()
            if exc_type is None and self.rows_written != self.meta.count:
                raise ShardError(
                    f"{self.path}: {self.rows_written} rows written, metadata promised {self.meta.count}"
                )
        except BaseException as err:
            self._atomic.__exit__(type(err), err, err.__traceback__)
            raise
        self._atomic.__exit__(exc_type, exc, tb)


def write_shard(path: str | os.PathLike, meta: ShardMeta, ids: list[str], vectors: np.ndarray) -> None:
    """Write a whole shard at once (tests, small outputs)."""
    with ShardWriter(path, meta) as writer:
        writer.write(ids, vectors)


def _open(path: str | os.PathLike) -> ipc.RecordBatchFileReader:
    try:
        return ipc.open_file(pa.memory_map(str(path), "r"))
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as err:
        raise ShardError(f"{path}: cannot open as an Arrow IPC file (corrupt or truncated?): {err}") from err


def read_meta(path: str | os.PathLike) -> ShardMeta:
    """Read and validate a shard's metadata without touching its rows."""
    reader = _open(path)
    meta = ShardMeta.from_arrow(reader.schema.metadata, str(path))
    _check_schema(reader.schema, meta, str(path))
    batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
    for batch in batches:
        _check_no_nulls(batch, str(path))
    if sum(batch.num_rows for batch in batches) != meta.count:
        raise ShardError(f"{path}: row count differs from dr.count={meta.count} (truncated or altered)")
    return meta


def _check_schema(schema: pa.Schema, meta: ShardMeta, source: str) -> None:
    """Columns exactly `id` (string | large_string) and `embedding` (fixed_size_list<dr.dtype>[dr.dim])."""
    if schema.names != ["id", "embedding"]:
        raise ShardError(f"{source}: columns {schema.names}; a shard has exactly ['id', 'embedding']")
    id_type = schema.field("id").type
    if not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
        raise ShardError(f"{source}: id column has type {id_type}; expected string or large_string")
    found = schema.field("embedding").type
    value_type = _DTYPES[meta.dtype][1]
    if not (
        pa.types.is_fixed_size_list(found) and found.value_type == value_type and found.list_size == meta.dim
    ):
        raise ShardError(
            f"{source}: embedding column has type {found}; dr.dtype={meta.dtype} and dr.dim={meta.dim} "
            f"need fixed_size_list<{meta.dtype}>[{meta.dim}]"
        )


def _check_no_nulls(batch: pa.RecordBatch, source: str) -> None:
    """Refuse null ids or vectors (they would become the docid None or NaN scores)."""
    if batch.column(0).null_count:
        raise ShardError(f"{source}: id column holds a null")
    if batch.column(1).null_count or batch.column(1).flatten().null_count:
        raise ShardError(f"{source}: embedding column holds a null")


def id_strings(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray:
    """An id column as a chunked `string` array, whatever of string / large_string each shard used.

    Search concatenates the id columns of many shards into one chunked array, which needs one type.
    """
    if isinstance(column, pa.Array):
        column = pa.chunked_array([column])
    if not pa.types.is_string(column.type):
        column = column.cast(pa.string())
    return column


def iter_shard(
    path: str | os.PathLike, max_rows: int | None = None, ids: bool = True, drop_pages: bool = False
) -> Iterator[tuple[list[str] | None, np.ndarray]]:
    """Yield (ids, vectors) blocks of a shard, memory-mapped where possible.

    Blocks follow the file's record batches, further cut to at most `max_rows` rows, so a caller can bound
    how many vectors are resident at once. `vectors` is a read-only (rows, dim) view into the mapped file.
    With ``ids=False`` the ids are None (not converted to Python strings: a search needs only vectors).
    With ``drop_pages`` a block's mapped pages leave the process (``MADV_DONTNEED``; the page cache keeps
    them) when the next block is asked for, so the resident part of the file stays one block, not the
    whole shard; a block used after that still reads correctly (its pages fault back in).
    """
    reader, mapped = _open_mapped(path) if drop_pages else (_open(path), None)
    meta = ShardMeta.from_arrow(reader.schema.metadata, str(path))
    _check_schema(reader.schema, meta, str(path))
    for i in range(reader.num_record_batches):
        batch = reader.get_batch(i)
        _check_no_nulls(batch, str(path))
        step = max_rows or batch.num_rows or 1
        for start in range(0, batch.num_rows, step):
            part = batch.slice(start, step)
            vectors = part.column(1).flatten().to_numpy(zero_copy_only=False).reshape(-1, meta.dim)
            yield (part.column(0).to_pylist() if ids else None), vectors
            if mapped is not None:
                _drop(mapped, vectors)


def _open_mapped(path: str | os.PathLike) -> tuple[ipc.RecordBatchFileReader, tuple[mmap.mmap, int]]:
    """`_open` through a Python mmap, whose pages can be dropped: (reader, (map, its base address))."""
    try:
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buffer = pa.py_buffer(mapped)
        return ipc.open_file(buffer), (mapped, buffer.address)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError, ValueError) as err:  # ValueError: empty file
        raise ShardError(f"{path}: cannot open as an Arrow IPC file (corrupt or truncated?): {err}") from err


def _drop(mapped: tuple[mmap.mmap, int], vectors: np.ndarray) -> None:
    """Drop the whole pages under `vectors` from this process (residency only: the data stays valid)."""
    if not hasattr(mmap, "MADV_DONTNEED") or vectors.nbytes == 0:
        return
    mm, base = mapped
    start = vectors.ctypes.data - base
    if not 0 <= start < len(mm):  # not a view into the map (a copy): nothing to drop
        return
    first = start // mmap.PAGESIZE * mmap.PAGESIZE
    mm.madvise(mmap.MADV_DONTNEED, first, min(len(mm), start + vectors.nbytes) - first)


def read_shard(path: str | os.PathLike) -> tuple[list[str], np.ndarray, ShardMeta]:
    """Read a whole shard: (ids, vectors (count, dim), meta). Prefer `iter_shard` for large shards."""
    meta = read_meta(path)
    ids: list[str] = []
    blocks: list[np.ndarray] = []
    for block_ids, vectors in iter_shard(path):
        ids.extend(block_ids)
        blocks.append(vectors)
    vectors = np.concatenate(blocks) if blocks else np.zeros((0, meta.dim), dtype=_DTYPES[meta.dtype][0])
    return ids, vectors, meta


# ---- additions for `dr encode`: checksums, manifests, cheap content checks ------------------------------

MANIFEST_FORMAT = "dr.embeddings.manifest"


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks (manifests record it so a rerun can verify a shard)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def edge_ids(path: str | os.PathLike) -> tuple[str | None, str | None]:
    """The first and last id of a shard (None for an empty one), reading only two record batches."""
    reader = _open(path)
    batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
    batches = [b for b in batches if b.num_rows]
    if not batches:
        return None, None
    return batches[0].column(0)[0].as_py(), batches[-1].column(0)[-1].as_py()


def read_manifest(path: str | os.PathLike) -> dict | None:
    """A manifest written by `dr encode`, or None when there is none; ShardError when it is unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    return read_tagged_json(path, MANIFEST_FORMAT, ShardError, "dr embedding manifest")


# ---- file naming: where `dr encode` writes each rank's file, the manifest and the config ---------------
#
#     <base>.arrow                                          one shard, one rank
#     <base>.<shard>-of-<N>.rank<r>-of-<W>.arrow            otherwise (5-digit, zero-padded numbers)
#     <base>[.<shard>-of-<N>].manifest.json                 written last by rank 0: files, counts, sha256
#     <base>[.<shard>-of-<N>].config.json                   the resolved arguments
#
# r is the GLOBAL rank; the shard and rank ranges are contiguous (planned by `dr.row_ranges`).


_LONG_NAME = re.compile(r"^(?P<base>.+)\.(\d{5})-of-(\d{5})\.rank(\d{5})-of-(\d{5})\.arrow$")


@dataclass(frozen=True)
class OutputLayout:
    """File names of one shard's outputs (see the module docstring)."""

    base: Path
    num_shards: int
    shard_index: int
    world_size: int

    @property
    def single(self) -> bool:
        return self.num_shards == 1 and self.world_size == 1

    @property
    def stem(self) -> str:
        if self.single:
            return self.base.name
        return f"{self.base.name}.{self.shard_index:05d}-of-{self.num_shards:05d}"

    def rank_file(self, rank: int) -> Path:
        if self.single:
            return self.base.with_name(self.base.name + ".arrow")
        return self.base.with_name(f"{self.stem}.rank{rank:05d}-of-{self.world_size:05d}.arrow")

    @property
    def manifest(self) -> Path:
        return self.base.with_name(self.stem + ".manifest.json")

    @property
    def config(self) -> Path:
        return self.base.with_name(self.stem + ".config.json")

    @property
    def glob(self) -> str:
        return str(self.base.with_name(self.base.name + ("*.arrow" if self.single else ".*.arrow")))

    def stale_files(self) -> list[Path]:
        """Files of the same base from another layout (other shard count or world size): a glob would mix them."""
        folder = self.base.parent
        if not folder.is_dir():
            return []
        stale = []
        for path in folder.iterdir():
            match = _LONG_NAME.match(path.name)
            if match and match.group("base") == self.base.name:
                shard, num, _, world = (int(g) for g in match.groups()[1:])
                other_layout = num != self.num_shards or (
                    shard == self.shard_index and world != self.world_size
                )
                if self.single or other_layout:
                    stale.append(path)
        single = self.base.with_name(self.base.name + ".arrow")
        if not self.single and single.exists():
            stale.append(single)
        return sorted(stale)


def manifest_complete(layout: OutputLayout) -> bool:
    """True when `dr encode` finished this shard with this layout: a readable manifest of the same layout
    whose files all exist (the cheap check `dr pipeline` uses to skip a stage)."""
    try:
        manifest = read_manifest(layout.manifest)
    except ShardError:
        return False
    if not manifest or (manifest.get("num_shards"), manifest.get("world_size")) != (
        layout.num_shards,
        layout.world_size,
    ):
        return False
    files = manifest.get("files") or []
    return len(files) == layout.world_size and all(
        (layout.manifest.parent / f["path"]).is_file() for f in files
    )
