"""The report's figures, as PNG files: what rank and module set buy, what they cost, how trials learned.

Figures are drawn on `matplotlib.figure.Figure` objects (the Agg canvas, no pyplot state),
so plotting needs no display and leaves no figures open.
"""

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import optuna
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import ScalarFormatter

from analysis.config import SelectionConfig
from analysis.select import Pick, by_configuration, finished_trials, pareto_front, tolerance_bar
from rundir.files import atomic_path
from rundir.params import Origin

# The parameters the search samples (trial-table columns) and how: from a list, a range, a log range.
SEARCHED = {
    "module_set": "choice", "r": "choice", "alpha_ratio": "choice", "lora_dropout": "range",
    "use_rslora": "choice", "use_dora": "choice", "learning_rate": "log range", "loraplus_lr_ratio": "choice",
}
# PED-ANOVA ranks a parameter by how differently its values spread among the best configurations
# than among all of them; Optuna's documentation advises at least 5 configurations in that best
# group. The best quarter, then, of at least 20 configurations: with fewer, one or two lucky
# configurations decide the ranking (4 runs of 2 configurations once gave dropout 0.99).
IMPORTANCE_QUANTILE = 0.25
MIN_CONFIGURATIONS_FOR_IMPORTANCE = 20
_STATUS_STYLE = {"finished": "-", "stopped": "--", "failed": ":"}


@dataclass(frozen=True)
class Plots:
    """The PNG files written, and for each figure not drawn, its file name and why."""

    files: list[Path]
    skipped: dict[str, str]


def write_plots(
    trials: pd.DataFrame, curves: pd.DataFrame, selection: SelectionConfig, pick: Pick | None, out_dir: str | os.PathLike
) -> Plots:
    """Draw every figure the data allows into `out_dir` (created if needed), each file replaced atomically.

    `trials` is `trials_table`'s table, `curves` `curves_table`'s, `pick` None when nothing
    was picked. Figures over finished trials use those with a finite metric and cost.
    """
    finished = finished_trials(trials, selection.metric, selection.cost)
    compared = configurations(trials, selection)
    colors = module_set_colors(trials["module_set"])
    no_finished = (
        f"no trial finished the full budget with a finite {selection.metric} and {selection.cost}"
        if finished.empty
        else None
    )
    figures = [
        ("metric_vs_rank.png", no_finished,
         lambda: by_rank_figure(finished, selection.metric, selection.direction, colors, pick_position(pick, trials, "value"))),
        ("train_seconds_vs_rank.png", no_finished,
         lambda: by_rank_figure(finished, "train_seconds", "min", colors, pick_position(pick, trials, "train_seconds"))),
        ("cost_vs_metric.png", no_finished, lambda: cost_figure(finished, selection, pick)),
        (
            "learning_curves.png",
            learning_curves_skip_reason(curves, selection.metric),
            lambda: learning_curves_figure(curves, trials, selection.metric, colors, pick),
        ),
        ("importance.png", importance_skip_reason(compared), lambda: importance_figure(compared, selection)),
    ]
    files, skipped = [], {}
    for name, skip_reason, draw in figures:
        if skip_reason:
            skipped[name] = skip_reason
        else:
            files.append(_save(draw(), Path(out_dir) / name))
    return Plots(files=files, skipped=skipped)


def module_set_colors(module_sets: pd.Series) -> dict[str, tuple]:
    """One colour per module set, stable across figures (sorted names on the tab10 palette)."""
    palette = matplotlib.colormaps["tab10"]
    return {name: palette(n % palette.N) for n, name in enumerate(sorted(set(module_sets)))}


