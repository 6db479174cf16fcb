#!/usr/bin/env bash
# Install from PyPI, then run the unit suite on CPU without network (GPU, vLLM and slow tests are opt-in markers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
python -m pytest -q "$@"
