"""The search space: ordinary Optuna code that reads like the decision it encodes.

`LoraSpace` is Optuna's define-by-run function for `search.tuning.searcher.StudySearcher`.
It returns the trial's whole contract (`rundir.params.TrialParams`), with `lora_config`,
the exact `LoraConfig` arguments, built here once and used unchanged by the trial and by
the export.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

from rundir.params import Origin, TrialParams

# A prior's keys: the space's own parameter names, as Optuna sees them (`LoraSpace`).
PRIOR_KEYS = ("module_set", "r", "alpha_ratio", "lora_dropout", "use_rslora", "use_dora", "learning_rate",
              "loraplus_lr_ratio")
# The semantic module sets, resolved per architecture by `search.inputs.modules`. They are part of
# the config's vocabulary, so they live here, where validating a config imports no torch.
MODULE_SETS = ("attention_qv", "attention", "mlp", "attention_mlp", "all_linear", "experts")
# PEFT adapts expert weights (3-D parameters, `target_parameters`) through its ParamWrapper, which refuses
# lora_dropout != 0 and use_dora=True for the whole adapter: a module set that adapts them holds both fixed.
HELD_FIXED = ("adapts expert weights through PEFT's target_parameters, whose wrapper refuses dropout and DoRA: "
              "lora_dropout held at 0 and use_dora at false for this set")
# How the search proposes configurations (search.tuning.tuner.search_parts): Optuna's TPE, Optuna's
# random sampler, or every point of the grid (`grid_points`) once per landscape seed, without ASHA
# or stages: the run that measures a landscape (analysis.landscape).
TPE, RANDOM, GRID = "tpe", "random", "grid"
ALGORITHMS = (TPE, RANDOM, GRID)


@dataclass
class GridConfig:
    learning_rates: list[float] = field(
        default_factory=lambda: [7.7e-4, 1.5e-3, 3e-3],
        metadata={"help": "search.algorithm grid: the learning rates of the grid, within search.learning_rate"})
    lora_dropouts: list[float] = field(
        default_factory=lambda: [0.0],
        metadata={"help": "search.algorithm grid: the lora_dropout values of the grid, within search.dropout"})


@dataclass(frozen=True)
class ResolvedModules:
    """A module set resolved against one model by `search.inputs.modules.resolve`."""

    name: str                  # the semantic set name, or "custom" for an explicit list
    target_modules: list[str]  # names for PEFT's LoraConfig(target_modules=...), sorted
    fan_in_fan_out: bool       # True for GPT-2 style Conv1D layers (weight stored as in x out)
    layers: list[str]          # full dotted names of every adapted layer, in model order
    note: str | None           # what could not be taken literally, or was inferred; None if nothing
    # names for LoraConfig(target_parameters=...), sorted, empty for none: the expert weights (3-D parameters),
    # and in a mixture of experts its MLP layers' weights, which PEFT takes by module name for experts
    target_parameters: list[str] = field(default_factory=list)
    parameters: list[str] = field(default_factory=list)  # full dotted names of every adapted parameter, in model order
    architecture_note: str | None = None  # the part of `note` that is about the model, the same in every set

    @property
    def holds_fixed(self) -> bool:
        """Whether this set holds lora_dropout at 0 and use_dora off (HELD_FIXED)."""
        return bool(self.target_parameters)

    @property
    def own_note(self) -> str | None:
        """`note` without the architecture's part, which a listing of every set says once."""
        if not self.note or not self.architecture_note:
            return self.note
        return self.note.removeprefix(self.architecture_note).removeprefix("; ") or None


