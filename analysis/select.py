"""The pick: the cheapest trial whose quality at the full budget is within tolerance of the best.

Pure functions over the trial table (`analysis.results.trials_table`). Only trials that
finished the full budget compete: a trial stopped early is never compared with a finished
one. Metrics are assumed non-negative (losses, accuracies), so
"within tolerance" is a ratio: maximise -> value >= tolerance * best; minimise ->
value <= best / tolerance. `Comparison` is this rule, once: the pick, the search's promotions,
confirmations and extra seeds (`analysis.candidates`) and the report's statement of it all ask it.

Every value is uncertain, and "within tolerance" is judged with that uncertainty (a refinement
of `selection.tolerance`, not a second knob): the bar is set by the best mean, and a
configuration is within it when the one-sided 90% interval of its distance to the bar reaches
it, value - Z * se <= bar (minimise; value + Z * se >= bar when maximising), Z = 1.28. That
standard error `se` has a rows' part and, for a configuration run with several seeds
(confirmations), a seeds' part, seed_sd / sqrt(k), seed_sd the sample standard deviation of its
k runs' values; the two add in squares, with, where the best ran with several seeds, the bar's
own seeds' part, the best's scaled as the bar scales it (best_seeds_se / tolerance, minimise): the
bar moves with the best's mean. Every seed is scored on the same eval rows, so the rows' part does
not shrink with more seeds; the seeds' parts do. The rows' part is:
- paired, where the configuration and the best both reported per-row values
  (`analysis.results.ROW_COLUMNS`; each configuration's averaged over its runs, row by row):
  the standard error of the mean of the per-row differences between the configuration and the
  bar, value_i - best_i / tolerance (minimise; value_i - tolerance * best_i when maximising).
  Every trial is scored on the same eval rows, so how hard the rows happen to be moves the
  configuration and the best together, and only the differences are noise of the comparison:
  their standard error is usually far below either configuration's own;
- otherwise (runs that reported no per-row values, a metric without them such as the user's
  function): the configuration's own standard error over the eval rows (`<metric>_se`, reported
  by the trial, the mean over its runs; 0 for a metric reported without one).
The pick (`Pick.compared`, `Pick.paired`) and its rule say which was used.
The pick is the cheapest configuration whose mean is within the band, so `selection.tolerance`
keeps its meaning; the uncertainty says where that is not the whole story. A cheaper
configuration within the band only by its interval (its mean is past the bar) cannot be told
apart from the pick at this budget: the pick names it (`undecided_with`), the confirmation stage
adds seeds to both (`analysis.candidates`), and the report gives both. (Picking the cheaper one
instead was measured on `facts`: a pick of 0.4159 against a best of 0.3862, 7.7% worse under a
5% tolerance, bench/results/h200-2026-12-01-uncertainty-rule/.)

More seeds can settle such a case only by moving its mean, or where its mean is past the bar
by more than Z times the rows' part: within that, the rows' part alone keeps the interval
reaching the bar however many seeds agree. So seeds are added only while the seeds' part is at
least the rows' part (`analysis.candidates.more_seeds`); past that, the two are as far told apart
as this eval set can tell them, and the report says they could not be. (On `facts`, 1,200 eval
rows, a configuration's own row standard error is about 0.008 on a loss of 0.4, so Z times it
is half the band's width of 5%.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

from analysis.config import SelectionConfig
from analysis.results import ROW_COLUMNS
from rundir.params import Origin

# The level of the one-sided interval: a configuration is within the band when the band is inside
# its one-sided 90% interval.
LEVEL = 0.90


def one_sided_z(level: float) -> float:
    """The one-sided normal quantile of `level`, to four digits (1.2816 at 90%)."""
    return round(NormalDist().inv_cdf(level), 4)


Z = one_sided_z(LEVEL)


class NoCandidate(Exception):
    """No trial finished the full budget with a finite metric and cost, so there is nothing to pick."""


@dataclass(frozen=True)
class Pick:
    """The chosen trial and why; `pick.json` is this, field for field."""

    trial_id: str
    lora_config: dict
    metric: str
    mode: str
    value: float
    best_value: float
    best_trial_id: str
    tolerance: float
    cost_name: str
    cost: float
    step: int
    rule: str
    candidates: int
    seeds: int      # runs of the chosen configuration averaged into `value`
    spread: float   # their standard deviation (0 for one run)
    se: float       # the standard error of `value`: its own over the eval rows, with its seeds' part
    undecided_with: str | None  # a configuration the pick cannot be told apart from at this budget, or None
    undecided: str | None  # one sentence that says so, giving both with value ± se and cost; None when decided
    compared: int   # configurations compared with the best (all that finished, but the best)
    paired: int     # of those, the ones whose rows' part was paired with the best's rows (the module's docstring)
    tie: str | None = None  # one sentence where the metric has the same value for every configuration, else None

    def comparison(self, max_steps: int) -> Comparison:
        """The comparison that made this pick, at `max_steps`."""
        return Comparison(self.metric, self.mode, self.tolerance, self.cost_name, max_steps)


@dataclass(frozen=True)
class Comparison:
    """The one comparison with the best that the pick, the promotions, the confirmations and the
    extra seeds all make (the module's docstring): which trials compete (finished, at
    `max_steps`), the bar the best sets (`tolerance`, in the direction `mode`), whether a value
    is past it by its mean (`within`) or by its one-sided `level` interval (`reaches`), and the
    order of preference among the candidates (`cost` first). The pick's rule and the report's
    statement of it are worded from these same fields."""

    metric: str
    mode: str
    tolerance: float
    cost: str
    max_steps: int
    level: float = LEVEL

    @classmethod
    def of(cls, selection: SelectionConfig, max_steps: int) -> Comparison:
        """The comparison that `selection` (in its `direction`, min or max) asks for at `max_steps`."""
        return cls(selection.metric, selection.direction, selection.tolerance, selection.cost, max_steps)

    @property
    def z(self) -> float:
        return one_sided_z(self.level)

    def bar(self, best_value: float) -> float:
        """The worst value still within the tolerance of `best_value` (`tolerance_bar`)."""
        return tolerance_bar(best_value, self.tolerance, self.mode)

    def within(self, value: float, bar: float) -> bool:
        """Whether `value` is at `bar` or better by itself (its mean)."""
        return within_bar(value, bar, self.mode)

    def reaches(self, value: float, se: float, bar: float) -> bool:
        """Whether the one-sided `level` interval of `value`, standard error `se`, reaches `bar`."""
        return self.within(value + (-1.0 if self.mode == "min" else 1.0) * self.z * se, bar)

    def standings(self, trials: pd.DataFrame) -> Standings:
        """The configurations that finished `max_steps` with a finite metric and cost, compared
        with the best of them; NoCandidate, saying why, when there are none."""
        eligible = trials[finished(trials, self.metric, self.cost) & (trials["step"] == self.max_steps)]
        if eligible.empty:
            raise NoCandidate(_why_no_candidate(trials, self.metric, self.cost, self.max_steps))
        eligible = by_configuration(eligible, trials, self.metric)
        # ranked on its keys alone: the search's stages ask for standings after every trial
        best = eligible.loc[rank_by_metric(eligible[[self.metric, "trial_id"]], self.metric, self.mode).index[0]]
        bar = self.bar(best[self.metric])
        table = against_bar(eligible, best["trial_id"], self.mode, self.tolerance)
        table = table.assign(by_mean=[self.within(value, bar) for value in table[self.metric]],
                             in_band=[self.reaches(value, se, bar)
                                      for value, se in zip(table[self.metric], table["gap_se"])])
        return Standings(self, table, best, bar)

    def rank(self, candidates: pd.DataFrame) -> pd.DataFrame:
        """`candidates` from most to least preferred: cheapest `cost` first; ties go to fewer
        trainable parameters, then the better metric, then the smaller trial id, so the order never
        depends on row order. This is the one place where further tie-breakers belong (such as the
        spread of a config across seeds)."""
        keys = list(dict.fromkeys([self.cost, "trainable_params", *(["spread"] if "spread" in candidates else []),
                                   self.metric, "trial_id"]))
        ascending = [key != self.metric or self.mode == "min" for key in keys]  # spread: lower first
        return sort_rows(candidates, keys, ascending)

    def statement(self) -> str:
        """The rule in one clause, as the report states it above everything else."""
        return (f"the cheapest trial by `{self.cost}` whose `{self.metric}` "
                f"({'higher' if self.mode == 'max' else 'lower'} is better) is within {self.tolerance:g} of the best")

    def rule(self, standings: Standings) -> str:
        """The rule as applied to `standings`: the bar, how it came from the best, and which
        standard error each configuration's interval used."""
        table, metric = standings.table, self.metric
        compared, paired = len(table) - 1, int(table["paired"].sum())
        averaged = " (a configuration run with several seeds counts by its mean)" if table["seeds"].max() > 1 else ""
        return (
            f"Cheapest by {self.cost} among the {int(table['by_mean'].sum())} configurations that finished "
            f"{self.max_steps} steps with {metric} {'>=' if self.mode == 'max' else '<='} {standings.bar:.6g}, the "
            f"best ({standings.best[metric]:.6g}) {'times' if self.mode == 'max' else 'divided by'} the tolerance "
            f"{self.tolerance:g}{averaged}; a cheaper one whose one-sided {self.level:.0%} interval reaches the bar is "
            f"named as not told apart.{_intervals(compared, paired, metric)}"
        )


