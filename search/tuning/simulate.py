"""The product's own search replayed on a landscape (`analysis.landscape`), with a simulated clock.

`replay` wires the search as a run does (`search.tuning.tuner.search_parts`: Optuna's sampler
behind `StudySearcher`, the priors, ASHA, `StagedSearch` with its promotions and confirmations,
the limit on concurrent trials), and plays Tune's part through their public `Searcher` and
`TrialScheduler` methods, in the order Tune's controller calls them: each report goes to the
scheduler first, to the searcher unless the scheduler stops the trial, and a trial's end to
both. A trial is a lookup: its configuration snapped to the grid's nearest point, its seed one
of the table's seeds that this configuration has not run with yet in this search (drawn at
random; a promotion continues its parent's curve, from its parent's step, with its parent's
seed), its reports at the simulated times the table's cumulative seconds give, with at most
`resources.max_concurrent_trials` trials at once (0: the landscape's `slots`). ASHA's STOP ends
it. The pick, and whether the report would call it uncertain, are the analysis' own over the
reports the trials made (`final_pick`). With `eval_rows`,
every trial of one search is scored on the same random `eval_rows` of the landscape's eval rows, as
a run with `data.eval_examples` scores the same rows in every trial (`scored`); the truth stays the
landscape's own values over all its rows.

What is not simulated: the time Optuna, ASHA and the analysis themselves take, model loading
and Tune's own overheads between trials (a trial's seconds are its train and eval seconds).
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import tempfile
import warnings
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from analysis.landscape import POINT_KEYS, Landscape, Point, row_seconds
from analysis.results import TrialFiles, trials_table
from analysis.select import Comparison, NoCandidate, pick, without_pick
from rundir.location import RunLocation
from rundir.params import Origin, TrialParams
from search.config import Config, load
from search.tuning.prior import prior_points
from search.tuning.space import LoraSpace, ResolvedModules, module_set_key
from search.tuning.tuner import search_parts

# The landscape's own keys in a row; the rest is what the trial reported.
_ROW_KEYS = (*POINT_KEYS, "seed")


def space_overrides(landscape: Landscape) -> list[str]:
    """`--set` overrides that make the search's space the landscape's grid: its values for the
    choices, [lowest, highest] of its values for the ranges (and the grid's points for
    search.algorithm grid), its budget, metric and direction."""
    grid, header = landscape.header.grid, landscape.header

    def value(values) -> str:
        return json.dumps(values)

    module_sets = [name.split("+") if "+" in name else name for name in grid["module_set"]]
    return [f"search.module_sets={value(module_sets)}", f"search.ranks={value(grid['r'])}",
            f"search.alpha_ratios={value(grid['alpha_ratio'])}", f"search.use_rslora={value(grid['use_rslora'])}",
            f"search.use_dora={value(grid['use_dora'])}", "search.loraplus_lr_ratio=[1.0]",
            f"search.learning_rate={value([min(grid['learning_rate']), max(grid['learning_rate'])])}",
            f"search.dropout={value([min(grid['lora_dropout']), max(grid['lora_dropout'])])}",
            f"search.grid.learning_rates={value(grid['learning_rate'])}",
            f"search.grid.lora_dropouts={value(grid['lora_dropout'])}",
            f"budget.max_steps={header.max_steps}", f"budget.eval_every={header.steps[0]}",
            f"budget.grace_period={min(header.steps[0], header.max_steps)}",
            f"selection.metric={header.metric}", f"selection.mode={header.mode}"]


def policy_config(landscape: Landscape, overrides: list[str] = ()) -> Config:
    """The embedded default configuration on the landscape's space (`space_overrides`), then
    `overrides` (a policy: `--set` strings, which may narrow the space). ValueError for an
    override the landscape cannot replay: a budget or eval rounds other than those it measured, a
    module set it did not measure, a selection metric its rows lack."""
    config = load(None, [*space_overrides(landscape), *overrides])
    header = landscape.header
    for key, value, measured in (("budget.max_steps", config.budget.max_steps, header.max_steps),
                                 ("budget.eval_every", config.budget.eval_every, header.steps[0])):
        if value != measured:
            raise ValueError(f"{key} is {value}; allowed: {measured}, the landscape's own (its rows were measured "
                             f"at steps {header.steps})")
    unmeasured = [key for key in map(module_set_key, config.search.module_sets) if key not in header.grid["module_set"]]
    if unmeasured:
        raise ValueError(f"search.module_sets holds {unmeasured}; allowed: module sets of the landscape's grid "
                         f"{header.grid['module_set']}")
    if not all(config.selection.metric in row for curve in landscape.curves.values() for row in curve):
        raise ValueError(f"selection.metric is {config.selection.metric!r}; allowed: a metric every row of the "
                         f"landscape carries, such as its own {header.metric!r}")
    if not config.resources.max_concurrent_trials:
        config = replace(config, resources=replace(config.resources,
                                                   max_concurrent_trials=landscape.header.slots))
    return config


@dataclass(frozen=True)
class Search:
    """One simulated search: what it picked (None: nothing), and what it cost."""

    pick: Point | None
    gpu_seconds: float  # the trials' train and eval seconds, summed
    wall_seconds: float  # when the last trial ended
    trials: int
    uncertain: bool = False  # what the run's report would call the pick: `analysis.select.WithoutPick.uncertain`


@dataclass
class _Running:
    trial: object  # Tune's Trial, which ASHA keeps in its rungs
    point: Point
    seed: int
    rows: list[dict]  # what is left to report, with the simulated time of each
    started: float
    reported: list[dict] = field(default_factory=list)


def replay(landscape: Landscape, config: Config, rng: np.random.Generator, eval_rows: int | None = None) -> Search:
    """The search of `config` (`policy_config`) replayed once on `landscape`; `rng` draws the seeds
    (and first the eval rows: `eval_subset`)."""
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.search import Searcher

    header = landscape.header
    subset = eval_subset(landscape, config.selection.metric, eval_rows, rng)
    # the run's module sets as the run resolves them: the config's, which may be fewer than the landscape's
    resolved = {name: ResolvedModules(name, name.split("+"), False, [], None)
                for name in map(module_set_key, config.search.module_sets)}
    priors = prior_points(config.search, header.search_train_rows, header.task_kind, config.budget.num_samples)
    space = LoraSpace(config.search, resolved, config.seed, priors=len(priors))
    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning for constant_liar, once per search
        parts = search_parts(config, space, priors, RunLocation(Path(scratch)), str(Path(scratch) / "asha_state.pkl"))
        staged, scheduler = parts.staged, parts.scheduler
        scheduler.set_search_properties(config.selection.metric, config.selection.direction)
        running: dict[str, _Running] = {}
        done: dict[str, _Running] = {}
        controller = SimpleNamespace(get_live_trials=lambda: [state.trial for state in running.values()])
        seeds_run: dict[Point, list[int]] = {}
        events: list[tuple[float, int, str]] = []  # (time, order of arrival for ties, trial id)
        order = itertools.count()
        now, gpu_seconds, finished, number = 0.0, 0.0, False, 0
        while True:
            while not finished and len(running) < config.resources.max_concurrent_trials:
                trial_id = f"{number:08x}"
                proposal = staged.suggest(trial_id)
                if proposal is None:
                    break
                if proposal == Searcher.FINISHED:
                    finished = True
                    break
                number += 1
                state = _start(landscape, trial_id, proposal, now, rng, seeds_run, {**running, **done}, subset)
                scheduler.on_trial_add(controller, state.trial)
                running[trial_id] = state
                heapq.heappush(events, (state.rows[0]["at"], next(order), trial_id))
            if not events:
                break
            now, _, trial_id = heapq.heappop(events)
            state = running[trial_id]
            row = state.rows.pop(0)
            result = {key: value for key, value in row.items() if key not in (*_ROW_KEYS, "at", "index")}
            result |= {"trial_id": trial_id, "checkpoint_dir_name": f"checkpoint_{row['index']:06d}"}
            state.reported.append(result)
            decision = scheduler.on_trial_result(controller, state.trial, result)
            if decision != TrialScheduler.STOP:
                staged.on_trial_result(trial_id, result)
            if decision == TrialScheduler.STOP or not state.rows:
                scheduler.on_trial_complete(controller, state.trial, result)
                staged.on_trial_complete(trial_id, result=result)
                gpu_seconds += now - state.started
                done[trial_id] = running.pop(trial_id)
            else:
                heapq.heappush(events, (state.rows[0]["at"], next(order), trial_id))
    trials = [TrialFiles(trial_id, TrialParams.from_config(state.trial.config), state.reported, "", None)
              for trial_id, state in done.items()]
    picked, uncertain = final_pick(trials, config)
    return Search(done[picked].point if picked else None, gpu_seconds, now, len(done), uncertain)


def final_pick(trials: list[TrialFiles], config: Config) -> tuple[str | None, bool]:
    """The pick's trial id (None: nothing finished) and whether the report would call it uncertain,
    by the same two functions the analysis' pipeline calls."""
    max_steps = config.budget.max_steps
    table = trials_table(trials, max_steps, config.selection.metric)
    try:
        chosen = pick(table, Comparison.of(config.selection, max_steps), configs := defaultdict(dict))
    except NoCandidate:
        return None, False
    return chosen.trial_id, without_pick(table, chosen, max_steps, configs).uncertain


