"""Math for the demos: Metamath ``set.mm`` from the Debian package ``metamath-databases``, CC0.

Proofs removed (``$= ... $.`` becomes ``$.``), English comments and statements kept, the
``$t``/``$j`` typesetting and tool comments dropped. Split at its section banners, long
sections cut at statement boundaries into documents of about 3,000 characters.
"""

from __future__ import annotations

import bisect
import re
from pathlib import Path
from typing import Iterator

from mft_pipeline.demo.fetch import DEB_CACHE, fetch_deb

#: Long sections are cut into pieces of about this many characters.
TARGET_CHARS = 3000
#: A section or trailing piece shorter than this is merged into a neighbour.
MIN_CHARS = 1000

METAMATH_PACKAGE = "metamath-databases"
METAMATH_SYSTEM_SETMM = Path("/usr/share/metamath/databases/set.mm")
METAMATH_REL_SETMM = Path("usr/share/metamath/databases/set.mm")


def setmm_path(out_dir: Path, install: bool) -> Path:
    if METAMATH_SYSTEM_SETMM.is_file():
        return METAMATH_SYSTEM_SETMM
    path = fetch_deb(METAMATH_PACKAGE, out_dir / DEB_CACHE, install=install) / METAMATH_REL_SETMM
    if not path.is_file():
        raise RuntimeError(f"{path} missing from the {METAMATH_PACKAGE} package")
    return path



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