@dataclass
class SpaceConfig:
    module_sets: list[str | list[str]] = field(
        default_factory=lambda: ["attention_qv", "attention", "mlp", "all_linear"],
        metadata={"help": f"semantic sets ({', '.join(MODULE_SETS)}) or explicit lists of layer (or expert "
                          "parameter) names"})
    ranks: list[int] = field(default_factory=lambda: [4, 8, 16, 32], metadata={"help": "LoRA ranks r to try"})
    alpha_ratios: list[float] = field(default_factory=lambda: [1.0, 2.0], metadata={"help": "lora_alpha / r ratios to try"})
    dropout: list[float] | float = field(
        default_factory=lambda: [0.0, 0.1],
        metadata={"help": "[low, high] range of lora_dropout, or one value, fixed"})
    use_rslora: list[bool] = field(
        default_factory=lambda: [False, True],
        metadata={"help": "RSLoRA choices (scale alpha/sqrt(r))"})
    use_dora: list[bool] = field(default_factory=lambda: [False], metadata={"help": "DoRA choices (slower steps)"})
    learning_rate: list[float] | float = field(
        default_factory=lambda: [7.7e-4, 3e-3],
        metadata={"help": "[low, high] range, sampled on a log scale, or one value, fixed"})
    loraplus_lr_ratio: list[float] = field(
        default_factory=lambda: [1.0],
        metadata={"help": "LoRA+ ratios: B's learning rate over A's; 1 is plain LoRA"})
    algorithm: str = field(
        default=TPE,
        metadata={"help": f"{', '.join(ALGORITHMS)}: how configurations are proposed; grid trains every "
                          "point budget.landscape_seeds times, without ASHA (docs/landscape.md)"})
    grid: GridConfig = field(default_factory=GridConfig)
    priors: str | list[dict[str, bool | int | float | str]] = field(
        default="auto",
        metadata={"help": "first trials, in the budget: auto (known-good ones, snapped), none, "
                          "or [{module_set: mlp, r: 8}, ...]"})

    def __post_init__(self) -> None:
        # one value is the range [value, value], which the space keeps fixed
        for key in ("dropout", "learning_rate"):
            value = getattr(self, key)
            if not isinstance(value, list):
                setattr(self, key, [float(value)] * 2)

    def problems(self) -> list[str]:
        out = []
        for key in ("module_sets", "ranks", "alpha_ratios", "use_rslora", "use_dora", "loraplus_lr_ratio"):
            if not getattr(self, key):
                out.append(f"search.{key} is empty; give at least one choice")
        for i, spec in enumerate(self.module_sets):
            if isinstance(spec, str) and spec not in MODULE_SETS:
                out.append(f"search.module_sets[{i}] is {spec!r}; allowed: {', '.join(MODULE_SETS)}, or a list of layer names")
            if isinstance(spec, list) and not spec:
                out.append(f"search.module_sets[{i}] is an empty list; give layer names such as [q_proj, v_proj]")
        out += [f"search.ranks contains {r}; allowed: positive integers" for r in self.ranks if r < 1]
        out += [f"search.alpha_ratios contains {a}; allowed: positive numbers" for a in self.alpha_ratios if a <= 0]
        out += [f"search.loraplus_lr_ratio contains {a}; allowed: numbers >= 1" for a in self.loraplus_lr_ratio if a < 1]
        out += _range_problems("search.dropout", self.dropout, low_ok=lambda x: x >= 0, high_ok=lambda x: x < 1,
                               allowed="0 <= low <= high < 1")
        out += _range_problems("search.learning_rate", self.learning_rate, low_ok=lambda x: x > 0, high_ok=lambda x: x < 1,
                               allowed="0 < low <= high < 1")
        return out + self._prior_problems() + self._grid_problems()

    def _grid_problems(self) -> list[str]:
        if self.algorithm not in ALGORITHMS:
            return [f"search.algorithm is {self.algorithm!r}; allowed: {', '.join(ALGORITHMS)}"]
        if self.algorithm != GRID:
            return []
        out = []
        for key, name, (low, high) in (("learning_rates", "learning_rate", self.learning_rate),
                                       ("lora_dropouts", "dropout", self.dropout)):
            values = getattr(self.grid, key)
            if not values or len(set(values)) != len(values):
                out.append(f"search.grid.{key} is {values}; allowed: distinct values, at least one")
            outside = [value for value in values if not low <= value <= high or (low == high and value != low)]
            if outside:
                out.append(f"search.grid.{key} has {outside} outside search.{name} [{low:g}, {high:g}]; allowed: "
                           f"values within it (search.{name}'s one value where it is fixed)")
        return out

    def _prior_problems(self) -> list[str]:
        """A listed prior must name the space's own parameters (PRIOR_KEYS) with values the space holds."""
        if isinstance(self.priors, str):
            if self.priors in ("auto", "none"):
                return []
            return [f"search.priors is {self.priors!r}; allowed: auto, none, or a list of points such as "
                    "[{module_set: all_linear, r: 16, learning_rate: 2e-4}]"]
        choices = {"module_set": ("module_sets", [module_set_key(s) for s in self.module_sets]),
                   "r": ("ranks", self.ranks), "alpha_ratio": ("alpha_ratios", self.alpha_ratios),
                   "use_rslora": ("use_rslora", self.use_rslora), "use_dora": ("use_dora", self.use_dora),
                   "loraplus_lr_ratio": ("loraplus_lr_ratio", self.loraplus_lr_ratio)}
        ranges = {"lora_dropout": ("dropout", self.dropout), "learning_rate": ("learning_rate", self.learning_rate)}
        out = []
        for i, point in enumerate(self.priors):
            if not point:
                out.append(f"search.priors[{i}] is empty; give at least one of {', '.join(PRIOR_KEYS)}")
            for key, value in point.items():
                where = f"search.priors[{i}].{key}"
                if key in choices:
                    name, allowed = choices[key]
                    # True == 1 in Python: a flag must be a flag, and a number a number
                    if not any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed):
                        out.append(f"{where} is {value!r}, not in the space; allowed: one of search.{name} {allowed}")
                elif key in ranges:
                    name, (low, high) = ranges[key]
                    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                        out.append(f"{where} is {value!r}, outside the space; allowed: search.{name} [{low:g}, {high:g}]")
                else:
                    out.append(f"search.priors[{i}] has the unknown key {key!r}; allowed: {', '.join(PRIOR_KEYS)}")
        return out