def by_rank_figure(finished: pd.DataFrame, column: str, mode: str, colors: dict,
                   pick_at: tuple[int, float, str] | None = None) -> Figure:
    """`column` against rank, one colour per module set: each trial a dot, the best per rank (`mode` min or max)
    joined by a line; `pick_at` (rank, value, trial id) marks the pick with a star."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    for module_set, group in finished.groupby("module_set"):
        color = colors[module_set]
        axes.scatter(group["r"], group[column], color=color, alpha=0.6)
        best = group.groupby("r")[column].agg(mode)
        axes.plot(best.index, best.values, color=color, marker="o", label=module_set)
    if pick_at is not None:
        rank, value, trial_id = pick_at
        axes.scatter([rank], [value], marker="*", s=300, color="tab:red", zorder=3, label=f"pick {trial_id}",
                     gid="pick")
    axes.set_xscale("log", base=2)
    axes.set_xticks(sorted(finished["r"].unique()), labels=[str(r) for r in sorted(finished["r"].unique())])
    axes.set_xlabel("rank r")
    axes.set_ylabel(column)
    axes.set_title(f"{column} by rank and module set ({len(finished)} finished trials)")
    axes.legend(title="module set")
    axes.grid(alpha=0.3)
    return plain_numbers(figure)


def cost_figure(finished: pd.DataFrame, selection: SelectionConfig, pick: Pick | None) -> Figure:
    """Cost against metric for finished trials: the Pareto front, the tolerance bar and the pick."""
    metric, cost = selection.metric, selection.cost
    front = pareto_front(finished, metric, selection.direction, cost)
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    axes.scatter(finished[cost], finished[metric], color="0.6", label="finished trial")
    axes.plot(front[cost], front[metric], color="tab:blue", marker="o", drawstyle="steps-post", label="Pareto front")
    if pick is not None:
        bar = tolerance_bar(pick.best_value, pick.tolerance, pick.mode)
        axes.axhline(bar, color="tab:green", linestyle="--", label=f"tolerance {pick.tolerance:g} of the best")
        axes.scatter([pick.cost], [pick.value], marker="*", s=300, color="tab:red", zorder=3, label=f"pick {pick.trial_id}",
                     gid="pick")
    if finished[cost].max() > 10 * finished[cost].min() > 0:
        axes.set_xscale("log")
    axes.set_xlabel(cost)
    axes.set_ylabel(f"{metric} ({'higher' if selection.direction == 'max' else 'lower'} is better)")
    axes.set_title(f"What quality costs ({len(finished)} finished trials)")
    axes.legend()
    axes.grid(alpha=0.3)
    return plain_numbers(figure)


def learning_curves_skip_reason(curves: pd.DataFrame, metric: str) -> str | None:
    """Why the learning-curve figure cannot be drawn, or None when it can."""
    if curves[metric].notna().any():
        return None
    return f"no trial reported {metric} at any step"


def learning_curves_figure(curves: pd.DataFrame, trials: pd.DataFrame, metric: str, colors: dict, pick: Pick | None) -> Figure:
    """`metric` by step for every trial, each evaluation a dot (a curve of one evaluation shows):
    finished solid, stopped dashed, failed dotted; a cut trial ends in an x; the pick thick, ending
    in a star. A trial that continued another's checkpoint (promoted, or run again) is drawn from
    its parent's start (`joined_curve`). Each line's gid is its trial id."""
    figure = Figure(figsize=(8, 5))
    axes = figure.add_subplot()
    about = trials.set_index("trial_id")
    reported = curves.dropna(subset=[metric])
    for trial_id in reported["trial_id"].unique():
        curve = joined_curve(reported, trials, trial_id)
        status, module_set = about.at[trial_id, "status"], about.at[trial_id, "module_set"]
        color = colors[module_set]
        is_pick = pick is not None and trial_id == pick.trial_id
        axes.plot(curve["step"], curve[metric], color=color, linestyle=_STATUS_STYLE[status], marker="o",
                  markersize=4 if is_pick else 3, linewidth=2.5 if is_pick else 1.0, alpha=0.9, gid=trial_id)
        if status != "finished":
            axes.plot(curve["step"].iloc[-1], curve[metric].iloc[-1], marker="x", markersize=8, color=color)
        if is_pick:
            axes.scatter([curve["step"].iloc[-1]], [curve[metric].iloc[-1]], marker="*", s=200, color="tab:red",
                         zorder=3, gid="pick")
    handles = [Line2D([], [], color=color, label=name) for name, color in colors.items()]
    handles += [Line2D([], [], color="0.3", linestyle=style, label=status) for status, style in _STATUS_STYLE.items()]
    if pick is not None:
        handles.append(Line2D([], [], color="tab:red", marker="*", markersize=12, linestyle="none",
                              label=f"pick {pick.trial_id}"))
    axes.legend(handles=handles, fontsize="small")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(metric)
    axes.set_title(f"Learning curves ({curves['trial_id'].nunique()} trials; x: stopped or failed there)")
    axes.grid(alpha=0.3)
    return plain_numbers(figure)


def joined_curve(curves: pd.DataFrame, trials: pd.DataFrame, trial_id: str) -> pd.DataFrame:
    """`trial_id`'s rows of `curves`, after those of the trials it continues: a promoted trial (or a
    trial run again from a checkpoint) reports only the steps after its parent's checkpoint, so its
    parent's steps before its own first one come first, and theirs before them."""
    own = curves[curves["trial_id"] == trial_id]
    row = trials[trials["trial_id"] == trial_id].iloc[0]
    parent = row["parent"]
    if not Origin(row["origin"]).continues_parent or not isinstance(parent, str) or own.empty:
        return own
    before = joined_curve(curves, trials, parent) if parent in set(trials["trial_id"]) else own.iloc[:0]
    return pd.concat([before[before["step"] < own["step"].min()], own])


