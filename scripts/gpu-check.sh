#!/usr/bin/env bash
# The command of each device call of the GPU check (docs/gpu-check.md), run in the repo root there:
#   bash scripts/gpu-check.sh speed     # call 1, carry .gpu-carry/call1
#   bash scripts/gpu-check.sh quality   # call 2, carry .gpu-carry/call2, within ~30 s of call 1
# Everything call 2 needs from call 1 (wheels, model part 1, speed.json) waits in /tmp/mft-gpu-check.
set -uo pipefail
phase=${1:?usage: scripts/gpu-check.sh speed|quality}
STASH=/tmp/mft-gpu-check
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$STASH" "$OUT"
carried=.gpu-carry/$([ "$phase" = speed ] && echo call1 || echo call2)
[ -d "$carried" ] && cp -r "$carried"/. "$STASH"/
if [ ! -d /tmp/site ] && ls "$STASH"/wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$STASH"/wheels/*.whl || exit 1
fi
# No network there: never let a library wait on the hub.
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/$phase.log"
python3 benchmarks/gpu_check.py "$phase" --out "$OUT" --stash "$STASH" 2>&1 | tee -a "$OUT/$phase.log"
