"""Reading a finished cache back as (B, T, k) training targets, a few rows at a time."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from mft_pipeline.cache.format import CacheError, read_manifest, shard_path
from mft_pipeline.cache.shard import TEACHER_COLUMNS, decode_shard
from mft_pipeline.labels import IGNORE_INDEX

# Decoded row groups kept for reuse. Bounded in bytes, not in shards, so the reader's memory
# does not grow with the cache; big enough to hold the groups one large batch touches.
DEFAULT_CACHE_BYTES = 256 * 2**20


class CachedSplit:
    """One split of a cache, read from its shards on demand.

    ``input_ids`` and ``num_tokens`` (4 bytes per token) are held in memory for the whole split,
    for labels and evaluation. The teacher's columns (about 90 bytes per token at k = 20) are
    read per Parquet row group when a batch needs them, memory-mapped, and only the last few
    decoded groups are kept (``cache_bytes``), so memory does not depend on the split's size.

    Attributes:
        input_ids: (N, T) int32.
        num_tokens: (N,) int32.
        tail_samples: sampled tail ids per position (the manifest's ``tail_samples``; 0 for
            caches made without them).
    """

    def __init__(self, path: Path, shards: list[dict], cache_bytes: int = DEFAULT_CACHE_BYTES, tail_samples: int = 0):
        self.path = Path(path)
        self.cache_bytes = cache_bytes
        self.tail_samples = tail_samples
        self.teacher_columns = TEACHER_COLUMNS + (("tail_ids",) if tail_samples else ())
        self._groups: list[tuple[Path, int]] = []  # (shard file, row group) in split order
        group_of_row, ids, num = [], [], []
        for shard in shards:
            f = shard_path(self.path, shard["file"])
            if not f.exists():
                raise CacheError(f"{f}: listed in the manifest but missing; run `mft cache-verify`")
            try:
                pf = pq.ParquetFile(f, memory_map=True)
                small = decode_shard(pf, columns=("input_ids", "num_tokens"))
            except (OSError, ValueError) as e:  # pyarrow's errors for a broken file derive from these
                raise CacheError(f"{f}: unreadable Parquet ({e}); run `mft cache-verify`") from e
            if pf.metadata.num_rows != shard["rows"]:
                raise CacheError(f"{f}: {pf.metadata.num_rows} rows, manifest says {shard['rows']}")
            if (pf.schema_arrow.get_field_index("tail_ids") >= 0) != bool(tail_samples):
                raise CacheError(f"{f}: the tail_ids column disagrees with the manifest's tail_samples={tail_samples}; run `mft cache-verify`")
            for g in range(pf.metadata.num_row_groups):
                group_of_row.append(np.full(pf.metadata.row_group(g).num_rows, len(self._groups), dtype=np.int64))
                self._groups.append((f, g))
            ids.append(small["input_ids"])
            num.append(small["num_tokens"])
        self.input_ids = np.concatenate(ids)
        self.num_tokens = np.concatenate(num)
        self._group = np.concatenate(group_of_row)
        # Row offset within its row group.
        starts = np.flatnonzero(np.r_[True, self._group[1:] != self._group[:-1]])
        self._offset = np.arange(len(self._group)) - np.repeat(starts, np.diff(np.r_[starts, len(self._group)]))
        self._decoded: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._decoded_bytes = 0

    def __len__(self) -> int:
        return len(self.num_tokens)

    def _rows(self, rows) -> np.ndarray:
        return np.arange(len(self))[rows].reshape(-1)

    def labels(self, rows=slice(None)) -> np.ndarray:
        """(n, T - 1) int64 next-token labels, IGNORE_INDEX past each row's end."""
        ids = self.input_ids[rows, 1:].astype(np.int64)
        valid = np.arange(ids.shape[1])[None] < (self.num_tokens[rows, None] - 1)
        return np.where(valid, ids, IGNORE_INDEX)

    def _group_arrays(self, g: int) -> dict[str, np.ndarray]:
        if g in self._decoded:
            self._decoded.move_to_end(g)
            return self._decoded[g]
        f, index = self._groups[g]
        arrays = decode_shard(f, columns=self.teacher_columns, row_groups=[index])
        self._decoded[g] = arrays
        self._decoded_bytes += sum(a.nbytes for a in arrays.values())
        while self._decoded_bytes > self.cache_bytes and len(self._decoded) > 1:
            _, old = self._decoded.popitem(last=False)
            self._decoded_bytes -= sum(a.nbytes for a in old.values())
        return arrays

    def read(self, rows=slice(None)) -> dict[str, np.ndarray]:
        """The teacher's columns of ``rows``, in the stored dtypes and in the order asked.

        Returns: topk_ids (n, T - 1, k) uint16/uint32; topk_logprobs (n, T - 1, k) float16;
        argmax_logprob (n, T - 1) float32, exact; label_logprobs (n, T - 1) float32, exact;
        where the cache has tail samples, tail_ids (n, T - 1, N) uint16/uint32.
        """
        idx = self._rows(rows)
        out: dict[str, np.ndarray] = {}
        groups = self._group[idx]
        for g in np.unique(groups):
            arrays = self._group_arrays(int(g))
            where = np.flatnonzero(groups == g)
            for name, a in arrays.items():
                if name not in out:
                    out[name] = np.empty((len(idx), *a.shape[1:]), dtype=a.dtype)
                out[name][where] = a[self._offset[idx[where]]]
        if not out:  # no rows asked
            return {name: arrays[:0] for name, arrays in self._group_arrays(0).items()}
        return out

    # Whole-split views of the teacher's columns, for inspection and tests: each reads the
    # whole split into memory. Training goes through batch(), which reads only its rows.
    @property
    def topk_ids(self) -> np.ndarray:
        return self.read()["topk_ids"]

    @property
    def topk_logprobs(self) -> np.ndarray:
        return self.read()["topk_logprobs"]

    @property
    def argmax_logprob(self) -> np.ndarray:
        return self.read()["argmax_logprob"]

    @property
    def label_logprobs(self) -> np.ndarray:
        return self.read()["label_logprobs"]

    @property
    def tail_ids(self) -> np.ndarray | None:
        return self.read()["tail_ids"] if self.tail_samples else None

    def chunks(self, columns: tuple[str, ...] = TEACHER_COLUMNS):
        """Yield ``(rows, arrays)`` per row group over the whole split, reading only ``columns``.

        ``rows`` are the split's row indices of the group; ``arrays`` as :meth:`read` returns
        them. For passes over a whole split (statistics) without holding it in memory.
        """
        for g, (f, index) in enumerate(self._groups):
            yield np.flatnonzero(self._group == g), decode_shard(f, columns=columns, row_groups=[index])

    def teacher_perplexity(self) -> float:
        """The teacher's perplexity on this split, from the cached label log-probs (no forward)."""
        total, count = 0.0, 0
        for rows, arrays in self.chunks(("label_logprobs",)):
            valid = self.labels(rows) >= 0
            total += float(arrays["label_logprobs"][valid].astype(np.float64).sum())
            count += int(valid.sum())
        return float(np.exp(-total / count))

    def batch(self, rows, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Tensors for ``sparse_mft_loss``, aligned with the model's full (B, T, V) logits.

        Targets are padded by one ignored position at the end instead of the logits being
        sliced, because slicing the logits would copy them whole.

        Returns: input_ids (B, T); labels (B, T), IGNORE_INDEX where there is no next token;
        topk_ids (B, T, k); topk_logprobs (B, T, k) with the exact argmax at index 0;
        label_logprobs (B, T); and, only where the cache has tail samples, tail_ids (B, T, N)
        int64 (the losses' ``tail_ids``).
        """
        teacher = self.read(rows)
        topk_lp = teacher["topk_logprobs"].astype(np.float32)
        topk_lp[..., 0] = teacher["argmax_logprob"]
        labels = self.labels(rows)
        pad = lambda a, value=0: np.concatenate([a, np.full_like(a[:, :1], value)], axis=1)  # noqa: E731
        out = {
            "input_ids": torch.from_numpy(self.input_ids[rows].astype(np.int64)),
            "labels": torch.from_numpy(pad(labels, IGNORE_INDEX)),
            "topk_ids": torch.from_numpy(pad(teacher["topk_ids"].astype(np.int64))),
            "topk_logprobs": torch.from_numpy(pad(topk_lp)),
            "label_logprobs": torch.from_numpy(pad(teacher["label_logprobs"])),
        }
        if self.tail_samples:
            out["tail_ids"] = torch.from_numpy(pad(teacher["tail_ids"].astype(np.int64)))
        return {k: v.to(device) for k, v in out.items()}


class Cache:
    """A finished stage-one cache: its manifest and lazily opened splits."""

    def __init__(self, path: str | Path, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.seq_len = self.manifest["seq_len"]
        self.top_k = self.manifest["top_k"]
        # Caches made without --tail-samples have no such field: the tail bucket.
        self.tail_samples = self.manifest.get("tail_samples", 0)
        self.cache_bytes = cache_bytes
        self._splits: dict[str, CachedSplit] = {}

    def has(self, split: str) -> bool:
        return self.manifest["splits"].get(split, {}).get("num_sequences", 0) > 0

    def split(self, name: str) -> CachedSplit:
        if name not in self._splits:
            info = self.manifest["splits"].get(name)
            if not info or not info["shards"]:
                raise CacheError(f"{self.path}: no {name} sequences in this cache")
            self._splits[name] = CachedSplit(self.path, info["shards"], self.cache_bytes, self.tail_samples)
        return self._splits[name]
