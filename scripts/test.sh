#!/usr/bin/env bash
# Runs the whole test suite (lint, types, pytest); sets up .venv first if it is missing or incomplete.
#   bash scripts/test.sh                 everything (about 7 minutes on 2 cores once .venv exists)
#   bash scripts/test.sh -m faults       the fault-injection tests only (kills, stuck requests, held ports)
#   bash scripts/test.sh -m "not server" skip the tests that start tritonserver
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c 'import generator, tritonclient, pytriton, pytest' 2>/dev/null; then
  bash scripts/setup.sh
fi
.venv/bin/ruff check generator tests
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