def _start(landscape: Landscape, trial_id: str, proposal: dict, now: float, rng: np.random.Generator,
           seeds_run: dict[Point, list[int]], trials: dict[str, _Running], subset: Subset | None) -> _Running:
    """A trial of `proposal` started at `now`: its grid point, its seed, its reports' times, its
    reports scored on `subset` of the eval rows (None: all)."""
    from ray.tune.experiment import Trial

    params = TrialParams.from_config(proposal)
    if params.origin == Origin.PROMOTED:  # the parent's curve, from the parent's last report on
        parent = trials[params.parent]
        point, seed, start = parent.point, parent.seed, parent.reported[-1]["step"]
    else:
        point, start = snap(landscape, params), 0
        used = seeds_run.setdefault(point, [])
        fresh = [seed for seed in landscape.header.seeds if seed not in used] or landscape.header.seeds
        seed = int(rng.choice(fresh))
        used.append(seed)
    curve = [scored(row, subset) for row in landscape.curves[point, seed]]
    elapsed = row_seconds(curve[[row["step"] for row in curve].index(start)]) if start else 0.0
    rows = [{**row, "at": now + row_seconds(row) - elapsed, "index": index}
            for index, row in enumerate(curve) if row["step"] > start]
    trial = Trial("simulated", config=proposal, trial_id=trial_id, stub=True)
    return _Running(trial, point, seed, rows, now)


