"""What each trial's learning curve says: diverged, overfitting, or plateaued early.

Pure functions over the curves (`analysis.results.curves_table`) and the trial table. The
thresholds are deliberately coarse: a diagnosis is a hint for the reader of the report,
never an input to the pick.
"""

from __future__ import annotations

import pandas as pd

# Eval loss this far above its own minimum, while train loss kept falling, is overfitting.
OVERFIT_RISE = 0.02
# Less than this relative improvement of eval loss over the second half of the steps is a plateau.
PLATEAU_GAIN = 0.01


def diagnose(trials: pd.DataFrame, curves: pd.DataFrame) -> dict[str, str]:
    """trial_id -> "diverged", "overfitting", "plateaued early", or "" when the curve looks healthy."""
    out = {}
    for row in trials.itertuples():
        if row.status == "failed":
            out[row.trial_id] = "diverged" if "TrialDiverged" in str(row.error) else ""
            continue
        curve = curves[curves["trial_id"] == row.trial_id].sort_values("step")
        out[row.trial_id] = curve_diagnosis(curve["step"].tolist(), curve["eval_loss"].tolist(), curve["train_loss"].tolist())
    return out


def curve_diagnosis(steps: list[int], eval_loss: list[float], train_loss: list[float]) -> str:
    """The diagnosis of one curve (at least three evaluations are needed to say anything)."""
    if len(steps) < 3:
        return ""
    best = min(range(len(eval_loss)), key=eval_loss.__getitem__)
    if eval_loss[-1] > eval_loss[best] * (1 + OVERFIT_RISE) and train_loss[-1] < train_loss[best]:
        return "overfitting"
    half = next(i for i, step in enumerate(steps) if step >= steps[-1] / 2)
    if half < len(steps) - 1 and eval_loss[half] - eval_loss[-1] < PLATEAU_GAIN * eval_loss[half]:
        return "plateaued early"
    return ""
