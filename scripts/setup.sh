#!/usr/bin/env bash
# Sets up a fresh machine: Debian packages perf_analyzer needs, and the project's venv at .venv/.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! ldconfig -p 2>/dev/null | grep -q libb64.so.0d; then
    echo "[setup] installing Debian package libb64-0d (perf_analyzer needs it)"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libb64-0d >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    python3 -m venv .venv
fi
if ! .venv/bin/python -c "import saguaro, torch, tritonclient, pytriton, transformers, jinja2, openai" 2>/dev/null; then
    echo "[setup] installing Python packages into .venv (torch 2.13.0 CPU, Triton 2.51 server and client)"
    .venv/bin/pip install -q --upgrade pip
    # torch is pinned: an unpinned torch pulls a multi-GB CUDA build.
    .venv/bin/pip install -q "torch==2.13.0"
    .venv/bin/pip install -q -e ".[serve,test]"
fi
echo "[setup] ready: .venv"
