"""The streaming reader: batches from rows spread over many shards, and memory that does not grow with the cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mft_pipeline.cache.format import SCHEMA_VERSION, shard_name
from mft_pipeline.cache.reader import Cache, Prefetch
from mft_pipeline.cache.shard import arrow_schema, encode_shard
from mft_pipeline.cache.writer import CacheWriter
from mft_pipeline.labels import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[2]


def write_cache(out: Path, num_shards: int, rows_per_shard: int, T: int, k: int, vocab: int = 500, seed: int = 0, repeat: bool = False,
                teacher: dict | None = None) -> Path:
    """A finished cache of random (but well-formed) teacher scores, written through CacheWriter.

    With ``repeat``, every shard is a copy of the first one's rows (fast to write: Parquet
    compresses each random shard only once), so only their file names differ. ``teacher``:
    the manifest's model and tokenizer entries, so a student can train from the cache.
    """
    rng = np.random.default_rng(seed)
    n = num_shards * rows_per_shard
    num_tokens = np.full(n, T, dtype=np.int32)
    num_tokens[-1] = T // 2 + 1  # a short last row, padded
    if repeat:
        num_tokens = np.tile(num_tokens[-rows_per_shard:], num_shards)
    plan = [
        {"file": shard_name("train", j), "split": "train", "start": j * rows_per_shard, "rows": rows_per_shard,
         "labels": int((num_tokens[j * rows_per_shard : (j + 1) * rows_per_shard] - 1).sum()), "worker": 0}
        for j in range(num_shards)
    ]
    settings = {"schema_version": SCHEMA_VERSION, "model": {"id": "random", "fingerprint": "x", "vocab_size": vocab},
                "top_k": k, "seq_len": T, "rows_per_shard": rows_per_shard, "num_workers": 1, "plan": plan, **(teacher or {})}
    schema = arrow_schema(T, k, vocab)
    with CacheWriter(out, settings) as writer:
        for j, p in enumerate(plan):
            if repeat and j:
                shutil.copyfile(out / plan[0]["file"], out / p["file"])
                assert writer.finished(p["file"])
                continue
            m = p["rows"]
            ids = rng.integers(0, vocab, size=(m, T)).astype(np.int32)
            nt = num_tokens[p["start"] : p["start"] + m]
            topk_ids = rng.integers(0, vocab, size=(m, T - 1, k))
            topk_lp = -np.sort(rng.exponential(2, size=(m, T - 1, k)), axis=-1).astype(np.float32)
            label_lp = -rng.exponential(3, size=(m, T - 1)).astype(np.float32)
            writer.write_shard(p["file"], encode_shard(schema, p["start"], ids, nt, topk_ids, topk_lp, label_lp))
    return out


def reference_batch(cache_dir: Path, rows: np.ndarray) -> dict[str, torch.Tensor]:
    """The batch built from plain pyarrow reads (Python lists) of every shard, all in memory."""
    data = {}
    for f in sorted(cache_dir.glob("train-*.parquet")):
        for col, values in pq.read_table(f).to_pydict().items():
            data.setdefault(col, []).extend(values)
    ids = np.array(data["input_ids"], dtype=np.int64)[rows]
    n = np.array(data["num_tokens"])[rows]
    T = ids.shape[1]
    labels = np.full_like(ids, IGNORE_INDEX)
    for b in range(len(rows)):
        labels[b, : n[b] - 1] = ids[b, 1 : n[b]]
    bits = np.cumsum(np.array(data["topk_logprob_deltas"], dtype=np.uint16)[rows], axis=-1, dtype=np.uint16)
    topk_lp = bits.view(np.float16).astype(np.float32)
    topk_lp[..., 0] = np.array(data["argmax_logprob"], dtype=np.float32)[rows]
    k = topk_lp.shape[-1]
    out = {
        "input_ids": ids,
        "labels": labels,
        "topk_ids": np.concatenate([np.array(data["topk_ids"], dtype=np.int64)[rows], np.zeros((len(rows), 1, k), np.int64)], 1),
        "topk_logprobs": np.concatenate([topk_lp, np.zeros((len(rows), 1, k), np.float32)], 1),
        "label_logprobs": np.concatenate([np.array(data["label_logprobs"], dtype=np.float32)[rows], np.zeros((len(rows), 1), np.float32)], 1),
    }
    assert out["topk_ids"].shape[1] == T
    return {key: torch.from_numpy(v) for key, v in out.items()}


def test_batches_spread_over_many_shards_equal_the_whole_split(tmp_path):
    # 40-row shards: two row groups each (32 + 8), so rows come from groups of both sizes.
    cache_dir = write_cache(tmp_path / "cache", num_shards=6, rows_per_shard=40, T=9, k=3)
    # A small decoded-group budget, so groups are evicted and read again within the test.
    split = Cache(cache_dir, cache_bytes=20_000).split("train")
    assert len(split) == 240
    rng = np.random.default_rng(1)
    order = rng.permutation(240)
    for rows in [order[:7], order[7:40], np.array([239, 0, 239, 31, 32, 33]), order]:
        got = split.batch(rows)
        want = reference_batch(cache_dir, rows)
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype, key
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    assert split._decoded_bytes <= 20_000 or len(split._decoded) == 1


def test_whole_split_statistics_stream(tmp_path):
    cache_dir = write_cache(tmp_path / "cache", num_shards=3, rows_per_shard=20, T=9, k=3)
    split = Cache(cache_dir).split("train")
    want = reference_batch(cache_dir, np.arange(60))
    valid = want["labels"][:, :-1] >= 0
    expected = float(np.exp(-want["label_logprobs"][:, :-1][valid].double().mean()))
    assert split.teacher_perplexity() == pytest.approx(expected, rel=1e-12)
    np.testing.assert_array_equal(split.topk_ids, want["topk_ids"][:, :-1].numpy())
    np.testing.assert_array_equal(split.labels(), want["labels"][:, :-1].numpy())


PEAK_RSS_SCRIPT = """
import json, sys
import numpy as np, torch
from mft_pipeline.cache.reader import Cache, Prefetch

