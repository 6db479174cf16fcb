"""Code for the demos and the stage-one benchmark: the running interpreter's CPython standard library.

``sysconfig.get_paths()["stdlib"]``, every ``*.py`` outside ``test/``, ``tests/``,
``idle_test/`` and ``site-packages/``; one document per file, its relative path as id. PSF license.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Iterator

CODE_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)


def stdlib_root() -> Path:
    """The standard library folder of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


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
