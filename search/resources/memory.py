"""How much of a GPU one trial gets, from what a trial measurably holds there.

A trial's process holds more than its tensors: the allocator's cache, CUDA-graph pools, the
CUDA context, and eval batches whose logits span the vocabulary. On an H200, 270M-parameter
trials with a 262k-token vocabulary reported an allocator peak of 11.3-11.6 GB while
`nvidia-smi` saw their processes hold 6.7 to 25.7 GB, and eight to a GPU ran out of memory.
So `gpus_per_trial: auto` is sized from one trial's measured footprint (`probe`), and a
trial that runs out of memory beside others runs again with a larger share (`larger_share`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from rundir.runconfig import MemoryProbe

SHARES = (0.125, 0.25, 0.5, 1.0)  # 8, 4, 2 or 1 trials to a GPU, as the rule by parameter count packs


def ran_out_of_memory(error_text: str) -> bool:
    """Whether a trial's error (Ray's `error.txt`) is PyTorch's CUDA out-of-memory error."""
    return "OutOfMemoryError" in error_text or "CUDA out of memory" in error_text


def share_for(footprint_gb: float, gpu_gb: float, margin: float) -> float:
    """The smallest share 1/n (n = 8, 4, 2, 1) for which n trials, each holding `footprint_gb`
    grown by `margin` (a fraction of it: what the probe's single step does not see), fit in
    `gpu_gb`: n * footprint_gb * (1 + margin) <= gpu_gb. 1.0 when not even one fits (a trial
    then has the GPU to itself, and may still run out of memory)."""
    for share in SHARES:
        if footprint_gb * (1 + margin) / share <= gpu_gb:
            return share
    return 1.0


def larger_share(share: float) -> float | None:
    """The share for a trial that ran out of memory at `share`: twice it (half the neighbours),
    at most the whole GPU; None when it already had a GPU to itself (or ran without one), so the
    failure is the configuration's own."""
    if share <= 0 or share >= 1:
        return None
    return min(1.0, 2 * share)


@dataclass(frozen=True)
class ProbeSpec:
    """What the probe trains: the heaviest configuration of the space at the run's shapes.
    Plain values, so it crosses into the probe's own process by pickle."""

    model_path: str
    dtype: str
    quantization: str
    trust_remote_code: bool
    gradient_checkpointing: bool
    lora_config: dict       # PEFT's LoraConfig arguments: the largest rank, widest module set, DoRA if in the space
    batch_size: int
    max_length: int         # every probe row is this long, and all of it is answer: the widest batches a trial makes
    cuda_graphs: bool
    compiled: bool


class Probe(MemoryProbe):
    """One trial's measured footprint on this machine's GPU, and the share chosen from it: the
    record `run_config.json` keeps as `resources.memory_probe`, with its line for the console."""

    def line(self) -> str:
        """The probe in one line, for the console and the dry run."""
        neighbours = round(1 / self.share)
        return (f"memory probe: one trial of the heaviest configuration (r={self.lora_config['r']}, "
                f"{_names(self.lora_config)} module names{', DoRA' if self.lora_config.get('use_dora') else ''}) "
                f"held {self.footprint_gb:.1f} GB ({self.source}; allocator peak {self.allocated_gb:.1f} GB, reserved "
                f"{self.reserved_gb:.1f} GB, outside the allocator {self.context_gb:.1f} GB) of a {self.gpu_gb:.0f} GB GPU; "
                f"with margin {self.margin:g}: gpus_per_trial {self.share:g} ({neighbours} trial{'s' if neighbours > 1 else ''} "
                f"to a GPU), "
                + ("measured by an earlier run on this GPU" if self.cached else f"measured in {self.seconds:.0f} s"))


def _names(lora_config: dict) -> int:
    """How many names a LoraConfig targets: its modules and its expert weights."""
    return len(lora_config["target_modules"]) + len(lora_config.get("target_parameters", []))


def heaviest_lora_config(resolved: dict, ranks: list[int], use_dora: list[bool], dropout: list[float] | float) -> dict:
    """The space's configuration that holds the most memory: the largest rank on the module set
    that adapts the most layers and expert weights, DoRA where the space has it (it keeps each
    weight's norm and a full-size product per step), and the highest dropout (its masks are kept
    for backward); neither where the set holds them fixed (its expert weights: HELD_FIXED)."""
    from search.tuning.space import lora_config

    widest = max(resolved.values(), key=lambda m: (len(m.layers) + len(m.parameters), len(m.target_modules)))
    highest = max(dropout) if isinstance(dropout, list) else dropout
    return lora_config(widest, max(ranks), 2.0, 0.0 if widest.holds_fixed else highest, False,
                       any(use_dora) and not widest.holds_fixed)


