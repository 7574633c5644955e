#!/usr/bin/env bash
# The reference search, two versions of the tree alternated on one GPU machine (its timings vary by 10% from
# run to run, and more from machine to machine). On the machine, after the staging of gpu/README.md:
#   BUDGET=265 bash bench/ab_search.sh CHANGE.patch new base new base
# CHANGE.patch (git diff BEFORE..AFTER, carried with the tree) is taken back for each run named "base"; a run
# named "layers" adds resources.pack_compile_layers=true, one named "nolayers" false (the default, auto, compiles
# them on a GPU). No run starts after BUDGET seconds. Each run's log
# and JSON go into $OUT/runs.tgz, rewritten after each run, so a call cut short still returns the runs it made.
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
patchfile=$1; shift; S=$(date +%s); mkdir -p /tmp/r; i=0
for v in "$@"; do
  i=$((i+1)); [ $(( $(date +%s) - S )) -gt ${BUDGET:-430} ] && break
  [ "$v" = base ] && patch -R -p1 -s < "$patchfile"
  a=search_vs_grid; [ "$v" = layers ] && a="search_vs_grid:--set=resources.pack_compile_layers=true"
  [ "$v" = nolayers ] && a="search_vs_grid:--set=resources.pack_compile_layers=false"
  OUT=/tmp/r bash bench/device.sh "$a" > /tmp/r/console_${i}_$v.txt 2>&1
  mv /tmp/r/search_vs_grid.json /tmp/r/search_${i}_$v.json 2>/dev/null
  [ "$v" = base ] && patch -p1 -s < "$patchfile"
  echo "run $i $v at $(( $(date +%s) - S )) s: $(grep -E 'search \(this run\)' /tmp/r/console_${i}_$v.txt)"
  grep -o '"trainer_time": .*' /tmp/r/console_${i}_$v.txt | head -1
  tar czf "$OUT/runs.tgz" -C /tmp/r .
done
tar czf "$OUT/runs.tgz" -C /tmp/r .
