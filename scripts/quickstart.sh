#!/usr/bin/env bash
# Install, then run the whole pipeline on the real SmolLM2-135M and real corpora on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
mft quickstart "$@"
