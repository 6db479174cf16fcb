"""The shard writer: refuses to clobber, writes shards atomically, writes the manifest last."""

from __future__ import annotations

import os
import re
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mft_pipeline.cache.format import (
    BYTE_STREAM_SPLIT,
    COMPRESSION,
    COMPRESSION_LEVEL,
    MANIFEST,
    SETTINGS,
    CacheError,
    read_json,
    sha256_file,
    worker_name,
    write_json_atomic,
)

# Everything a cache folder may hold; --overwrite deletes only these.
_OWN = re.compile(r"^(\.?.*\.tmp|(train|validation)-\d{5}\.parquet|worker-\d{5}-of-\d{5}\.json|manifest\.json|cache-settings\.json)$")


def settings_differences(a: dict, b: dict, prefix="") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += settings_differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: existing {va!r} vs now {vb!r}")
    return out


class CacheWriter:
    """Context manager that owns one worker's writes into a cache folder.

    ``settings`` is everything that must agree between a cache's parts (model, tokenizer,
    k, packing, corpus, the planned shards). On a clean exit the worker records its shards;
    the worker that completes the set writes ``manifest.json``, so a folder without a
    manifest is never mistaken for a finished cache.
    """

    def __init__(self, out: str | Path, settings: dict, *, shard_index=0, num_shards=1, resume=False, overwrite=False):
        self.out = Path(out)
        self.settings = settings
        self.shard_index, self.num_shards = shard_index, num_shards
        self.resume, self.overwrite = resume, overwrite
        self.records: dict[str, dict] = {}

    def __enter__(self) -> "CacheWriter":
        self.out.mkdir(parents=True, exist_ok=True)
        entries = sorted(p.name for p in self.out.iterdir())
        foreign = [e for e in entries if not _OWN.match(e)]
        if entries and self.overwrite:
            if foreign:
                raise CacheError(f"{self.out}: holds files that are not a cache ({foreign[:3]}); refusing to delete")
            for e in entries:
                (self.out / e).unlink()
            entries = []
        if foreign:
            raise CacheError(f"{self.out}: not empty and not a cache ({foreign[:3]}); choose another folder")
        settings_path = self.out / SETTINGS
        if entries:
            if not settings_path.exists():
                raise CacheError(f"{self.out}: holds cache files but no {SETTINGS}; use --overwrite")
            diffs = settings_differences(read_json(settings_path), self.settings)
            if diffs:
                raise CacheError(
                    f"{self.out}: the existing cache was made with other settings:\n  "
                    + "\n  ".join(diffs)
                    + "\nuse --overwrite to replace it, or another folder"
                )
            mine = [n for n in self._planned() if (self.out / n).exists()]
            if (self.out / MANIFEST).exists() and not self.resume:
                raise CacheError(f"{self.out}: already holds a finished cache; use --overwrite to rebuild it")
            if mine and not self.resume:
                raise CacheError(f"{self.out}: already holds {len(mine)} of this worker's shards; use --resume or --overwrite")
            for e in entries:
                if e.endswith(".tmp"):
                    (self.out / e).unlink()  # a crash left it; it never counts as finished
        else:
            write_json_atomic(settings_path, self.settings)
        return self

    def _planned(self) -> list[str]:
        return [s["file"] for s in self.settings["plan"] if s["worker"] == self.shard_index]

    def finished(self, name: str) -> bool:
        """Whether shard ``name`` is already complete (from an earlier, interrupted run)."""
        path = self.out / name
        if path.exists():
            self.records[name] = {"file": name, "sha256": sha256_file(path), "bytes": path.stat().st_size}
            return True
        return False

    def write_shard(self, name: str, table: pa.Table) -> None:
        final = self.out / name
        tmp = self.out / f".{name}.tmp"
        pq.write_table(
            table, tmp, compression=COMPRESSION, compression_level=COMPRESSION_LEVEL,
            use_dictionary=False, use_byte_stream_split=list(BYTE_STREAM_SPLIT),
        )
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)  # atomic: a shard under its final name is always complete
        self.records[name] = {"file": name, "sha256": sha256_file(final), "bytes": final.stat().st_size}

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            return False
        missing = [n for n in self._planned() if n not in self.records]
        if missing:
            raise CacheError(f"worker finished without writing {missing[:3]}")
        part = {"worker": self.shard_index, "num_workers": self.num_shards, "shards": self.records}
        write_json_atomic(self.out / worker_name(self.shard_index, self.num_shards), part)
        if all((self.out / worker_name(i, self.num_shards)).exists() for i in range(self.num_shards)):
            write_manifest(self.out, self.settings, self.num_shards)
        return False


def write_manifest(out: Path, settings: dict, num_workers: int) -> dict:
    """Join the workers' shard records into ``manifest.json``, checking none is missing."""
    planned_by = {p["file"]: p["worker"] for p in settings["plan"]}
    records: dict[str, dict] = {}
    for i in range(num_workers):
        part = read_json(out / worker_name(i, num_workers))
        for name, record in part["shards"].items():
            if name in records:
                raise CacheError(f"{out}: shard {name} is recorded by two workers (overlapping parts)")
            if planned_by.get(name) != i:
                raise CacheError(f"{out}: worker {i} recorded {name}, which the plan gives to worker {planned_by.get(name)}")
            records[name] = record
    splits: dict[str, dict] = {}
    for planned in settings["plan"]:
        name = planned["file"]
        if name not in records:
            raise CacheError(f"{out}: shard {name} was planned but no worker recorded it")
        split = splits.setdefault(planned["split"], {"num_sequences": 0, "num_labels": 0, "shards": []})
        split["num_sequences"] += planned["rows"]
        split["num_labels"] += planned["labels"]
        split["shards"].append({**records[name], "rows": planned["rows"], "labels": planned["labels"]})
    manifest = {k: v for k, v in settings.items() if k != "plan"}
    manifest["splits"] = splits
    manifest["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json_atomic(out / MANIFEST, manifest)
    return manifest