@dataclass(frozen=True)
class Standings:
    """`Comparison.standings`: one row per configuration (`against_bar`'s table, with `by_mean`,
    within the bar by its mean, and `in_band`, within it by its interval), the best's row, the bar."""

    comparison: Comparison
    table: pd.DataFrame
    best: pd.Series
    bar: float

    def candidates(self) -> pd.DataFrame:
        """The configurations within the band by their interval, most preferred first."""
        return self.comparison.rank(self.table[self.table["in_band"]])

    def preferred(self) -> pd.DataFrame:
        """Every configuration in the order the pick prefers them: those within the bar by their
        mean (the first is the pick), then those within it by their interval only (one of them
        is the pick if more seeds move its mean), each most preferred first, then the rest from
        the best metric down."""
        table, comparison = self.table, self.comparison
        # the parts are ordered on the ranking's keys alone, and the whole table reordered once
        keys = [key for key in dict.fromkeys([comparison.cost, "trainable_params", "spread", comparison.metric,
                                              "trial_id", "by_mean", "in_band"]) if key in table]
        narrow = table[keys]
        by_mean, in_band = narrow["by_mean"], narrow["in_band"]
        order = [*comparison.rank(narrow[by_mean]).index, *comparison.rank(narrow[in_band & ~by_mean]).index,
                 *rank_by_metric(narrow[~in_band], comparison.metric, comparison.mode).index]
        return table.loc[order]

    def pick(self, lora_configs: Mapping[str, dict]) -> Pick:
        """The pick among these configurations (`pick`: its rule); `lora_configs` by trial id."""
        comparison = self.comparison
        metric, cost = comparison.metric, comparison.cost
        best, bar = self.best, self.bar
        candidates = self.candidates()
        chosen = self.preferred().iloc[0]  # the best is within by its mean: always one
        undecided_with = undecided = None
        if not candidates["by_mean"].iloc[0]:  # a cheaper configuration is in the band by its interval only
            other = candidates.iloc[0]
            undecided_with, undecided = other["trial_id"], undecided_sentence(chosen, other, metric, cost, bar)
        return Pick(
            trial_id=chosen["trial_id"],
            lora_config=dict(lora_configs[chosen["trial_id"]]),
            metric=metric,
            mode=comparison.mode,
            value=float(chosen[metric]),
            best_value=float(best[metric]),
            best_trial_id=best["trial_id"],
            tolerance=float(comparison.tolerance),
            cost_name=cost,
            cost=float(chosen[cost]),
            step=int(chosen["step"]),
            rule=comparison.rule(self),
            candidates=len(candidates),
            seeds=int(chosen["seeds"]),
            spread=float(chosen["spread"]),
            se=float(chosen["se"]),
            undecided_with=undecided_with,
            undecided=undecided,
            compared=len(self.table) - 1,
            paired=int(self.table["paired"].sum()),
            tie=tie_sentence(self.table, comparison),
        )