def _range_problems(key: str, value: list[float], low_ok, high_ok, allowed: str) -> list[str]:
    if len(value) != 2 or not (low_ok(value[0]) and high_ok(value[1]) and value[0] <= value[1]):
        return [f"{key} is {value}; allowed: [low, high] with {allowed}"]
    return []


def module_set_key(spec: str | list[str]) -> str:
    """The categorical value Optuna sees for a module set: its name, or the explicit names joined."""
    return spec if isinstance(spec, str) else "+".join(spec)


def lora_config(resolved: ResolvedModules, r: int, alpha_ratio: float, dropout: float, use_rslora: bool, use_dora: bool) -> dict:
    """The exact keyword arguments of PEFT's LoraConfig; lora_alpha = alpha_ratio * r; `target_parameters`
    only where the set adapts expert weights. ValueError for dropout or DoRA on a set that holds them fixed."""
    if resolved.holds_fixed and (dropout or use_dora):
        raise ValueError(f"module set {resolved.name!r} {HELD_FIXED}; got lora_dropout={dropout}, use_dora={use_dora}")
    alpha = alpha_ratio * r
    extra = {"target_parameters": list(resolved.target_parameters)} if resolved.target_parameters else {}
    return {
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout,
        "target_modules": list(resolved.target_modules),
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "fan_in_fan_out": resolved.fan_in_fan_out,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        **extra,
    }


