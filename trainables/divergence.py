"""The divergence check: a trial whose loss became NaN or infinite fails, in either trainer, and is
never a result."""

from __future__ import annotations

import math


class TrialDiverged(RuntimeError):
    """The loss became NaN or infinite: the trial ends as failed, never as a result."""


def train_diverged(train_loss: float, step: int) -> TrialDiverged | None:
    """The failure of a trial whose mean train loss up to `step` is not finite; None when it is."""
    return None if math.isfinite(train_loss) else TrialDiverged(f"train loss became {train_loss} by step {step}")


def eval_diverged(eval_loss: float, step: int) -> TrialDiverged | None:
    """The failure of a trial whose eval loss at `step` is not finite; None when it is."""
    return None if math.isfinite(eval_loss) else TrialDiverged(f"eval loss became {eval_loss} at step {step}")
