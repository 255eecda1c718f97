#!/usr/bin/env bash
# A reduced-size `gen-repo eval` run on a GPU machine: for each model, build its repository, then evaluate
#   1. the engine dir directly (in process; under `mpirun -n TP` when TP > 1)  vs transformers, and
#   2. the served repository (tritonserver, gRPC ensemble, streaming off)    vs transformers,
# on the same prompts (gen-repo's own news set), greedy. Each run writes its JSON report to OUT/<model>/.
#
#   bash bench/eval_gpu.sh [OUT]                                   # tiny-mpt and tiny-dbrx, float32
#   DTYPE=bfloat16 bash bench/eval_gpu.sh                           # the same in bf16 (parity is then approximate)
#   TP=2 MODELS=tiny-mpt bash bench/eval_gpu.sh                     # two ranks (mpirun) for both engine paths
#   MODELS=mpt-7b MODEL_DIR=/models/mpt-7b DTYPE=float16 SAMPLES=20 OUTPUT_LEN=100 bash bench/eval_gpu.sh
#
# Environment: MODELS (presets, default "tiny-mpt tiny-dbrx"), MODEL_DIR (checkpoint of a real preset), DTYPE
# (float32), TP (1), SAMPLES (32), OUTPUT_LEN (tiny: 64, else 100), MAX_INPUT_LEN (tiny: 60, else 923),
# BATCH (8: requests in flight on the engine paths), GRPC_PORT (18001), GEN_REPO (.venv/bin/gen-repo).
# Tiny presets are random: their ROUGE is ~0; what matters there is the agreement and the timings.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-eval_gpu}
GEN=${GEN_REPO:-.venv/bin/gen-repo}
MPIRUN=${MPIRUN:-$(dirname "$GEN")/mpirun}
PY=${PYTHON:-$(dirname "$GEN")/python}
[ -x "$PY" ] || PY=python3
MODELS=${MODELS:-"tiny-mpt tiny-dbrx"}
DTYPE=${DTYPE:-float32}
TP=${TP:-1}
SAMPLES=${SAMPLES:-32}
BATCH=${BATCH:-8}
HTTP_PORT=${HTTP_PORT:-18000}
GRPC_PORT=${GRPC_PORT:-18001}
METRICS_PORT=${METRICS_PORT:-18002}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi: a CPU run"

summary() {  # one line per path and per agreement of a `gen-repo eval --json` report
  "$PY" - "$1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
for name, v in r["results"].items():
    print(f"{name:7s} rouge1 {v['rouge1']:6.2f} rouge2 {v['rouge2']:6.2f} rougeL {v['rougeL']:6.2f} rougeLsum "
          f"{v['rougeLsum']:6.2f}  latency {v['latency_s']:8.3f} s  tokens {v['output_tokens']:6d}  "
          f"{v['tokens_per_s']:9.1f} tok/s")
for a in r["agreement"]:
    print(f"{a['a']} vs {a['b']}: identical texts {a['identical_texts']}/{a['samples']}, identical tokens "
          f"{a['identical_token_ids']}/{a['samples']}, token match {a['token_match'] * 100:.2f}%")
EOF
}

for model in $MODELS; do
  dir="$OUT/$model-$DTYPE-tp$TP"
  case "$model" in
    tiny-*) hf="$dir/hf"; input_len=${MAX_INPUT_LEN:-60}; output_len=${OUTPUT_LEN:-64}; model_args=() ;;
    *) hf=${MODEL_DIR:?"MODEL_DIR=<checkpoint dir> is needed for $model"}; input_len=${MAX_INPUT_LEN:-923}
       output_len=${OUTPUT_LEN:-100}; model_args=(--model-dir "$MODEL_DIR") ;;
  esac
  echo "=== $model ($DTYPE, TP $TP): build"
  "$GEN" --model "$model" "${model_args[@]}" --output "$dir" --dtype "$DTYPE" --tp-size "$TP" > "$dir.build.log"
  common=(--hf-model-dir "$hf" --tokenizer-dir "$dir/tokenizer" --max-samples "$SAMPLES"
          --max-input-len "$input_len" --output-len "$output_len" --batch-size "$BATCH" --no-progress --json)

  echo "=== $model: engine dir vs transformers"
  launch=()
  if [ "$TP" -gt 1 ]; then launch=("$MPIRUN" --allow-run-as-root -n "$TP"); fi
  "${launch[@]}" "$GEN" eval --engine-dir "$dir/engine" "${common[@]}" > "$dir/eval_engine.json"
  summary "$dir/eval_engine.json"

  echo "=== $model: served ensemble vs transformers"
  "$GEN" serve --model-repository "$dir/triton_repo" --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" \
      --metrics-port "$METRICS_PORT" --log-file "$dir/tritonserver.log" > "$dir/serve.log" 2>&1 &
  server=$!
  status=0
  "$GEN" eval --url "127.0.0.1:$GRPC_PORT" --wait 900 "${common[@]}" > "$dir/eval_served.json" || status=$?
  kill -TERM "$server" 2>/dev/null || true
  wait "$server" || true
  if [ "$status" -ne 0 ]; then echo "served eval of $model failed ($status); see $dir/tritonserver.log"; exit "$status"; fi
  summary "$dir/eval_served.json"
done