def probe(spec: ProbeSpec, cache_dir: Path | None = None, device: str = "") -> dict:
    """Measure one trial of `spec` in a fresh process (spawned, so the caller holds no CUDA
    context afterwards and nothing of the probe's stays on the GPU): load the base model, add the
    adapter, take two optimizer steps at the run's batch and width (the first allocates AdamW's
    state; a CUDA graph, where trials use one, is captured as trials capture it), then one eval
    batch at the eval token budget. Returns `footprint_gb, reserved_gb, allocated_gb,
    context_gb, source, gpu_gb, seconds, cached` in GB of 2**30 bytes.

    With `cache_dir`, the figures are kept there under a key of `spec`, the model's files (names,
    sizes, times), `device` (the GPU's name) and the torch version, and a later run with the same
    key reads them instead of measuring: the probe takes about 20 s, as long as a small model's
    search spends in steps in its first minute."""
    import time

    path = cache_dir / f"{_probe_key(spec, device)}.json" if cache_dir else None
    if path and path.is_file():
        return {**json.loads(path.read_text()), "seconds": 0.0, "cached": True}
    started = time.perf_counter()
    measured = {**_measure_in_a_fresh_process(spec), "seconds": time.perf_counter() - started, "cached": False}
    if path:
        from rundir.files import write_json_atomic

        write_json_atomic(path, measured)
    return measured


# What the probe runs (`_measure`): a new value when that changes, so that no run reads a
# measure of what trials no longer do. 2: the eval batch at `eval_budget`'s tokens and answers.
# 3: up to 4 GiB of bf16 logits, their float32 loss in chunks.
PROBE_RUNS = 3


def _probe_key(spec: ProbeSpec, device: str) -> str:
    import torch

    model = Path(spec.model_path)
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in model.iterdir() if f.is_file()) \
        if model.is_dir() else [spec.model_path]
    return hashlib.sha256(json.dumps([asdict(spec), files, device, torch.__version__, PROBE_RUNS], sort_keys=True,
                                     default=str).encode()).hexdigest()[:20]


def _measure_in_a_fresh_process(spec: ProbeSpec) -> dict:
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure, (spec,))


def _measure(spec: ProbeSpec) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from trainables.data import IGNORE
    from trainables.evaluation import evaluate, model_eval_budget
    from trainables.metrics import allocated_peak_gb, outside_allocator, process_peak_gb
    from trainables.model import load_base_model
    from trainables.optim import loraplus_adamw
    from trainables.step import TrainStep

    device = torch.device("cuda", 0)
    base = load_base_model(spec.model_path, spec.dtype, spec.quantization, spec.trust_remote_code, device,
                           spec.gradient_checkpointing)
    model = get_peft_model(base, LoraConfig(**spec.lora_config))
    optimizer = loraplus_adamw(model, 1e-4, 1.0, cuda=True)
    vocab_size = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (spec.max_length,), generator=generator).tolist()
    rows = [(ids, ids)] * spec.batch_size
    pad_token_id = 0  # every row is max_length long: nothing is padded
    train_step = TrainStep(model, rows, spec.batch_size, 0, 2, pad_token_id, device, cuda_graph=spec.cuda_graphs,
                           compiled="inductor" if spec.compiled else None)
    try:
        for step in range(2):
            train_step(step)
            optimizer.step()
        budget = model_eval_budget(model, train_step.tokens_per_batch, spec.gradient_checkpointing)
        # the eval batch a trial's budget allows at its largest: its padded tokens full, and as many
        # answer positions as it allows among them
        rows = max(1, budget.tokens // spec.max_length)
        answers = min(spec.max_length - 1, max(1, budget.answers // rows))
        labels = [IGNORE] * (spec.max_length - answers) + ids[spec.max_length - answers:]
        evaluate(model, [(ids, labels)] * rows, pad_token_id, device, torch.autocast("cuda", dtype=torch.bfloat16),
                 budget)
        torch.cuda.synchronize(device)
        outside, source = outside_allocator()  # as a trial counts its peak_memory_gb
        return {"footprint_gb": process_peak_gb(True), "reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30,
                "allocated_gb": allocated_peak_gb(True), "context_gb": outside / 2**30, "source": source,
                "gpu_gb": torch.cuda.mem_get_info(device)[1] / 2**30}
    finally:
        train_step.close()
