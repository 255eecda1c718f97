#!/usr/bin/env bash
# One command, start to finish: set up .venv, build the tiny-mpt Triton repository, serve it with a real
# tritonserver, ask it for text (plain and streamed), then stop the server.
#   bash scripts/demo.sh            (OUT=dir to choose the output directory, PROMPT="..." to ask something else)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh   # SKIP_SETUP=1: .venv is ready
OUT=${OUT:-model_repo}
PROMPT=${PROMPT:-What is machine learning?}

.venv/bin/gen-repo --model tiny-mpt --output "$OUT"

# free ports, so the demo never collides with another server on 8000-8002
read -r HTTP_PORT GRPC_PORT METRICS_PORT < <(.venv/bin/python -c '
from generator.serving.serve import free_port
print(free_port(), free_port(), free_port())')

.venv/bin/gen-repo serve --model-repository "$OUT/triton_repo" \
  --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT" &
SERVER_PID=$!
stop_server() { kill -TERM "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; }
trap stop_server EXIT

echo "--- gRPC, whole answer:"
echo "prompt: $PROMPT"
.venv/bin/gen-repo infer --wait 120 --url "127.0.0.1:$GRPC_PORT" --max-tokens 24 --exclude-input-in-output "$PROMPT"
echo "--- HTTP generate_stream, token by token:"
.venv/bin/gen-repo infer --protocol http --url "127.0.0.1:$HTTP_PORT" --stream --max-tokens 24 "$PROMPT"
echo "--- (tiny-mpt has random weights: the text is gibberish, but it is exactly transformers' greedy output)"
