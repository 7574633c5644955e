"""The run's configuration: YAML plus `--set` overrides, checked once, at the edge.

Each part's dataclass lives beside its owner (`trainables.config`, `search.tuning.space`,
`analysis.config`); this module composes them, converts YAML values to the declared
types (YAML reads `1e-4` as a string and `no` as false), and reports every problem at
once as a `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from analysis.config import SelectionConfig, needs_generations
from rundir.runconfig import RunConfig
from search.output.tracking import TrackingConfig
from search.resources.memory import share_for
from search.tuning.prior import TaskConfig
from search.tuning.space import SpaceConfig
from trainables.config import DataConfig, ModelConfig

# Package data (the `configs` package), so a wheel install finds it as a checkout does.
DEFAULT_CONFIG = resources.files("configs") / "default.yaml"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ConfigError(ValueError):
    """Bad input: its `problems`, each of which the CLI prints as one line that starts with
    `error: `, and exits 2."""

    def __init__(self, *problems: str):
        super().__init__("\n".join(problems))
        self.problems = problems


@contextmanager
def bad_input(prefix: str = "") -> Iterator[None]:
    """A ValueError raised in the block (whose message names the key, the value and what is
    allowed) is bad input: a ConfigError of `prefix` and its message."""
    try:
        yield
    except ValueError as e:
        raise ConfigError(f"{prefix}{e}") from None


def too_small(section: str, settings, **least: int) -> list[str]:
    """A problem for each integer setting of `section` below the least value `least` allows it."""
    return [f"{section}.{key} is {getattr(settings, key)}; allowed: an integer >= {minimum}"
            for key, minimum in least.items() if getattr(settings, key) < minimum]


@dataclass
class BudgetConfig:
    num_samples: int = field(default=5, metadata={"help": "configurations the search tries"})
    max_steps: int = field(default=30, metadata={"help": "optimizer steps of a trial at full budget (the fidelity ASHA allocates)"})
    eval_every: int = field(default=10, metadata={"help": "steps between evaluations; ASHA decides at these"})
    grace_period: int = field(default=10, metadata={"help": "steps every trial gets before ASHA may stop it"})
    reduction_factor: int = field(default=4, metadata={"help": "ASHA keeps 1/reduction_factor of trials at each rung"})
    batch_size: int = field(default=8, metadata={"help": "sequences per optimizer step"})
    warmup_steps: int = field(default=4, metadata={"help": "linear learning-rate warm-up before cosine decay"})
    landscape_seeds: int = field(default=2, metadata={"help": "search.algorithm grid: runs of each grid point, with seeds seed, seed + 1, ..."})

    def problems(self) -> list[str]:
        out = too_small("budget", self, num_samples=1, max_steps=1, eval_every=1, grace_period=1, reduction_factor=2,
                        batch_size=1, warmup_steps=0, landscape_seeds=1)
        if self.grace_period > self.max_steps >= 1:
            out.append(f"budget.grace_period is {self.grace_period}, above budget.max_steps={self.max_steps}; allowed: 1 to max_steps")
        if self.eval_every > self.max_steps >= 1:
            out.append(f"budget.eval_every is {self.eval_every}, above budget.max_steps={self.max_steps}; allowed: 1 to max_steps")
        return out


# resources.compile: auto. On an H100 the 1.1B Llama's compiled step saved 262 ms a step for 26 s of
# compiling (bench/results/h100-2026-11-23/step_modes.json), on an H200 201 ms for 13.5 s
# (bench/results/step_modes.json): it paid from about 100 steps; 200 leaves a margin for
# smaller batches. Under 1B no measured step was bound by anything the CUDA graph leaves.
COMPILE_FROM_PARAMS = 1e9
COMPILE_FROM_STEPS = 200
# resources.packing: how trials share a GPU (search/tuning/tuner.py runs each).
SHARED = "shared"        # one trainer per GPU holds the base model once and trains up to pack_slots trials' adapters together
PROCESSES = "processes"  # every trial is a process of its own, with its own copy of the base model
AUTO = "auto"
PACKINGS = (AUTO, SHARED, PROCESSES)
TRIAL_FIXED_GB = 2.5  # CUDA context, allocator slack, an eval batch's logits (see eval_budget): SmolLM2 trials peaked at 1.4-2.7 GB


def trial_memory_gb(total_params: int, bytes_per_param: float) -> float:
    """A rough upper estimate of one trial's GPU memory: the fixed part, and four times the
    base weights (the weights, and activations, adapter and optimizer state that grow with them)."""
    return TRIAL_FIXED_GB + 4 * total_params * bytes_per_param / 2**30


@dataclass
class ResourcesConfig:
    gpus_per_trial: float | str = field(default="auto", metadata={"help": "GPUs per trial (a fraction packs several on a GPU); auto: none without CUDA, else by model size and one trial's measured memory"})
    cpus_per_trial: int = field(default=1, metadata={"help": "CPUs (and torch threads) per trial"})
    max_concurrent_trials: int = field(default=0, metadata={"help": "trials at once; 0: every slot of the Ray cluster at the start (GPUs / gpus_per_trial, else CPUs / cpus_per_trial)"})
    max_failures: int = field(default=0, metadata={"help": "retries of a failed trial from its last checkpoint (for transient faults such as a lost node)"})
    # 0.25, from searches on one H200 (bench/results/h200-2026-12-01-memory/): the probe's heaviest
    # configuration held more than any trial of the search did (SmolLM2 9.4 GB against at most 7.0;
    # a 262k-vocabulary 270M model 13.0 GB against at most 11.3 with 8 trials to the GPU and no
    # out-of-memory failure, with eval batches of at most 1 GiB of bf16 logits). At 1.0 the probe halved
    # SmolLM2's packing to 4 a GPU, and the search took 116 s instead of 98.
    memory_margin: float = field(default=0.25, metadata={"help": "under auto, each trial's measured GPU footprint is counted (1 + memory_margin) times when packing trials on a GPU"})
    # On by default: SmolLM2 with all seven projections at r16 steps in 19 ms replayed against
    # 196 ms eager on an H200 (bench/results/step_modes.json).
    cuda_graphs: bool = field(default=True, metadata={"help": "on GPU, replay each trial's train step as a CUDA graph captured once per trial; false: eager steps"})
    compile: bool | str = field(default="auto", metadata={"help": f"on GPU, torch.compile the train step (shared: then captured); auto: unquantized {COMPILE_FROM_PARAMS / 1e9:g}B+ models whose trials all train {COMPILE_FROM_STEPS}+ steps, and shared trainers"})
    packing: str = field(default=AUTO, metadata={"help": "shared: one trainer per GPU trains the adapters of up to pack_slots trials in one pass; processes: a process per trial; auto: the faster"})
    pack_slots: int = field(default=8, metadata={"help": "with shared packing: trials one trainer trains at once"})
    # auto: on where a shared trainer compiles its step. The reference search on the real weights on
    # one H100 (bench/results/h100-2026-12-07-sitting13/): 37.3 and 38.4 s with the layers compiled
    # from inductor's cache against 42.1-45.8 s without, the steps 6.3-6.8 s against 10.1-11.4 s; with
    # the cache empty, 58.4 s against 55.6 s (the layers' first compile, 25 s against 14 s of preparing).
    pack_compile_layers: bool | str = field(default=AUTO, metadata={"help": "shared packing on a GPU: compile the decoder layers into the captured step too (a machine's first search compiles them); auto: where the step compiles"})

    def compiled(self, gpus_per_trial: float, total_params: int, steps_every_trial: int, bf16_unchecked: bool,
                 shared: bool = False) -> bool:
        """Whether trials compile their steps: `compile` as given, or for auto, GPU trials of a
        model of COMPILE_FROM_PARAMS or more whose every trial trains COMPILE_FROM_STEPS steps
        or more (`steps_every_trial`: the grace period, before which ASHA stops none; each
        trial pays its own compile), and a plain bf16 model without gradient checkpointing
        (`bf16_unchecked`: neither bitsandbytes' 4-bit layers nor recomputed activations were
        measured compiled). A `shared` trainer on a GPU compiles whatever the model's size: it
        compiles once for all its trials (8 s on an H100), and its compiled step trained
        SmolLM2 at 3.88x one trial alone with 8 slots against 2.98x uncompiled
        (bench/results/h100-2026-12-05-packed-compiled/)."""
        if self.compile != "auto":
            return bool(self.compile)
        if shared:
            return gpus_per_trial > 0 and bf16_unchecked
        return (gpus_per_trial > 0 and total_params >= COMPILE_FROM_PARAMS and steps_every_trial >= COMPILE_FROM_STEPS
                and bf16_unchecked)

    def layers_compiled(self, shared: bool, compiled: bool) -> bool:
        """Whether a shared trainer compiles its decoder layers into its captured step: with
        `pack_compile_layers` true or auto, where the run packs (`shared`) and compiles its step
        (`compiled`, what `compiled` resolved)."""
        return shared and compiled and self.pack_compile_layers in (True, AUTO)

    def gpus(self, cuda: bool, total_params: int, gpu_memory_gb: float | None = None,
             bytes_per_param: float = 2.0, footprint_gb: float | None = None) -> float:
        """The GPU share per trial; `auto` packs small models several to a GPU (each trial
        holds its own CUDA context and copy of the base model). Measured on H100s and an H200
        (bench/results/trial_throughput.json, README "Measured"): 8 SmolLM2-135M trials at a time
        gave 3.4-9.6x the tokens per second of one, the best of 1, 2, 4 and 8 every time, in
        8-18 GB of GPU memory together (1.4-2.7 GB a process). Where the GPU's memory is known
        (a local run), the share is then doubled until a trial fits in it: by `footprint_gb`,
        what one trial measurably held on this GPU (search/resources/memory.py), with `memory_margin`,
        else by the estimate from the parameter count. A small GPU packs fewer."""
        if self.gpus_per_trial != "auto":
            return float(self.gpus_per_trial)
        if not cuda:
            return 0.0
        share = 0.125 if total_params < 0.5e9 else 0.25 if total_params < 1e9 else 0.5 if total_params < 4e9 else 1.0
        if gpu_memory_gb and footprint_gb:
            return max(share, share_for(footprint_gb, gpu_memory_gb, self.memory_margin))
        if gpu_memory_gb:
            need = trial_memory_gb(total_params, bytes_per_param)
            while share < 1.0 and share * gpu_memory_gb < need:
                share *= 2
        return share

    def problems(self) -> list[str]:
        out = []
        if isinstance(self.gpus_per_trial, str):
            if self.gpus_per_trial != "auto":
                out.append(f"resources.gpus_per_trial is {self.gpus_per_trial!r}; allowed: auto, 0, a fraction in (0, 1], or a whole number")
        elif self.gpus_per_trial < 0 or (self.gpus_per_trial > 1 and not float(self.gpus_per_trial).is_integer()):
            out.append(f"resources.gpus_per_trial is {self.gpus_per_trial}; allowed: 0, a fraction in (0, 1], or a whole number")
        if isinstance(self.compile, str) and self.compile != "auto":
            out.append(f"resources.compile is {self.compile!r}; allowed: auto, true or false")
        if isinstance(self.pack_compile_layers, str) and self.pack_compile_layers != AUTO:
            out.append(f"resources.pack_compile_layers is {self.pack_compile_layers!r}; allowed: auto, true or false")
        if self.pack_compile_layers is True and self.compile is False:
            out.append("resources.pack_compile_layers is true but resources.compile is false; the layers compile into "
                       "the compiled step only: set resources.compile to auto or true, or pack_compile_layers to false")
        if self.max_concurrent_trials < 0:
            out.append(f"resources.max_concurrent_trials is {self.max_concurrent_trials}; allowed: 0 (no limit) or more")
        if self.memory_margin < 0:
            out.append(f"resources.memory_margin is {self.memory_margin}; allowed: a number >= 0 (0: trials packed to their measured footprint exactly)")
        if self.packing not in PACKINGS:
            out.append(f"resources.packing is {self.packing!r}; allowed: {', '.join(PACKINGS)}")
        return out + too_small("resources", self, cpus_per_trial=1, max_failures=0, pack_slots=1)


@dataclass
class Config:
    name: str = field(default="default", metadata={"help": "run name: results go to <output>/<name>/"})
    seed: int = field(default=0, metadata={"help": "seeds the sampler, the data order and the trials"})
    output: str = field(default="runs", metadata={"help": "directory, or storage URI (s3://, gs://, ...), that holds the runs"})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    search: SpaceConfig = field(default_factory=SpaceConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def problems(self) -> list[str]:
        out = []
        if not _NAME.match(self.name):
            out.append(f"name is {self.name!r}; allowed: letters, digits, '.', '_', '-', not starting with '.' "
                       "(a run name cannot leave the output directory)")
        if needs_generations(self.selection.metric) and self.data.eval_generate_examples == 0:
            out.append(f"selection.metric={self.selection.metric!r} is computed from generated answers, but "
                       "data.eval_generate_examples is 0 (off). Fix: set data.eval_generate_examples to 1 or more")
        return out


# What `auto` resolves to on each kind of device, and why: the dry run and the report say it.
AUTO_PACKING = {
    "cpu": (PROCESSES, "on an idle 2-core CPU the batched pack of 2 to 8 SmolLM2 trials trained at 1.03x to 1.07x of "
                       "one trial alone, with 1.7x to 5.8x its memory (bench/results/shared_packing_cpu.json): a CPU's "
                       "step is bound by its arithmetic, which a pack does not reduce"),
    "cuda": (SHARED, "on one H100 the reference search took 83 s packed against 91 s with processes, on the same "
                     "machine (bench/results/h100-2026-12-06-sitting3/): the pack's one process imports and loads the "
                     "model once, and a new trial needs no process of its own (one started mid-search took 18 s to "
                     "train what a started one trains in 9)"),
}
# Where `auto` keeps processes on a GPU whatever AUTO_PACKING says: what the packed step was never
# measured on, and what it cannot train.
PROCESSES_FOR = {
    "quantized": "the base model is quantized (model.quantization), and the packed step was measured on "
                 "unquantized weights only",
    "checkpointed": "model.gradient_checkpointing is on, and the packed step was measured without it",
    "conv1d": "module sets adapt Conv1D layers (GPT-2 style), which the shared trainer does not train",
    "beside": "the space has trials the shared trainer does not train (DoRA, or expert weights), which would run in "
              "processes beside it, a mix not measured on a GPU",
}


def resolve_packing(config: Config, cuda: bool, conv1d: bool = False, experts: bool = False) -> tuple[str, str]:
    """The packing a run of `config` uses, SHARED or PROCESSES, and why where `auto` chose it
    ("" where resources.packing names it): for auto, the one `AUTO_PACKING` gives this kind of
    device, the faster where bench/ measured them, unless a GPU run is one the shared trainer
    was not measured on or cannot train (`PROCESSES_FOR`; `conv1d`: a module set adapts Conv1D
    layers; `experts`: one adapts a mixture's expert weights)."""
    if config.resources.packing != AUTO:
        return config.resources.packing, ""
    packing, reason = AUTO_PACKING["cuda" if cuda else "cpu"]
    if packing == SHARED:
        kept = [PROCESSES_FOR[key] for key, present in (
            ("quantized", config.model.quantization != "none"),
            ("checkpointed", config.model.gradient_checkpointing),
            ("conv1d", conv1d),
            ("beside", any(config.search.use_dora) or experts)) if present]
        if kept:
            return PROCESSES, "; ".join(kept)
    return packing, reason


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read YAML (the embedded default when `path` is None), apply `key.sub=value`
    overrides (values read as YAML), and return a checked Config or raise ConfigError
    listing every problem."""
    source = Path(path) if path else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(source.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"--config {source}: cannot read it ({e.strerror}). Fix: give an existing YAML file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {source} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {source} must hold a mapping of keys, found {type(raw).__name__}")
    problems: list[str] = []
    for item in overrides:
        _apply_override(raw, item, problems)
    return _checked(raw, problems)


def recorded(run_config: RunConfig, output: str, name: str) -> Config:
    """The config a run was started with, from its `run_config.json` record, as resolved there
    (`auto` settings hold what they became), for the run where it is now: `output`/`name`.
    ConfigError where the record no longer makes a valid config."""
    values = run_config.to_json()
    raw = {f.name: values[f.name] for f in dataclasses.fields(Config)}
    settings = {f.name for f in dataclasses.fields(ResourcesConfig)}
    raw["resources"] = {key: value for key, value in raw["resources"].items() if key in settings}
    raw["output"], raw["name"] = output, name
    return _checked(raw, [])


def _checked(raw: dict, problems: list[str]) -> Config:
    config = _build(Config, raw, "", problems)
    problems += _all_problems(config)  # fields that failed conversion kept their (valid) defaults
    if problems:
        raise ConfigError(*problems)
    return config


def _apply_override(raw: dict, item: str, problems: list[str]) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        problems.append(f"--set {item!r} is not KEY=VALUE; example: --set search.ranks=[8,16]")
        return
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    *parents, leaf = key.strip().split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            problems.append(f"--set {key}: {part!r} is not a section")
            return
        node = child
    node[leaf] = value


def _all_problems(obj) -> list[str]:
    out = obj.problems() if hasattr(obj, "problems") else []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += _all_problems(value)
    return out


def _build(cls, raw, prefix: str, problems: list[str]):
    """A `cls` instance from a mapping; unknown keys and wrong types go to `problems`."""
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'the config'} must be a mapping, found {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            problems.append(f"unknown key {prefix}{key}; allowed in {prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}")
    values = {}
    for name in fields:
        if name in raw:
            values[name] = _convert(raw[name], hints[name], prefix + name, problems)
    try:
        return cls(**{k: v for k, v in values.items() if v is not _BAD})
    except TypeError as e:
        problems.append(f"{prefix.rstrip('.')}: {e}")
        return cls()


_BAD = object()


def _convert(value, hint, key: str, problems: list[str]):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, key + ".", problems)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        for arg in arms:
            trial: list[str] = []
            converted = _convert(value, arg, key, trial)
            if not trial:
                return converted
        list_arm = next((a for a in arms if typing.get_origin(a) is list), None)
        if isinstance(value, list) and list_arm is not None:
            return _convert(value, list_arm, key, problems)  # a list was meant: name its bad items
        problems.append(f"{key} is {value!r}; allowed: {_describe(hint)}")
        return _BAD
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{key} is {value!r}; allowed: a list of {_describe(args[0])}, e.g. [a, b]")
            return _BAD
        items = [_convert(v, args[0], f"{key}[{i}]", problems) for i, v in enumerate(value)]
        return _BAD if any(v is _BAD for v in items) else items
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key} is {value!r}; allowed: {_describe(hint)}, e.g. {{a: b}}")
            return _BAD
        entries = {_convert(k, args[0], f"{key} key {k!r}", problems): _convert(v, args[1], f"{key}.{k}", problems)
                   for k, v in value.items()}
        return _BAD if _BAD in entries or _BAD in entries.values() else entries
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    problems.append(f"{key} is {value!r}; allowed: {_describe(hint)}")
    return _BAD


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def to_yaml(config: Config) -> str:
    """`config` as YAML that `load` reads back to an equal Config, laid out as
    configs/default.yaml is: one block per section, lists of plain values on one line."""
    return yaml.dump(to_dict(config), Dumper=_ConfigDumper, sort_keys=False)


class _ConfigDumper(yaml.SafeDumper):
    def represent_list(self, items: list) -> yaml.SequenceNode:
        flat = not any(isinstance(item, (list, dict)) for item in items)
        return self.represent_sequence("tag:yaml.org,2002:seq", items, flow_style=flat)


_ConfigDumper.add_representer(list, _ConfigDumper.represent_list)


def leaves(obj, prefix: str = "") -> list[tuple[str, dataclasses.Field, object]]:
    """Every setting under the config dataclass `obj`, in declaration order: (its dotted key,
    its field, its value in `obj`), e.g. ("budget.max_steps", <Field>, 30)."""
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += leaves(value, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, f, value))
    return out
