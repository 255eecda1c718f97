#!/usr/bin/env bash
# TP1 vs TP2 of MPT-7B shapes (bf16, 128/128, engine alone, weights made on the GPUs) in one lease, with the
# multi-rank switches A/B: GEN_REPO_TP_ALLREDUCE (fused | oneshot | nccl) and GEN_REPO_STEP_STREAM (1 | 0).
#   bash bench/tp_scaling.sh OUT_DIR [batch sizes, default 1,64] [what, default all of:
#       allreduce,tp2_before,tp2_nccl_stream,tp2_oneshot_nostream,tp2_oneshot,tp2_after]
# TP1 always runs. `allreduce` is bench/tp_allreduce_gpu.py; `tp2_before` is NCCL with the step messages on the
# compute stream; `tp2_oneshot` the one-shot all-reduce alone; `tp2_after` the defaults (all-reduce fused with the
# residual add and LayerNorm, side stream).
set -u
cd "$(dirname "$0")/.."
out=${1:?output dir}
batches=${2:-1,64}
what=${3:-allreduce,tp2_before,tp2_nccl_stream,tp2_oneshot_nostream,tp2_oneshot,tp2_after}
mkdir -p "$out"
export PYTHONPATH=$PWD
shape=(--hidden 4096 --layers 32 --heads 32 --vocab 50432 --dtype bfloat16 --weights-on-device
       --batch-sizes "$batches" --input-len 128 --output-len 128)
wanted() { [[ ",$what," == *",$1,"* ]]; }
run() {  # name, "VAR=value ...", extra bench args...
    local name=$1 variables=$2; shift 2
    echo "== $name" | tee -a "$out/summary.txt"
    # timeout signals its whole process group, so the spawned ranks end with it
    # shellcheck disable=SC2086 # the variables are words on purpose
    env $variables timeout -k 10 240 python3 -m generator bench "${shape[@]}" --json "$out/$name.json" "$@" \
        > "$out/$name.log" 2>&1
    echo "rc $?" >> "$out/summary.txt"
    grep -E "^batch|KV cache|ready|symmetric" "$out/$name.log" | tee -a "$out/summary.txt"
}
nvidia-smi topo -m > "$out/topo.txt" 2>&1
if wanted allreduce; then
    timeout 120 python3 -m torch.distributed.run --nproc-per-node 2 bench/tp_allreduce_gpu.py 2>&1 \
        | grep -v Warning | tee "$out/allreduce.txt"
fi
run tp1 "CUDA_VISIBLE_DEVICES=0"
if wanted tp2_before; then run tp2_before "GEN_REPO_TP_ALLREDUCE=nccl GEN_REPO_STEP_STREAM=0" --nproc 2; fi
if wanted tp2_nccl_stream; then run tp2_nccl_stream "GEN_REPO_TP_ALLREDUCE=nccl GEN_REPO_STEP_STREAM=1" --nproc 2; fi
if wanted tp2_oneshot_nostream; then
    run tp2_oneshot_nostream "GEN_REPO_TP_ALLREDUCE=oneshot GEN_REPO_STEP_STREAM=0" --nproc 2
fi
if wanted tp2_oneshot; then run tp2_oneshot "GEN_REPO_TP_ALLREDUCE=oneshot GEN_REPO_STEP_STREAM=1" --nproc 2; fi
if wanted tp2_after; then run tp2_after "GEN_REPO_TP_ALLREDUCE=fused GEN_REPO_STEP_STREAM=1" --nproc 2; fi