def grid_points(space: SpaceConfig) -> list[dict]:
    """Every point of `search.algorithm: grid`, as Optuna parameters of `LoraSpace` (a fixed
    range is no parameter): the cross product of the space's choices with search.grid's
    learning rates and dropouts."""
    values = {"module_set": [module_set_key(s) for s in space.module_sets], "r": space.ranks,
              "alpha_ratio": space.alpha_ratios, "use_rslora": space.use_rslora, "use_dora": space.use_dora,
              "loraplus_lr_ratio": space.loraplus_lr_ratio}
    if space.dropout[1] > space.dropout[0]:
        values["lora_dropout"] = space.grid.lora_dropouts
    if space.learning_rate[1] > space.learning_rate[0]:
        values["learning_rate"] = space.grid.learning_rates
    return [dict(zip(values, point)) for point in itertools.product(*values.values())]


class LoraSpace:
    """Optuna's define-by-run function over a SpaceConfig (a class, not a closure, because
    Tune pickles the searcher, and with it the space, into the experiment state)."""

    def __init__(self, space: SpaceConfig, resolved: dict[str, ResolvedModules], seed: int, priors: int = 0):
        self.space, self.resolved, self.seed, self.priors = space, resolved, seed, priors

    def cheaper(self, params: TrialParams) -> list[TrialParams]:
        """The configurations of this space next to `params` that train fewer parameters, nearest
        first: its next smaller rank, then each module set whose layers are a strict part of its
        own (the largest first), everything else the same. Empty for a module set the space lacks."""
        own = self.resolved.get(params.module_set)
        if own is None:
            return []

        def layers(resolved: ResolvedModules) -> set[str]:
            return set(resolved.target_modules) | set(resolved.target_parameters)

        config = params.lora_config
        smaller = [r for r in self.space.ranks if r < config["r"]]
        inside = sorted((name for name, m in self.resolved.items() if layers(m) < layers(own)),
                        key=lambda name: -len(layers(self.resolved[name])))
        out = []
        for name, r in ([(params.module_set, max(smaller))] if smaller else []) + [(name, config["r"]) for name in inside]:
            try:
                lora = lora_config(self.resolved[name], r, params.alpha_ratio, config["lora_dropout"],
                                   config["use_rslora"], config["use_dora"])
            except ValueError:  # a set that holds dropout or DoRA fixed: not the same configuration
                continue
            out.append(dataclasses.replace(params, lora_config=lora, module_set=name))
        return out

    def __call__(self, trial) -> dict:
        space = self.space
        dropout_low, dropout_high = space.dropout
        lr_low, lr_high = space.learning_rate
        module_set = trial.suggest_categorical("module_set", list(self.resolved))
        held = self.resolved[module_set].holds_fixed  # no dropout, no DoRA: HELD_FIXED
        r = trial.suggest_categorical("r", space.ranks)
        alpha_ratio = trial.suggest_categorical("alpha_ratio", space.alpha_ratios)
        if held or dropout_high == dropout_low:
            dropout = 0.0 if held else dropout_low
        else:
            dropout = trial.suggest_float("lora_dropout", dropout_low, dropout_high)
        use_rslora = trial.suggest_categorical("use_rslora", space.use_rslora)
        use_dora = False if held else trial.suggest_categorical("use_dora", space.use_dora)
        learning_rate = trial.suggest_float("learning_rate", lr_low, lr_high, log=True) if lr_high > lr_low else lr_low
        loraplus_lr_ratio = trial.suggest_categorical("loraplus_lr_ratio", space.loraplus_lr_ratio)
        return TrialParams(
            lora_config=lora_config(self.resolved[module_set], r, alpha_ratio, dropout, use_rslora, use_dora),
            module_set=module_set,
            alpha_ratio=alpha_ratio,
            learning_rate=learning_rate,
            loraplus_lr_ratio=loraplus_lr_ratio,
            seed=self.seed,
            # Optuna asks enqueued points first: trials 0 to priors - 1 are the priors (search/tuning/prior.py)
            origin=Origin.PRIOR if trial.number < self.priors else Origin.SEARCH,
        ).to_config()
