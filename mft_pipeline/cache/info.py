"""`mft cache-info`, `mft cache-verify` and `mft cache-merge`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mft_pipeline.cache.format import (
    MANIFEST,
    SETTINGS,
    CacheError,
    FieldError,
    read_json,
    read_manifest,
    read_part,
    read_settings,
    sha256_file,
    shard_path,
    worker_name,
)
from mft_pipeline.cache.reader import Cache
from mft_pipeline.cache.shard import arrow_schema, decode_shard
from mft_pipeline.cache.writer import settings_differences, write_manifest
from mft_pipeline.labels import IGNORE_INDEX


def cache_info(path: str | Path) -> dict:
    """Sizes and the teacher's quality per split.

    Returns a dict per split: sequences, tokens (labelled positions), target_tokens (those that
    are training targets: the answers of an instruction or chat corpus, else all), bytes, bytes
    per token, bytes per stored candidate (k per token), and the teacher's argmax accuracy and
    perplexity over the target positions.
    """
    cache = Cache(path)
    k = cache.top_k
    out = {"model": cache.manifest["model"]["id"], "top_k": k, "tail_samples": cache.tail_samples, "seq_len": cache.seq_len, "splits": {}}
    for name, info in cache.manifest["splits"].items():
        tokens = info["num_labels"]
        size = sum(s["bytes"] for s in info["shards"])
        row = {"sequences": info["num_sequences"], "tokens": tokens, "target_tokens": 0, "bytes": size}
        if tokens:
            row["target_tokens"] = cache.split(name).target_tokens
            row.update(bytes_per_token=size / tokens, bytes_per_candidate=size / (tokens * k))
            row.update(teacher_stats(cache.split(name)))
        out["splits"][name] = row
    return out


def verify_cache(path: str | Path) -> list[str]:
    """Every problem found: schema, row counts, checksums. An empty list means the cache is sound."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except FieldError as e:
        return [f"{e.path}: {problem}" for problem in e.problems]
    except CacheError as e:
        return [str(e)]
    problems = []
    schema = arrow_schema(
        manifest["seq_len"], manifest["top_k"], manifest["model"]["vocab_size"], manifest.get("tail_samples", 0), manifest.get("targets", False)
    )
    for split, info in manifest["splits"].items():
        rows = labels = 0
        for shard in info["shards"]:
            f = shard_path(path, shard["file"])
            if not f.exists():
                problems.append(f"{shard['file']}: missing")
                continue
            if sha256_file(f) != shard["sha256"]:
                problems.append(f"{shard['file']}: checksum differs from the manifest (file changed or corrupt)")
                continue
            try:
                table = pq.read_table(f)
                num_tokens = decode_shard(table, columns=("num_tokens",))["num_tokens"]
            except Exception as e:  # pyarrow raises several types for a broken file
                problems.append(f"{shard['file']}: unreadable Parquet ({e})")
                continue
            if not table.schema.equals(schema):
                problems.append(f"{shard['file']}: schema differs from the cache format")
            if table.num_rows != shard["rows"]:
                problems.append(f"{shard['file']}: {table.num_rows} rows, manifest says {shard['rows']}")
            got = int((num_tokens.astype(np.int64) - 1).sum())
            if got != shard["labels"]:
                problems.append(f"{shard['file']}: {got} labelled tokens, manifest says {shard['labels']}")
            rows += table.num_rows
            labels += got
        if rows != info["num_sequences"] or labels != info["num_labels"]:
            problems.append(f"{split}: shards hold {rows} sequences / {labels} tokens, manifest says {info['num_sequences']} / {info['num_labels']}")
    return problems


def merge_cache(path: str | Path, sources: tuple[str | Path, ...] = ()) -> dict:
    """Make one finished cache from the parts that ``--num-workers`` workers wrote.

    With no ``sources``, the workers shared the folder ``path``. With ``sources``, each worker
    (or group of workers, e.g. one per node) wrote its own folder; their shards are linked or
    copied into the new folder ``path``. Either way the parts must come from the same model,
    tokenizer and settings, and cover the planned corpus with no gap and no overlap.
    """
    path = Path(path)
    if sources:
        _gather(path, [Path(s) for s in sources])
    settings_path = path / SETTINGS
    if not settings_path.exists():
        raise CacheError(f"{path}: no {SETTINGS}; is this a stage-one output folder?")
    settings = read_settings(path)
    n = settings["num_workers"]
    missing = [i for i in range(n) if not (path / worker_name(i, n)).exists()]
    if missing:
        raise CacheError(f"{path}: workers {missing} of {n} have not finished; rerun them with --worker-index I --resume")
    for i in range(n):
        part = read_part(path / worker_name(i, n))
        for name, rec in part["shards"].items():
            f = shard_path(path, name)
            if not f.exists() or sha256_file(f) != rec["sha256"]:
                raise CacheError(f"{f}: missing or changed since worker {i} wrote it")
    write_manifest(path, settings, n)
    return read_json(path / MANIFEST)


