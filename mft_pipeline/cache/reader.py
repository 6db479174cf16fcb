"""Reading a finished cache back as (B, T, k) training targets, a few rows at a time.

Two ways in: ``CachedSplit.batch(rows)`` reads any rows (random access, a small cache of decoded
row groups), and ``CachedSplit.read_in_order(parts)`` reads a planned sequence of batches in a
block-shuffled order (``epoch_order``), decoding each row group once per epoch; ``Prefetch``
runs that in a background thread, so the next batch is ready when a training step ends.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
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
# Micro-batches decoded ahead of the one being trained on.
PREFETCH_DEPTH = 4


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
        target: (N, T - 1) bool, whether position t's label is a training target (instruction
            and chat corpora: the answers); None for caches without the column, where every
            labelled position is.
    """

    def __init__(self, path: Path, shards: list[dict], cache_bytes: int = DEFAULT_CACHE_BYTES, tail_samples: int = 0, targets: bool = False):
        self.path = Path(path)
        self.cache_bytes = cache_bytes
        self.tail_samples = tail_samples
        self.teacher_columns = TEACHER_COLUMNS + (("tail_ids",) if tail_samples else ())
        self._groups: list[tuple[Path, int]] = []  # (shard file, row group) in split order
        group_of_row, ids, num, target = [], [], [], []
        for shard in shards:
            f = shard_path(self.path, shard["file"])
            if not f.exists():
                raise CacheError(f"{f}: listed in the manifest but missing; run `mft cache-verify`")
            try:
                pf = pq.ParquetFile(f, memory_map=True)
                small = decode_shard(pf, columns=("input_ids", "num_tokens") + (("target",) if targets else ()))
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
            target.append(small.get("target"))
        self.input_ids = np.concatenate(ids)
        self.num_tokens = np.concatenate(num)
        self.target = np.concatenate(target) if targets else None
        self._group = np.concatenate(group_of_row)
        self._group_sizes = np.bincount(self._group, minlength=len(self._groups))
        self.decoded_groups = 0  # row groups decoded so far, a count for tests and benchmarks
        # Row offset within its row group.
        starts = np.flatnonzero(np.r_[True, self._group[1:] != self._group[:-1]])
        self._offset = np.arange(len(self._group)) - np.repeat(starts, np.diff(np.r_[starts, len(self._group)]))
        self._decoded: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._decoded_bytes = 0

    def __len__(self) -> int:
        return len(self.num_tokens)

    @property
    def target_tokens(self) -> int:
        """Labelled positions that are training targets (all of them without a target column)."""
        if self.target is None:
            return int((self.num_tokens.astype(np.int64) - 1).sum())
        return int(self.target.sum())

    def _rows(self, rows) -> np.ndarray:
        return np.arange(len(self))[rows].reshape(-1)

    def labels(self, rows=slice(None)) -> np.ndarray:
        """(n, T - 1) int64 next-token labels, IGNORE_INDEX past each row's end and at non-target positions.

        Every loss, metric and evaluation that reads its labels here counts only the target
        positions (the answers of an instruction or chat corpus).
        """
        ids = self.input_ids[rows, 1:].astype(np.int64)
        valid = np.arange(ids.shape[1])[None] < (self.num_tokens[rows, None] - 1)
        if self.target is not None:
            valid = valid & self.target[rows]
        return np.where(valid, ids, IGNORE_INDEX)

    def _group_arrays(self, g: int) -> dict[str, np.ndarray]:
        if g in self._decoded:
            self._decoded.move_to_end(g)
            return self._decoded[g]
        arrays = self._decode(g)
        self._decoded[g] = arrays
        self._decoded_bytes += sum(a.nbytes for a in arrays.values())
        while self._decoded_bytes > self.cache_bytes and len(self._decoded) > 1:
            _, old = self._decoded.popitem(last=False)
            self._decoded_bytes -= sum(a.nbytes for a in old.values())
        return arrays

    def _decode(self, g: int) -> dict[str, np.ndarray]:
        f, index = self._groups[g]
        self.decoded_groups += 1
        return decode_shard(f, columns=self.teacher_columns, row_groups=[index])

    def read(self, rows=slice(None), group_arrays=None) -> dict[str, np.ndarray]:
        """The teacher's columns of ``rows``, in the stored dtypes and in the order asked.

        ``group_arrays(g)``: the decoded arrays of row group ``g``; by default from the small
        cache of recently decoded groups.

        Returns: topk_ids (n, T - 1, k) uint16/uint32; topk_logprobs (n, T - 1, k) float16;
        argmax_logprob (n, T - 1) float32, exact; label_logprobs (n, T - 1) float32, exact;
        where the cache has tail samples, tail_ids (n, T - 1, N) uint16/uint32.
        """
        group_arrays = group_arrays or self._group_arrays
        idx = self._rows(rows)
        out: dict[str, np.ndarray] = {}
        groups = self._group[idx]
        for g in np.unique(groups):
            arrays = group_arrays(int(g))
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

    def batch(self, rows, device: torch.device | str = "cpu", group_arrays=None) -> dict[str, torch.Tensor]:
        """Tensors for ``sparse_mft_loss``, aligned with the model's full (B, T, V) logits.

        Targets are padded by one ignored position at the end instead of the logits being
        sliced, because slicing the logits would copy them whole.

        Returns: input_ids (B, T); labels (B, T), IGNORE_INDEX where there is no next token;
        topk_ids (B, T, k); topk_logprobs (B, T, k) with the exact argmax at index 0;
        label_logprobs (B, T); and, only where the cache has tail samples, tail_ids (B, T, N)
        int64 (the losses' ``tail_ids``). ``group_arrays``: as for :meth:`read`.
        """
        teacher = self.read(rows, group_arrays)
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

    def epoch_order(self, seed: int, epoch: int, shuffle_groups: int, stream: int | None = None) -> np.ndarray:
        """Every row of the split once, in a seeded block-shuffled order (mosaicml/streaming's block shuffling).

        The row groups are put in a random order and cut into blocks of ``shuffle_groups``
        groups; each block's rows follow in a random order of their own. A block's groups are
        decoded together and never needed again in the epoch, so a reader that keeps the
        current block's decoded groups decodes each group once per epoch, whatever the split's
        size. ``seed``, ``epoch`` (and ``stream``, another source's own order under the same
        seed) determine the order.
        """
        if shuffle_groups < 1:
            raise ValueError(f"shuffle_groups must be >= 1, got {shuffle_groups}")
        rng = np.random.default_rng([seed, epoch] if stream is None else [seed, stream, epoch])
        groups = rng.permutation(len(self._groups))
        # The split's rows are stored group after group: group g holds rows starts[g] ... starts[g] + size - 1.
        starts = np.r_[0, np.cumsum(self._group_sizes)[:-1]]
        blocks = []
        for b in range(0, len(groups), shuffle_groups):
            block = groups[b : b + shuffle_groups]
            sizes = self._group_sizes[block]
            rows = np.repeat(starts[block] - np.r_[0, np.cumsum(sizes)[:-1]], sizes) + np.arange(sizes.sum())
            blocks.append(rng.permutation(rows))
        return np.concatenate(blocks)

    def read_in_order(self, parts: list[tuple[np.ndarray, np.ndarray]]) -> Iterator[dict[str, torch.Tensor] | None]:
        """``batch(rows)`` for each ``(rows, epochs)`` of ``parts`` in turn (None for no rows), each row group decoded once per epoch.

        ``epochs[i]`` is the epoch of ``rows[i]``: the plan knows which pass over the split a
        row belongs to. A group is decoded when a part first needs it in an epoch and dropped
        after the last part of the plan that needs it in that epoch, so in an order from
        :meth:`epoch_order` only the groups of about one block are held at a time. Under
        several processes each rank plans its own share of the rows and decodes only the
        groups its share touches.
        """
        sizes = [len(rows) for rows, _ in parts]
        if not sum(sizes):
            yield from (None for _ in parts)
            return
        # (epoch, group) keys of every planned row, and the last part that needs each key.
        rows_all = np.concatenate([np.asarray(r, dtype=np.int64) for r, _ in parts])
        keys = np.concatenate([np.asarray(e, dtype=np.int64) for _, e in parts]) * len(self._groups) + self._group[rows_all]
        part_of = np.repeat(np.arange(len(parts)), sizes)
        by_key = np.argsort(keys, kind="stable")  # within a key, parts stay in plan order
        sorted_keys = keys[by_key]
        is_last = np.r_[sorted_keys[1:] != sorted_keys[:-1], True]
        release: dict[int, list[int]] = {}
        for key, part in zip(sorted_keys[is_last].tolist(), part_of[by_key][is_last].tolist()):
            release.setdefault(part, []).append(key)
        decoded: dict[int, dict[str, np.ndarray]] = {}
        for i, (rows, epochs) in enumerate(parts):
            if not len(rows):
                yield None
                continue
            rows = np.asarray(rows, dtype=np.int64)
            # A part that crosses an epoch's end may need a group under both epochs: same arrays, either key.
            key_of_group = dict(zip(self._group[rows].tolist(), (np.asarray(epochs) * len(self._groups) + self._group[rows]).tolist()))

            def group_arrays(g: int) -> dict[str, np.ndarray]:
                key = key_of_group[g]
                if key not in decoded:
                    decoded[key] = self._decode(g)
                return decoded[key]

            batch = self.batch(rows, group_arrays=group_arrays)
            for key in release.get(i, ()):
                decoded.pop(key, None)
            yield batch


