"""General English for the demos: GCIDE, the GNU Collaborative International Dictionary of English.

Webster 1913 + WordNet definitions with usage quotations, from the Debian package
``dict-gcide`` (``/usr/share/dictd/gcide.dict.dz`` + ``gcide.index``), GPL-2.0+. The dictd
text is cleaned: pronunciations, syllable marks and ``[1913 Webster]`` source tags dropped,
``[e^]``-style accent codes turned into Unicode, hard-wrapped lines joined. Consecutive
entries are grouped into documents of about 3,000 characters.
"""

from __future__ import annotations

import gzip
import os
import re
import unicodedata
from pathlib import Path
from typing import Iterator

from mft_pipeline.demo.fetch import DEB_CACHE, fetch_deb

#: Entries are grouped into documents until they reach about this many characters.
TARGET_CHARS = 3000

GCIDE_PACKAGE = "dict-gcide"
GCIDE_SYSTEM_DICT = Path("/usr/share/dictd/gcide.dict.dz")
GCIDE_REL_DICT = Path("usr/share/dictd/gcide.dict.dz")


def gcide_dict_path(out_dir: Path, install: bool) -> Path:
    if GCIDE_SYSTEM_DICT.is_file() and GCIDE_SYSTEM_DICT.with_name("gcide.index").is_file():
        return GCIDE_SYSTEM_DICT
    path = fetch_deb(GCIDE_PACKAGE, out_dir / DEB_CACHE, install=install) / GCIDE_REL_DICT
    if not path.is_file():
        raise RuntimeError(f"{path} missing from the {GCIDE_PACKAGE} package")
    return path



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
