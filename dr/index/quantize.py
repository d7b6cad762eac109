"""Quantized passage shards: the codes `dr quantize` writes beside float shards and `dr search --quantize`
scans in its first pass (docs/formats.md "Quantized shards" is the contract; torch-free).

Two kinds (`KINDS`):

- ``int8``: one signed byte per dimension, an affine code per dimension d:
  ``code = round((x - offset[d]) / scale[d]) - 128`` with ``offset = min`` and ``scale = (max - min) / 255``
  over the *whole corpus* (one streaming pass before writing). Calibrating on every row rather than a sample
  costs one cheap read of the corpus and means no value is ever clipped, and every shard of a corpus
  carries the same calibration (inner products stay comparable across shards). A constant dimension gets
  ``scale = 1`` (all its codes are -128). Decoding is ``offset + scale * (code + 128)``.
- ``binary``: one bit per dimension, 1 where ``x > 0`` (threshold 0, as sentence-transformers does: a
  per-dimension median would balance the bits but approximates the angle between *centred* vectors, which
  ranks differently from the inner product being approximated), packed 8 per byte with
  ``numpy.packbits`` (dimension 0 is the most significant bit of byte 0). The dimension must be a
  multiple of 8.

A float shard ``DIR/NAME.arrow`` gets the quantized shard ``DIR/<kind>/NAME.arrow`` (or
``OUTPUT_DIR/NAME.arrow``): a sub-folder, so that the float shards' glob (``DIR/*.arrow``) never picks up
codes. ``<kind>.manifest.json`` in that folder lists the files (rows, bytes, sha256, the source file) in
the format of `dr encode`'s manifests, so `dr search --verify` checks them the same way.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import ipc

from dr.errors import InputError, UsageError
from dr.io.atomic import atomic_path, write_json_atomic
from dr.io.shards import (
    ENCODER_FIELDS,
    MANIFEST_FORMAT,
    ShardMeta,
    file_sha256,
    iter_shard,
    read_manifest,
)
from dr.search.shard_set import check_finite, id_column, read_metas

logger = logging.getLogger("dr.quantize")

KINDS = ("int8", "binary")
_CODE_TYPES = {"int8": pa.int8(), "binary": pa.uint8()}
# The keys a quantized shard adds to the float shard's dr.* metadata (docs/formats.md).
SOURCE_KEYS = ("dr.source", "dr.source_bytes", "dr.source_rows")


class QuantizeError(InputError):
    """A quantized shard is missing, unreadable, or does not match the float shard it was made from."""


def code_bytes(kind: str, dim: int) -> int:
    """Bytes per row of a `kind` code of a `dim`-dimensional vector."""
    return dim if kind == "int8" else dim // 8


def check_kind(kind: str, dim: int) -> None:
    """A known kind and, for binary, a dimension divisible by 8 (a usage error: choose another kind)."""
    if kind not in KINDS:
        raise UsageError(f"--quantize {kind!r}: choose one of {', '.join(KINDS)}")
    if kind == "binary" and dim % 8:
        raise UsageError(
            f"--quantize binary needs a dimension divisible by 8 (packed 8 bits per byte); "
            f"the vectors have dim {dim}: use --quantize int8"
        )


@dataclass(frozen=True)
class Int8Calibration:
    """Per-dimension affine int8 code: ``x ~ offset + scale * (code + 128)`` (module docstring)."""

    offset: np.ndarray  # float32 (dim,): the corpus minimum per dimension
    scale: np.ndarray  # float32 (dim,): (max - min) / 255 per dimension, 1 where max == min

    @classmethod
    def fit(cls, paths: list[str], dim: int, max_rows: int) -> Int8Calibration:
        """Min and max per dimension over every row of `paths`, streamed in blocks of `max_rows`."""
        low = np.full(dim, np.inf, dtype=np.float32)
        high = np.full(dim, -np.inf, dtype=np.float32)
        for path in paths:
            row = 0
            for ids, vectors in iter_shard(path, max_rows=max_rows):
                check_finite(vectors, path, row, ids)  # NaN/inf: named by file and row, not a bad calibration
                row += len(vectors)
                if len(vectors):
                    np.minimum(low, vectors.min(axis=0), out=low)
                    np.maximum(high, vectors.max(axis=0), out=high)
        if not np.isfinite(low).all() or not np.isfinite(high).all():
            raise QuantizeError("int8 calibration: the shards hold no rows, or NaN/inf values")
        span = (high - low) / np.float32(255)
        return cls(low, np.where(span > 0, span, np.float32(1)).astype(np.float32))

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        """int8 codes (n, dim) of float vectors."""
        steps = np.rint((np.asarray(vectors, dtype=np.float32) - self.offset) / self.scale)
        return (np.clip(steps, 0, 255) - 128).astype(np.int8)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """float32 approximations (n, dim) of the vectors behind `codes`."""
        return self.offset + self.scale * (codes.astype(np.float32) + np.float32(128))

    def to_metadata(self) -> dict[str, str]:
        return {"dr.int8_offset": _floats_json(self.offset), "dr.int8_scale": _floats_json(self.scale)}

    @classmethod
    def from_metadata(cls, raw: dict[str, str], dim: int, source: str) -> Int8Calibration:
        arrays = []
        for key in ("dr.int8_offset", "dr.int8_scale"):
            try:
                values = np.array(json.loads(raw[key]), dtype=np.float32)
            except (KeyError, ValueError, TypeError) as err:
                raise QuantizeError(
                    f"{source}: {key} is missing or not a JSON list of numbers ({err})"
                ) from None
            if values.shape != (dim,) or not np.isfinite(values).all():
                raise QuantizeError(f"{source}: {key} must hold {dim} finite numbers (dr.dim)")
            arrays.append(values)
        if (arrays[1] <= 0).any():
            raise QuantizeError(f"{source}: dr.int8_scale holds a value <= 0")
        return cls(*arrays)

    def same_as(self, other: Int8Calibration) -> bool:
        return np.array_equal(self.offset, other.offset) and np.array_equal(self.scale, other.scale)


def _floats_json(values: np.ndarray) -> str:
    """A JSON list of float32 values, each as its shortest round-tripping decimal."""
    return "[" + ",".join(str(v) for v in np.asarray(values, dtype=np.float32)) + "]"


def binary_codes(vectors: np.ndarray) -> np.ndarray:
    """Sign bits (1 where x > 0) packed 8 per byte, dimension 0 first (most significant): uint8 (n, dim/8)."""
    return np.packbits(np.asarray(vectors) > 0, axis=1)


def quantized_path(
    float_path: str | os.PathLike, kind: str, output_dir: str | os.PathLike | None = None
) -> Path:
    """Where the `kind` codes of a float shard live: ``<output_dir or shard folder/kind>/<shard name>``."""
    path = Path(float_path)
    folder = Path(output_dir) if output_dir else path.parent / kind
    return folder / path.name


def manifest_path(folder: Path, kind: str) -> Path:
    return folder / f"{kind}.manifest.json"


@dataclass(frozen=True)
class QuantizedShard:
    """A quantized shard's header: what it encodes, from which float shard, and the int8 calibration."""

    path: str
    kind: str
    meta: ShardMeta  # the float shard's metadata (dr.dtype is the float dtype the codes were made from)
    source: tuple[str, int, int]  # (float shard file name, its bytes, its rows)
    calibration: Int8Calibration | None


