"""Reading a corpus into documents with `datasets`, and splitting them by a hash of each document."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from mft_pipeline.data.chat import ChatError, ChatRecord, check_record, record_format
from mft_pipeline.errors import MFTError

TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.zst", ".json.zst", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)


class CorpusError(MFTError, ValueError):
    """The corpus can't be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Corpus:
    """Documents of one corpus, split into train and validation.

    Attributes:
        train, validation: document texts (or, for instruction and chat corpora, records), in corpus order.
        fingerprint: hash of all documents in order (before the split).
    """

    train: list[str] | list[ChatRecord]
    validation: list[str] | list[ChatRecord]
    fingerprint: str

    @property
    def num_documents(self) -> int:
        return len(self.train) + len(self.validation)


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSON_SUFFIXES):
        return "json"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    raise CorpusError(
        f"{path}: unknown corpus format; use .jsonl, .jsonl.zst, .parquet, .txt/.md, or a saved Hugging Face dataset folder"
    )


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    files = [p for p in files if p.name.lower().endswith(TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES)]
    if not files:
        raise CorpusError(f"{path}: folder holds no .jsonl, .jsonl.zst, .parquet or .txt files")
    return files


def _check_utf8(files: list[Path]) -> None:
    # datasets reports bad bytes deep in a worker traceback; name the file and offset instead.
    import zstandard

    for f in files:
        name = f.name.lower()
        if name.endswith(PARQUET_SUFFIXES) or name.endswith(".gz"):
            continue
        opener = zstandard.open(f, "rb") if name.endswith(".zst") else open(f, "rb")
        with opener as fh:
            data = fh.read()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorpusError(f"{f}: not valid UTF-8 at byte {e.start} ({e.reason})") from None


def _open(f: Path):
    """A binary file object over ``f`` that reads lines, decompressing .zst and .gz."""
    import gzip
    import io

    import zstandard

    name = f.name.lower()
    return io.BufferedReader(zstandard.open(f, "rb")) if name.endswith(".zst") else gzip.open(f, "rb") if name.endswith(".gz") else open(f, "rb")


@dataclass(frozen=True)
class _JsonLines:
    """What one read of a JSON Lines file learns: its record format (None: no records) and each record's line number."""

    format: str | None
    lines: list[int]


def _read_jsonl(f: Path) -> _JsonLines:
    """Check every line of one JSON Lines file, once: UTF-8, a JSON object, and one record format throughout.

    pyarrow's JSON reader has crashed the process, not raised, on some files that mix record
    formats, so such files are refused here with the line that differs.
    """
    fmt, first, lines, offset = None, 0, [], 0
    with _open(f) as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorpusError(f"{f}: not valid UTF-8 at byte {offset + e.start} ({e.reason})") from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise CorpusError(f"{f}, line {n}: could not be read as JSON ({e})") from None
            if not isinstance(record, dict):
                raise CorpusError(f"{f}, line {n}: a record must be a JSON object, got {type(record).__name__}")
            this = record_format(record)
            if fmt is None:
                fmt, first = this, n
            elif this != fmt:
                raise CorpusError(
                    f"{f}, line {n}: a {this} record, but line {first} is a {fmt} record; keep one record format per corpus"
                )
            lines.append(n)
    return _JsonLines(fmt, lines)


def _file_format(f: Path, kind: str, jsonl: dict[Path, _JsonLines]) -> str | None:
    """One file's record format, where it can be seen before datasets reads it (JSON Lines, Parquet)."""
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return record_format(pq.read_schema(f).names)
        except Exception:
            return None  # datasets reports the broken file
    return jsonl[f].format if f in jsonl else None


def _check_one_format(path: Path, files: list[Path], kind: str, jsonl: dict[Path, _JsonLines]) -> None:
    # datasets would fail to merge the schemas with an unhelpful message, or silently leave
    # one format's rows empty; name the two files instead.
    seen: dict[str, Path] = {}
    for f in files:
        fmt = _file_format(f, kind, jsonl)
        if fmt is not None:
            seen.setdefault(fmt, f)
    if not seen and len(jsonl) == len(files):
        raise CorpusError(f"{path}: corpus is empty (no records)")  # datasets says only "StopIteration"
    if len(seen) > 1:
        (a, fa), (b, fb) = list(seen.items())[:2]
        raise CorpusError(f"{fa} holds {a} records but {fb} holds {b} records; keep one record format per corpus")