@dataclass(frozen=True)
class Subset:
    """The eval rows one simulated search scores: their positions among the landscape's `total`."""

    rows: np.ndarray
    total: int


def eval_subset(landscape: Landscape, metric: str, eval_rows: int | None, rng: np.random.Generator) -> Subset | None:
    """`eval_rows` of the landscape's eval rows of `metric` (`Landscape.eval_rows`), drawn by `rng`
    without replacement; None for None (every row, the landscape's values as they are). ValueError
    for a count the landscape cannot give."""
    if eval_rows is None:
        return None
    total = landscape.eval_rows(metric)
    if not 2 <= eval_rows <= total:
        raise ValueError(f"eval rows (--eval-rows) is {eval_rows}; allowed: an integer from 2 (a standard error needs two) to "
                         f"{total}, the eval rows the landscape kept per-row values of {metric} for")
    return Subset(np.sort(rng.choice(total, size=eval_rows, replace=False)), total)


def scored(row: dict, subset: Subset | None) -> dict:
    """A landscape row as a trial that scored only `subset`'s eval rows would report it: each
    metric whose per-row values (`eval_row_<name>`) hold all the rows is their mean over the
    subset (every row weighs the same, where the landscape's own value weighs every answer token
    the same), with its standard error over them; the eval seconds are the subset's share of the
    row's. Per-row values of another length (exact match, over the rows answered by generation)
    are left as they are. `row` itself for None."""
    if subset is None:
        return row
    out = dict(row)
    for key, values in row.items():
        if key.startswith("eval_row_") and len(values) == subset.total:
            kept = np.asarray(values, dtype=float)[subset.rows]
            metric = "eval_" + key.removeprefix("eval_row_")
            out |= {key: kept.tolist(), metric: float(kept.mean()),
                    f"{metric}_se": float(kept.std(ddof=1)) / math.sqrt(len(kept))}
    out["eval_seconds"] = row["eval_seconds"] * len(subset.rows) / subset.total
    return out