def _source_signature(float_path: str, meta: ShardMeta) -> tuple[str, int, int]:
    return (Path(float_path).name, os.path.getsize(float_path), meta.count)


def _schema(meta: ShardMeta, kind: str, source: tuple[str, int, int], calibration: Int8Calibration | None):
    metadata = {k.decode(): v.decode() for k, v in meta.to_arrow().items()}
    metadata.update(
        {
            "dr.quantize": kind,
            "dr.code_bytes": str(code_bytes(kind, meta.dim)),
            "dr.source": source[0],
            "dr.source_bytes": str(source[1]),
            "dr.source_rows": str(source[2]),
        }
    )
    metadata.update(calibration.to_metadata() if calibration else {"dr.binary_threshold": "0"})
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("code", pa.list_(_CODE_TYPES[kind], code_bytes(kind, meta.dim)), nullable=False),
        ],
        metadata=metadata,
    )


def open_quantized(path: str | os.PathLike) -> tuple[QuantizedShard, ipc.RecordBatchFileReader]:
    """Open and validate a quantized shard's schema and metadata (rows are not read)."""
    path = str(path)
    try:
        reader = ipc.open_file(pa.memory_map(path, "r"))
    except (pa.ArrowInvalid, OSError) as err:
        raise QuantizeError(
            f"{path}: cannot open as an Arrow IPC file (corrupt or truncated?): {err}"
        ) from None
    raw = {
        k.decode(errors="replace"): v.decode(errors="replace")
        for k, v in (reader.schema.metadata or {}).items()
    }
    kind = raw.get("dr.quantize")
    if kind not in KINDS:
        raise QuantizeError(f"{path}: not a quantized shard (dr.quantize {kind!r}, expected one of {KINDS})")
    meta = ShardMeta.from_arrow(reader.schema.metadata, path)
    width = code_bytes(kind, meta.dim)
    found = reader.schema.field("code").type if "code" in reader.schema.names else None
    if reader.schema.names != ["id", "code"] or not (
        pa.types.is_fixed_size_list(found)
        and found.value_type == _CODE_TYPES[kind]
        and found.list_size == width
    ):
        raise QuantizeError(
            f"{path}: columns {reader.schema.names} ({found}); a {kind} shard of dim {meta.dim} has "
            f"['id', 'code'] with code fixed_size_list<{_CODE_TYPES[kind]}>[{width}]"
        )
    try:
        source = (raw["dr.source"], int(raw["dr.source_bytes"]), int(raw["dr.source_rows"]))
    except (KeyError, ValueError):
        raise QuantizeError(f"{path}: {', '.join(SOURCE_KEYS)} missing or not integers") from None
    calibration = Int8Calibration.from_metadata(raw, meta.dim, path) if kind == "int8" else None
    rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    if rows != meta.count:
        raise QuantizeError(f"{path}: {rows} rows but dr.count={meta.count} (truncated or altered)")
    return QuantizedShard(path, kind, meta, source, calibration), reader


