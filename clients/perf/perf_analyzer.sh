#!/usr/bin/env bash
# Runs the real perf_analyzer (Triton 2.51, shipped in the tritonclient wheel) with the shared
# libraries it needs on the path, so users never set LD_LIBRARY_PATH themselves:
#   clients/perf/perf_analyzer.sh -m ensemble -u 127.0.0.1:8001 -i grpc --async --streaming ...
# libcudart.so.12 comes from pip nvidia-cuda-runtime-cu12 (perf_analyzer links it even without a
# GPU); libb64.so.0d from Debian libb64-0d. scripts/setup.sh installs both.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${SAGUARO_VENV:-$ROOT/.venv}"
PA="$VENV/bin/perf_analyzer"
if [ ! -x "$PA" ]; then
    echo "perf_analyzer.sh: $PA not found: run scripts/setup.sh (pip tritonclient[all]==2.51.0)" >&2
    exit 127
fi
for dir in "$VENV"/lib/python3*/site-packages/nvidia/cuda_runtime/lib; do
    [ -e "$dir/libcudart.so.12" ] && export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
# Name the missing library and its fix instead of the loader's bare error.
missing="$(ldd "$PA" 2>/dev/null | awk '/not found/ {print $1}' | tr '\n' ' ')"
if [ -n "$missing" ]; then
    echo "perf_analyzer.sh: missing shared libraries: $missing" >&2
    echo "  libb64.so.0d: apt-get install -y libb64-0d;  libcudart.so.12: pip install nvidia-cuda-runtime-cu12" >&2
    echo "  (scripts/setup.sh installs both)" >&2
    exit 127
fi
exec "$PA" "$@"
