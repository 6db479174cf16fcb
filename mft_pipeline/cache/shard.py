"""One Parquet shard of a stage-one cache: its columns, and their encoding and decoding as one pair.

Every column name and per-row shape is spelled out here once (``COLUMNS``); the writer, the
reader and ``mft cache-info``/``cache-verify`` go through :func:`encode_shard`,
:func:`write_shard_file` and :func:`decode_shard`. docs/cache-format.md describes the result.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

COMPRESSION = "zstd"
COMPRESSION_LEVEL = 9
# Small row groups let stage two read a few rows of a shard without decoding all of it. At
# T = 2048 and k = 20 a 32-row group's top-k columns are ~2.6 MB per column chunk, a few pages
# each, so compression barely changes: a 256-row shard of synthetic top-20 scores at T = 1024
# grew by 1.3% against one row group per shard.
ROWS_PER_ROW_GROUP = 32

# Decoded name -> (stored column, per-row shape from (T, k, N)). Stored and decoded differ only
# for the top-k log-probs, which are stored as float16 bit-pattern deltas.
COLUMNS = {
    "seq_id": ("seq_id", lambda T, k, n: ()),
    "num_tokens": ("num_tokens", lambda T, k, n: ()),
    "input_ids": ("input_ids", lambda T, k, n: (T,)),
    "topk_ids": ("topk_ids", lambda T, k, n: (T - 1, k)),
    "topk_logprobs": ("topk_logprob_deltas", lambda T, k, n: (T - 1, k)),
    "argmax_logprob": ("argmax_logprob", lambda T, k, n: (T - 1,)),
    "label_logprobs": ("label_logprobs", lambda T, k, n: (T - 1,)),
    "tail_ids": ("tail_ids", lambda T, k, n: (T - 1, n)),
    "target": ("target", lambda T, k, n: (T - 1,)),
}
# Columns a shard holds only in caches made with them (tail_ids: ``--tail-samples N`` with
# N > 0; target: instruction and chat corpora); a cache without them reads as before.
OPTIONAL_COLUMNS = ("tail_ids", "target")
# The teacher's columns, the large ones that stage two reads per batch (tail_ids too, where present).
TEACHER_COLUMNS = ("topk_ids", "topk_logprobs", "argmax_logprob", "label_logprobs")

# Byte-stream split puts the same byte of every value together (all exponents, then all
# mantissas), which zstd compresses far better for floats and narrow ids; dictionary
# encoding only gets in its way on these columns. Leaf paths of the nested lists:
BYTE_STREAM_SPLIT = tuple(
    # one ".list.element" per nesting level, i.e. per dimension of the per-row shape
    COLUMNS[name][0] + ".list.element" * len(COLUMNS[name][1](2, 1, 1))
    for name in (*TEACHER_COLUMNS, "tail_ids")
)


def ids_type(vocab_size: int) -> pa.DataType:
    """Narrowest unsigned type that holds every token id (2 bytes for vocabularies up to 64k)."""
    return pa.uint16() if vocab_size <= 2**16 else pa.uint32()


def arrow_schema(seq_len: int, top_k: int, vocab_size: int, tail_samples: int = 0, targets: bool = False) -> pa.Schema:
    """The schema of a cache's shards; ``tail_ids`` only when ``tail_samples > 0``, ``target`` only with ``targets``."""
    n = seq_len - 1
    types = {
        "seq_id": pa.int64(),
        "num_tokens": pa.int32(),
        "input_ids": pa.list_(pa.int32(), seq_len),
        "topk_ids": pa.list_(pa.list_(ids_type(vocab_size), top_k), n),
        "topk_logprobs": pa.list_(pa.list_(pa.uint16(), top_k), n),
        "argmax_logprob": pa.list_(pa.float32(), n),
        "label_logprobs": pa.list_(pa.float32(), n),
    }
    if tail_samples:
        types["tail_ids"] = pa.list_(pa.list_(ids_type(vocab_size), tail_samples), n)
    if targets:
        types["target"] = pa.list_(pa.bool_(), n)
    return pa.schema([(stored, types[name]) for name, (stored, _) in COLUMNS.items() if name in types])


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


def _row_shape(type_: pa.DataType) -> tuple[int, ...]:
    shape = []
    while pa.types.is_fixed_size_list(type_):
        shape.append(type_.list_size)
        type_ = type_.value_type
    return tuple(shape)