def pick(trials: pd.DataFrame, comparison: Comparison, lora_configs: Mapping[str, dict]) -> Pick:
    """Pick the cheapest trial within the tolerance of the best, among trials that finished the
    full budget, by `comparison`.

    Eligible: status "finished", step == `max_steps`, finite `metric` and `cost`. The best
    eligible value sets the bar; every eligible configuration whose interval reaches the bar is
    a candidate (including the best); the most preferred candidate within the bar by its mean
    wins (`Comparison`). `lora_configs` maps trial ids to their exact LoraConfig arguments
    (`analysis.results.lora_configs`). Raises NoCandidate, saying why, when no trial is eligible.
    """
    return comparison.standings(trials).pick(lora_configs)


def tie_sentence(table: pd.DataFrame, comparison: Comparison) -> str | None:
    """Where every configuration of `table` (`Standings.table`, more than one) has the same value of
    the metric, one sentence saying that the metric cannot decide and the cost alone did; else None."""
    values = table[comparison.metric]
    if len(table) < 2 or values.nunique() > 1:
        return None
    return (f"`{comparison.metric}` is {values.iloc[0]:.4g} for all {len(table)} configurations that finished "
            f"{comparison.max_steps} steps, so it cannot tell them apart: the pick is only the cheapest by "
            f"`{comparison.cost}`. Pick by a metric that separates them (`selection.metric`), or train longer "
            f"(`budget.max_steps`).")


