"""The run's resources, resolved once before Ray starts: how trials are packed (a process each,
or the adapters of several on one shared base), each trial's GPU share (measured by the memory
probe where `resources.gpus_per_trial` is auto and this machine has the GPU), and whether steps
compile. Frozen: what comes after reads it and changes nothing."""

from __future__ import annotations

from dataclasses import dataclass, replace

from search.config import SHARED, Config, resolve_packing
from search.resources.memory import Probe
from trainables.config import cache_root


@dataclass(frozen=True)
class ResourcePlan:
    packing: str                 # SHARED or PROCESSES, `auto` resolved
    packing_reason: str          # why `auto` chose it; "" where resources.packing named it
    gpus_per_trial: float        # `auto` resolved: 0 without CUDA
    compiled: bool               # trials torch.compile their steps (`resources.compile`, auto resolved)
    layers_compiled: bool        # the trainer compiles its decoder layers too (`resources.pack_compile_layers`, auto resolved)
    gpu_memory_gb: float | None  # this machine's GPU, where the run is local and has one
    memory_probe: Probe | None   # what the share was measured from, where it was

    @property
    def shared(self) -> bool:
        return self.packing == SHARED

    def applied(self, config: Config) -> Config:
        """`config` with its `auto` resources replaced by what they resolved to, as
        `run_config.json` records it and the Tune side reads it."""
        return replace(config, resources=replace(config.resources, compile=self.compiled, packing=self.packing,
                                                 pack_compile_layers=self.layers_compiled))


def plan_resources(config: Config, prepared, local: bool) -> ResourcePlan:
    """The plan for `config` on this machine (`local`) or on a cluster whose GPUs are not known
    here; `prepared`: the model as `search.inputs.prepare.prepare_model` resolved it."""
    import torch

    cuda = torch.cuda.is_available()
    conv1d = any(resolved.fan_in_fan_out for resolved in prepared.resolved.values())
    experts = any(resolved.holds_fixed for resolved in prepared.resolved.values())
    packing, packing_reason = resolve_packing(config, cuda, conv1d, experts)
    gpu_memory_gb = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda and local else None
    bytes_per_param = 0.5 if config.model.quantization == "4bit" else 4.0 if config.model.dtype == "float32" else 2.0
    gpus = config.resources.gpus(cuda, prepared.total_params, gpu_memory_gb, bytes_per_param)
    steps_every_trial = min(config.budget.grace_period, config.budget.max_steps)
    compiled = config.resources.compiled(gpus, prepared.total_params, steps_every_trial,
                                         config.model.quantization == "none" and not config.model.gradient_checkpointing,
                                         shared=packing == SHARED)
    probe = None
    # a shared trial holds no share of a GPU: its trainer holds the GPU
    if config.resources.gpus_per_trial == "auto" and gpu_memory_gb and packing != SHARED:
        probe = _probe_memory(config, prepared, compiled, gpu_memory_gb)
        gpus = probe.share
    return ResourcePlan(packing=packing, packing_reason=packing_reason, gpus_per_trial=gpus, compiled=compiled,
                        layers_compiled=config.resources.layers_compiled(packing == SHARED, compiled),
                        gpu_memory_gb=gpu_memory_gb, memory_probe=probe)


def _probe_memory(config: Config, prepared, compiled: bool, gpu_memory_gb: float) -> Probe:
    """One trial of the space's heaviest configuration, measured on this machine's GPU, and the
    share `auto` takes from it (search/resources/memory.py)."""
    import torch

    from search.resources.memory import ProbeSpec, heaviest_lora_config, probe
    from trainables.model import resolve_dtype

    search = config.search
    lora = heaviest_lora_config(prepared.resolved, search.ranks, search.use_dora, search.dropout)
    measured = probe(ProbeSpec(
        model_path=prepared.path, dtype=resolve_dtype(config.model.dtype, cuda=True),
        quantization=config.model.quantization, trust_remote_code=config.model.trust_remote_code,
        gradient_checkpointing=config.model.gradient_checkpointing, lora_config=lora,
        batch_size=config.budget.batch_size, max_length=config.data.max_length,
        cuda_graphs=config.resources.cuda_graphs and not config.model.gradient_checkpointing, compiled=compiled),
        cache_dir=cache_root() / "memory-probes", device=torch.cuda.get_device_name(0))
    share = config.resources.gpus(True, prepared.total_params, gpu_memory_gb, footprint_gb=measured["footprint_gb"])
    return Probe(**measured, margin=config.resources.memory_margin, share=share, lora_config=lora)