class Prefetch:
    """Iterate ``items`` in a background thread, at most ``depth`` items ahead of the consumer.

    Decoding (pyarrow, numpy copies) releases the GIL, so the next batches are read while
    the training step runs. An error in the thread is raised by ``next``; ``close()`` (or the
    ``with`` block's end) stops the thread early.
    """

    def __init__(self, items: Iterable, depth: int = PREFETCH_DEPTH):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._fill, args=(items,), name="mft-prefetch", daemon=True)
        self._thread.start()

    def _fill(self, items: Iterable) -> None:
        try:
            for item in items:
                if not self._put((True, item)):
                    return
            self._put((False, None))
        except BaseException as e:  # handed to the consumer, who raises it
            self._put((False, e))

    def _put(self, entry) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        ok, item = self._queue.get()
        if ok:
            return item
        self._done = True
        if item is None:
            raise StopIteration
        raise item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Cache:
    """A finished stage-one cache: its manifest and lazily opened splits."""

    def __init__(self, path: str | Path, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.seq_len = self.manifest["seq_len"]
        self.top_k = self.manifest["top_k"]
        # Caches made without --tail-samples have no such field: the tail bucket.
        self.tail_samples = self.manifest.get("tail_samples", 0)
        # Likewise caches of plain text (and of schema version 2) have no target column.
        self.targets = self.manifest.get("targets", False)
        self.cache_bytes = cache_bytes
        self._splits: dict[str, CachedSplit] = {}

    def has(self, split: str) -> bool:
        return self.manifest["splits"].get(split, {}).get("num_sequences", 0) > 0

    def split(self, name: str) -> CachedSplit:
        if name not in self._splits:
            info = self.manifest["splits"].get(name)
            if not info or not info["shards"]:
                raise CacheError(f"{self.path}: no {name} sequences in this cache")
            self._splits[name] = CachedSplit(self.path, info["shards"], self.cache_bytes, self.tail_samples, self.targets)
        return self._splits[name]
