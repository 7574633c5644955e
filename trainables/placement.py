"""Where a trial of a shared run (`resources.packing=shared`) trains: in a slot of one of the run's
shared trainers, through its light client (trainables/client.py), or, for a configuration that a
pack cannot train, in a process of its own beside them, as every trial of
`resources.packing=processes` does (trainables/trial.py). Imports no torch until a trial needs its
own process, so a packed trial's process stays a light client.
"""

from __future__ import annotations

from rundir.params import TrialParams
from trainables.client import train_lora_shared


def in_own_process(config: dict) -> bool:
    """Whether a shared run trains this trial (Tune's config) in a process of its own: a DoRA trial,
    whose norm needs the adapted weight merged into its own copy of the base weight, which a base
    shared by several trials never holds; a trial that adapts expert weights (PEFT's
    target_parameters), which the shared trainer, adapting Linear layers only, cannot train."""
    lora = TrialParams.from_config(config).lora_config
    return bool(lora.get("use_dora") or lora.get("target_parameters"))


def train_lora_packed_or_alone(config: dict, setup, trainers: list) -> None:
    """A trial of a shared run: `train_lora_shared` in a slot of one of `trainers`, or, where
    `in_own_process`, `train_lora` with `setup`, beside them."""
    if in_own_process(config):
        from trainables.trial import train_lora  # torch, transformers and PEFT: only in this trial's process

        return train_lora(config, setup)
    return train_lora_shared(config, trainers)
