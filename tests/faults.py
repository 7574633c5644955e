"""Faults injected into chosen trials through Ray's own `worker_process_setup_hook` (runs in
every worker before it unpickles the trainable): a CUDA out-of-memory error cannot happen on
a CPU, so it is raised the way PyTorch raises it; the NaN is real, made by poisoning one
adapter weight, so the trial's own divergence check is what catches it.

Which trials: rank 8 runs out of memory; module set `mlp` (at other ranks) diverges.
"""

from __future__ import annotations

import torch


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
    import trainables.trial as trial
    from ray import tune

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
