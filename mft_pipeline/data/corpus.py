"""Reading a corpus into documents with `datasets`, and splitting them by a hash of each document."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
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
        train, validation: document texts, in corpus order.
        fingerprint: hash of all document texts in order (before the split).
    """

    train: list[str]
    validation: list[str]
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


def load_documents(path: str | Path, text_field: str = "text", sample_by: str = "paragraph") -> list[str]:
    """Read every document of a corpus, in a deterministic order.

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
            _check_utf8(files)
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


def _hash(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def split_documents(docs: list[str], val_fraction: float) -> Corpus:
    """Assign each document to validation when its hash falls below ``val_fraction``.

    Depends only on the document's text, so it is stable across runs, file orders and
    corpus growth, and identical documents always land on the same side.
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
