"""Legal text for the demos: ScanCode's license texts from the PyPI package ``licensedcode-data``, CC-BY-4.0.

``licensedcode/data/licenses/*.LICENSE`` with the YAML front matter stripped; one document
per license. The package is installed with ``python -m pip`` into the running environment
when it is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Iterator

from mft_pipeline.demo.fetch import log, run

LICENSE_PIP_PACKAGE = "licensedcode-data"


def find_license_dir() -> Path | None:
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


def license_dir(install: bool) -> Path:
    found = find_license_dir()
    if found is not None:
        return found
    cmd = [sys.executable, "-m", "pip", "install", LICENSE_PIP_PACKAGE]
    manual = " ".join(cmd)
    if not install:
        raise RuntimeError(f"{LICENSE_PIP_PACKAGE} is not installed; run by hand:  {manual}")
    log(f"installing {LICENSE_PIP_PACKAGE} with pip")
    res = run(cmd)
    if res.returncode != 0:
        raise RuntimeError(
            f"pip install {LICENSE_PIP_PACKAGE} failed ({res.stderr.strip()[-300:]}); "
            f"run by hand:  {manual}"
        )
    found = find_license_dir()
    if found is None:
        raise RuntimeError(
            f"{LICENSE_PIP_PACKAGE} installed but licensedcode/data/licenses not importable; "
            f"check with:  {sys.executable} -c 'import licensedcode'"
        )
    return found



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