def snap(landscape: Landscape, params: TrialParams) -> Point:
    """The grid point nearest `params`: the same choices, the nearest learning rate on a log
    scale and the nearest dropout. A module set the grid lacks is an error."""
    grid, lora = landscape.header.grid, params.lora_config
    if params.module_set not in grid["module_set"]:
        raise ValueError(f"module set {params.module_set!r} is not in the landscape's grid {grid['module_set']}")

    def nearest(key: str, value: float, scale=lambda x: x):
        return min(grid[key], key=lambda candidate: abs(scale(candidate) - scale(value)))

    return Point(params.module_set, nearest("r", lora["r"]), nearest("alpha_ratio", params.alpha_ratio),
                 nearest("lora_dropout", lora["lora_dropout"]), nearest("use_rslora", lora["use_rslora"]),
                 nearest("use_dora", lora["use_dora"]), nearest("learning_rate", params.learning_rate, math.log))


@dataclass(frozen=True)
class Truth:
    """What the table's means say: each configuration's value and cost, the best, and the rule's pick."""

    comparison: Comparison
    values: dict[Point, float]
    costs: dict[Point, float]
    best: float
    pick: Point

    @classmethod
    def of(cls, landscape: Landscape, config: Config) -> Truth:
        comparison = Comparison.of(config.selection, landscape.header.max_steps)
        points = landscape.header.points()
        values = {point: landscape.mean(point, comparison.metric) for point in points}
        costs = {point: landscape.mean(point, comparison.cost) for point in points}
        best = (min if comparison.mode == "min" else max)(values.values())
        table = pd.DataFrame({"trial_id": [point.label() for point in points],
                              comparison.metric: [values[point] for point in points],
                              comparison.cost: [costs[point] for point in points],
                              "trainable_params": [landscape.mean(point, "trainable_params") for point in points]})
        within = table[[comparison.within(value, comparison.bar(best)) for value in table[comparison.metric]]]
        label = comparison.rank(within)["trial_id"].iloc[0]
        return cls(comparison, values, costs, best, next(point for point in points if point.label() == label))

    def within(self, point: Point | None) -> bool:
        return point is not None and self.comparison.within(self.values[point], self.comparison.bar(self.best))

    def right(self, point: Point | None) -> bool:
        """The rule's pick, or one at most twice its cost within the tolerance."""
        return point == self.pick or (self.within(point) and self.costs[point] <= 2 * self.costs[self.pick])

    def excess(self, point: Point | None) -> float:
        """How much worse than the best `point`'s true value is, as a share of the best (inf: no pick)."""
        if point is None:
            return math.inf
        change = self.values[point] / self.best - 1
        return change if self.comparison.mode == "min" else -change

    def cost_ratio(self, point: Point | None) -> float:
        return math.inf if point is None else self.costs[point] / self.costs[self.pick]