def peak_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

split = Cache(sys.argv[1], cache_bytes=int(sys.argv[2])).split("train")
split.batch(np.arange(8))  # first use of pyarrow's and torch's code paths: the same at any cache size
before = peak_mib()
# The training path: two epochs in block-shuffled order, read in order.
order = np.concatenate([split.epoch_order(0, e, shuffle_groups=2) for e in (0, 1)])
parts = [(order[b : b + 8], np.arange(b, b + 8) // len(split)) for b in range(0, len(order), 8)]
for batch in split.read_in_order(parts):
    pass
assert split.decoded_groups == 1 + 2 * len(split._groups), split.decoded_groups  # the warm-up batch's group, then once per epoch
print(json.dumps({"growth_mib": peak_mib() - before, "rows": len(split)}))
"""


def peak_rss_growth(cache_dir: Path, cache_bytes: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(cache_dir), str(cache_bytes)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["growth_mib"]


def test_peak_memory_does_not_grow_with_the_number_of_shards(tmp_path):
    """Two passes over a whole split in training order (``read_in_order``): peak RSS stays put from 8 to 64 shards.

    At T = 256, k = 32 a row's decoded teacher columns take 34 KB, so the 64-shard split
    (2048 rows) would take 69 MiB decoded whole; the reader may hold 8 MiB of decoded groups.
    """
    T, k, rows = 256, 32, 32
    decoded_mib_per_shard = rows * (T - 1) * (k * 2 * 2 + 8) / 2**20
    growth = {}
    for shards in (8, 64):
        cache_dir = write_cache(tmp_path / f"c{shards}", num_shards=shards, rows_per_shard=rows, T=T, k=k, repeat=True)
        growth[shards] = peak_rss_growth(cache_dir, cache_bytes=8 * 2**20)
    whole_64 = 64 * decoded_mib_per_shard
    assert whole_64 > 60
    assert growth[64] < growth[8] + 12, growth
    assert growth[64] < 0.3 * whole_64, (growth, whole_64)


def plan(order: np.ndarray, n_rows: int, batch: int, rank: int = 0, world: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """A rank's share of each batch of ``order`` (several epochs, one after another), as ``read_in_order`` parts."""
    part = batch // world
    return [(order[b + rank * part : b + (rank + 1) * part], np.arange(b + rank * part, min(b + (rank + 1) * part, len(order))) // n_rows)
            for b in range(0, len(order), batch)]  # fmt: skip


def test_block_order_visits_every_row_once_per_epoch_and_decodes_each_group_once(tmp_path):
    # 5 shards of 37 rows: row groups of 32 and 5 rows, so blocks mix full and partial groups.
    cache_dir = write_cache(tmp_path / "cache", num_shards=5, rows_per_shard=37, T=9, k=3)
    split = Cache(cache_dir).split("train")
    n, groups = len(split), 10
    assert n == 185 and len(split._groups) == groups
    orders = [split.epoch_order(7, e, shuffle_groups=3) for e in range(3)]
    for e, order in enumerate(orders):
        assert sorted(order) == list(range(n)), "every row exactly once per epoch"
        np.testing.assert_array_equal(order, split.epoch_order(7, e, shuffle_groups=3))  # the seed decides it
        # Blocks: the order is a run of all the rows of 3 groups, then of 3 others, ...
        block, left = set(), 0
        for row in order:
            g = int(split._group[row])
            if g not in block:
                if len(block) == 3:
                    assert left == 0, "a block must end before rows of a fourth group come"
                    block = set()
                block.add(g)
                left += int(split._group_sizes[g])
            left -= 1
        assert left == 0
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[0], split.epoch_order(8, 0, shuffle_groups=3))
    assert not np.array_equal(orders[0], split.epoch_order(7, 0, shuffle_groups=3, stream=1))
    whole = np.concatenate(orders)

    # One process, batches that divide the epoch: every group decoded exactly once per epoch, batches as random access gives them.
    reader = Cache(cache_dir).split("train")
    for (rows, _), got in zip(plan(whole, n, 5), reader.read_in_order(plan(whole, n, 5))):
        want = reference_batch(cache_dir, rows) if rows[0] % 7 == 0 else split.batch(rows)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    assert reader.decoded_groups == 3 * groups

    # Two ranks, batches of 8 that cross the epochs' ends: disjoint shares that together are each epoch once,
    # and no rank decodes a group twice in an epoch.
    seen = []
    for rank in (0, 1):
        reader = Cache(cache_dir).split("train")
        parts = plan(whole, n, 8, rank, 2)
        batches = list(reader.read_in_order(parts))
        assert reader.decoded_groups <= 3 * groups
        for (rows, _), got in zip(parts, batches, strict=True):
            if len(rows):
                np.testing.assert_array_equal(got["input_ids"].numpy(), split.input_ids[rows])
            else:
                assert got is None
        seen.append(np.concatenate([rows for rows, _ in parts]))
    positions = [np.concatenate([np.arange(b + r * 4, min(b + r * 4 + 4, len(whole))) for b in range(0, len(whole), 8)]) for r in (0, 1)]
    assert not set(positions[0]) & set(positions[1])
    for e in range(3):
        rows = np.concatenate([s[(p // n) == e] for s, p in zip(seen, positions)])
        assert sorted(rows) == list(range(n))


def test_prefetch_keeps_order_raises_errors_and_stops_early():
    assert list(Prefetch(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("broken shard")

    stream = Prefetch(failing(), depth=2)
    assert next(stream) == 1
    with pytest.raises(ValueError, match="broken shard"):
        next(stream)
    produced = []
    endless = Prefetch((produced.append(i) or i for i in range(10**9)), depth=2)
    assert next(endless) == 0
    endless.close()
    assert not endless._thread.is_alive() and len(produced) < 10


TRAIN_RSS_SCRIPT = """
import json, sys
from mft_pipeline.config import TrainConfig
from mft_pipeline.train.loop import train

def peak_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

before = peak_mib()
train(TrainConfig(cache=sys.argv[1], out=sys.argv[2], steps=3, batch_size=4, eval_every=3, report_to="none"))
print(json.dumps({"growth_mib": peak_mib() - before}))
"""


def test_training_memory_does_not_grow_with_the_cache(tmp_path, tiny_model_dir, tiny_tokenizer):
    """`mft train` for a few steps: the process's peak RSS is the same from a cache of 8 shards as of 64.

    The 64-shard cache's teacher columns take 69 MiB decoded (T = 256, k = 32, 2048 rows); a
    reader that decoded the split whole would add that to the peak.
    """
    from mft_pipeline.models import load_model, tokenizer_fingerprint, weights_fingerprint

    model = load_model(str(tiny_model_dir), torch.device("cpu"), dtype=torch.float32)
    vocab = len(tiny_tokenizer)
    teacher = {
        "model": {"id": str(tiny_model_dir), "fingerprint": weights_fingerprint(model), "vocab_size": vocab},
        "tokenizer": {"id": str(tiny_model_dir), "fingerprint": tokenizer_fingerprint(tiny_tokenizer), "vocab_size": vocab},
    }
    T, k, rows = 256, 32, 32
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    growth = {}
    for shards in (8, 64):
        cache_dir = write_cache(tmp_path / f"c{shards}", num_shards=shards, rows_per_shard=rows, T=T, k=k, vocab=vocab, repeat=True, teacher=teacher)
        out = subprocess.run([sys.executable, "-c", TRAIN_RSS_SCRIPT, str(cache_dir), str(tmp_path / f"run{shards}")],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        growth[shards] = json.loads(out.stdout.strip().splitlines()[-1])["growth_mib"]
    whole_64 = 64 * rows * (T - 1) * (k * 2 * 2 + 8) / 2**20
    assert whole_64 > 60
    assert growth[64] < growth[8] + 0.25 * whole_64, (growth, whole_64)
