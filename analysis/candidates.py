"""Which trials deserve more budget after the search: pure functions over the trial table.

- Promotion: ASHA stops a cheap configuration that is a few percent worse at an early
  rung, and the cheapest-within-tolerance rule would never see it. A stopped trial is
  promoted when, at the step it was stopped, it was within the tolerance of the best
  value any trial reported at that step, and it is cheaper than the current pick.
- Confirmation: the leading candidates of the pick are trained again with other seeds,
  so the pick is made on a mean, not on one lucky run.
"""

from __future__ import annotations

import math
from collections import defaultdict

import pandas as pd

from analysis.select import NoCandidate, finished_trials, pick, rank_candidates, tolerance_bar, within_bar


def promotion_candidates(trials: pd.DataFrame, curves: pd.DataFrame, metric: str, mode: str, tolerance: float,
                         cost: str, max_steps: int, pick_cost: float) -> list[str]:
    """Ids of stopped trials within `tolerance` of their rung's best and cheaper than
    `pick_cost` (math.inf when there is no pick yet), cheapest first. For the cost
    `train_seconds` a stopped trial's time is scaled to the full budget."""
    stopped = trials[(trials["status"] == "stopped") & (trials["origin"].isin(["search", "prior"]))]
    out = []
    for _, row in stopped.iterrows():
        step, value = row["step"], row[metric]
        if pd.isna(step) or pd.isna(value) or not math.isfinite(value):
            continue
        at_rung = curves[(curves["step"] == step) & curves[metric].notna()][metric]
        best = at_rung.min() if mode == "min" else at_rung.max()
        projected = row[cost] * max_steps / step if cost == "train_seconds" else row[cost]
        if within_bar(value, tolerance_bar(best, tolerance, mode), mode) and projected < pick_cost:
            out.append((projected, row["trial_id"]))
    return [trial_id for _, trial_id in sorted(out)]


def confirmation_candidates(trials: pd.DataFrame, metric: str, mode: str, tolerance: float, cost: str,
                            max_steps: int, top_k: int) -> list[str]:
    """The `top_k` finished trials the pick would prefer: those within tolerance of the
    best, cheapest first, then the rest by metric. Empty when nothing finished."""
    finished = finished_trials(trials, metric, cost)
    finished = finished[finished["step"] == max_steps]
    if finished.empty or top_k <= 0:
        return []
    best = finished[metric].min() if mode == "min" else finished[metric].max()
    within = finished[[within_bar(v, tolerance_bar(best, tolerance, mode), mode) for v in finished[metric]]]
    rest = finished.drop(within.index).sort_values(metric, ascending=mode == "min")
    ordered = pd.concat([rank_candidates(within, metric, mode, cost), rest])
    return list(ordered["trial_id"][:top_k])


def current_pick_cost(trials: pd.DataFrame, metric: str, mode: str, tolerance: float, cost: str, max_steps: int) -> float:
    """The cost of what would be picked now, or infinity when nothing can be picked."""
    try:
        return pick(trials, metric, mode, tolerance, cost, max_steps, lora_configs=defaultdict(dict)).cost
    except NoCandidate:
        return math.inf
