"""Two GPUs against one: trials per hour of the same search, and one trial spread over both.

    python bench/scaling.py [--parts search,spread] [--samples 32]

Needs a machine with two or more GPUs. Each search runs as `python -m search.run` in its own
process, its GPUs chosen with CUDA_VISIBLE_DEVICES (what Ray counts when it starts), so the
two runs differ in nothing else.

- `search`: the reference task at the grid's budget (bench/search_vs_grid.py's settings, 100
  steps of 8 sequences a trial, ASHA at 50 and 100), `--samples` trials, once on GPU 0 alone
  and once on GPUs 0 and 1; with the default 1/8 GPU a trial, 8 slots against 16. Figures:
  `scaling_trials_per_hour_2gpu` (trials ended per hour on two GPUs over one; a trial ends
  finished or stopped by ASHA; the wall time includes Ray's start, every stage and the
  report, so a short search cannot double) and `scaling_steps_per_hour_2gpu` (the same with
  the optimizer steps the trials ran: the searcher's proposals and ASHA's decisions depend on
  how many trials run at once, so the runs are not the same trials).
- `spread`: a random-init Llama of 1.2B parameters (step_modes' 1B shape with SmolLM2's
  vocabulary, saved as a checkpoint), a 2-trial search of 20 steps with
  `resources.gpus_per_trial=2` (the trial loads the model with `device_map="auto"`, its layers
  on both GPUs) and the same with `gpus_per_trial=1`: both must finish; their step mode,
  tokens per second and peak memory (all GPUs of the trial together).
Writes bench/results/scaling.json and adds its figures to summary.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from search_vs_grid import RESULTS, busy_windows, facts_overrides, reports_by_trial, union_seconds  # noqa: E402

from analysis.render import own_total  # noqa: E402

# the spread part's search, after the reference task's settings for 2 trials of 20 steps
SPREAD_SETS = ["budget.warmup_steps=2", "selection.promote=false", "selection.confirm_top_k=0",
               "search.module_sets=[all_linear]", "search.ranks=[16]"]


def run_search(devices: str, sets: list[str], output: Path, name: str, timeout: float) -> dict:
    """One `python -m search.run` on the GPUs `devices`; its wall time, exit code and trials."""
    import pandas as pd

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": devices}
    command = [sys.executable, "-m", "search.run", "--output", str(output), "--name", name,
               *[x for s in sets for x in ("--set", s)]]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - started
    run_dir = output / name
    result = {"devices": devices, "exit_code": done.returncode, "wall_seconds": wall,
              "log_tail": (done.stdout + done.stderr)[-3000:]}
    if not (run_dir / "trials.csv").exists():
        return result
    trials = pd.read_csv(run_dir / "trials.csv")
    ended = trials[trials.status.isin(["finished", "stopped"])]
    steps = int(own_total(ended, "step"))  # a promoted trial's own steps, not its parent's again
    reports = reports_by_trial(run_dir)
    pick = json.loads((run_dir / "pick.json").read_text()) if (run_dir / "pick.json").exists() else {}
    result.update({
        "trials": len(trials), "trials_by_status": trials.status.value_counts().to_dict(),
        "trials_ended": len(ended), "steps": steps,
        "trials_per_hour": len(ended) / wall * 3600, "steps_per_hour": steps / wall * 3600,
        "busy_seconds": union_seconds(busy_windows(reports)),
        "pick_eval_loss": pick.get("value"),
        "rows": trials[["trial_id", "status", "origin", "step", "eval_loss", "tokens_per_second", "peak_memory_gb",
                        "train_seconds", "step_mode", "error"]].to_dict(orient="records"),
    })
    return result


def build_spread_model(path: Path) -> int:
    """A random-init 1.2B Llama with SmolLM2's tokenizer, saved in bf16; its parameter count."""
    import torch
    from step_modes import llama_1b_config
    from transformers import AutoTokenizer, LlamaForCausalLM

    from trainables.model import smollm2_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    config = llama_1b_config()
    config.vocab_size, config.pad_token_id = len(tokenizer), tokenizer.pad_token_id
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    with torch.device("cuda", 0):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return params


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="search,spread")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=400, help="seconds for each search")
    args = parser.parse_args()
    import peft
    import ray
    import torch
    import transformers

    from trainables.model import smollm2_checkpoint

    parts = set(args.parts.split(","))
    gpus = torch.cuda.device_count()
    if gpus < 2:
        print(f"bench/scaling.py needs two GPUs; this machine has {gpus}", file=sys.stderr)
        return 2
    smollm2_checkpoint()  # the embedded model's one-time conversion, before any clock
    record = {
        "benchmark": "scaling",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{gpus} x {torch.cuda.get_device_name(0)}",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "ray": ray.__version__, "python": platform.python_version()},
        "samples": args.samples, "search": {}, "spread": {},
    }
    path = RESULTS / "scaling.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    figures = dict(previous.get("figures", {}))
    for part in ("search", "spread"):  # a part not run this time keeps its last record
        if part not in parts and previous.get(part):
            record[part] = previous[part]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if "search" in parts:
            sets = facts_overrides(args.samples, 100, 1200, "auto")
            for devices in ("0", "0,1"):
                record["search"][devices] = run_search(devices, sets, scratch, f"gpus-{devices.replace(',', '')}",
                                                       args.timeout)
                row = record["search"][devices]
                print(f"GPUs {devices}: exit {row['exit_code']}, {row['wall_seconds']:.0f} s, "
                      f"{row.get('trials_ended')} trials ended, {row.get('steps')} steps", flush=True)
        if "spread" in parts:
            model_dir = scratch / "llama-1.2b"
            record["spread"]["total_params"] = build_spread_model(model_dir)
            for devices, share in (("0,1", 2), ("0", 1)):
                key = f"gpus_per_trial={share}"
                sets = [*facts_overrides(2, 20, 64, str(share)), f"model.path={model_dir}", *SPREAD_SETS]
                record["spread"][key] = run_search(devices, sets, scratch, f"spread-{share}", args.timeout)
                row = record["spread"][key]
                print(f"{key}: exit {row['exit_code']}, {row['wall_seconds']:.0f} s, {row.get('trials_by_status')}",
                      flush=True)
    one, two = record["search"].get("0", {}), record["search"].get("0,1", {})
    if one.get("trials_per_hour") and two.get("trials_per_hour"):
        figures["scaling_trials_per_hour_2gpu"] = two["trials_per_hour"] / one["trials_per_hour"]
        figures["scaling_steps_per_hour_2gpu"] = two["steps_per_hour"] / one["steps_per_hour"]
    spread = record["spread"].get("gpus_per_trial=2", {})
    if spread:
        figures["spread_trial_finished"] = spread.get("exit_code") == 0 and \
            spread.get("trials_by_status", {}).get("finished", 0) >= 1
    record["figures"] = figures
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str))
    summary_path = RESULTS / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.update({k: v for k, v in figures.items() if k.startswith("scaling_")})
    summary_path.write_text(json.dumps(summary, indent=2))

    print(f"\n{'search on':<12}{'wall s':>8}{'ended':>7}{'steps':>7}{'trials/h':>10}{'steps/h':>9}{'busy s':>8}{'pick':>8}")
    for devices, row in record["search"].items():
        if "trials" in row:
            print(f"GPUs {devices:<7}{row['wall_seconds']:>8.0f}{row['trials_ended']:>7}{row['steps']:>7}"
                  f"{row['trials_per_hour']:>10.0f}{row['steps_per_hour']:>9.0f}{row['busy_seconds']:>8.0f}"
                  f"{row['pick_eval_loss'] or float('nan'):>8.4f}")
    for key, row in record["spread"].items():
        if isinstance(row, dict):
            for trial in row.get("rows", []):
                print(f"1.2B {key}: {trial['status']} at step {trial['step']}, {trial['step_mode']}, "
                      f"{trial['tokens_per_second']:.0f} tokens/s, peak {trial['peak_memory_gb']:.1f} GB"
                      + (f", error {trial['error']}" if isinstance(trial['error'], str) else ""))
    print("figures:", json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