@dataclass(frozen=True)
class WithoutPick:
    """What the same rule picks with the pick's configuration (all its runs) left out of the
    trials: whether the pick rests on the one configuration that found it.

    The uncertainty of each value (above) says whether the configurations that ran can be told
    apart; it cannot say whether another seed of the whole search would have found the same
    ones. This leave-one-out answers the part a single run can. When the same module set and
    rank also win without the pick's configuration, two configurations the search found agree.
    When another wins within the tolerance of the pick's value, a search that missed the pick
    would pick about as well, with another module set or rank. When what wins is past that, the
    pick is uncertain: it rests on one configuration, and a search that missed it, as a search
    with another seed may, picks worse. `pick.json` holds this as `without_pick`."""

    trial_id: str | None    # what the rule picks without the pick's configuration; None: nothing else finished
    module_set: str | None
    r: int | None
    value: float | None
    same: bool              # the same module set and rank as the pick
    as_good: bool           # another module set or rank, within the tolerance of the pick's value
    uncertain: bool         # neither: what wins without the pick is worse by more than the tolerance, or nothing
    left_out: int           # runs of the pick's configuration left out
    sentence: str           # what the report says of it


def without_pick(trials: pd.DataFrame, chosen: Pick, max_steps: int, lora_configs: Mapping[str, dict]) -> WithoutPick:
    """`WithoutPick` for `chosen`, picked from `trials` by `pick` with `chosen`'s rule."""
    roots = configuration_root(trials)
    own = trials["trial_id"].map(roots) == roots[chosen.trial_id]
    pick_row = trials[trials["trial_id"] == chosen.trial_id].iloc[0]
    cell = (pick_row["module_set"], int(pick_row["r"]))
    runs = int(own.sum())
    left = f"`{chosen.trial_id}`" + (f" and its {runs - 1} other run{'s' if runs > 2 else ''}" if runs > 1 else "")
    try:
        other = pick(trials[~own], chosen.comparison(max_steps), lora_configs)
    except NoCandidate:
        return WithoutPick(None, None, None, None, False, False, True, runs, (
            f"**The pick is uncertain**: no other configuration finished {max_steps} steps, so nothing the search "
            f"found confirms it. More trials (`budget.num_samples`) would."))
    row = trials[trials["trial_id"] == other.trial_id].iloc[0]
    found = (row["module_set"], int(row["r"]))
    same = found == cell
    comparison = chosen.comparison(max_steps)
    as_good = not same and comparison.within(other.value, comparison.bar(chosen.value))
    described = (f"`{other.trial_id}`, {found[0]} r={found[1]} ({chosen.metric} {other.value:.4g}, "
                 f"{_against(other.value, chosen.value)} the pick's {chosen.value:.4g})")
    if same:
        sentence = (f"Without its configuration ({left}), the same rule picks {described}: the same module set and "
                    f"rank, so they do not rest on one configuration the search found.")
    elif as_good:
        sentence = (f"Without its configuration ({left}), the same rule picks {described}, within the tolerance of "
                    f"it: a search that missed the pick would pick about as well, with another module set or rank.")
    else:
        sentence = (f"**The pick is uncertain**: without its configuration ({left}), the same rule picks {described}, "
                    f"past the tolerance. The pick rests on the one configuration that found it, so a search with "
                    f"another seed may pick worse; more trials (`budget.num_samples`) make that less likely.")
    return WithoutPick(other.trial_id, found[0], found[1], other.value, same, as_good, not (same or as_good), runs,
                       sentence)