def iter_codes(reader: ipc.RecordBatchFileReader, width: int, max_rows: int) -> Iterator[np.ndarray]:
    """Yield code blocks (rows, width) of an open quantized shard, each of `max_rows` rows (the last fewer).

    Consecutive record batches are joined (one copy of the codes, which are small) so that the first pass
    scores few large blocks instead of one per record batch; a block inside one batch is a zero-copy view.
    """
    pending: list[np.ndarray] = []
    held = 0
    for i in range(reader.num_record_batches):
        column = reader.get_batch(i).column(1)
        if column.null_count:
            raise QuantizeError("a quantized shard holds a null code")
        codes = column.flatten().to_numpy().reshape(-1, width)
        while len(codes):
            take = codes[: max_rows - held]
            pending.append(take)
            held += len(take)
            codes = codes[len(take) :]
            if held == max_rows:
                yield pending[0] if len(pending) == 1 else np.concatenate(pending)
                pending, held = [], 0
    if held:
        yield pending[0] if len(pending) == 1 else np.concatenate(pending)


def check_matches(shard: QuantizedShard, float_path: str, float_meta: ShardMeta, kind: str) -> None:
    """The quantized shard encodes exactly the float shard: kind, dim, encoder, rows and ids in order."""
    where = f"{shard.path}: does not match the float shard {float_path}"
    if shard.kind != kind:
        raise QuantizeError(f"{shard.path}: a {shard.kind} shard where {kind} codes are expected")
    diff = shard.meta.differences(float_meta, (*ENCODER_FIELDS, "dim", "count"), ("codes", "floats"))
    if diff:
        raise QuantizeError(f"{where} ({', '.join(diff)}); rerun dr quantize")
    qids, fids = id_column(shard.path), id_column(float_path)
    if not qids.equals(fids):
        row = int(pc.index(pc.equal(qids, fids), False).as_py())
        raise QuantizeError(
            f"{where} (row {row}: id {qids[row].as_py()!r} vs {fids[row].as_py()!r}); rerun dr quantize"
        )


def _up_to_date(out: Path, float_path: str, meta: ShardMeta, kind: str, calibration) -> bool:
    """True when `out` already holds the codes of the current float shard (same source and calibration)."""
    if not out.is_file():
        return False
    try:
        shard, _ = open_quantized(out)
        if shard.source != _source_signature(float_path, meta):
            return False
        check_matches(shard, float_path, meta, kind)
    except InputError:
        return False
    return calibration is None or (shard.calibration is not None and shard.calibration.same_as(calibration))


