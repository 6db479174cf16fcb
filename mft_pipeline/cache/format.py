"""The on-disk cache contract (docs/cache-format.md): schema, file names, manifest I/O."""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
from mft_pipeline.errors import MFTError

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
SETTINGS = "cache-settings.json"
SPLITS = ("train", "validation")
COMPRESSION = "zstd"
COMPRESSION_LEVEL = 9
# Byte-stream split puts the same byte of every value together (all exponents, then all
# mantissas), which zstd compresses far better for floats and narrow ids; dictionary
# encoding only gets in its way on these columns. Leaf paths of the nested lists:
BYTE_STREAM_SPLIT = (
    "topk_ids.list.element.list.element",
    "topk_logprob_deltas.list.element.list.element",
    "argmax_logprob.list.element",
    "label_logprobs.list.element",
)


class CacheError(MFTError):
    """The cache folder is missing, incomplete, inconsistent, or made by another model."""


def ids_type(vocab_size: int) -> pa.DataType:
    """Narrowest unsigned type that holds every token id (2 bytes for vocabularies up to 64k)."""
    return pa.uint16() if vocab_size <= 2**16 else pa.uint32()


def arrow_schema(seq_len: int, top_k: int, vocab_size: int) -> pa.Schema:
    n = seq_len - 1
    return pa.schema(
        [
            ("seq_id", pa.int64()),
            ("num_tokens", pa.int32()),
            ("input_ids", pa.list_(pa.int32(), seq_len)),
            ("topk_ids", pa.list_(pa.list_(ids_type(vocab_size), top_k), n)),
            ("topk_logprob_deltas", pa.list_(pa.list_(pa.uint16(), top_k), n)),
            ("argmax_logprob", pa.list_(pa.float32(), n)),
            ("label_logprobs", pa.list_(pa.float32(), n)),
        ]
    )


def delta_encode_float16(values: np.ndarray) -> np.ndarray:
    """(..., k) log-probs -> (..., k) uint16: float16 bit patterns, differenced along the last axis.

    Lossless for any float16 values (the differences wrap modulo 2**16, and so does the
    decoding sum). For log-probs sorted descending the bit patterns only grow, by a few ulps
    per step, so the differences are small numbers that compress about 30% better than the
    float16 values themselves.
    """
    bits = np.ascontiguousarray(values, dtype=np.float16).view(np.uint16)
    return np.diff(bits, axis=-1, prepend=np.zeros_like(bits[..., :1]))


def delta_decode_float16(deltas: np.ndarray) -> np.ndarray:
    """Inverse of :func:`delta_encode_float16`: (..., k) uint16 -> (..., k) float16."""
    return np.cumsum(deltas, axis=-1, dtype=np.uint16).view(np.float16)


def to_fixed_lists(array: np.ndarray, type_: pa.DataType) -> pa.Array:
    """(N, d1, d2, ...) numpy array -> nested fixed-size-list Arrow array of ``type_``."""
    inner = type_
    while pa.types.is_fixed_size_list(inner):
        inner = inner.value_type
    values = pa.array(np.ascontiguousarray(array).reshape(-1), type=inner)
    shape = array.shape[1:]
    for size in reversed(shape):
        values = pa.FixedSizeListArray.from_arrays(values, size)
    return values


def from_fixed_lists(column: pa.ChunkedArray | pa.Array, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`to_fixed_lists`: returns an (N, *shape) numpy array."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    for _ in shape:
        array = array.flatten()
    return array.to_numpy(zero_copy_only=False).reshape(-1, *shape)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.parquet"


SHARD_FILE = re.compile(r"^(train|validation)-\d{5}\.parquet$")
# Temporary files carry the writing worker's index (or "merge") and a per-call random part:
# two processes never share a temp name, and a worker can tell its own crash leftovers apart
# from the files other workers are writing right now.
TEMP_FILE = re.compile(r"^\..+\.(w\d{5}|merge)-\d+-[0-9a-f]{12}\.tmp$")


def temp_name(name: str, worker: int | None = None) -> str:
    """A fresh temp file name for writing ``name``, unique to this process and call."""
    tag = "merge" if worker is None else f"w{worker:05d}"
    return f".{name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp"


def is_worker_temp(entry: str, worker: int) -> bool:
    """Whether ``entry`` is a temp file that worker ``worker`` wrote (and, if it is not running, left behind)."""
    return bool(TEMP_FILE.match(entry)) and f".w{worker:05d}-" in entry


def shard_path(cache_dir: str | Path, name) -> Path:
    """``cache_dir / name`` for a shard name read from a manifest, settings or worker file.

    Those files may come from anyone; a name that is not a plain shard file name (``..``, an
    absolute path, a sub-folder, anything else) would let them point the reader outside the cache.
    """
    if not isinstance(name, str) or not SHARD_FILE.match(name):
        raise CacheError(f"{cache_dir}: {name!r} is not a shard file name ({{split}}-NNNNN.parquet in the cache folder); refusing it")
    return Path(cache_dir) / name


def worker_name(index: int, count: int) -> str:
    return f"worker-{index:05d}-of-{count:05d}.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_temp_json(path: Path, data: dict, worker: int | None) -> Path:
    tmp = path.with_name(temp_name(path.name, worker))
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return tmp


def write_json_atomic(path: Path, data: dict, worker: int | None = None) -> None:
    """Write JSON so that a reader sees either nothing or the whole file.

    Safe when several processes write the same file at once (two workers finishing together
    both write the manifest): each writes its own temp file, and the last rename wins whole.
    """
    tmp = _write_temp_json(Path(path), data, worker)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_once(path: Path, data: dict, worker: int | None = None) -> dict | None:
    """Create ``path`` holding ``data`` unless it exists; returns None if this call created it, else the existing content.

    Creation is atomic and exclusive (a hard link of a complete temp file, which fails if the
    name exists): of several workers starting together exactly one creates the file, and the
    others read it whole and compare.
    """
    path = Path(path)
    tmp = _write_temp_json(path, data, worker)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return read_json(path)
        except OSError:
            # A filesystem without hard links: exclusive create, then the content. A reader
            # may then briefly see a partial file, which read_json reports as unreadable.
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return read_json(path)
            with os.fdopen(fd, "wb") as f:
                f.write(tmp.read_bytes())
                f.flush()
                os.fsync(f.fileno())
        return None
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CacheError(f"{path}: unreadable ({e})") from e


def read_manifest(cache_dir: str | Path) -> dict:
    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST
    if not path.exists():
        hint = ""
        if any(cache_dir.glob("worker-*.json")) or (cache_dir / SETTINGS).exists():
            hint = " (stage one did not finish: rerun it with --resume, or `mft cache-merge` if workers wrote parts)"
        raise CacheError(f"{cache_dir}: not a finished cache, no {MANIFEST}{hint}")
    manifest = read_json(path)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise CacheError(
            f"{path}: schema version {manifest.get('schema_version')} is not {SCHEMA_VERSION}; rebuild the cache with this version"
        )
    try:
        shards = [s["file"] for split in manifest["splits"].values() for s in split["shards"]]
    except (KeyError, TypeError, AttributeError) as e:
        raise CacheError(f"{path}: malformed splits ({e!r}); run `mft cache-verify` or rebuild") from None
    for name in shards:
        shard_path(cache_dir, name)  # refuses names that would point outside the folder
    return manifest
