"""Legal text for the demos: ScanCode's license texts from the PyPI package ``licensedcode-data``, CC-BY-4.0.

``licensedcode/data/licenses/*.LICENSE`` with the YAML front matter stripped; one document
per license. The package is installed with ``python -m pip`` into the running environment
when it is missing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from mft_pipeline.demo.fetch import pip_package_data

LICENSE_PIP_PACKAGE = "licensedcode-data"


def license_dir(install: bool) -> Path:
    """``licensedcode/data/licenses`` of the installed package, pip-installing it when missing."""
    return pip_package_data(LICENSE_PIP_PACKAGE, "licensedcode", "data/licenses", "*.LICENSE", install=install)


def strip_front_matter(text: str) -> str:
    """The text after a leading YAML front matter (between two ``---`` lines), stripped."""
    lines = text.split("\n")
    if lines and lines[0].strip() == "---":
        for i in range(1, len(lines)):
            if lines[i].strip() == "---":
                lines = lines[i + 1 :]
                break
    return "\n".join(lines).strip()


def short_name(text: str) -> str | None:
    """The ``short_name:`` of a leading YAML front matter ("Apache 2.0"), or None."""
    lines = text.split("\n")
    if not lines or lines[0].strip() != "---":
        return None
    for line in lines[1:]:
        if line.strip() == "---":
            break
        key, sep, value = line.partition(":")
        if sep and key == "short_name" and value.strip():
            return value.strip().strip("'\"")
    return None


def license_documents(licenses_dir: str | os.PathLike) -> Iterator[dict]:
    """One document per ``*.LICENSE`` file (sorted by name; id = the license key, name = its short name or the key)."""
    for path in sorted(Path(licenses_dir).glob("*.LICENSE")):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        body = strip_front_matter(text)
        if body:
            yield {"id": path.stem, "name": short_name(text) or path.stem, "text": body}
