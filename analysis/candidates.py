"""Which trials deserve more budget: pure functions over the trial table, and `decide`, the
one function over the trials' raw reports that the search's stages ask while it runs.

- Promotion: ASHA stops a cheap configuration that is a few percent worse at an early
  rung, and the cheapest-within-tolerance rule would never see it. A stopped trial is
  promoted when, at the step it was stopped, it was within the tolerance of the best
  value any trial reported at that step, and it is cheaper than the current pick.
- Confirmation: the leading candidates of the pick are trained again with other seeds,
  so the pick is made on a mean, not on one lucky run. While the pick cannot be told apart
  from another configuration (`Pick.undecided_with`), both get more seeds (`more_seeds`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import pandas as pd

from analysis.config import SelectionConfig
from analysis.results import TrialFiles, curves_table, trials_table
from analysis.select import Comparison, NoCandidate, Pick, Standings
from rundir.params import Origin


@dataclass(frozen=True)
class Decision:
    """What the search should do next, given the trials so far."""

    promote: list[str]  # stopped trials to continue to the full budget, cheapest first
    confirm: list[str]  # leading trials to run again with other seeds (when confirmation is on)
    pick: str | None    # the trial the pick would be now; None while nothing can be picked
    # configurations the pick cannot yet be told apart: trial id -> the runs with other seeds it should have in all
    more_seeds: dict[str, int] = field(default_factory=dict)


def decide(trials: Sequence[TrialFiles], selection: SelectionConfig, max_steps: int,
           running: Collection[str] = ()) -> Decision:
    """Promotions, confirmations and the current pick, by the analysis' own comparison
    (`analysis.select.Comparison`: `pick`, `promotion_candidates`, `confirmation_candidates`,
    `more_seeds`), from the trials' raw reports. Trials in `running` have not ended: their
    reports count towards the best value at each rung, but they are neither promoted,
    confirmed nor picked."""
    comparison = Comparison.of(selection, max_steps)
    table = trials_table([trial for trial in trials if trial.trial_id not in running], max_steps, selection.metric)
    standings = chosen = None
    try:
        standings = comparison.standings(table)
        chosen = standings.pick(lora_configs=defaultdict(dict))
    except NoCandidate:
        pass
    pick_id, pick_cost = (chosen.trial_id, chosen.cost) if chosen else (None, math.inf)
    promote = (promotion_candidates(table, curves_table(trials, selection.metric), comparison, pick_cost)
               if selection.promote else [])
    confirm, more = [], {}
    if selection.confirm_seeds and selection.confirm_top_k:  # leaders among the runs of their own configuration
        confirm = confirmation_candidates(table[table["origin"] != Origin.CONFIRM.value], comparison,
                                          selection.confirm_top_k)
        if chosen is not None:
            more = more_seeds(standings, chosen, selection.confirm_max_seeds)
    return Decision(promote, confirm, pick_id, more)


def leader(trials: Sequence[TrialFiles], selection: SelectionConfig, max_steps: int) -> pd.Series | None:
    """The best configuration so far among `trials` (ended ones), as the pick and the report name
    it (`analysis.select.Standings.best`: a configuration's runs with other seeds and its promotion
    count together, by their mean, under the id of its first run that is not a confirmation);
    its row of `analysis.select.by_configuration`'s table. None while none finished the full budget."""
    try:
        return Comparison.of(selection, max_steps).standings(trials_table(list(trials), max_steps, selection.metric)).best
    except NoCandidate:
        return None


def more_seeds(standings: Standings, chosen: Pick, max_runs: int) -> dict[str, int]:
    """While `chosen` cannot be told apart from `chosen.undecided_with`: for each of the two, its
    trial id -> the runs with other seeds it should have in all, one more than it has finished.

    A configuration gets one while it has fewer than `max_runs` runs (its own included) and
    another seed can still narrow the standard error of its distance to the bar: it has a single
    run (its seeds' part is not known yet), or its seeds' part is at least its rows' part (paired
    with the best's rows where both have per-row values: `analysis.select.against_bar`). Every
    seed is scored on the same eval rows, so seeds shrink only the seeds' part; once the rows'
    part is the larger, the two are as far told apart as this eval set can tell them, and the
    report says so. Empty when the pick is decided. `standings` are those `chosen` was picked from."""
    if chosen.undecided_with is None:
        return {}
    table = standings.table
    out = {}
    for _, row in table[table["trial_id"].isin([chosen.trial_id, chosen.undecided_with])].iterrows():
        runs = int(row["seeds"])
        if runs < max_runs and (runs == 1 or row["seeds_se"] >= row["gap_row_se"]):
            out[row["trial_id"]] = runs  # the runs with other seeds: all but its own, plus one
    return out


def promotion_candidates(trials: pd.DataFrame, curves: pd.DataFrame, comparison: Comparison,
                         pick_cost: float) -> list[str]:
    """Ids of stopped trials within the bar of their rung's best (`Comparison.within`: by the
    value at the rung, where a stopped trial has one run only) and cheaper than `pick_cost`
    (math.inf when there is no pick yet), cheapest first. For the cost `train_seconds` a
    stopped trial's time is scaled to the full budget."""
    metric, cost, max_steps = comparison.metric, comparison.cost, comparison.max_steps
    proposed = [origin.value for origin in Origin if origin.proposed]
    stopped = trials[(trials["status"] == "stopped") & (trials["origin"].isin(proposed))]
    reported = curves[curves[metric].notna()].groupby("step")[metric]
    best_at = reported.min() if comparison.mode == "min" else reported.max()  # each rung's best, by step
    out = []
    for _, row in stopped.iterrows():
        step, value = row["step"], row[metric]
        if pd.isna(step) or pd.isna(value) or not math.isfinite(value) or step not in best_at.index:
            continue
        best = best_at[step]
        projected = row[cost] * max_steps / step if cost == "train_seconds" else row[cost]
        if comparison.within(value, comparison.bar(best)) and projected < pick_cost:
            out.append((projected, row["trial_id"]))
    return [trial_id for _, trial_id in sorted(out)]


def confirmation_candidates(trials: pd.DataFrame, comparison: Comparison, top_k: int) -> list[str]:
    """The `top_k` configurations in the order the pick prefers them (`Standings.preferred`: the
    pick first, then those within the bar, then those it cannot be told apart from, then the
    rest by metric). Empty when nothing finished."""
    try:
        standings = comparison.standings(trials)
    except NoCandidate:
        return []
    return list(standings.preferred()["trial_id"][:max(top_k, 0)])
