#!/usr/bin/env bash
# Run HERE (network to PyPI, the SmolLM2 package installed), before a session with a GPU machine.
# Fills the git-ignored .gpu-carry/ with what the two device calls of the GPU check carry:
#   .gpu-carry/call1: wheels the device lacks (datasets, dill, multiprocess, zstandard, gguf), model part 1
#   .gpu-carry/call2: model part 2, the quality benchmark's gpu-profile corpora (xz), manifest with the sha256
# Each call's carry plus the repo stays under the device's 64 MiB. See docs/gpu-check.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.gpu-carry
WHEELS=$DEST/wheels
mkdir -p "$WHEELS"
# The versions this project is tested with; Python 3.12 manylinux builds for the device's x86-64 Python 3.12.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 zstandard==0.25.0 gguf==0.19.0
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} "$PY" benchmarks/gpu_check.py prepare-carry --dest "$DEST" --wheels "$WHEELS" --data "$DEST/data"
du -sh "$DEST/call1" "$DEST/call2"
