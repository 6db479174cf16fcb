"""Atomic writing: whoever reads a path, or resumes after a kill, sees its old content or its new, never half of either."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

# A folder cannot be renamed over a non-empty one, so the previous one steps aside under this
# suffix for the moment between the two renames (a resume looks there after a crash).
OLD = ".old"


def atomic_write(path: str | Path, write: Callable[[Path], None], temp_name: str | None = None) -> None:
    """Call ``write(tmp)`` on a temp path beside ``path``, then move the result over ``path``.

    ``write`` makes a file or a folder at ``tmp``. A file replaces ``path`` in one rename, which
    also makes concurrent writers safe: the last rename wins whole. A folder replaces a previous
    folder in two renames (``path`` to ``path.old``, ``tmp`` to ``path``), after which the old
    one is removed. On any error the temp is removed and the previous content stays whole: at
    ``path``, or at ``path.old`` if the error fell between the two renames.

    Args:
        path: the final file or folder.
        write: makes the new content at the path it is given (and fsyncs it where that matters).
        temp_name: the temp's file name, for callers whose folder owns its temp names
            (default ``<name>.<pid>.tmp``).
    """
    path = Path(path)
    tmp = path.with_name(temp_name or f"{path.name}.{os.getpid()}.tmp")
    _remove(tmp)  # left by a killed earlier write under the same name
    try:
        write(tmp)
        if tmp.is_dir() and path.exists():
            old = path.with_name(path.name + OLD)
            _remove(old)
            path.rename(old)
            tmp.rename(path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """``path.write_text(text)``, atomically (see ``atomic_write``)."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