def configurations(trials: pd.DataFrame, selection: SelectionConfig) -> pd.DataFrame:
    """One row per configuration that finished the full budget with a finite metric and cost
    (`analysis.select.by_configuration`: runs of one configuration with other seeds, and a
    promoted trial with its parent, count once, by their mean)."""
    finished = finished_trials(trials, selection.metric, selection.cost)
    if finished.empty:
        return finished
    return by_configuration(finished, trials, selection.metric)


def importance_skip_reason(configurations: pd.DataFrame) -> str | None:
    """Why parameter importance cannot be estimated from these configurations (`configurations`),
    or None when it can."""
    count = len(configurations)
    if count < MIN_CONFIGURATIONS_FOR_IMPORTANCE:
        return (
            f"only {count} configuration(s) finished the full budget (runs of one configuration with other seeds "
            f"count once); parameter importance needs at least {MIN_CONFIGURATIONS_FOR_IMPORTANCE}, so that "
            f"the best {IMPORTANCE_QUANTILE:.0%} it sets apart holds "
            f"{round(IMPORTANCE_QUANTILE * MIN_CONFIGURATIONS_FOR_IMPORTANCE)}"
        )
    if not varied_parameters(configurations):
        return f"no searched parameter took more than one value among the {count} configurations that finished"
    return None


def varied_parameters(finished: pd.DataFrame) -> list[str]:
    """The searched parameters that took at least two values among `finished`: the only ones importance can rank."""
    return [name for name in SEARCHED if finished[name].nunique() > 1]


def parameter_importance(finished: pd.DataFrame, metric: str, mode: str) -> dict[str, float]:
    """Importance of each varied parameter for reaching the best `IMPORTANCE_QUANTILE` of `metric`
    values, summing to 1, most important first; `finished` holds one row per configuration.

    PED-ANOVA (optuna.importance), over an in-memory Optuna study rebuilt from the rows;
    distributions span the values observed, so configurations from outside the search space
    (priors) fit too. fANOVA, Optuna's default, would need scikit-learn.
    """
    names = varied_parameters(finished)
    distributions = {name: _observed_distribution(finished[name], SEARCHED[name]) for name in names}
    trials = [
        optuna.trial.create_trial(
            params={name: row[name] for name in names}, distributions=distributions, value=row[metric]
        )
        for row in finished[names + [metric]].to_dict("records")
    ]
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="minimize" if mode == "min" else "maximize")
        study.add_trials(trials)
        # PED-ANOVA warns that few trials make a rough estimate; the figure's title gives the count.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.importance.get_param_importances(study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(
                target_quantile=IMPORTANCE_QUANTILE))
    finally:
        optuna.logging.set_verbosity(verbosity)


def importance_figure(finished: pd.DataFrame, selection: SelectionConfig) -> Figure:
    """A horizontal bar per varied parameter: its importance for reaching the best metric values;
    `finished` holds one row per configuration (`configurations`)."""
    importances = parameter_importance(finished, selection.metric, selection.direction)
    names = list(importances)[::-1]
    figure = Figure(figsize=(7, 0.5 * len(names) + 1.5))
    axes = figure.add_subplot()
    axes.barh(names, [importances[name] for name in names], color="tab:blue")
    axes.set_xlabel(f"importance for the best {IMPORTANCE_QUANTILE:.0%} (PED-ANOVA, sums to 1)")
    axes.set_title(f"What mattered for {selection.metric} ({len(finished)} configurations)")
    axes.grid(axis="x", alpha=0.3)
    return plain_numbers(figure)


def _observed_distribution(values: pd.Series, sampled_from: str) -> optuna.distributions.BaseDistribution:
    if sampled_from == "choice":
        return optuna.distributions.CategoricalDistribution(sorted(set(values.tolist())))
    return optuna.distributions.FloatDistribution(
        float(values.min()), float(values.max()), log=sampled_from == "log range"
    )


def plain_numbers(figure: Figure) -> Figure:
    """`figure` with its linear axes' ticks written as plain numbers: no offset (`+1.056e1` above
    ticks 0.0040-0.0048) and no shared power of ten for a reader to apply."""
    for axes in figure.axes:
        for axis in (axes.xaxis, axes.yaxis):
            formatter = axis.get_major_formatter()
            if isinstance(formatter, ScalarFormatter):
                formatter.set_useOffset(False)
                formatter.set_scientific(False)
    return figure


def pick_position(pick: Pick | None, trials: pd.DataFrame, column: str) -> tuple[int, float, str] | None:
    """Where the pick goes on a by-rank figure: its rank, its `column` (`value`: the value it was
    picked by, a mean over its runs), its trial id; None without a pick."""
    if pick is None:
        return None
    row = trials[trials["trial_id"] == pick.trial_id].iloc[0]
    return int(row["r"]), pick.value if column == "value" else float(row[column]), pick.trial_id


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110)
    return path
