"""A trial's checkpoint, one format for both trainers, never the base model:
- `adapter/`: a PEFT adapter directory (`adapter_config.json` as PEFT writes it, and the weights
  in `adapter_model.safetensors`), which `PeftModel.from_pretrained` loads;
- `trainer_state.pt`: the rest of `TrialCheckpoint` (optimizer and schedule, dropout generators,
  counters).
The optimizer's state has PEFT's LoRA+ groups in either trainer (trainables/optim.py), so a
checkpoint of a per-process trial continues in a shared trainer's slot and the other way round.
Only the dropout masks then start afresh: each trainer draws them in a way of its own.

Imports torch only where it reads or writes the state: a shared trial's client writes the files
(`write_files`) without it.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from trainables.metrics import Progress

ADAPTER_CONFIG = "adapter/adapter_config.json"
ADAPTER_WEIGHTS = "adapter/adapter_model.safetensors"
TRAINER_STATE = "trainer_state.pt"
# Whose generators `TrialCheckpoint.dropout_rng` holds:
PROCESS = "process"  # a per-process trial's: torch's default generators, the CPU's then each GPU's
SLOT = "slot"        # a shared trainer's slot's: none, its masks are a function of the trial's seed and step
_COUNTERS = ("step", "tokens", "train_seconds", "eval_seconds", "generate_seconds")


@dataclass
class TrialCheckpoint:
    """What a trial continues from: its adapter, optimizer, schedule, dropout generators and
    `Progress` counters."""

    adapter: dict[str, torch.Tensor]  # PEFT's state dict of the adapter (keys without the adapter's name), on the CPU
    adapter_config: dict              # adapter_config.json's values (`adapter_config`)
    optimizer: dict                   # the AdamW's state_dict, in PEFT's LoRA+ groups
    scheduler: dict                   # the warm-up and cosine schedule's state_dict
    dropout_rng: list[torch.Tensor]   # the states of the generators that draw the dropout masks
    dropout_rng_of: str               # PROCESS or SLOT: which trainer's generators `dropout_rng` holds
    step: int                         # optimizer steps taken
    tokens: int                       # real (unpadded) tokens trained on
    train_seconds: float
    eval_seconds: float
    generate_seconds: float

    def __post_init__(self):
        if self.dropout_rng_of not in (PROCESS, SLOT):
            raise ValueError(f"dropout_rng_of={self.dropout_rng_of!r}; allowed: {PROCESS!r}, {SLOT!r}")

    @classmethod
    def take(cls, progress: Progress, adapter: dict, adapter_config: dict, optimizer, scheduler,
             dropout_rng: list, dropout_rng_of: str) -> TrialCheckpoint:
        """The checkpoint of a trial at `progress`, its weights copied to the CPU."""
        return cls(adapter={key: weight.detach().to("cpu", copy=True).contiguous() for key, weight in adapter.items()},
                   adapter_config=adapter_config, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                   dropout_rng=dropout_rng, dropout_rng_of=dropout_rng_of,
                   **{name: getattr(progress, name) for name in _COUNTERS})

    def restore(self, optimizer, scheduler, progress: Progress) -> None:
        """Continue `optimizer`, `scheduler` and `progress`'s counters from this checkpoint (the
        adapter and the dropout generators are each trainer's to load)."""
        optimizer.load_state_dict(self.optimizer)
        scheduler.load_state_dict(self.scheduler)
        for name in _COUNTERS:
            setattr(progress, name, getattr(self, name))

    def to_files(self) -> dict[str, bytes]:
        """The checkpoint's files by their paths inside it."""
        import torch
        from safetensors.torch import save

        state = io.BytesIO()
        torch.save({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.name not in ("adapter", "adapter_config")}, state)
        return {ADAPTER_CONFIG: json.dumps(self.adapter_config, indent=2, sort_keys=True).encode(),
                ADAPTER_WEIGHTS: save(self.adapter, metadata={"format": "pt"}),
                TRAINER_STATE: state.getvalue()}

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> TrialCheckpoint:
        """The checkpoint from `to_files`' files; ValueError naming a missing file, or the state's
        missing and unknown keys."""
        import torch
        from safetensors.torch import load

        missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINER_STATE) if name not in files]
        if missing:
            raise ValueError(f"the checkpoint lacks {missing}; it was not written by this version's trainers")
        state = torch.load(io.BytesIO(files[TRAINER_STATE]), map_location="cpu", weights_only=True)
        names = {f.name for f in dataclasses.fields(cls)} - {"adapter", "adapter_config"}
        if set(state) != names:
            raise ValueError(f"the checkpoint's {TRAINER_STATE} lacks {sorted(names - set(state))} and has unknown "
                             f"keys {sorted(set(state) - names)}; it was not written by this version's trainers")
        return cls(adapter=load(files[ADAPTER_WEIGHTS]), adapter_config=json.loads(files[ADAPTER_CONFIG]), **state)

    def save(self, directory: Path) -> None:
        write_files(directory, self.to_files())

    @classmethod
    def load(cls, directory: Path) -> TrialCheckpoint:
        return cls.from_files(read_files(directory))


def adapter_config(lora_config, base_model_name_or_path: str | None) -> dict:
    """The values of adapter_config.json for an adapter of `lora_config` (a PEFT `LoraConfig`) on
    the base model, as PEFT's own writer gives them for a saved adapter."""
    import copy
    import tempfile

    config = copy.copy(lora_config)
    config.base_model_name_or_path = base_model_name_or_path
    config.inference_mode = True  # as PeftModel.save_pretrained writes it
    with tempfile.TemporaryDirectory() as directory:
        config.save_pretrained(directory)
        return json.loads(Path(directory, "adapter_config.json").read_text())


def write_files(directory: Path, files: dict[str, bytes]) -> None:
    """Write `files` (relative path -> contents) under `directory`."""
    for name, data in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def read_files(directory: Path) -> dict[str, bytes]:
    """Every file under `directory`, by its relative path."""
    return {path.relative_to(directory).as_posix(): path.read_bytes()
            for path in sorted(directory.rglob("*")) if path.is_file()}
