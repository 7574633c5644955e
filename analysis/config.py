"""The selection settings: which metric decides, how much quality may be traded, for what."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

# The direction each built-in metric improves in; besides these, trials report only the user's
# function that selection.metric names (`is_user_metric`).
METRIC_MODES = {"eval_loss": "min", "eval_accuracy": "max", "train_loss": "min", "eval_exact_match": "max"}
MODES = ("auto", "min", "max")
COSTS = ("trainable_params", "train_seconds", "peak_memory_gb")
# `package.module:function`, the form of a user's metric function (as in entry points)
_USER_METRIC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def is_user_metric(metric: str) -> bool:
    """True when `metric` names the user's function (`module:function`); trials report its
    value under that name, and trials.csv has a column of that name."""
    return bool(_USER_METRIC.match(metric))


def needs_generations(metric: str) -> bool:
    """True when trials compute `metric` from greedily generated answers, which they do
    only with data.eval_generate_examples > 0: exact match, or the user's function."""
    return metric == "eval_exact_match" or is_user_metric(metric)


@dataclass(frozen=True)
class SelectionConfig:
    """How the analysis picks one trial among those that finished the full budget."""

    metric: str = field(default="eval_loss", metadata={"help": f"metric that ranks trials at the full budget: one of {list(METRIC_MODES)}, or your module:function"})
    mode: str = field(default="auto", metadata={"help": "'min' or 'max': the direction in which the metric improves; auto: the metric's own (not for a function)"})
    tolerance: float = field(default=0.95, metadata={"help": "share of the best quality a cheaper trial must keep, in (0, 1]; 1 takes the best"})
    cost: str = field(default="trainable_params", metadata={"help": f"what 'cheaper' means, one of {list(COSTS)}"})
    promote: bool = field(default=True, metadata={"help": "train on to the full budget the trials ASHA stopped that are within tolerance and cheaper than the pick"})
    confirm_top_k: int = field(default=1, metadata={"help": "leading candidates re-run with other seeds at the full budget; the pick uses their mean; 0: off"})
    confirm_seeds: int = field(default=1, metadata={"help": "extra seeds per confirmed candidate"})
    cheaper: int = field(default=1, metadata={"help": "after the search, the pick's nearest cheaper neighbours (next smaller rank, a module set inside its own) trained in full, at most this many; 0: off"})
    confirm_max_seeds: int = field(default=0, metadata={"help": "runs (its own included) a configuration may get while the pick cannot be told from it: >= confirm_seeds + 1, or 0: none past the confirmation"})
    retrain: bool = field(default=False, metadata={"help": "train the pick once more on all the training data and export its adapter weights"})
    trust_metric_code: bool = field(default=False, metadata={"help": "let every trial import and run the metric function that selection.metric names (your code)"})

    @property
    def direction(self) -> str:
        """'min' or 'max': `mode`, or for `auto` the metric's own direction. What Tune, the pick
        and the console use; `mode` stays as the user wrote it, so a config printed or recorded
        keeps `auto` and a later change of metric brings its own direction. ValueError for `auto`
        with a function of the user's, whose direction only the user knows (`problems` says so)."""
        if self.mode != "auto":
            return self.mode
        if self.metric not in METRIC_MODES:
            raise ValueError(f"selection.mode is 'auto', which knows no direction for {self.metric!r}")
        return METRIC_MODES[self.metric]

    @classmethod
    def recorded(cls, settings: dict) -> SelectionConfig:
        """The settings as run_config.json records them (`RunConfig.selection`); ValueError naming
        any key it does not know."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise ValueError(f"run_config.json: selection has unknown keys {unknown}; the known keys are {known}.")
        return cls(**settings)

    def with_options(self, **options) -> SelectionConfig:
        """These settings with `options` (keyword arguments named as the fields) in place. A metric
        other than this one comes with its own direction (mode auto) unless a mode is among them:
        this one's direction may not be the other's."""
        if options.get("metric", self.metric) != self.metric and "mode" not in options:
            options = {**options, "mode": "auto"}
        return replace(self, **options)

    def problems(self, key: Callable[[str], str] = "selection.{}".format) -> list[str]:
        """Every problem with these settings, one message per problem; empty when valid. `key`
        names a setting as the command at hand takes it (a config key by default; an option of
        `analysis.report`)."""
        found = []
        metric, mode = key("metric"), key("mode")
        user_metric = is_user_metric(self.metric)
        if self.metric not in METRIC_MODES and not user_metric:
            found.append(
                f"{metric}={self.metric!r} is not a metric the trials report. "
                f"Fix: use one of {list(METRIC_MODES)}, or a function of yours as module:function."
            )
        if user_metric and self.trust_metric_code is not True:
            # the trials would import and run the user's module: only on the user's explicit say-so
            found.append(
                f"{metric}={self.metric!r} is a function of yours, which every trial would import and run, "
                f"but {key('trust_metric_code')} is not true. "
                f"Fix: set {key('trust_metric_code')} to true if you trust that code."
            )
        if self.mode not in MODES:
            found.append(f"{mode}={self.mode!r} is not a direction. Fix: use 'min', 'max' or 'auto'.")
        elif user_metric and self.mode == "auto":
            found.append(
                f"{mode} is 'auto', which cannot know in which direction {self.metric!r} improves. "
                f"Fix: set {mode} to 'max' (higher is better) or 'min'."
            )
        elif self.mode != "auto" and METRIC_MODES.get(self.metric, self.mode) != self.mode:
            # Optimising a loss upwards (or accuracy downwards) would silently pick the worst trial.
            found.append(
                f"{mode}={self.mode!r} does not fit {metric}={self.metric!r}, "
                f"which improves towards {METRIC_MODES[self.metric]!r}. "
                f"Fix: set {mode} to {METRIC_MODES[self.metric]!r} or 'auto'."
            )
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)):
            found.append(f"{key('tolerance')}={self.tolerance!r} is not a number. Fix: use a number such as 0.95.")
        elif not 0 < self.tolerance <= 1:
            found.append(
                f"{key('tolerance')}={self.tolerance!r} is outside (0, 1]. "
                "Fix: use a share of the best quality, such as 0.95 (1 takes the best trial)."
            )
        if self.cost not in COSTS:
            found.append(f"{key('cost')}={self.cost!r} is not a cost the trials report. Fix: use one of {list(COSTS)}.")
        for name in ("confirm_top_k", "confirm_seeds", "cheaper"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                found.append(f"{key(name)}={value!r} is not a whole number >= 0. Fix: use 0 (off) or more.")
        seeds, most = self.confirm_seeds, self.confirm_max_seeds
        if isinstance(most, bool) or not isinstance(most, int):
            found.append(f"{key('confirm_max_seeds')}={most!r} is not a whole number. Fix: use a number such as 4.")
        elif isinstance(seeds, int) and not isinstance(seeds, bool) and most != 0 and most < seeds + 1:
            found.append(
                f"{key('confirm_max_seeds')}={most} is less than {key('confirm_seeds')} + 1 = {seeds + 1}, the runs "
                f"every confirmed candidate gets anyway. Fix: set {key('confirm_max_seeds')} to {seeds + 1} or more, "
                f"or 0 for no seeds past the confirmation."
            )
        return found
