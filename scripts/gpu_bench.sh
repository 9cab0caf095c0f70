#!/usr/bin/env bash
# bench.py's GPU rows in one call of under 10 minutes, the issue's targets first: each part has its own time limit
# and JSON (bench.py rewrites it after every row, and a row's times before its memory runs, which compile again), so
# a part cut short keeps what it measured and the next part still runs. Parts' limits add up to 540 s.
# Random weights (the 135M and Llama-3.2-1B shapes): no model files to bring.
#   bash scripts/gpu_bench.sh [out folder]      (default: $OUT where set, else results/bench)
set -u -o pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-results/bench}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=$(command -v python3 || command -v python)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$out/gpu-bench.log"
part() {  # part NAME SECONDS bench.py-options...
  local name=$1 limit=$2; shift 2
  echo "== $name, at most ${limit}s: bench.py $*" | tee -a "$out/gpu-bench.log"
  timeout "$limit" "$python" bench.py --output "$out/gpu-$name.json" "$@" 2>&1 | tee -a "$out/gpu-bench.log"
  echo "== $name exit ${PIPESTATUS[0]} (124: cut at ${limit}s)" | tee -a "$out/gpu-bench.log"
}
# 135M shape, 16 x 1024, r=8, compiled: >= 1.3x transformers + peft tokens/s at <= 0.7x its peak memory
part 135m-compile 220 --shapes 135m --batch 16 --rank 8 --rows train --mode compile --sides ours,theirs-autocast
# 1B shape, 8 x 1024, r=8, compiled: >= 55% MFU
part 1b-compile 110 --shapes 1b --batch 8 --rank 8 --rows train --mode compile --sides ours --no-memory
# decode >= 1.5x transformers' generate; prefill
part inference 80 --shapes 135m,1b --rows prefill,decode
# PrunedLoRA's statistics and events <= 5% of training time, at its start rank
part rankprune 50 --shapes 135m,1b --batch 8 --rows rankprune --rank0 64,512 --mode eager --steps 2 --repeats 3
# eager rows, r = 8 and 512, and the model compacted to half its width
part eager 80 --shapes 135m,1b --batch 8 --rows train,compact --rank 8,512 --mode eager --no-memory
