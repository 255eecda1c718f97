#!/usr/bin/env bash
# Issue 12's GPU table: MPT-7B shapes (random bf16 weights), 128 input / 128 output tokens, through the
# `ensemble` (Triton gRPC streaming) and the OpenAI endpoint at concurrency 1 / 32 / 128, with transformers'
# generate on the same checkpoint as the baseline rows. Usage: bash bench/served_table.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-/tmp/served-mpt7b}
PY=${PYTHON:-.venv/bin/python}
GEN="$PY -m generator"
mkdir -p "$W"
# a random MPT-7B-shaped HF checkpoint (+ a small tokenizer) written on the GPU, as serve_tp_parity.py does
$PY - "$W" <<'PYEOF'
import argparse, sys
from pathlib import Path
sys.path.insert(0, "bench")
from serve_tp_parity import write_random_mpt
write_random_mpt(Path(sys.argv[1]) / "hf", argparse.Namespace(hidden=4096, layers=32, heads=32, vocab=50432,
                                                               dtype="bfloat16"))
PYEOF
[ -d "$W/job/triton_repo" ] || $GEN --model "$W/hf" --dtype bfloat16 --max-batch-size 256 --max-input-len 256 \
    --max-seq-len 512 --output "$W/job"
# transformers' baseline first, when another interpreter runs it: the server's KV pool then takes the GPU
if [ -n "${HF_PYTHON:-}" ]; then
  "$HF_PYTHON" bench/hf_generate.py --hf "$W/hf" --batch-sizes 1,32,128 --dtype bfloat16 | tee "$W/hf.jsonl"
fi
$GEN serve --model-repository "$W/job/triton_repo" --openai-port 9000 > "$W/serve.log" 2>&1 &
SERVE=$!
trap 'kill -TERM $SERVE; wait $SERVE || true' EXIT
for _ in $(seq 600); do grep -q "OpenAI-compatible API" "$W/serve.log" && break; sleep 1; done
COMMON=(--concurrency 1,32,128 --input-len 128 --output-len 128 --tokenizer-dir "$W/job/tokenizer")
# HF_PYTHON: run transformers' baseline with that interpreter instead (the GPU image's own python3, whose numpy
# transformers imports with; the serving venv puts numpy<2 first)
if [ -n "${HF_PYTHON:-}" ]; then
  $GEN bench --url localhost:8001 "${COMMON[@]}" --json "$W/ensemble.json"
else
  $GEN bench --url localhost:8001 "${COMMON[@]}" --hf "$W/hf" --hf-dtype bfloat16 --json "$W/ensemble.json"
fi
$GEN bench --url http://localhost:9000 --openai "${COMMON[@]}" --json "$W/openai.json"
