"""Faults injected into chosen trials through Ray's own `worker_process_setup_hook` (runs in
every worker before it unpickles the trainable): a CUDA out-of-memory error cannot happen on
a CPU, so it is raised the way PyTorch raises it; the NaN is real, made by poisoning one
adapter weight, so the trial's own divergence check is what catches it.

Which trials: rank 8 runs out of memory; module set `mlp` (at other ranks) diverges.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def run_search(driver: str, output: Path, name: str, sets: list[str]):
    """Run `python -c driver` (a script that starts Ray with the faults' hook, then calls
    search.run's main with its arguments) on `sets` as a run named `name` under `output`;
    return its exit code, run directory and trials.csv as a DataFrame."""
    import pandas as pd

    args = ["--output", str(output), "--name", name, *[x for s in sets for x in ("--set", s)]]
    result = subprocess.run([sys.executable, "-c", driver % str(ROOT), *args], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    run_dir = output / name
    assert (run_dir / "trials.csv").exists(), result.stdout[-2000:] + result.stderr[-3000:]
    return result.returncode, run_dir, pd.read_csv(run_dir / "trials.csv")


def install() -> None:
    import trainables.trial as trial

    original = trial._train

    def faulty_train(model, optimizer, scheduler, params, *rest):
        if params.lora_config["r"] == 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
        if params.module_set == "mlp":
            with torch.no_grad():
                next(p for name, p in model.named_parameters() if "lora_B" in name).fill_(float("nan"))
        return original(model, optimizer, scheduler, params, *rest)

    trial._train = faulty_train


def install_transient() -> None:
    """Every trial dies once, just after its second report (a lost node, a preempted GPU);
    the marker file beside its checkpoints remembers that it already did."""
    import os
    from pathlib import Path

    from ray import tune

    original_report = tune.report

    def report_then_fail_once(metrics, checkpoint=None):
        original_report(metrics, checkpoint=checkpoint)
        marker = Path(os.environ["FAULT_DIR"]) / f"{tune.get_context().get_trial_id()}.failed"
        if metrics["step"] >= 6 and not marker.exists():
            marker.touch()
            raise RuntimeError("worker lost (injected by the test)")

    tune.report = report_then_fail_once  # the trial looks tune.report up at call time


def install_out_of_memory_when_shared() -> None:
    """A rank-8 trial runs out of memory just after its first report whenever it shares its GPU
    (its share below 1; Ray is told of a GPU this CPU machine does not have, so the trial itself
    runs on the CPU); with a GPU to itself it trains to the end."""
    from ray import tune

    import trainables.trial as trial

    original_train, original_report = trial._train, tune.report
    rank = {}

    def train(model, optimizer, scheduler, params, *rest):
        rank["r"] = params.lora_config["r"]
        return original_train(model, optimizer, scheduler, params, *rest)

    def report_then_run_out_of_memory(metrics, checkpoint=None):
        original_report(metrics, checkpoint=checkpoint)
        share = tune.get_context().get_trial_resources().required_resources.get("GPU", 0)
        if rank["r"] == 8 and share < 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test: "
                                         f"the trial shares its GPU, {share:g} of it)")

    trial._train, tune.report = train, report_then_run_out_of_memory
