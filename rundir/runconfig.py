"""`run_config.json`: the run's settings as resolved and the facts of its model and data, written
once by the driver when it creates the run and read by the analysis and by a resume.

`RunConfig` is the record, field for field the file; `to_json` and `from_json` are the only ways
in and out. `from_json` refuses a key it does not know and a value of the wrong type, naming
the key, the value and what is allowed, and lists every missing key at once; a field with a
default here may be missing from the file and gets that default, nowhere else. The sections
that another package types itself (`model`, `data`, `task`, `search`, `selection`, `tracking`:
the search's config, the analysis' `SelectionConfig`) are kept as the JSON objects it wrote, for
their owner to read; the rest is typed here, since this layer imports none of those packages.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field

from rundir.layout import RUN_CONFIG

CREATED_BY = "lora-search"  # `created_by` of every run this tool writes: a resume continues only those


@dataclass(frozen=True)
class Budget:
    """The search's budget (the search's `budget` settings, as given)."""

    num_samples: int
    max_steps: int         # a trial's full budget: the step every competing trial is compared at
    eval_every: int
    grace_period: int
    reduction_factor: int
    batch_size: int
    warmup_steps: int
    landscape_seeds: int = 1  # a run recorded before grids ran one seed a configuration


@dataclass(frozen=True)
class MemoryProbe:
    """One trial of the space's heaviest configuration, measured on the driver's GPU, and the share
    per trial chosen from it (the search's memory probe)."""

    footprint_gb: float       # what the process held at most, as a trial's peak_memory_gb counts it
    reserved_gb: float        # torch.cuda.max_memory_reserved: the allocator's peak reserve
    allocated_gb: float       # torch.cuda.max_memory_allocated: the tensors' own peak
    context_gb: float         # what the process holds outside the allocator (the CUDA context, libraries' workspaces)
    source: str               # "nvml" (measured) or "estimate" (pynvml not installed): where context_gb comes from
    gpu_gb: float
    margin: float
    share: float              # the share `auto` chose (the larger of this and the share by parameter count)
    seconds: float            # the probe's wall time, its own process included (0 when `cached`)
    lora_config: dict
    cached: bool = False      # the figures of an earlier probe of the same model, configuration and GPU


@dataclass(frozen=True)
class Resources:
    """The search's `resources` settings as the run resolved them: `gpus_per_trial`, `compile`
    and `packing` hold what `auto` became."""

    gpus_per_trial: float
    cpus_per_trial: int
    max_concurrent_trials: int
    max_failures: int
    memory_margin: float
    cuda_graphs: bool
    compile: bool
    # a run recorded before trials could share a trainer ran a process per trial
    packing: str = field(default="processes", kw_only=True)
    packing_reason: str = field(default="", kw_only=True)  # why `auto` chose `packing`; "": it was named
    pack_slots: int
    # a run recorded before the shared trainer could compile its layers compiled none
    pack_compile_layers: bool = field(default=False, kw_only=True)
    memory_probe: MemoryProbe | None = None  # None: no probe ran (no GPU, a fixed share, or shared packing)


@dataclass(frozen=True)
class BaseModel:
    path: str          # where the weights were loaded from
    name: str          # as the user named it (the embedded default: its hub id); the exported adapter records it
    origin: str        # where the weights came from, in words
    total_params: int


@dataclass(frozen=True)
class SourceInfo:
    """What was read from one data source and kept: for run_config.json, the dry run and the report."""

    key: str        # the config key that named the source: data.train or data.eval
    source: str     # the source as the config gives it
    part: str       # which of its rows
    format: str     # a key of search.inputs.data.FORMATS
    rows: int       # rows read
    truncated: int  # rows cut at data.max_length, still used
    dropped: int    # rows left with no token to train on within data.max_length, not used
    empty: int      # rows whose trained answers are all empty: not used unless data.keep_empty_answers


@dataclass(frozen=True)
class DataInfo:
    """The data as the driver prepared it (`data_info`)."""

    template: str           # chat or plain: how rows other than text became tokens
    max_length: int
    train: SourceInfo
    eval: SourceInfo
    train_rows: int         # rows a retrain uses: train's, less those dropped
    search_train_rows: int  # rows the search's trials train on: data.search_fraction of train_rows
    eval_rows: int          # rows scored at every eval round: at most data.eval_examples
    pad_token_id: int
    train_turns: str        # the assistant turns of a chat row that carry loss: all or last
    eval_rows_kept: int     # eval rows left after dropping, of which eval_rows are scored
    eval_chosen_by: str     # how the eval_rows were chosen of them, in words
    example: str            # the first training row as the model sees it, its trained tokens between [[ and ]]

    def eval_sample(self, eval_examples: int | str | None = None) -> str:
        """How many eval rows every round scores, of how many, set by what (`eval_examples`, the
        setting's value where known), and chosen how."""
        setting = "data.eval_examples" if eval_examples is None else f"data.eval_examples={eval_examples}"
        return (f"{self.eval_rows:,} of {self.eval_rows_kept:,} eval rows scored at each round ({setting}), "
                f"chosen by {self.eval_chosen_by}")


@dataclass(frozen=True)
class Training:
    """How every trial trains, in words, as the trainer that ran them describes itself (`training`)."""

    optimizer: str  # the optimizer, its settings and how batches become steps
    schedule: str   # the learning rate over the steps


@dataclass(frozen=True)
class ModuleSet:
    """How one module set resolved on the base model."""

    target_modules: list[str]
    layers: int
    note: str | None  # what had to be inferred or approximated, if anything


@dataclass(frozen=True)
class RunConfig:
    """The record of `run_config.json`."""

    name: str
    seed: int
    output: str
    model: dict
    data: dict
    task: dict
    search: dict       # the space's settings: lists of values, [low, high] ranges, `priors`
    budget: Budget
    resources: Resources
    selection: dict    # the analysis' `SelectionConfig`, as the user gave it (mode auto, min or max)
    tracking: dict
    base_model: BaseModel
    data_info: DataInfo
    module_sets: dict[str, ModuleSet]
    created_by: str
    training: Training | None = None  # None: a run recorded before the trainer described itself here
    # when the command that made the run started (epoch seconds, read before its imports); None for a
    # run recorded before this was
    started_at: float | None = None

    def to_json(self) -> dict:
        """The record as plain JSON values, in the file's order."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: object) -> RunConfig:
        """The record from `values` (the file's JSON); ValueError naming the key, the value and
        what is allowed for a wrong type or an unknown key, or listing every missing key."""
        missing: list[str] = []
        record = _record(cls, values, "", missing)
        if missing:
            raise ValueError(f"{RUN_CONFIG} lacks {missing}; it was not written by this version of the search.")
        return record


def _record(cls: type, values: object, key: str, missing: list[str]):
    """The dataclass `cls` from the JSON object `values` at `key` (dotted; "" at the top); the keys
    it lacks, without a default, are added to `missing` and the record is then None."""
    where = f"{RUN_CONFIG}: {key}" if key else RUN_CONFIG
    if not isinstance(values, dict):
        raise ValueError(f"{where} is {values!r}; allowed: a JSON object with the keys "
                         f"{[f.name for f in dataclasses.fields(cls)]}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [name for name in values if name not in fields]
    if unknown:
        raise ValueError(f"{where} has the unknown key {key + '.' if key else ''}{unknown[0]} "
                         f"(= {values[unknown[0]]!r}); the known keys are {list(fields)}.")
    hints = typing.get_type_hints(cls)
    converted, lacking = {}, []
    for name, f in fields.items():
        dotted = f"{key}.{name}" if key else name
        if name in values:
            converted[name] = _value(hints[name], values[name], dotted, missing)
        elif f.default is dataclasses.MISSING:
            lacking.append(dotted)
    missing += lacking
    return None if lacking else cls(**converted)


def _value(hint, value: object, key: str, missing: list[str]):
    """`value` at `key` checked against the type `hint` (a dataclass, `X | None`, `list[X]`,
    `dict[str, X]`, plain `dict`, int, float, bool or str)."""
    if dataclasses.is_dataclass(hint):
        return _record(hint, value, key, missing)
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        options = [option for option in typing.get_args(hint) if option is not type(None)]
        return None if value is None else _value(options[0], value, key, missing)
    container = typing.get_origin(hint) or hint
    if container is dict and isinstance(value, dict):
        args = typing.get_args(hint)
        return {k: _value(args[1], v, f"{key}.{k}", missing) for k, v in value.items()} if args else value
    if container is list and isinstance(value, list):
        (item,) = typing.get_args(hint) or (object,)
        return [_value(item, v, f"{key}[{i}]", missing) for i, v in enumerate(value)] if item is not object else value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ValueError(f"{RUN_CONFIG}: {key} is {value!r}; allowed: {_allowed(hint)}.")


def _allowed(hint) -> str:
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "a string", dict: "a JSON object",
             list: "a JSON list"}
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join("null" if option is type(None) else _allowed(option) for option in typing.get_args(hint))
    return names.get(typing.get_origin(hint) or hint, str(hint))