def summary(searches: list[Search], truth: Truth, landscape: Landscape) -> dict:
    """The figures of a policy over its simulated searches."""
    picks = [search.pick for search in searches]
    excess = np.array([truth.excess(pick) for pick in picks])
    ratio = np.array([truth.cost_ratio(pick) for pick in picks])
    return {
        "searches": len(searches),
        "within_tolerance": float(np.mean([truth.within(pick) for pick in picks])),
        "pick_or_at_most_2x_cost": float(np.mean([truth.right(pick) for pick in picks])),
        "true_pick": float(np.mean([pick == truth.pick for pick in picks])),
        "no_pick": int(sum(pick is None for pick in picks)),
        "excess_median": float(np.median(excess)), "excess_p90": float(np.quantile(excess, 0.9)),
        "cost_ratio_median": float(np.median(ratio)), "cost_ratio_p90": float(np.quantile(ratio, 0.9)),
        "gpu_seconds_median": float(np.median([search.gpu_seconds for search in searches])),
        "wall_seconds_median": float(np.median([search.wall_seconds for search in searches])),
        # a run's wall time has a long tail (a pick that cannot be told apart gets seeds one after another)
        "wall_seconds_p90": float(np.quantile([search.wall_seconds for search in searches], 0.9)),
        "trials_median": float(np.median([search.trials for search in searches])),
        # whether the report's "the pick is uncertain" tells a worse pick: the share right with and without it
        "uncertain": float(np.mean([search.uncertain for search in searches])),
        **{f"within_tolerance_{flag}": _share([truth.within(s.pick) for s in searches if s.uncertain == is_flagged])
           for flag, is_flagged in (("if_uncertain", True), ("if_certain", False))},
        # each search's own, in the order of its seed: what pairs one policy's searches with another's
        "per_search": [{"pick": None if s.pick is None else s.pick.label(), "within": truth.within(s.pick),
                        "uncertain": s.uncertain, "gpu_seconds": round(s.gpu_seconds, 1),
                        "wall_seconds": round(s.wall_seconds, 1)} for s in searches],
    }


def _share(flags: list[bool]) -> float | None:
    """The share of `flags` that are true; None for none (JSON's null)."""
    return float(np.mean(flags)) if flags else None


def hand_grid(landscape: Landscape, config: Config, points: list[dict], rng: np.random.Generator,
              eval_rows: int | None = None) -> Search:
    """The hand grid: `points` (space keys; each snapped to the grid, duplicates once) trained to
    the full budget with one seed drawn from the table's, picked by the same rule; with
    `eval_rows`, scored on that many of the eval rows (`eval_subset`, drawn first)."""
    subset = eval_subset(landscape, config.selection.metric, eval_rows, rng)
    snapped = list(dict.fromkeys(snap(landscape, _params(point)) for point in points))
    trials, seconds = [], 0.0
    for number, point in enumerate(snapped):
        seed = int(rng.choice(landscape.header.seeds))
        rows = [{key: value for key, value in scored(row, subset).items() if key not in _ROW_KEYS}
                for row in landscape.curves[point, seed]]
        seconds += row_seconds(scored(landscape.final(point, seed), subset))
        trials.append(TrialFiles(f"{number:08x}", _params(point.as_dict()), rows, "", None))
    picked, uncertain = final_pick(trials, config)
    return Search(snapped[int(picked, 16)] if picked else None, seconds, seconds, len(snapped), uncertain)


def _params(point: dict) -> TrialParams:
    """A trial's parameters for the space keys of `point` (a hand grid's row)."""
    lora = {"r": point["r"], "lora_alpha": point["alpha_ratio"] * point["r"], "lora_dropout": point["lora_dropout"],
            "target_modules": point["module_set"].split("+"), "use_rslora": point["use_rslora"],
            "use_dora": point["use_dora"]}
    return TrialParams(lora, point["module_set"], point["alpha_ratio"], point["learning_rate"], 1.0, 0)


def simulate(landscape: Landscape, config: Config, seeds: int, eval_rows: int | None = None) -> list[Search]:
    """`seeds` searches of `config`, the search's seed 0 to seeds - 1 (the seeds' draws too), each
    scored on `eval_rows` of the eval rows (None: all; `eval_subset`)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return [replay(landscape, replace(config, seed=seed), np.random.default_rng(seed), eval_rows)
            for seed in range(seeds)]
