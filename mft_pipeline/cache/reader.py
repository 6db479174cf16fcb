"""Reading a finished cache back as (B, T, k) training targets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from mft_pipeline.cache.format import CacheError, delta_decode_float16, from_fixed_lists, read_manifest
from mft_pipeline.distill.sparse_loss import IGNORE_INDEX


@dataclass
class CachedSplit:
    """One split of a cache, held in memory in its compact stored dtypes.

    Attributes:
        input_ids: (N, T) int32.
        num_tokens: (N,) int32.
        topk_ids: (N, T - 1, k) uint16/uint32.
        topk_logprobs: (N, T - 1, k) float16.
        argmax_logprob: (N, T - 1) float32, exact.
        label_logprobs: (N, T - 1) float32, exact.
    """

    input_ids: np.ndarray
    num_tokens: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    argmax_logprob: np.ndarray
    label_logprobs: np.ndarray

    def __len__(self) -> int:
        return len(self.num_tokens)

    def labels(self, rows=slice(None)) -> np.ndarray:
        """(n, T - 1) int64 next-token labels, IGNORE_INDEX past each row's end."""
        ids = self.input_ids[rows, 1:].astype(np.int64)
        valid = np.arange(ids.shape[1])[None] < (self.num_tokens[rows, None] - 1)
        return np.where(valid, ids, IGNORE_INDEX)

    def teacher_perplexity(self) -> float:
        """The teacher's perplexity on this split, from the cached label log-probs (no forward)."""
        valid = self.labels() >= 0
        return float(np.exp(-self.label_logprobs[valid].astype(np.float64).mean()))

    def batch(self, rows, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Tensors for ``sparse_mft_loss``, aligned with the model's full (B, T, V) logits.

        Targets are padded by one ignored position at the end instead of the logits being
        sliced, because slicing the logits would copy them whole.

        Returns: input_ids (B, T); labels (B, T), IGNORE_INDEX where there is no next token;
        topk_ids (B, T, k); topk_logprobs (B, T, k) with the exact argmax at index 0;
        label_logprobs (B, T).
        """
        topk_lp = self.topk_logprobs[rows].astype(np.float32)
        topk_lp[..., 0] = self.argmax_logprob[rows]
        labels = self.labels(rows)
        pad = lambda a, value=0: np.concatenate([a, np.full_like(a[:, :1], value)], axis=1)  # noqa: E731
        out = {
            "input_ids": torch.from_numpy(self.input_ids[rows].astype(np.int64)),
            "labels": torch.from_numpy(pad(labels, IGNORE_INDEX)),
            "topk_ids": torch.from_numpy(pad(self.topk_ids[rows].astype(np.int64))),
            "topk_logprobs": torch.from_numpy(pad(topk_lp)),
            "label_logprobs": torch.from_numpy(pad(self.label_logprobs[rows])),
        }
        return {k: v.to(device) for k, v in out.items()}


class Cache:
    """A finished stage-one cache: its manifest and lazily loaded splits."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.seq_len = self.manifest["seq_len"]
        self.top_k = self.manifest["top_k"]
        self._splits: dict[str, CachedSplit] = {}

    def has(self, split: str) -> bool:
        return self.manifest["splits"].get(split, {}).get("num_sequences", 0) > 0

    def split(self, name: str) -> CachedSplit:
        if name not in self._splits:
            self._splits[name] = self._load(name)
        return self._splits[name]

    def _load(self, name: str) -> CachedSplit:
        info = self.manifest["splits"].get(name)
        if not info or not info["shards"]:
            raise CacheError(f"{self.path}: no {name} sequences in this cache")
        T, k = self.seq_len, self.top_k
        cols: dict[str, list[np.ndarray]] = {}
        for shard in info["shards"]:
            f = self.path / shard["file"]
            if not f.exists():
                raise CacheError(f"{f}: listed in the manifest but missing; run `mft cache-verify`")
            table = pq.read_table(f)
            if table.num_rows != shard["rows"]:
                raise CacheError(f"{f}: {table.num_rows} rows, manifest says {shard['rows']}")
            shapes = {
                "input_ids": (T,),
                "num_tokens": (),
                "topk_ids": (T - 1, k),
                "topk_logprob_deltas": (T - 1, k),
                "argmax_logprob": (T - 1,),
                "label_logprobs": (T - 1,),
            }
            for col, shape in shapes.items():
                cols.setdefault(col, []).append(from_fixed_lists(table.column(col), shape))
        arrays = {c: np.concatenate(v) for c, v in cols.items()}
        arrays["topk_logprobs"] = delta_decode_float16(arrays.pop("topk_logprob_deltas"))
        return CachedSplit(**arrays)
