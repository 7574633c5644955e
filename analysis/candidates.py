"""Which trials deserve more budget: pure functions over the trial table, and `decide`, the
one function over the trials' raw reports that the search's stages ask while it runs.

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
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import pandas as pd

from analysis.config import SelectionConfig
from analysis.results import TrialFiles, curves_table, trials_table
from analysis.select import NoCandidate, finished_trials, pick, rank_candidates, tolerance_bar, within_bar
from rundir.params import Origin


@dataclass(frozen=True)
class Decision:
    """What the search should do next, given the trials so far."""

    promote: list[str]  # stopped trials to continue to the full budget, cheapest first
    confirm: list[str]  # leading trials to run again with other seeds (when confirmation is on)
    pick: str | None    # the trial the pick would be now; None while nothing can be picked


def decide(trials: Sequence[TrialFiles], selection: SelectionConfig, max_steps: int,
           running: Collection[str] = ()) -> Decision:
    """Promotions, confirmations and the current pick, by the analysis' own rules (`pick`,
    `promotion_candidates`, `confirmation_candidates`), from the trials' raw reports. Trials
    in `running` have not ended: their reports count towards the best value at each rung,
    but they are neither promoted, confirmed nor picked."""
    rule = (selection.metric, selection.mode, selection.tolerance, selection.cost, max_steps)
    table = trials_table([trial for trial in trials if trial.trial_id not in running], max_steps, selection.metric)
    pick_id, pick_cost = None, math.inf
    try:
        chosen = pick(table, *rule, lora_configs=defaultdict(dict))
        pick_id, pick_cost = chosen.trial_id, chosen.cost
    except NoCandidate:
        pass
    promote = (promotion_candidates(table, curves_table(trials, selection.metric), *rule[:4], max_steps, pick_cost)
               if selection.promote else [])
    confirm = []
    if selection.confirm_seeds and selection.confirm_top_k:  # leaders among the runs of their own configuration
        confirm = confirmation_candidates(table[table["origin"] != Origin.CONFIRM.value], *rule, selection.confirm_top_k)
    return Decision(promote, confirm, pick_id)


def promotion_candidates(trials: pd.DataFrame, curves: pd.DataFrame, metric: str, mode: str, tolerance: float,
                         cost: str, max_steps: int, pick_cost: float) -> list[str]:
    """Ids of stopped trials within `tolerance` of their rung's best and cheaper than
    `pick_cost` (math.inf when there is no pick yet), cheapest first. For the cost
    `train_seconds` a stopped trial's time is scaled to the full budget."""
    proposed = [origin.value for origin in Origin if origin.proposed]
    stopped = trials[(trials["status"] == "stopped") & (trials["origin"].isin(proposed))]
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