def _write(out: Path, float_path: str, meta: ShardMeta, kind: str, calibration, max_rows: int) -> None:
    """Stream the float shard's blocks into codes, under a temporary name renamed when complete."""
    schema = _schema(meta, kind, _source_signature(float_path, meta), calibration)
    width = code_bytes(kind, meta.dim)
    with atomic_path(out) as tmp, pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, schema) as writer:
        row = 0
        for ids, vectors in iter_shard(float_path, max_rows=max_rows):
            check_finite(vectors, float_path, row, ids)  # a NaN's sign bit or int8 code would be garbage
            row += len(vectors)
            codes = calibration.encode(vectors) if calibration else binary_codes(vectors)
            column = pa.FixedSizeListArray.from_arrays(
                pa.array(codes.reshape(-1), schema.field("code").type.value_type), width
            )
            writer.write_batch(pa.record_batch([pa.array(ids, pa.string()), column], schema=schema))


def quantize_shards(
    paths: list[str], kind: str, output_dir: str | None = None, max_memory_bytes: int = 2**30
) -> list[Path]:
    """Write (or keep, when up to date) the `kind` codes of every float passage shard; return their paths.

    Reruns are idempotent: a quantized shard whose recorded source (file name, bytes, rows) and calibration
    match is kept; the manifest of each output folder is rewritten to list the files (entries of other
    files in that folder that still exist are kept).
    """
    metas = read_metas(paths, "passage")
    dim = metas[0].dim
    check_kind(kind, dim)
    outputs = [quantized_path(p, kind, output_dir) for p in paths]
    if len(set(outputs)) != len(outputs):
        raise UsageError(f"--output_dir {output_dir}: two shards share a file name; quantize them separately")
    max_rows = max(1, max_memory_bytes // (dim * 4))
    calibration = Int8Calibration.fit(paths, dim, max_rows) if kind == "int8" else None
    written: set[int] = set()
    for i, (path, meta, out) in enumerate(zip(paths, metas, outputs)):
        if _up_to_date(out, path, meta, kind, calibration):
            logger.info("%s: up to date, kept", out)
            continue
        _write(out, path, meta, kind, calibration, max_rows)
        written.add(i)
        logger.info("%s: %d rows -> %s codes (%d bytes each)", out, meta.count, kind, code_bytes(kind, dim))
    _write_manifests(paths, metas, outputs, kind, written)
    logger.info("%d shard(s) written, %d kept", len(written), len(paths) - len(written))
    return outputs


def _write_manifests(
    paths: list[str], metas: list[ShardMeta], outputs: list[Path], kind: str, written: set[int]
) -> None:
    """One `<kind>.manifest.json` per output folder, in `dr encode`'s manifest format (files, rows, sha256).

    A kept file's sha256 is taken from the previous manifest when its size still matches (no re-hashing)."""
    by_folder: dict[Path, list[int]] = {}
    for i, out in enumerate(outputs):
        by_folder.setdefault(out.parent, []).append(i)
    for folder, items in by_folder.items():
        target = manifest_path(folder, kind)
        try:
            old = read_manifest(target) or {}
        except InputError:
            old = {}
        previous = {f.get("path"): f for f in old.get("files", []) if isinstance(f, dict)}
        files = {}
        for i in items:
            out, size = outputs[i], outputs[i].stat().st_size
            known = previous.get(out.name, {})
            reuse = i not in written and known.get("bytes") == size and known.get("sha256")
            files[out.name] = {
                "path": out.name,
                "rows": metas[i].count,
                "bytes": size,
                "sha256": known["sha256"] if reuse else file_sha256(out),
                "source": os.path.relpath(paths[i], folder),
            }
        for name, entry in previous.items():  # other corpora quantized into the same folder
            if name not in files and (folder / str(name)).is_file():
                files[name] = entry
        meta = metas[items[0]]
        write_json_atomic(
            target,
            {
                "format": MANIFEST_FORMAT,
                "version": 1,
                "quantize": kind,
                "side": meta.side,
                "model": meta.model,
                "pooling": meta.pooling,
                "normalize": meta.normalize,
                "dim": meta.dim,
                "code_bytes": code_bytes(kind, meta.dim),
                "rows": sum(f["rows"] for f in files.values()),
                "files": sorted(files.values(), key=lambda f: f["path"]),
            },
        )
