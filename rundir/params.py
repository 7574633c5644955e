"""The trial contract: what a trial reads from Tune's config, and what the analysis reads
back from the trial's `params.json`.

The space (`search.tuning.space`) and the stages (`search.tuning.stages`) build a `TrialParams`; it enters
Tune's config through `to_config` only, and the trial and the analysis read it through
`from_config` only. Tune's config may hold more keys than these: the searcher merges the
values Optuna sampled (`r`, `use_rslora`, ...) into it, and they are ignored here, since
`lora_config` already holds them exactly as PEFT takes them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum


class Origin(str, Enum):
    """Why a trial ran."""

    PRIOR = "prior"         # a known-good configuration, proposed before the sampler's own
    SEARCH = "search"       # proposed by the sampler
    PROMOTED = "promoted"   # a trial ASHA stopped, continued to the full budget from its checkpoint
    CONFIRM = "confirm"     # a leading configuration again, with another seed
    CHEAPER = "cheaper"     # the pick with the next smaller rank, or with a module set inside its own
    RERUN = "rerun"         # a trial that ran out of GPU memory beside others, again with fewer neighbours
    RETRAIN = "retrain"     # the pick, trained on all the training data

    @property
    def proposed(self) -> bool:
        """Whether the searcher (Optuna) proposed this trial and ASHA schedules it; the stages' trials
        train to the full budget outside both."""
        return self in (Origin.PRIOR, Origin.SEARCH)

    @property
    def repeats_parent(self) -> bool:
        """Whether such a trial is its parent's configuration run again (its runs count together);
        a cheaper neighbour names the pick it is next to as its parent, but is a configuration of its own."""
        return self in (Origin.PROMOTED, Origin.CONFIRM, Origin.RERUN, Origin.RETRAIN)

    @property
    def continues_parent(self) -> bool:
        """Whether such a trial carries on its parent's run from the parent's last checkpoint (where
        it saved one): its reports continue the parent's steps, and its totals include the parent's."""
        return self in (Origin.PROMOTED, Origin.RERUN)


@dataclass(frozen=True)
class TrialParams:
    """One trial's parameters. `lora_config` is the exact `LoraConfig` keyword arguments, built
    once by the space and used unchanged by the trial and the export."""

    lora_config: dict
    module_set: str          # the semantic name, or explicit layer names joined by '+'
    alpha_ratio: float       # lora_alpha / r
    learning_rate: float
    loraplus_lr_ratio: float  # B's learning rate over A's (LoRA+); 1 is plain LoRA
    seed: int                # adapter initialisation, dropout masks and data order
    origin: Origin = Origin.SEARCH
    parent: str | None = None      # the trial that a promoted, confirming, rerun or retrained trial repeats
    start_from: str | None = None  # a checkpoint (directory or URI) to continue from: a promotion's
    full_data: bool = False        # train on all the training data, not data.search_fraction of it
    gpu_share: float | None = None  # the GPU share of a rerun after running out of memory beside others; None: the run's

    def to_config(self) -> dict:
        """The trial as Tune's config: plain JSON values."""
        config = dataclasses.asdict(self)
        config["origin"] = self.origin.value
        return config

    @classmethod
    def from_config(cls, config: Mapping) -> TrialParams:
        """The trial from Tune's config (or a `params.json`); KeyError names a missing field."""
        values = {field.name: config[field.name] for field in dataclasses.fields(cls)}
        values["origin"] = Origin(values["origin"])
        return cls(**values)

    def repeat(self, origin: Origin, parent: str, **changes) -> TrialParams:
        """This configuration again for a later stage: `changes` override the rest (a seed, a checkpoint)."""
        return dataclasses.replace(self, **{"origin": origin, "parent": parent, "start_from": None, "full_data": False,
                                            "gpu_share": None, **changes})
