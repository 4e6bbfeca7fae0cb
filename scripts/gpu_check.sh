#!/usr/bin/env bash
# GPU smoke check of the PyTorch engine: greedy SD/SSD against AR, then AR/SD/SSD tokens/s with
# SSD's drafter on its own CUDA stream, all in one JSON file ($OUT/gpu_check.json, or
# runs/gpu_check/gpu_check.json). Needs only python3 with torch (and numpy) on a CUDA machine, no
# network; stops itself after GPU_CHECK_TIMEOUT_S (default 450 s, well under 8 minutes on an H100).
#   bash scripts/gpu_check.sh                       # every dev prompt, 128 new tokens
#   bash scripts/gpu_check.sh --prompts 8 --max-new-tokens 64
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-runs/gpu_check}"
python="${PYTHON:-python3}"
limit="${GPU_CHECK_TIMEOUT_S:-450}"
mkdir -p "$out_dir"
result="$out_dir/gpu_check.json"
# What the file says if the run never gets to write its own.
printf '{"ok": false, "error": "did not finish within %ss (or was killed)"}\n' "$limit" > "$result"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
status=0
timeout "$limit" "$python" scripts/gpu_check.py --out "$result" --device "${DEVICE:-cuda}" "$@" || status=$?
echo "gpu_check: exit $status, result in $result"
exit "$status"
