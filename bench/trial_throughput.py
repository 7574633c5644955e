"""Trial throughput and packing on one GPU, side by side with the hand-made Trainer setup.

    python bench/trial_throughput.py [--steps 100] [--anchor-steps 30] [--packing 1,2,4,8]

1. The anchor: Hugging Face Trainer + PEFT, all seven Llama projections r=16 RSLoRA alpha 16,
   micro-batch 2 x gradient accumulation 4, lr 2e-4, cosine, 10 warm-up steps, bf16 (the grid's
   anchor), on the builtin atlas task, SmolLM2-135M-Instruct.
2. One of our trials, same model, configuration, data and 8 sequences per optimizer step, run
   through the real search (Ray Tune, one trial, no early stopping): its own tokens_per_second
   (its train_seconds include the CUDA graph's capture), with `resources.cuda_graphs` on (the
   default) and off.
3. Packing: N concurrent trials on the one GPU (gpus_per_trial = 1/N), aggregate tokens/s,
   with CUDA graphs.

Prints a short table last and writes bench/results/trial_throughput.json (device, versions,
date, figures) and updates bench/results/summary.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
from bench.grid import ALL_SEVEN  # noqa: E402 - after the path is set
from rundir.params import Origin  # noqa: E402


def trainer_tokens_per_second(model_path: str, steps: int) -> dict:
    """The anchor setup's training throughput, timed per optimizer step after 5 warm-up steps."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from bench.grid import anchor_trainer
    from search.inputs.data import prepare
    from trainables.config import DataConfig

    splits, _ = prepare(DataConfig(), AutoTokenizer.from_pretrained(model_path), seed=0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).cuda()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, use_rslora=True, target_modules=ALL_SEVEN,
                                             task_type="CAUSAL_LM"))
    train = splits["train"]
    step_times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.started)

    with tempfile.TemporaryDirectory() as out:
        trainer = anchor_trainer(model, model_path, train, steps, out, cuda=True, callbacks=[Clock()])
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
    mean_tokens = sum(len(x) for x in train["input_ids"]) / len(train)
    per_step = sum(step_times[5:]) / len(step_times[5:])
    return {"seconds_per_step": per_step, "tokens_per_second": 8 * mean_tokens / per_step, "wall_seconds": wall,
            "steps": steps}


def search_trials(concurrent: int, steps: int, output: Path, cuda_graphs: bool = True) -> dict:
    """`concurrent` identical-config trials through the real search, sharing the GPU."""
    import pandas as pd

    from search.run import main

    name = f"packing-{concurrent}-{'graph' if cuda_graphs else 'eager'}"
    sets = ["search.module_sets=[[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]]", "search.ranks=[16]",
            "search.alpha_ratios=[1.0]", "search.use_rslora=[true]", "search.dropout=[0.0,0.0]",
            "search.learning_rate=[2e-4,2e-4]", f"budget.num_samples={concurrent}", f"budget.max_steps={steps}",
            f"budget.eval_every={steps}", f"budget.grace_period={steps}", "budget.batch_size=8",
            "budget.warmup_steps=10", f"resources.gpus_per_trial={1 / concurrent}", "resources.cpus_per_trial=1",
            "selection.promote=false", "selection.confirm_top_k=0", "data.eval_examples=32",
            f"resources.cuda_graphs={str(cuda_graphs).lower()}"]
    started = time.perf_counter()
    with GpuMemorySampler() as memory:
        code = main(["--output", str(output), "--name", name, "--overwrite", *[x for s in sets for x in ("--set", s)]])
    wall = time.perf_counter() - started
    trials = pd.read_csv(output / name / "trials.csv")
    trials = trials[trials.origin.isin([o.value for o in Origin if o.proposed])]
    return {"exit_code": code, "trials": len(trials), "tokens_per_second_each": trials.tokens_per_second.tolist(),
            "tokens_per_second_total": float(trials.tokens_per_second.sum()),
            "train_seconds_each": trials.train_seconds.tolist(), "wall_seconds": wall,
            "step_modes": trials.step_mode.fillna("none").tolist(),  # "none": a trial without a report
            # what packing costs: every trial process holds its own CUDA context and base model
            "gpu_memory_gb_peak_total": memory.peak_total_gb, "gpu_memory_gb_peak_per_process": memory.peak_per_process_gb}


