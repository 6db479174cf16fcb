"""The shard writer: refuses to clobber, writes shards atomically, writes the manifest last."""

from __future__ import annotations

import os
import re
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from mft_pipeline.cache.format import (
    MANIFEST,
    SETTINGS,
    TEMP_FILE,
    CacheError,
    is_worker_temp,
    read_part,
    read_settings,
    sha256_file,
    shard_path,
    temp_name,
    worker_name,
    write_json_atomic,
    write_json_once,
)
from mft_pipeline.cache.shard import write_shard_file
from mft_pipeline.files import atomic_write

# Everything a cache folder may hold; --overwrite deletes only these.
_OWN = re.compile(r"^(\.?.*\.tmp|(train|validation)-\d{5}\.parquet|worker-\d{5}-of-\d{5}\.json|manifest\.json|cache-settings\.json)$")


# Where the inputs lie, not what they are: workers on other machines may read the same corpus,
# model or tokenizer from other paths. Their fingerprints (content hashes) are compared instead.
LOCATIONS = ("corpus.path", "model.id", "tokenizer.id")


def settings_differences(a: dict, b: dict, prefix="") -> list[str]:
    """"field: existing ... vs now ..." for every setting (dotted path) in which ``a`` and ``b`` differ, ``LOCATIONS`` aside."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += settings_differences(va, vb, f"{prefix}{key}.")
        elif va != vb and f"{prefix}{key}" not in LOCATIONS:
            out.append(f"{prefix}{key}: existing {va!r} vs now {vb!r}")
    return out


class CacheWriter:
    """Context manager that owns one worker's writes into a cache folder.

    ``settings`` is everything that must agree between a cache's parts (model, tokenizer,
    k, packing, corpus, the planned shards). On a clean exit the worker records its shards;
    the worker that completes the set writes ``manifest.json``, so a folder without a
    manifest is never mistaken for a finished cache.

    Several workers may write into one folder at once. The first to arrive creates
    ``cache-settings.json`` (atomically and exclusively), later ones compare theirs with it.
    Every temp file names its worker, so a worker deletes only its own leftovers, never a file
    another worker is writing.
    """

    def __init__(self, out: str | Path, settings: dict, *, worker_index=0, num_workers=1, resume=False, overwrite=False):
        self.out = Path(out)
        self.settings = settings
        self.worker_index, self.num_workers = worker_index, num_workers
        self.resume, self.overwrite = resume, overwrite
        self.records: dict[str, dict] = {}

    def __enter__(self) -> "CacheWriter":
        self.out.mkdir(parents=True, exist_ok=True)
        entries = sorted(p.name for p in self.out.iterdir())
        foreign = [e for e in entries if not _OWN.match(e)]
        if entries and self.overwrite:
            if foreign:
                raise CacheError(f"{self.out}: holds files that are not a cache ({foreign[:3]}); refusing to delete")
            mine = self._replaced(entries)
            for e in mine:
                (self.out / e).unlink(missing_ok=True)
            entries = [e for e in entries if e not in mine]
        if foreign:
            raise CacheError(f"{self.out}: not empty and not a cache ({foreign[:3]}); choose another folder")
        settings_path = self.out / SETTINGS
        # Temp files are other workers' work in progress (or crash leftovers): they say nothing
        # about whether the folder is a cache. Shards or worker files without settings do.
        written = [e for e in entries if not TEMP_FILE.match(e) and not e.endswith(".tmp") and e != SETTINGS]
        if written and not settings_path.exists():
            raise CacheError(f"{self.out}: holds cache files but no {SETTINGS}; use --overwrite")
        existing = write_json_once(settings_path, self.settings, self.worker_index)
        if existing is not None:
            diffs = settings_differences(existing, self.settings)
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
                if is_worker_temp(e, self.worker_index):
                    (self.out / e).unlink(missing_ok=True)  # this worker's crash left it; it never counts as finished
        return self

    def _replaced(self, entries: list[str]) -> list[str]:
        """The entries ``--overwrite`` deletes.

        A single worker owns the whole folder. Of several workers sharing it, each replaces only
        its own part of the same cache (its planned shards, its worker file and temp files) and
        the manifest, which stops describing the folder; never another worker's files, which may
        be finished or being written right now.
        """
        if self.num_workers == 1:
            return entries
        own_temps = [e for e in entries if is_worker_temp(e, self.worker_index)]
        if not (self.out / SETTINGS).exists():
            if any(not e.endswith(".tmp") for e in entries):
                raise CacheError(
                    f"{self.out}: holds cache files but no {SETTINGS}, so this worker's part cannot be told from the others'; "
                    "delete the folder to build a cache in it"
                )
            return own_temps  # other workers' temp files: a cache being set up
        diffs = settings_differences(read_settings(self.out), self.settings)
        if diffs:
            raise CacheError(
                f"{self.out}: holds a cache made with other settings:\n  " + "\n  ".join(diffs) + "\nwith several workers, "
                "--overwrite replaces only this worker's part of the same cache, never other workers' files; "
                "delete the folder to build another cache in it, or use another folder"
            )
        own = set(self._planned()) | {worker_name(self.worker_index, self.num_workers), MANIFEST}
        return [e for e in entries if e in own] + own_temps

    def _planned(self) -> list[str]:
        return [s["file"] for s in self.settings["plan"] if s["worker"] == self.worker_index]

    def finished(self, name: str) -> bool:
        """Whether shard ``name`` is already complete (from an earlier, interrupted run)."""
        path = shard_path(self.out, name)
        if path.exists():
            self.records[name] = {"file": name, "sha256": sha256_file(path), "bytes": path.stat().st_size}
            return True
        return False

    def write_shard(self, name: str, table: pa.Table) -> None:
        final = shard_path(self.out, name)

        def write(tmp: Path) -> None:
            write_shard_file(table, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())

        atomic_write(final, write, temp_name(name, self.worker_index))  # a shard under its final name is always complete
        self.records[name] = {"file": name, "sha256": sha256_file(final), "bytes": final.stat().st_size}

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            return False
        missing = [n for n in self._planned() if n not in self.records]
        if missing:
            raise CacheError(f"worker finished without writing {missing[:3]}")
        part = {"worker": self.worker_index, "num_workers": self.num_workers, "shards": self.records}
        write_json_atomic(self.out / worker_name(self.worker_index, self.num_workers), part, self.worker_index)
        # Each worker writes its own file before looking, so the last to finish sees them all.
        # Two that finish together may both write the manifest: the same content, each through
        # its own temp file, so either rename leaves a whole manifest.
        if all((self.out / worker_name(i, self.num_workers)).exists() for i in range(self.num_workers)):
            write_manifest(self.out, self.settings, self.num_workers, self.worker_index)
        return False


def write_manifest(out: Path, settings: dict, num_workers: int, worker: int | None = None) -> dict:
    """Join the workers' shard records into ``manifest.json``, checking none is missing."""
    planned_by = {p["file"]: p["worker"] for p in settings["plan"]}
    records: dict[str, dict] = {}
    for i in range(num_workers):
        part = read_part(out / worker_name(i, num_workers))
        for name, record in part["shards"].items():
            if name in records:
                raise CacheError(f"{out}: shard {name} is recorded by two workers (overlapping parts)")
            if planned_by.get(name) != i:
                raise CacheError(f"{out}: worker {i} recorded {name}, which the plan gives to worker {planned_by.get(name)}")
            records[name] = record
    splits: dict[str, dict] = {}
    for planned in settings["plan"]:
        name = planned["file"]
        shard_path(out, name)  # the settings file is read back from disk: refuse names outside the folder
        if name not in records:
            raise CacheError(f"{out}: shard {name} was planned but no worker recorded it")
        split = splits.setdefault(planned["split"], {"num_sequences": 0, "num_labels": 0, "shards": []})
        split["num_sequences"] += planned["rows"]
        split["num_labels"] += planned["labels"]
        split["shards"].append({**records[name], "rows": planned["rows"], "labels": planned["labels"]})
    manifest = {k: v for k, v in settings.items() if k != "plan"}
    manifest["splits"] = splits
    manifest["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json_atomic(out / MANIFEST, manifest, worker)
    return manifest