def _against(value: float, reference: float) -> str:
    """How `value` stands against `reference`: '3.0% above', 'equal to', or, where the reference is 0
    and no share of it exists, '0.02 above'."""
    if value == reference:
        return "equal to"
    side = "above" if value > reference else "below"
    return f"{abs(value / reference - 1):.1%} {side}" if reference else f"{abs(value - reference):.4g} {side}"


def _intervals(compared: int, paired: int, metric: str) -> str:
    """The rule's sentence on which standard error the intervals used (the module's docstring)."""
    paired_part = ("its distance to the bar, paired with the best over the same eval rows (the standard error of "
                   "their per-row differences)")
    if not compared:
        return ""
    if paired == compared:
        return f" Each configuration's interval is that of {paired_part}."
    if not paired:
        return (f" Each configuration's interval is that of its own {metric} over the eval rows (no per-row values "
                "to pair with the best's were reported).")
    return (f" Each configuration's interval is that of {paired_part} for {paired} of the {compared} configurations "
            f"compared with the best; for the rest, which reported no per-row values, that of its own {metric} over "
            "the eval rows.")


def undecided_sentence(chosen: pd.Series, other: pd.Series, metric: str, cost: str, bar: float) -> str:
    """The one sentence saying that `chosen` cannot be told apart from `other` (rows of
    `against_bar`'s table), with each one's value ± standard error, cost and runs, and, where
    `other` was compared with the best over paired rows, that comparison's standard error."""
    def described(row: pd.Series) -> str:
        runs = int(row["seeds"])
        runs_part = "1 run" if runs == 1 else f"mean of {runs} runs with different seeds"
        return f"{row[metric]:.4g} ± {row['se']:.2g} at {amount(row[cost])} {cost} ({runs_part})"

    how = (f"only by the standard error of its distance to the bar paired with the best over the same eval rows "
           f"({other['gap_se']:.2g}, against {abs(other[metric] - bar):.2g} past the bar)" if other["paired"]
           else "by its standard error only")
    return (f"The pick `{chosen['trial_id']}` cannot be told apart from the cheaper `{other['trial_id']}` on this "
            f"eval set: {metric} {described(chosen)} against {described(other)}; the pick is within the tolerance "
            f"by its mean, `{other['trial_id']}` {how}.")


def amount(value: float) -> str:
    """A cost as people read it: a whole number with separators (a parameter count), else three digits."""
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:.3g}"


def configuration_root(trials: pd.DataFrame) -> dict[str, str]:
    """trial_id -> the id of the search trial it repeats (following `parent` where the trial
    repeats its parent's configuration), itself for a search trial or a cheaper neighbour."""
    parents = {trial_id: parent for trial_id, parent, origin in zip(trials["trial_id"], trials["parent"], trials["origin"])
               if Origin(origin).repeats_parent}

    def root(trial_id: str) -> str:
        seen = set()
        while isinstance(parents.get(trial_id), str) and trial_id not in seen:
            seen.add(trial_id)
            trial_id = parents[trial_id]
        return trial_id

    return {trial_id: root(trial_id) for trial_id in trials["trial_id"]}