class GpuMemorySampler:
    """Polls nvidia-smi twice a second while the block runs: the peak memory in use on the GPU
    and each process's peak (CUDA context included, which torch's own counters leave out).
    Both None where nvidia-smi is missing."""

    def __enter__(self):
        import shutil
        import threading

        self.peak_total_gb = self.peak_per_process_gb = None
        self._per_process: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True) if shutil.which("nvidia-smi") else None
        if self._thread:
            self.peak_total_gb = 0.0
            self._thread.start()
        return self

    def _poll(self) -> None:
        import subprocess

        while not self._stop.wait(0.5):
            total = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                   capture_output=True, text=True).stdout.split()
            apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True).stdout.splitlines()
            if total:
                self.peak_total_gb = max(self.peak_total_gb, float(total[0]) / 1024)
            for line in apps:
                pid, used = (x.strip() for x in line.split(","))
                self._per_process[pid] = max(self._per_process.get(pid, 0.0), float(used) / 1024)

    def __exit__(self, *exc):
        if self._thread:
            self._stop.set()
            self._thread.join()
            self.peak_per_process_gb = sorted(self._per_process.values(), reverse=True)
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--anchor-steps", type=int, default=30)
    parser.add_argument("--packing", default="1,2,4,8")
    args = parser.parse_args()
    import peft
    import ray
    import torch
    import transformers

    from trainables.model import smollm2_checkpoint

    model_path = str(smollm2_checkpoint())
    anchor = trainer_tokens_per_second(model_path, args.anchor_steps)
    packing = {}
    with tempfile.TemporaryDirectory() as output:
        eager = search_trials(1, args.steps, Path(output), cuda_graphs=False)
        print("eager", json.dumps(eager), flush=True)
        for n in [int(x) for x in args.packing.split(",")]:
            packing[n] = search_trials(n, args.steps, Path(output))
            print(n, json.dumps(packing[n]), flush=True)
    one = packing[min(packing)]["tokens_per_second_total"]
    best_n = max(packing, key=lambda n: packing[n]["tokens_per_second_total"])
    figures = {
        "trial_speedup": one / anchor["tokens_per_second"],
        "trial_speedup_eager": eager["tokens_per_second_total"] / anchor["tokens_per_second"],
        "packing_speedup": packing[best_n]["tokens_per_second_total"] / one,
        "packing_best_concurrent": best_n,
    }
    record = {
        "benchmark": "trial_throughput",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "ray": ray.__version__, "python": platform.python_version()},
        "config": "all seven projections, r=16, alpha 16, RSLoRA, 8 sequences per optimizer step, atlas task, SmolLM2-135M",
        "anchor_trainer": anchor,
        "one_trial_eager": eager,
        "packing": packing,
        "figures": figures,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "trial_throughput.json").write_text(json.dumps(record, indent=2))
    summary_path = RESULTS / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.update({k: figures[k] for k in ("trial_speedup", "packing_speedup")}, device=record["device"], date=record["date"])
    summary_path.write_text(json.dumps(summary, indent=2))
    print(f"\n{'setup':<34}{'tokens/s':>12}")
    print(f"{'Trainer (2 x 4 accumulation)':<34}{anchor['tokens_per_second']:>12,.0f}")
    print(f"{'our trial, eager steps':<34}{eager['tokens_per_second_total']:>12,.0f}")
    for n, p in packing.items():
        print(f"{f'our trials, graph, {n} on the GPU':<34}{p['tokens_per_second_total']:>12,.0f}")
    print(f"trial_speedup {figures['trial_speedup']:.2f}  packing_speedup {figures['packing_speedup']:.2f} (at {best_n})")
    for n, p in packing.items():
        print(f"{n} on the GPU: peak GPU memory {p['gpu_memory_gb_peak_total']} GB in all, per process "
              f"{p['gpu_memory_gb_peak_per_process']} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