def _gather(out: Path, sources: list[Path]) -> None:
    """Link (or copy) the workers' parts from ``sources`` into the new folder ``out``."""
    if out.exists() and any(out.iterdir()):
        raise CacheError(f"{out}: merge target must be a new or empty folder")
    settings = None
    owner: dict[str, Path] = {}
    for src in sources:
        if not (src / SETTINGS).exists():
            raise CacheError(f"{src}: no {SETTINGS}; not a stage-one output folder")
        theirs = read_settings(src)
        if settings is None:
            settings = theirs
        elif diffs := settings_differences(settings, theirs):
            raise CacheError(f"{src}: made with other settings than {sources[0]}:\n  " + "\n  ".join(diffs[:10]))
        for part in sorted(src.glob("worker-*-of-*.json")):
            if part.name in owner:
                raise CacheError(f"{part.name} is in both {owner[part.name]} and {src} (overlapping parts)")
            owner[part.name] = src
    n = settings["num_workers"]
    missing = [i for i in range(n) if worker_name(i, n) not in owner]
    if missing:
        raise CacheError(f"workers {missing} of {n} have not finished in any of the given folders; rerun them with --worker-index I --resume")
    tmp = out.with_name(out.name + ".merging")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shutil.copy2(sources[0] / SETTINGS, tmp / SETTINGS)
        for name, src in owner.items():
            for shard in read_part(src / name)["shards"]:
                _link_or_copy(shard_path(src, shard), shard_path(tmp, shard))
            shutil.copy2(src / name, tmp / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-merged stays behind
        raise
    if out.exists():
        out.rmdir()
    tmp.rename(out)


def _link_or_copy(src: Path, dst: Path) -> None:
    if not src.exists():
        raise CacheError(f"{src}: recorded by its worker but missing")
    try:
        os.link(src, dst)  # same filesystem: no copy of possibly large shards
    except OSError:
        shutil.copy2(src, dst)


# Resolution of the tail-mass percentiles: a value is reported to within 1 / TAIL_BINS.
TAIL_BINS = 1 << 16


def teacher_stats(split, chunk_rows: int = 64, bins: int = TAIL_BINS) -> dict:
    """The teacher's quality over one split, and how much of it the top-k keeps (for choosing ``--top-k``).

    One pass: reads the split ``chunk_rows`` rows at a time through ``split.batch(rows)``, so
    memory does not grow with the split. Counts and sums are exact (int64, float64); percentiles
    come from a histogram of ``bins`` equal bins on [0, 1] and are the upper edge of the bin
    holding the nearest-rank percentile, i.e. at most ``1 / bins`` above it.

    Args:
        split: a cache split (``len(split)`` rows, ``split.batch(rows)`` as in ``CachedSplit``).
        chunk_rows: rows per read.
        bins: histogram bins for the percentiles.

    Returns:
        teacher_argmax_accuracy: share of labelled positions where the argmax is the label.
        teacher_perplexity: exp of the mean negative cached label log-prob (no forward).
        label_outside_top_k: share of labelled positions whose label is not among the top-k.
        tail_mass_mean, tail_mass_p50, tail_mass_p90, tail_mass_p99: the teacher's probability
            outside its top-k, ``1 - sum(exp(top-k log-probs))`` per position (clipped to [0, 1]
            against float16 rounding), mean and percentiles over labelled positions.
        All None when the split has no labelled position.
    """
    n = outside = argmax_right = 0
    tail_sum = label_logprob_sum = 0.0
    counts = np.zeros(bins, dtype=np.int64)
    for start in range(0, len(split), chunk_rows):
        b = split.batch(list(range(start, min(start + chunk_rows, len(split)))))
        labels = b["labels"].numpy()
        ids = b["topk_ids"].numpy()
        valid = labels != IGNORE_INDEX
        in_top = (ids == labels[..., None]).any(-1)
        tail = np.clip(1.0 - np.exp(b["topk_logprobs"].numpy().astype(np.float64)).sum(-1), 0.0, 1.0)[valid]
        n += int(valid.sum())
        outside += int((valid & ~in_top).sum())
        argmax_right += int((valid & (ids[..., 0] == labels)).sum())
        tail_sum += float(tail.sum())
        label_logprob_sum += float(b["label_logprobs"].numpy().astype(np.float64)[valid].sum())
        counts += np.bincount(np.minimum((tail * bins).astype(np.int64), bins - 1), minlength=bins)
    keys = ("teacher_argmax_accuracy", "teacher_perplexity", "label_outside_top_k", "tail_mass_mean", "tail_mass_p50", "tail_mass_p90", "tail_mass_p99")
    if n == 0:
        return dict.fromkeys(keys)
    cumulative = np.cumsum(counts)

    def percentile(q: float) -> float:
        rank = max(1, int(np.ceil(q / 100 * n)))
        return float((np.searchsorted(cumulative, rank) + 1) / bins)

    perplexity = float(np.exp(-label_logprob_sum / n))
    values = (argmax_right / n, perplexity, outside / n, tail_sum / n, percentile(50), percentile(90), percentile(99))
    return dict(zip(keys, values))