def by_configuration(eligible: pd.DataFrame, trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per configuration among `eligible` (finished) runs: a search trial together
    with its promoted continuation and its confirming runs with other seeds. The row is
    that of the configuration's first run that is not a confirmation, with `metric` (and
    the cost columns) replaced by the mean over the runs, `seeds` their count, `spread`
    the standard deviation of `metric` (0 for one run), `row_se` the mean of the runs' own
    standard errors over the eval rows, `seeds_se` the seeds' part (0 for one run), `se`
    the two combined (the module's docstring says how), and `row_values` the runs' per-row
    values averaged row by row (`mean_row_values`; None where there are none to pair).
    Configurations come in the order of their first run in `eligible`."""
    roots = configuration_root(trials)
    runs_of: dict[str, list[int]] = {}  # root -> positions of its runs in `eligible`, in order of the first
    for position, trial_id in enumerate(eligible["trial_id"]):
        runs_of.setdefault(roots[trial_id], []).append(position)
    # plain arrays, not a pandas row per configuration: the search's stages ask this after every trial
    confirm = (eligible["origin"] == Origin.CONFIRM.value).to_numpy()
    ids = eligible["trial_id"].to_numpy()
    averaged = {column: eligible[column].astype(float).to_numpy() for column in (metric, "train_seconds", "peak_memory_gb")}
    own_se = (np.nan_to_num(eligible[f"{metric}_se"].astype(float).to_numpy(), nan=0.0) if f"{metric}_se" in eligible
              else np.zeros(len(eligible)))
    row_column = ROW_COLUMNS.get(metric)
    row_lists = list(eligible[row_column]) if row_column in eligible else [None] * len(eligible)
    firsts, columns = [], {name: [] for name in (*averaged, "seeds", "spread", "row_se", "seeds_se", "se", "row_values")}
    for positions in runs_of.values():
        firsts.append(min(positions, key=lambda position: (confirm[position], ids[position])))
        for column, values in averaged.items():
            columns[column].append(_mean(values[positions]))
        values, runs = averaged[metric][positions], len(positions)
        columns["seeds"].append(runs)
        columns["spread"].append(float(np.std(values)) if runs > 1 else 0.0)
        columns["row_se"].append(float(np.mean(own_se[positions])))
        columns["seeds_se"].append(float(np.std(values, ddof=1)) / math.sqrt(runs) if runs > 1 else 0.0)
        columns["se"].append(math.hypot(columns["row_se"][-1], columns["seeds_se"][-1]))
        columns["row_values"].append(mean_row_values([row_lists[position] for position in positions]))
    table = eligible.iloc[firsts].reset_index(drop=True)
    return table.assign(**columns | {"row_values": pd.Series(columns["row_values"], index=table.index, dtype=object)})


def _mean(values: np.ndarray) -> float:
    """The mean of the values that are not NaN, as pandas takes a column's (NaN when none is)."""
    present = values[~np.isnan(values)]
    return float(present.mean()) if len(present) else math.nan


def mean_row_values(values: list) -> np.ndarray | None:
    """The runs' per-row values of the metric (`ROW_COLUMNS`: each run's a list, or None where it
    reported none) averaged row by row; None unless every run reported them for the same number
    of rows."""
    if any(not isinstance(run, list) for run in values) or len({len(run) for run in values}) != 1:
        return None
    return np.mean(np.array(values, dtype=float), axis=0)


def against_bar(configurations: pd.DataFrame, best_id: str, mode: str, tolerance: float) -> pd.DataFrame:
    """`by_configuration`'s table with how each configuration is compared with the bar the best
    (`best_id`) sets: `gap_row_se`, the rows' part of the standard error of its distance to the
    bar, paired with the best's rows where both have per-row values (`paired` True:
    `paired_row_se`) and its own `row_se` otherwise; `gap_se`, that part combined with its seeds'
    part and the bar's (the best's seeds' part, scaled by `tolerance_bar`). The best itself keeps its
    own standard error (`paired` False): it is not compared with itself."""
    best = configurations.loc[configurations["trial_id"] == best_id].iloc[0]
    best_rows, bar_seeds_se = best["row_values"], tolerance_bar(best["seeds_se"], tolerance, mode)
    paired_se = [None if trial_id == best_id else paired_row_se(rows, best_rows, tolerance, mode)
                 for trial_id, rows in zip(configurations["trial_id"], configurations["row_values"])]
    gap_row_se = [own if paired is None else paired for paired, own in zip(paired_se, configurations["row_se"])]
    return configurations.assign(
        paired=[paired is not None for paired in paired_se], gap_row_se=gap_row_se,
        gap_se=[math.hypot(rows, seeds, 0.0 if trial_id == best_id else bar_seeds_se)
                for trial_id, rows, seeds in zip(configurations["trial_id"], gap_row_se, configurations["seeds_se"])])


def paired_row_se(rows: np.ndarray | None, best_rows: np.ndarray | None, tolerance: float, mode: str) -> float | None:
    """The standard error of the mean over the eval rows of rows_i - bar_i, bar_i being
    `tolerance_bar` of the best's value on row i (the bar scales the best's mean, so it scales
    each of its rows alike): the rows' part of a configuration's distance to the bar, paired.
    None unless both have per-row values for the same rows, at least two."""
    pairable = (isinstance(rows, np.ndarray) and isinstance(best_rows, np.ndarray)
                and len(rows) == len(best_rows) and len(rows) > 1)
    if not pairable:
        return None
    differences = rows - tolerance_bar(best_rows, tolerance, mode)
    return float(np.std(differences, ddof=1)) / math.sqrt(len(differences))


def tolerance_bar(best_value: float, tolerance: float, mode: str) -> float:
    """The worst value still within `tolerance` of `best_value`: best * tolerance (max) or best / tolerance (min)."""
    return tolerance * best_value if mode == "max" else best_value / tolerance


def within_bar(value: float, bar: float, mode: str) -> bool:
    """True when `value` is at `bar` or better in the direction `mode` ("min" or "max") improves.

    A value equal to the bar on paper counts even where floating point puts the bar a hair
    past it (0.9 * 0.2 is 0.18000000000000002).
    """
    return (value >= bar if mode == "max" else value <= bar) or math.isclose(value, bar, rel_tol=1e-12)


def rank_by_metric(trials: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """Trials from best to worst `metric`; ties go to the smaller trial id."""
    return sort_rows(trials, [metric, "trial_id"], [mode == "min", True])


def sort_rows(frame: pd.DataFrame, keys: list[str], ascending: list[bool]) -> pd.DataFrame:
    """`frame.sort_values(keys, ascending=ascending, kind="stable")`: by each key in turn, a
    missing value last whichever the direction, ties in `frame`'s order; a descending key must be
    numeric. Sorted in Python on the keys' values, which for the few rows of a trial table is far
    quicker than pandas' sort (it encodes every key first), and the search's stages rank after
    every trial."""
    columns = [(frame[key].tolist(), up) for key, up in zip(keys, ascending)]

    def order(position: int) -> tuple:
        out = []
        for values, up in columns:
            value = values[position]
            missing = value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))
            out.append((True, 0) if missing else (False, value if up else -value))
        return tuple(out)

    return frame.iloc[sorted(range(len(frame)), key=order)]


