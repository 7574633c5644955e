#!/usr/bin/env bash
# one sitting: install the staged wheels, then the 8B pack at K=16 with its capture in passes, then
# inductor's warm-up before a shared trainer's start (start_profile), all outputs tarred into $OUT
set -x
mkdir -p /tmp/stage && cp .stage/7/* /tmp/stage/ && cd /tmp/stage && cat ray.part_* > "$(cat ray.name)" && rm ray.part_* \
  && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ./*.whl
cd - >/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 LORA_SEARCH_CACHE=/tmp/lscache PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p "$R"
source bench/bytecode.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$R/gpu.txt"
git log --oneline -1 > "$R/tree.txt" 2>/dev/null
timeout 320 python bench/shared_packing.py --llama8b --slots 1,16 --modes compiled_layers > "$R/llama8b_passes.txt" 2>&1
cp bench/results/shared_packing_8b*.json "$R/" 2>/dev/null
python -c "import torch; from transformers import AutoConfig, AutoModelForCausalLM as M; c=AutoConfig.from_pretrained('.stage/rand'); torch.manual_seed(0); M.from_config(c, dtype=torch.float32).save_pretrained('/tmp/lscache/smollm2-135m-instruct')" \
  && cp .stage/rand/* /tmp/lscache/smollm2-135m-instruct/
for v in cold warm plain; do
  flag=""; [ $v = warm ] && flag=--warm
  timeout 80 python bench/start_profile.py $flag > "$R/start_$v.txt" 2>&1; mv "$R/start_$v.txt" "$R/start_${v}_$(date +%s).txt"
done
grep -h "tokens/s\|memory\|wrote" "$R/llama8b_passes.txt" | cut -c1-400
for f in "$R"/start_*; do echo "$f"; grep -E "^[a-z_ ,()]+: [0-9.]+ s$|^captured:|Error" "$f" | cut -c1-200; done
tar czf "$OUT/runs.tgz" -C "$OUT" r && rm -rf "$R"; tar tzf "$OUT/runs.tgz"
