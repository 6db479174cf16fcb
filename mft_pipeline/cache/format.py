"""The on-disk cache contract (docs/cache-format.md): file names, manifest and settings I/O.

The columns of a shard and their encoding are in cache/shard.py."""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path

from mft_pipeline.errors import MFTError
from mft_pipeline.files import atomic_write


SCHEMA_VERSION = 3
# Version 3 added the optional ``target`` column; a version-2 cache reads as one without it.
READABLE_SCHEMA_VERSIONS = (2, 3)
MANIFEST = "manifest.json"
SETTINGS = "cache-settings.json"
SPLITS = ("train", "validation")


class CacheError(MFTError):
    """The cache folder is missing, incomplete, inconsistent, or made by another model."""


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


def _dump_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: Path, data: dict, worker: int | None = None) -> None:
    """Write JSON so that a reader sees either nothing or the whole file.

    Safe when several processes write the same file at once (two workers finishing together
    both write the manifest): each writes its own temp file, and the last rename wins whole.
    """
    atomic_write(path, lambda tmp: _dump_json(tmp, data), temp_name(Path(path).name, worker))


def write_json_once(path: Path, data: dict, worker: int | None = None) -> dict | None:
    """Create ``path`` holding ``data`` unless it exists; returns None if this call created it, else the existing content.

    Creation is atomic and exclusive (a hard link of a complete temp file, which fails if the
    name exists): of several workers starting together exactly one creates the file, and the
    others read it whole and compare.
    """
    path = Path(path)
    tmp = path.with_name(temp_name(path.name, worker))
    try:
        _dump_json(tmp, data)
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
    if manifest.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
        raise CacheError(
            f"{path}: schema version {manifest.get('schema_version')} is not one of {READABLE_SCHEMA_VERSIONS}; rebuild the cache with this version"
        )
    try:
        shards = [s["file"] for split in manifest["splits"].values() for s in split["shards"]]
    except (KeyError, TypeError, AttributeError) as e:
        raise CacheError(f"{path}: malformed splits ({e!r}); run `mft cache-verify` or rebuild") from None
    for name in shards:
        shard_path(cache_dir, name)  # refuses names that would point outside the folder
    return manifest
