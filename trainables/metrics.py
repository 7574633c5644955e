"""What a trial reports, built the same way by both trainers: where it stands (`Progress`), the
memory it held, and the `TrialReport` of an evaluation round."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import torch

from rundir.report import TrialReport
from trainables.evaluation import Evaluation

WORKER_STARTED = time.time()  # when this worker process first loaded the trial code (a reused worker keeps it)


@dataclass
class Progress:
    """Where a trial stands. The counters continue from a checkpoint; the clock readings (epoch
    seconds) are this call's, for bench/search_vs_grid.py's account of where a search's time goes."""

    called_at: float          # when Tune called the trial function
    imported_at: float        # when it had imported PEFT; its setup runs from here to the first busy_from
    busy_from: float = 0.0    # since when it has done nothing but train and evaluate (restarts at each report)
    step: int = 0             # optimizer steps taken
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    generate_seconds: float = 0.0  # the part of eval_seconds spent generating answers
    tokens: int = 0           # real (unpadded) tokens trained on
    worker_started_at: float = WORKER_STARTED  # when the trial's process loaded its code (a shared trial's client's)

    def metrics(self) -> dict:
        """The report's keys that come from here; `busy_to` is now."""
        return {
            "step": self.step,
            "train_seconds": self.train_seconds,
            "tokens_per_second": self.tokens / self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "eval_generate_seconds": self.generate_seconds,
            "busy_from": self.busy_from,
            "busy_to": time.time(),
            "called_at": self.called_at,
            "entered_at": self.imported_at,
            "worker_started_at": self.worker_started_at,
        }


def process_peak_gb(cuda: bool) -> float:
    """GPU: the most this trial's process held on its GPUs, as `nvidia-smi` counts a process (a
    cluster is sized from it): the allocator's peak reserve plus what the process holds outside
    the allocator (`outside_allocator`). CPU: the worker process's peak resident set."""
    if cuda:
        # a trial given several GPUs (device_map="auto") counts them all
        reserved = sum(torch.cuda.max_memory_reserved(i) for i in range(torch.cuda.device_count()))
        return (reserved + outside_allocator()[0]) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def allocated_peak_gb(cuda: bool) -> float:
    """GPU: the allocator's own peak, the tensors alone, over the trial's GPUs. CPU: as
    `process_peak_gb` (no allocator keeps a peak there)."""
    if cuda:
        return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**30
    return process_peak_gb(cuda)


# The CUDA context, which only NVML sees (it exists before the allocator's first byte): an
# estimate per GPU where pynvml is not installed; bench/memory_share.py prints NVML's figure.
CONTEXT_BYTES = 600 * 2**20


def outside_allocator() -> tuple[int, str]:
    """Bytes this process holds on its GPUs outside PyTorch's allocator (the CUDA context,
    cuBLAS's and CUDA graphs' own memory) and where the figure comes from: "nvml" (the
    process's memory as `nvidia-smi` lists it, less the allocator's reserve now), or
    "estimate" (CONTEXT_BYTES per GPU it used) where pynvml is not installed."""
    import os

    devices = [i for i in range(torch.cuda.device_count()) if torch.cuda.max_memory_reserved(i)]  # those it used
    try:
        import pynvml
    except ImportError:
        return CONTEXT_BYTES * len(devices), "estimate"
    pynvml.nvmlInit()
    try:
        held = sum(process.usedGpuMemory or 0 for index in range(pynvml.nvmlDeviceGetCount())
                   for process in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(index))
                   if process.pid == os.getpid())
    finally:
        pynvml.nvmlShutdown()
    return max(0, held - sum(torch.cuda.memory_reserved(i) for i in devices)), "nvml"


def trial_report(progress: Progress, evaluation: Evaluation, answered: dict[str, float | list[float]],
                 train_loss: float, trainable_params: int, total_params: int, cuda: bool, step_mode: str,
                 pack_size: int | None = None, trainer_pid: int | None = None) -> TrialReport:
    """The report of an evaluation round: `evaluation`, `answered` (the answer metrics,
    trainables/generate.py, or {}), the mean `train_loss` since the last report, the adapter's
    `trainable_params` (and their share of the base model's `total_params`), the memory peaks,
    `step_mode` and `progress`'s counters and clock readings; the shared trainer's `pack_size`
    and `trainer_pid`."""
    return TrialReport.from_dict({
        **evaluation.metrics(), **answered, "train_loss": train_loss, "trainable_params": trainable_params,
        "trainable_pct": 100.0 * trainable_params / total_params, "peak_memory_gb": process_peak_gb(cuda),
        "peak_allocated_gb": allocated_peak_gb(cuda), "step_mode": step_mode, "pack_size": pack_size, "trainer_pid": trainer_pid,
        **progress.metrics()})
