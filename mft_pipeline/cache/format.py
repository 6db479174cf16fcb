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


class FieldError(CacheError):
    """A manifest, settings or worker file whose fields are missing or of the wrong kind.

    ``problems`` holds one line per bad field (``mft cache-verify`` prints each); the message
    joins them.
    """

    def __init__(self, path: Path, problems: list[str]):
        self.path, self.problems = Path(path), problems
        super().__init__(f"{path}: {'; '.join(problems)} (the file is damaged or was edited; rebuild the cache)")


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


# What each field the code reads must be, checked where its file is read (``read_manifest``,
# ``read_settings``, ``read_part``): a damaged or hand-edited file is one clear error naming the
# field, never a KeyError or TypeError deep inside a command. Each check is (predicate, wording).
def _integer(minimum: int, maximum: int = 2**63 - 1):
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and minimum <= v <= maximum), f"an integer in [{minimum}, {maximum}]"


_COUNT = _integer(0)
_LIST_MAX = 2**31 - 1  # Parquet's fixed-size lists, whose sizes T, k and the tail samples are
_TEXT = (lambda v: isinstance(v, str) and v != ""), "a non-empty string"
_SHARD_NAME = (lambda v: isinstance(v, str) and bool(SHARD_FILE.match(v))), "a shard file name ({split}-NNNNN.parquet in the cache folder)"
_COMMON_FIELDS = {
    "model.id": _TEXT,
    "model.fingerprint": _TEXT,
    "model.vocab_size": _integer(1, 2**32),  # ids are stored as uint32 at most
    "top_k": _integer(1, _LIST_MAX),
    "seq_len": _integer(2, _LIST_MAX),
}
# Checked where present: synthetic caches (tests, benchmarks) are made without a tokenizer.
_OPTIONAL_FIELDS = {
    "tail_samples": _integer(0, _LIST_MAX),
    "tokenizer.fingerprint": _TEXT,
    "targets": ((lambda v: isinstance(v, bool)), "true or false"),  # chat caches: a target column marks the answers
}
_SPLIT_FIELDS = {"num_sequences": _COUNT, "num_labels": _COUNT}
_SHARD_FIELDS = {"file": _SHARD_NAME, "sha256": _TEXT, "bytes": _COUNT, "rows": _COUNT, "labels": _COUNT}
_PLAN_FIELDS = {"file": _SHARD_NAME, "split": ((lambda v: v in SPLITS), f"one of {SPLITS}"), "start": _COUNT, "rows": _COUNT, "labels": _COUNT, "worker": _COUNT}
_PART_FIELDS = {"worker": _COUNT, "num_workers": _integer(1)}
_RECORD_FIELDS = {"file": _SHARD_NAME, "sha256": _TEXT, "bytes": _COUNT}
_MISSING = object()


def _field_problems(data, fields: dict, where: str = "", optional: bool = False) -> list[str]:
    """One line per field of ``fields`` (dotted paths) that ``data`` lacks or holds in the wrong kind."""
    problems = []
    for key, (ok, wanted) in fields.items():
        value = data
        for part in key.split("."):
            value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        if value is _MISSING:
            if not optional:
                problems.append(f"{where}{key}: missing")
        elif not ok(value):
            problems.append(f"{where}{key}: {value!r} is not {wanted}")
    return problems


def _list_problems(data: dict, key: str, fields: dict, where: str = "") -> list[str]:
    """Problems of ``data[key]``, a list of objects each holding ``fields``."""
    items = data.get(key, _MISSING)
    if not isinstance(items, list):
        return [f"{where}{key}: {'missing' if items is _MISSING else 'not a list'}"]
    problems = []
    for i, item in enumerate(items):
        problems += _field_problems(item, fields, f"{where}{key}[{i}].") if isinstance(item, dict) else [f"{where}{key}[{i}]: not an object"]
    return problems


def manifest_problems(manifest) -> list[str]:
    """Every field of a manifest that the readers rely on and that is missing or of the wrong kind."""
    if not isinstance(manifest, dict):
        return ["not a JSON object"]
    problems = _field_problems(manifest, _COMMON_FIELDS) + _field_problems(manifest, _OPTIONAL_FIELDS, optional=True)
    splits = manifest.get("splits", _MISSING)
    if not isinstance(splits, dict):
        return problems + [f"splits: {'missing' if splits is _MISSING else 'not an object'}"]
    for name, split in splits.items():
        if name not in SPLITS:
            problems.append(f"splits: {name!r} is not one of {SPLITS}")
        elif not isinstance(split, dict):
            problems.append(f"splits.{name}: not an object")
        else:
            problems += _field_problems(split, _SPLIT_FIELDS, f"splits.{name}.") + _list_problems(split, "shards", _SHARD_FIELDS, f"splits.{name}.")
    return problems


def settings_problems(settings) -> list[str]:
    """Every field of ``cache-settings.json`` that merging and the manifest rely on and that is missing or wrong."""
    if not isinstance(settings, dict):
        return ["not a JSON object"]
    problems = _field_problems(settings, {**_COMMON_FIELDS, "num_workers": _integer(1)}) + _field_problems(settings, _OPTIONAL_FIELDS, optional=True)
    problems += _list_problems(settings, "plan", _PLAN_FIELDS)
    if not problems:
        n = settings["num_workers"]
        problems += [f"plan: {p['file']} goes to worker {p['worker']}, not one of the {n} workers" for p in settings["plan"] if p["worker"] >= n]
    return problems


def part_problems(part) -> list[str]:
    """Every field of a worker file (``worker-I-of-N.json``) that is missing or wrong."""
    if not isinstance(part, dict):
        return ["not a JSON object"]
    problems = _field_problems(part, _PART_FIELDS)
    shards = part.get("shards", _MISSING)
    if not isinstance(shards, dict):
        return problems + [f"shards: {'missing' if shards is _MISSING else 'not an object'}"]
    for name, record in shards.items():
        if not _SHARD_NAME[0](name):
            problems.append(f"shards: {name!r} is not {_SHARD_NAME[1]}")
        elif not isinstance(record, dict):
            problems.append(f"shards.{name}: not an object")
        else:
            problems += _field_problems(record, _RECORD_FIELDS, f"shards.{name}.")
    return problems


def _checked(path: Path, problems) -> dict:
    data = read_json(path)
    found = problems(data)
    if found:
        raise FieldError(path, found)
    return data


def read_settings(cache_dir: str | Path) -> dict:
    """``cache-settings.json`` of ``cache_dir``, its fields checked (``settings_problems``)."""
    return _checked(Path(cache_dir) / SETTINGS, settings_problems)


def read_part(path: str | Path) -> dict:
    """A worker file, its fields checked (``part_problems``)."""
    return _checked(Path(path), part_problems)


def read_manifest(cache_dir: str | Path) -> dict:
    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST
    if not path.exists():
        hint = ""
        if any(cache_dir.glob("worker-*.json")) or (cache_dir / SETTINGS).exists():
            hint = " (stage one did not finish: rerun it with --resume, or `mft cache-merge` if workers wrote parts)"
        raise CacheError(f"{cache_dir}: not a finished cache, no {MANIFEST}{hint}")
    manifest = read_json(path)
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version not in READABLE_SCHEMA_VERSIONS:
        raise CacheError(f"{path}: schema version {version} is not one of {READABLE_SCHEMA_VERSIONS}; rebuild the cache with this version")
    # Also refuses shard names that would point outside the folder.
    problems = manifest_problems(manifest)
    if problems:
        raise FieldError(path, problems)
    return manifest
