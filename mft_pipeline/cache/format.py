"""The on-disk cache contract (docs/cache-format.md): schema, file names, manifest I/O."""

from __future__ import annotations

import hashlib
import json
import os
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


def worker_name(index: int, count: int) -> str:
    return f"worker-{index:05d}-of-{count:05d}.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON so that a reader sees either nothing or the whole file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    return manifest