def encode_shard(
    schema: pa.Schema,
    first_row: int,
    input_ids: np.ndarray,
    num_tokens: np.ndarray,
    topk_ids: np.ndarray,
    topk_logprobs: np.ndarray,
    label_logprobs: np.ndarray,
    tail_ids: np.ndarray | None = None,
    target: np.ndarray | None = None,
) -> pa.Table:
    """The rows ``first_row ...`` of a split and the teacher's scores of them, as one shard table.

    Args:
        schema: :func:`arrow_schema` of the cache.
        first_row: the split's row index of the first row (stored as ``seq_id``).
        input_ids: (N, T) token ids; num_tokens: (N,) real tokens per row.
        topk_ids: (N, T - 1, k); topk_logprobs: (N, T - 1, k) float32, descending (index 0 is
            the argmax, kept exact in ``argmax_logprob``); label_logprobs: (N, T - 1).
        tail_ids: (N, T - 1, n) sampled tail ids, exactly when the schema has ``tail_ids``.
        target: (N, T - 1) bool, whether position t's label is a training target, exactly
            when the schema has ``target``.
    """
    for name, value in (("tail_ids", tail_ids), ("target", target)):
        if (value is None) != (schema.get_field_index(name) < 0):
            raise ValueError(f"{name} must be given exactly when the schema has the {name} column")
    n = len(num_tokens)
    decoded = {
        "seq_id": np.arange(first_row, first_row + n, dtype=np.int64),
        "num_tokens": np.asarray(num_tokens, dtype=np.int32),
        "input_ids": input_ids,
        "topk_ids": topk_ids,
        "topk_logprobs": delta_encode_float16(topk_logprobs),
        "argmax_logprob": np.asarray(topk_logprobs[..., 0], dtype=np.float32),
        "label_logprobs": np.asarray(label_logprobs, dtype=np.float32),
        "tail_ids": tail_ids,
        "target": target,
    }
    columns = {}
    for name, (stored, _) in COLUMNS.items():
        if schema.get_field_index(stored) < 0:
            continue
        type_ = schema.field(stored).type
        columns[stored] = to_fixed_lists(decoded[name], type_) if pa.types.is_fixed_size_list(type_) else pa.array(decoded[name], type=type_)
    return pa.Table.from_pydict(columns, schema=schema)


def write_shard_file(table: pa.Table, path: str | Path) -> None:
    """Write one shard with the cache's Parquet encoding (zstd, byte-stream split, no dictionaries)."""
    present = [leaf for leaf in BYTE_STREAM_SPLIT if table.schema.get_field_index(leaf.split(".")[0]) >= 0]
    pq.write_table(
        table, path, compression=COMPRESSION, compression_level=COMPRESSION_LEVEL, use_dictionary=False,
        use_byte_stream_split=present, row_group_size=ROWS_PER_ROW_GROUP,
    )


def decode_shard(
    source: pa.Table | pq.ParquetFile | str | Path,
    columns: tuple[str, ...] | None = None,
    row_groups: list[int] | None = None,
) -> dict[str, np.ndarray]:
    """Decode a shard (or some of its row groups) into numpy arrays in the stored dtypes.

    Args:
        source: a shard table, an open ``ParquetFile``, or a shard's path (memory-mapped).
        columns: decoded names (keys of ``COLUMNS``) to read; by default all that the shard
            holds (``tail_ids`` only where it was made with tail samples). Only those columns
            are read from a file.
        row_groups: for a file, read only these row groups, in this order.

    Returns: name -> array: seq_id (N,) int64, num_tokens (N,) int32, input_ids (N, T) int32,
    topk_ids (N, T - 1, k) uint16/uint32, topk_logprobs (N, T - 1, k) float16 (the argmax's
    exact value is ``argmax_logprob``), argmax_logprob and label_logprobs (N, T - 1) float32,
    tail_ids (N, T - 1, n) uint16/uint32, target (N, T - 1) bool.
    """
    if isinstance(source, (str, Path)):
        source = pq.ParquetFile(source, memory_map=True)
    if columns is None:
        held = source.schema_arrow if isinstance(source, pq.ParquetFile) else source.schema
        names = tuple(n for n, (stored, _) in COLUMNS.items() if n not in OPTIONAL_COLUMNS or held.get_field_index(stored) >= 0)
    else:
        names = tuple(columns)
    stored = [COLUMNS[n][0] for n in names]
    if isinstance(source, pq.ParquetFile):
        if row_groups is None:
            table = source.read(columns=stored)
        else:
            table = source.read_row_groups(row_groups, columns=stored)
    else:
        table = source.select(stored)
    out = {}
    for name, column in zip(names, stored):
        array = from_fixed_lists(table.column(column), _row_shape(table.schema.field(column).type))
        out[name] = delta_decode_float16(array) if name == "topk_logprobs" else array
    return out