def _locator(files: list[Path] | None, path: Path, kind: str, jsonl: dict[Path, _JsonLines]):
    """row index -> "FILE, line N" (JSON Lines) or "FILE, record N" (other formats)."""
    if files is None:
        return lambda i: f"{path}, record {i + 1}"
    starts = []  # per file: (first row, file, line number of each row or None)
    row = 0
    for f in files:
        if f in jsonl:
            starts.append((row, f, jsonl[f].lines))
            row += len(jsonl[f].lines)
        else:
            import pyarrow.parquet as pq

            count = pq.ParquetFile(f).metadata.num_rows if kind == "parquet" else None
            starts.append((row, f, None))
            row += count or 0

    def locate(i: int) -> str:
        first, f, lines = next(s for s in reversed(starts) if s[0] <= i)
        return f"{f}, line {lines[i - first]}" if lines is not None and i - first < len(lines) else f"{f}, record {i - first + 1}"

    return locate


def _chat_records(ds, fmt: str, locate) -> list[ChatRecord]:
    records = []
    for i, row in enumerate(ds):
        try:
            records.append(check_record(row, fmt, locate(i)))
        except ChatError as e:
            raise CorpusError(str(e)) from None
    return records


def load_documents(path: str | Path, text_field: str = "text", sample_by: str = "paragraph") -> list[str] | list[ChatRecord]:
    """Read every document of a corpus, in a deterministic order.

    A corpus whose records have a ``messages`` column, or ``prompt`` and ``completion``
    columns, is an instruction or chat corpus: its records come back as checked
    :class:`ChatRecord` s (see :mod:`mft_pipeline.data.chat`); all its files must hold that format.

    Args:
        path: a file, a folder of files of one format, or a folder made by
            ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (its "train" split is read).
        text_field: the column that holds the text (plain-text files always give "text").
        sample_by: for plain-text files, what one document is.
    """
    import datasets

    path = Path(path)
    if not path.exists():
        raise CorpusError(f"{path}: no such file or folder")
    datasets.disable_progress_bars()
    files, kind, jsonl = None, "saved", {}
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise CorpusError(f"{path}: saved DatasetDict has no 'train' split (has {list(ds)})")
                ds = ds["train"]
        else:
            files = _files(path)
            kinds = {_kind(f) for f in files}
            if len(kinds) > 1:
                raise CorpusError(f"{path}: mixes formats {sorted(kinds)}; keep one format per corpus")
            kind = kinds.pop()
            # Each JSON Lines file is read once, for its UTF-8, its records' format and their line numbers.
            jsonl = {f: _read_jsonl(f) for f in files if ".jsonl" in f.name.lower()}
            _check_utf8([f for f in files if f not in jsonl])
            if kind != "text":
                _check_one_format(path, files, kind, jsonl)
            kwargs = {"sample_by": sample_by} if kind == "text" else {}
            if kind == "text":
                text_field = "text"
            ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", **kwargs)
    except CorpusError:
        raise
    except Exception as e:  # datasets wraps parse errors in several exception types
        raise CorpusError(f"{path}: could not be read as a corpus: {e}") from e
    finally:
        datasets.enable_progress_bars()
    fmt = "text" if kind == "text" else record_format(ds.column_names)
    if fmt != "text":
        records = _chat_records(ds, fmt, _locator(files, path, kind, jsonl))
        if not records:
            raise CorpusError(f"{path}: corpus is empty (no records)")
        return records
    if text_field not in ds.column_names:
        raise CorpusError(f"{path}: no text field {text_field!r}; columns are {ds.column_names} (use --text-field)")
    texts = ds[text_field]
    bad = next((i for i, t in enumerate(texts) if t is not None and not isinstance(t, str)), None)
    if bad is not None:
        raise CorpusError(f"{path}: field {text_field!r} of row {bad} is {type(texts[bad]).__name__}, not text")
    docs = [t for t in texts if t and t.strip()]
    if not docs:
        raise CorpusError(f"{path}: corpus is empty (no non-blank {text_field!r} values)")
    return docs


def _hash(doc: str | ChatRecord) -> bytes:
    text = doc.key() if isinstance(doc, ChatRecord) else doc
    return hashlib.sha256(text.encode("utf-8")).digest()


def split_documents(docs: list[str] | list[ChatRecord], val_fraction: float) -> Corpus:
    """Assign each document to validation when its hash falls below ``val_fraction``.

    Depends only on the document's text (a record's: its whole content, so a conversation
    never lands on both sides), so it is stable across runs, file orders and corpus growth,
    and identical documents always land on the same side.
    """
    whole = hashlib.sha256()
    train, val = [], []
    for d in docs:
        h = _hash(d)
        whole.update(h)
        (val if int.from_bytes(h[:8], "big") / 2**64 < val_fraction else train).append(d)
    if not train:
        raise CorpusError("every document fell into validation; lower val_fraction or add documents")
    return Corpus(train=train, validation=val, fingerprint=whole.hexdigest()[:32])


def load_corpus(path, text_field="text", sample_by="paragraph", val_fraction=0.05) -> Corpus:
    docs = load_documents(path, text_field, sample_by)
    try:
        return split_documents(docs, val_fraction)
    except CorpusError as e:
        raise CorpusError(f"{path}: {e}") from None