def pareto_front(trials: pd.DataFrame, metric: str, mode: str, cost: str) -> pd.DataFrame:
    """The finished trials that no other finished trial beats on both `cost` and `metric`, cheapest first.

    A trial is dominated when another is at most as costly and at least as good, and
    strictly better on one of the two; of trials equal on both, the smaller trial id stays.
    """
    sign = 1.0 if mode == "min" else -1.0
    ordered = finished_trials(trials, metric, cost).assign(_loss=lambda t: sign * t[metric])
    ordered = ordered.sort_values([cost, "_loss", "trial_id"], kind="stable")
    # Sweeping from the cheapest, a trial is on the front when it beats every cheaper one.
    best_so_far = ordered["_loss"].cummin().shift(fill_value=math.inf)
    return ordered[ordered["_loss"] < best_so_far].drop(columns="_loss")


def finished_trials(trials: pd.DataFrame, metric: str, cost: str) -> pd.DataFrame:
    """Trials with status "finished" and a finite `metric` and `cost`: the ones that can be compared."""
    return trials[finished(trials, metric, cost)]


def finished(trials: pd.DataFrame, metric: str, cost: str) -> pd.Series:
    """Which of `trials` `finished_trials` keeps, as a mask."""
    finite = np.isfinite(trials[metric].astype(float)) & np.isfinite(trials[cost].astype(float))
    return (trials["status"] == "finished") & finite


def _why_no_candidate(trials: pd.DataFrame, metric: str, cost: str, max_steps: int) -> str:
    counts = trials["status"].value_counts()
    summary = ", ".join(f"{counts.get(status, 0)} {status}" for status in ("finished", "stopped", "failed"))
    if trials.empty:
        return "The run has no trials yet, so there is nothing to pick. Fix: run the search (or resume it) first."
    if counts.get("finished", 0) == 0 and counts.get("failed", 0) == 0:
        return (
            f"No trial reached step {max_steps}, the full budget ({summary}), and none failed: the run was "
            "interrupted before any got there, so there is nothing to pick yet. Fix: resume the run (its command "
            "with --resume)."
        )
    if counts.get("finished", 0) == 0:
        return (
            f"No trial reached step {max_steps}, the full budget ({summary}), so there is nothing to pick. "
            "Fix: read the errors in trials.csv, then resume the run or start it again."
        )
    return (
        f"No finished trial reported a finite {metric} and {cost} at step {max_steps} ({summary}), "
        f"so there is nothing to pick. Fix: select by a metric and cost that the trials report."
    )
