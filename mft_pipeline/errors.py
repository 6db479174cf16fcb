"""The one base class for errors a user can cause and fix: bad input, settings or files.

The CLI catches only ``MFTError`` and shows its message as one line (exit 2). Anything else
is a bug in this package and keeps its traceback.
"""

from __future__ import annotations


class MFTError(Exception):
    """A user error: the message says what is wrong and what to do instead."""


class ConfigError(MFTError, ValueError):
    """Settings that are invalid or cannot work together (a ``ValueError`` too, for callers that catch that)."""
