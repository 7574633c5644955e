#!/usr/bin/env bash
# The sweeps that chose the search's defaults, on a landscape (default: the atlas landscape of the
# embedded default): one simulator sweep per default, 100 simulated searches per policy and value,
# each a JSON and a PNG under bench/results/defaults_<landscape>/. Runs two sweeps at a time
# (about 20 minutes on a 2-core CPU). Then `python bench/simulate.py --landscape ... --set ...`
# with the chosen values against today's gives the figures of docs/landscape.md.
#   bash bench/choose_defaults.sh [bench/landscapes/atlas_cpu] [extra --set KEY=VALUE ...]
set -uo pipefail  # a sweep that fails is listed at the end; the others still run
cd "$(dirname "$0")/.."
landscape=${1:-bench/landscapes/atlas_cpu}; shift || true
out=bench/results/defaults_$(basename "$landscape"); mkdir -p "$out"
sweep() {  # KEY=V1,V2,... "policies" [--set=KEY=VALUE ...]
  local spec=$1 names=$2; shift 2
  local key=${spec%%=*} policies=()
  for policy in ${names:-search random_asha hand_grid}; do policies+=(--policy "$policy"); done
  python bench/simulate.py --landscape "$landscape" --seeds "${SEEDS:-100}" "${policies[@]}" "$@" --sweep "$spec" \
    --out "$out/${key##*.}.json" > "$out/${key##*.}.txt" 2>&1
}
export -f sweep; export landscape out
set -- "${@/#/--set=}"
pids=()
for spec in "budget.num_samples=4,6,8,12,16" "budget.reduction_factor=2,3,4" "budget.grace_period=10,20" \
            "search.priors=auto,none|search" "selection.confirm_top_k=0,1,2,3|search" "selection.cheaper=0,1,2,4|search" \
            "selection.confirm_max_seeds=2,3,4|search" \
            "eval_rows=8,16,32|search" "search.learning_rate=[2.0e-4,3.0e-3],[7.7e-4,3.0e-3]|search random_asha" \
            "search.module_sets=[attention_qv,attention,mlp,all_linear],[attention,mlp,all_linear],[mlp,all_linear]|search random_asha"; do
  sweep "${spec%%|*}" "$( [[ $spec == *"|"* ]] && echo "${spec#*|}" )" "$@" &
  pids+=($!)
  if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
wait
tail -n 2 "$out"/*.txt
! grep -l "^error" "$out"/*.txt
