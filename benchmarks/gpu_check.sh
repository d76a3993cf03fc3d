#!/usr/bin/env bash
# GPU readiness check (issue 14, item 5): on a machine with a CUDA device, run in one go and under 10 minutes
#   1. the GPU test twins (pytest -m gpu),
#   2. the kernel benchmark's GPU reference case (python -m tikmix_kernels.bench --shapes gpu),
#   3. a short mixture-quality protocol on the medium preset (tikmix experiment --model medium --device cuda,
#      stratified and online TiKMiX-D, one seed, 200 steps),
# writing every log, the kernel CSV, the experiment's results and a summary to one folder.
#
# Usage: benchmarks/gpu_check.sh [OUT_DIR]     (default: out/gpu-check-<UTC time>)
# Environment: PYTHON (default: python), CORPUS (default: corpus; built there when missing).
# Exit status: 0 all passed; 1 a stage failed or timed out (see OUT_DIR/summary.txt); 2 no CUDA device.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
CORPUS="${CORPUS:-$ROOT/corpus}"
OUT="${1:-$ROOT/out/gpu-check-$(date -u +%Y%m%d-%H%M%S)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT" || exit 2

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device visible to torch (PYTHON=$PYTHON); run this on a machine with an" \
        "NVIDIA GPU and a CUDA build of torch. Nothing was run." >&2
    exit 2
fi
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
STATUS=0

# stage NAME SECONDS COMMAND...: run COMMAND with a time limit, log to OUT/NAME.log, record status and time.
stage() {
    local name="$1" limit="$2"
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local verdict="ok"
    if [ "$rc" -eq 124 ]; then verdict="TIMED OUT after ${limit}s"; elif [ "$rc" -ne 0 ]; then verdict="FAILED (rc $rc)"; fi
    [ "$rc" -eq 0 ] || STATUS=1
    echo "$name: $verdict in $((SECONDS - started))s; log $OUT/$name.log" | tee -a "$SUMMARY"
}

{
    date -u
    git -C "$ROOT" rev-parse HEAD 2>/dev/null
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} >"$OUT/machine.txt" 2>&1

stage pytest-gpu 180 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests
stage kernel-bench 120 "$PYTHON" -m tikmix_kernels.bench --shapes gpu --csv "$OUT/kernels.csv"
if [ ! -f "$CORPUS/manifest.json" ]; then
    stage corpus-build 60 "$PYTHON" -m tikmix_loader.cli corpus build "$CORPUS" --no-progress
fi
stage experiment-medium 240 "$PYTHON" -m tikmix_loader.cli experiment --corpus "$CORPUS" \
    --out "$OUT/experiment" --model medium --device cuda --methods stratified tikmix-d --seeds 0 \
    --steps 200 --batch-size 16 --seq-len 512 --every 50 --eval-samples 64 --no-progress

echo "gpu_check.sh: everything is in $OUT" | tee -a "$SUMMARY"
exit "$STATUS"
