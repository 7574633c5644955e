"""The selection settings: which metric decides, how much quality may be traded, for what."""

from dataclasses import dataclass, field

# The direction each metric improves in; a metric not listed here is not reported by trials.
METRIC_MODES = {"eval_loss": "min", "eval_accuracy": "max", "train_loss": "min"}
MODES = ("min", "max")
COSTS = ("trainable_params", "train_seconds", "peak_memory_gb")


@dataclass(frozen=True)
class SelectionConfig:
    """How the analysis picks one trial among those that finished the full budget."""

    metric: str = field(
        default="eval_loss",
        metadata={"help": f"metric that ranks trials at the full budget, one of {list(METRIC_MODES)}"},
    )
    mode: str = field(
        default="min",
        metadata={"help": "'min' or 'max': the direction in which the metric improves"},
    )
    tolerance: float = field(
        default=0.95,
        metadata={"help": "share of the best quality a cheaper trial must keep, in (0, 1]; 1 takes the best"},
    )
    cost: str = field(
        default="trainable_params",
        metadata={"help": f"what 'cheaper' means, one of {list(COSTS)}"},
    )
    promote: bool = field(
        default=True,
        metadata={"help": "train on to the full budget the trials ASHA stopped that are within tolerance and cheaper than the pick"},
    )
    confirm_top_k: int = field(
        default=2,
        metadata={"help": "leading candidates re-run with other seeds at the full budget; the pick uses their mean; 0: off"},
    )
    confirm_seeds: int = field(
        default=1,
        metadata={"help": "extra seeds per confirmed candidate"},
    )
    retrain: bool = field(
        default=False,
        metadata={"help": "train the pick once more on all the training data and export its adapter weights"},
    )

    def problems(self) -> list[str]:
        """Every problem with these settings, one message per problem; empty when valid."""
        found = []
        if self.metric not in METRIC_MODES:
            found.append(
                f"selection.metric={self.metric!r} is not a metric the trials report. "
                f"Fix: use one of {list(METRIC_MODES)}."
            )
        if self.mode not in MODES:
            found.append(f"selection.mode={self.mode!r} is not a direction. Fix: use 'min' or 'max'.")
        elif METRIC_MODES.get(self.metric, self.mode) != self.mode:
            # Optimising a loss upwards (or accuracy downwards) would silently pick the worst trial.
            found.append(
                f"selection.mode={self.mode!r} does not fit selection.metric={self.metric!r}, "
                f"which improves towards {METRIC_MODES[self.metric]!r}. "
                f"Fix: set selection.mode to {METRIC_MODES[self.metric]!r}."
            )
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)):
            found.append(f"selection.tolerance={self.tolerance!r} is not a number. Fix: use a number such as 0.95.")
        elif not 0 < self.tolerance <= 1:
            found.append(
                f"selection.tolerance={self.tolerance!r} is outside (0, 1]. "
                "Fix: use a share of the best quality, such as 0.95 (1 takes the best trial)."
            )
        if self.cost not in COSTS:
            found.append(f"selection.cost={self.cost!r} is not a cost the trials report. Fix: use one of {list(COSTS)}.")
        for key in ("confirm_top_k", "confirm_seeds"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                found.append(f"selection.{key}={value!r} is not a whole number >= 0. Fix: use 0 (off) or more.")
        return found
