"""The text of report.md: what was searched, what it cost, the pick and why, the top trials, the
retrain, the plots and how to use the pick (`render_report`), from the run's record and the
analysis' results; it reads and writes no file.
"""

import math
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from analysis.select import (
    Comparison,
    Pick,
    WithoutPick,
    by_configuration,
    configuration_root,
    finished_trials,
    rank_by_metric,
)
from analysis.timing import RunClock, duration
from rundir.layout import ADAPTER
from rundir.params import Origin
from rundir.runconfig import Budget, Resources, RunConfig

if TYPE_CHECKING:
    from analysis.plots import Plots

TOP_TRIALS = 10


# Search settings sampled from a [low, high] range rather than chosen from a list.
_RANGES = ("dropout", "learning_rate")


def render_report(
    run_config: RunConfig,
    trials: pd.DataFrame,
    comparison: Comparison,
    chosen: Pick | None,
    no_pick: str | None,
    plots: "Plots",
    diagnoses: dict[str, str],
    retrain: str = "",
    standing: WithoutPick | None = None,
    clock: RunClock | None = None,
    run_path: str = "",
    retrained: bool = False,
) -> str:
    """report.md's text: what was searched, what it cost, the pick and why, the top trials, the
    retrain, the plots, the config.

    `plots` is `analysis.plots.write_plots`' result; `no_pick` says why when `chosen` is None;
    `diagnoses` is `analysis.diagnose.diagnose`'s reading of each trial's curve; `retrain` the
    section on retrained weights, if any; `standing` what the rule picks without the pick's
    configuration (`analysis.select.without_pick`); `clock` the trials' wall time
    (`analysis.timing.run_clock`); `run_path` the run directory as commands should name it;
    `retrained` whether its adapter/ holds the pick's retrained weights.
    """
    sections = [
        _title(run_config, comparison),
        _data_section(run_config),
        _searched(run_config),
        _module_notes(run_config),
        _spent(trials, run_config.budget.max_steps, run_config.resources),
        _clock_section(clock, run_config.budget),
        _pick_section(trials, chosen, no_pick, standing, run_config.search),
        _prior_section(trials, chosen, comparison),
        _top_trials(trials, comparison, chosen, diagnoses),
        *([retrain] if retrain else []),
        _plots_section(plots),
    ]
    if chosen is not None:
        sections.append(_snippet_section(chosen, trials, run_config, run_path, retrained))
    return "\n\n".join(sections) + "\n"


def rationale(chosen: Pick, trials: pd.DataFrame) -> str:
    """One sentence on why `chosen` won: its value, the best, the tolerance, and what it saves against the best trial."""
    if chosen.trial_id == chosen.best_trial_id:
        return (
            f"Trial `{chosen.trial_id}` has the best {chosen.metric} ({chosen.value:.4g} at step {chosen.step}) "
            f"and is also the cheapest by {chosen.cost_name} of the {chosen.candidates} trials within tolerance "
            f"{chosen.tolerance:g} of it, so it saves nothing against the best."
        )
    row, best = _row(trials, chosen.trial_id), _row(trials, chosen.best_trial_id)
    return (
        f"Trial `{chosen.trial_id}` reaches {chosen.metric} {chosen.value:.4g} at step {chosen.step} against the best "
        f"{chosen.best_value:.4g} (trial `{chosen.best_trial_id}`), within tolerance {chosen.tolerance:g}, and trains "
        f"{row['trainable_params']:,} parameters instead of {best['trainable_params']:,} "
        f"({_relative(row['trainable_params'], best['trainable_params'], 'fewer')}) in "
        f"{row['train_seconds']:,.0f} s instead of {best['train_seconds']:,.0f} s "
        f"({_relative(row['train_seconds'], best['train_seconds'], 'less')})."
    )


def lora_config_snippet(lora_config: dict) -> str:
    """Python source that builds the same `LoraConfig`, one keyword argument per line."""
    arguments = "".join(f"    {key}={value!r},\n" for key, value in lora_config.items())
    return f"from peft import LoraConfig\n\nconfig = LoraConfig(\n{arguments})"


def _title(run_config: RunConfig, comparison: Comparison) -> str:
    base = run_config.base_model
    origin = f"{base.origin}, at `{base.path}`; " if base.origin and base.path != base.name else ""
    return (
        f"# LoRA search: {run_config.name}\n\n"
        f"Base model `{base.name}` ({origin}{base.total_params:,} parameters), seed {run_config.seed}. "
        f"Selection: {comparison.statement()}."
    )


def _data_section(run_config: RunConfig) -> str:
    """Where the train and eval rows came from, how many there were, and what data.max_length cut."""
    info = run_config.data_info
    rows = [(purpose, f"`{split.key}`: `{split.source}`", split.part, split.format, f"{split.rows:,}",
             f"{split.truncated:,}", f"{split.dropped:,}")
            for purpose, split in (("train", info.train), ("eval", info.eval))]
    template = ("none: text rows are trained on every token" if info.train.format == "text"
                else f"{info.template}: the loss is on the answer's tokens only")
    return (
        "## Data\n\n"
        + _markdown_table(("", "source", "rows used", "format", "rows", f"truncated at {info.max_length} tokens",
                           "dropped (no token left to train on)"), rows)
        + f"\n\nTemplate {template}. The search's trials train on {info.search_train_rows:,} of the "
        f"{info.train_rows:,} train rows kept. {info.eval_sample()}."
    )


def _setting(key: str, values) -> str:
    """A search setting as the report shows it: a range, a list, or a single word (`priors: auto`);
    a list of priors as one configuration each."""
    if isinstance(values, str):
        return values
    if key in _RANGES:
        return f"from {values[0]:g} to {values[1]:g}"
    return ", ".join(" ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else str(value)
                     for value in values)


def _searched(run_config: RunConfig) -> str:
    rows = [(f"`{key}`", _setting(key, values)) for key, values in run_config.search.items()]
    budget = run_config.budget
    return (
        "## What was searched\n\n"
        + _markdown_table(("setting", "values"), rows)
        + f"\n\nBudget: up to {budget.num_samples} trials of {budget.max_steps} optimizer steps "
        f"(batch size {budget.batch_size}), evaluated every {budget.eval_every} steps; ASHA may stop "
        f"a trial from step {budget.grace_period} on, keeping 1 in {budget.reduction_factor} at each rung."
    )


def _module_notes(run_config: RunConfig) -> str:
    """How each module set was resolved on this model, with what had to be inferred or approximated."""
    lines = [f"- `{name}`: {', '.join(info.target_modules)} ({info.layers} layers)"
             + (f". {info.note}" if info.note else "")
             for name, info in run_config.module_sets.items()]
    return "## Module sets on this model\n\n" + ("\n".join(lines) if lines else "Not recorded in run_config.json.")


STEP_MODES = {"cuda_graph": "as a CUDA graph", "compiled": "compiled", "eager": "eagerly",
              "packed": "packed in a shared trainer",
              "packed+cuda_graph": "packed in a shared trainer as a CUDA graph",
              "packed+compiled+cuda_graph": "packed in a shared trainer, its loss, AdamW and dropout masks compiled, "
                                            "as a CUDA graph"}


def _step_modes(trials: pd.DataFrame, compile_on) -> str:
    """How the trials' train steps ran (trials.csv's `step_mode`), and which trials of a run
    that asked for compiled steps trained without them (their compile failed: the worker's
    log says why)."""
    modes = trials["step_mode"].dropna() if "step_mode" in trials else pd.Series(dtype=object)
    if modes.empty:
        return ""
    counts = modes.value_counts()
    parts = [f"{STEP_MODES.get(mode, mode)} in {count}" for mode, count in counts.items()]
    text = f" Train steps ran {', '.join(parts)} trial{'s' if len(modes) > 1 else ''}."
    packed = modes.str.startswith("packed")
    alone = ~packed & packed.any()  # only a shared run trains some trials alone
    dora = int(trials.loc[alone[alone].index, "use_dora"].astype(bool).sum())
    if dora:
        text += (f" The {dora} DoRA trial(s) trained in processes of their own beside the shared trainer: "
                 "DoRA's norm needs the adapted weight merged into a copy of the base weight, which a base shared by "
                 "several trials never holds.")
    # the other trials a shared run trains alone adapt expert weights (trainables.placement.in_own_process)
    if experts := int(alone.sum()) - dora:
        text += (f" The {experts} trial(s) that adapt expert weights trained in processes of their own beside the "
                 "shared trainer, which adapts Linear layers only.")
    if compile_on is True:
        uncompiled = trials.loc[modes.index[~modes.str.contains("compiled")], "trial_id"]
        if len(uncompiled):
            text += (f" resources.compile was on, but {len(uncompiled)} trial(s) trained uncompiled because their "
                     f"step failed to compile (the trial worker's log says why): "
                     + ", ".join(f"`{t}`" for t in uncompiled) + ".")
    return text


def own_total(trials: pd.DataFrame, column: str) -> float:
    """`column` summed over `trials`, each counted for its own work: a promoted trial continued
    its parent's checkpoint and reports their totals (steps, seconds) together, as does a rerun
    of a trial that ran out of memory after a checkpoint."""
    parents = trials.loc[trials["origin"].isin([origin.value for origin in Origin if origin.continues_parent]), "parent"]
    return float(trials[column].sum() - trials.set_index("trial_id")[column].reindex(parents).fillna(0).sum())


def _spent(trials: pd.DataFrame, max_steps: int, resources: Resources) -> str:
    counts = trials["status"].value_counts()
    seconds = own_total(trials, "train_seconds")
    eval_seconds = own_total(trials, "eval_seconds")
    generate_seconds = own_total(trials, "eval_generate_seconds")
    generating = f" ({generate_seconds:,.0f} of it generating answers)" if generate_seconds > 0 else ""
    stages = trials["origin"].value_counts()
    text = (
        "## What it cost\n\n"
        f"{len(trials)} trials: {counts.get('finished', 0)} finished all {max_steps} steps, "
        f"{counts.get('stopped', 0)} stopped early (by ASHA, or the run was interrupted), "
        f"{counts.get('failed', 0)} failed. Training took {seconds:,.0f} trial-seconds ({duration(seconds)})"
        f"{f', evaluation {eval_seconds:,.0f}{generating}.' if eval_seconds > 0 else '.'}"
        f" Of these, {stages.get('promoted', 0)} continued a trial ASHA had stopped within tolerance (promoted), "
        f"{stages.get('confirm', 0)} repeated a leading candidate with another seed (confirm) and "
        f"{stages.get('cheaper', 0)} tried a configuration next to the pick that trains fewer parameters (cheaper)."
        + _reruns(trials)
        + _packing(resources)
        + _share(resources)
        + _step_modes(trials, compile_on=resources.compile)
    )
    failed = trials[trials["status"] == "failed"]
    if failed.empty:
        return text
    rerun_as = dict(zip(trials.loc[trials["origin"] == Origin.RERUN.value, "parent"],
                        trials.loc[trials["origin"] == Origin.RERUN.value, "trial_id"]))
    lines = [f"- `{row.trial_id}` ({row.module_set}, r={row.r}): {row.error}"
             + (f"; run again as `{rerun_as[row.trial_id]}`" if row.trial_id in rerun_as else "")
             for row in failed.itertuples()]
    return text + "\n\nFailed trials:\n\n" + "\n".join(lines)


def _reruns(trials: pd.DataFrame) -> str:
    """Why trials ran again: the parent of a rerun that has a row of its own failed (it ran out
    of GPU memory beside others); one without a row never started (Tune lost it:
    search.tuning.tuner.TellLostTrials), and Tune wrote no files of it."""
    parents = trials.loc[trials["origin"] == Origin.RERUN.value, "parent"]
    out_of_memory = int(parents.isin(trials["trial_id"]).sum())
    lost = len(parents) - out_of_memory
    text = ""
    if out_of_memory:
        text += (f" {out_of_memory} trial{'s' if out_of_memory > 1 else ''} ran again (rerun) after running out of GPU "
                 "memory while other trials shared the GPU, with a larger share of it: a neighbour's memory is no "
                 "fault of a configuration, and the failed run is judged by its rerun.")
    if lost:
        text += (f" {lost} trial{'s' if lost > 1 else ''} ran again (rerun) because Tune could not start "
                 f"{'them' if lost > 1 else 'it'} on a reused worker (the worker's last trial had not ended in time); "
                 "no configuration was lost.")
    return text


def _packing(resources: Resources) -> str:
    """How the trials shared the machine (resources.packing), and why where `auto` chose it."""
    how = ("together in one shared trainer per GPU, its base model held once (resources.packing=shared)"
           if resources.packing == "shared" else "each in a process of its own (resources.packing=processes)")
    return f" Trials trained {how}" + (f": auto chose it, {resources.packing_reason}." if resources.packing_reason else ".")


def _share(resources: Resources) -> str:
    """The GPU share trials had, and the memory probe it came from, where one ran."""
    probe = resources.memory_probe
    if probe is None:
        return f" Trials had {resources.gpus_per_trial:g} of a GPU each." if resources.gpus_per_trial else ""
    return (f" Trials had {probe.share:g} of a GPU each: one trial of the space's heaviest configuration "
            f"(r={probe.lora_config['r']}) held {probe.footprint_gb:.1f} GB of the {probe.gpu_gb:.0f} GB GPU "
            f"(allocator peak {probe.allocated_gb:.1f} GB), counted {1 + probe.margin:g} times "
            "(resources.memory_margin) when packing trials on it.")


EDGE = 0.1  # the share of a searched range at either end where the pick's value is called at its edge


def at_the_edge(search: dict, row: pd.Series) -> str:
    """One sentence on what of the pick (`row` of the trial table) lies at the edge of the space
    `search` (run_config.json's): a learning rate in the top or bottom tenth of its range, on the
    log scale it is sampled on, or the largest rank searched. There the best may lie outside what
    was searched: the range says nothing of what is past it. Empty when nothing is."""
    found = []
    low, high = search["learning_rate"]
    if 0 < low < high:
        position = math.log(row["learning_rate"] / low) / math.log(high / low)
        if position >= 1 - EDGE or position <= EDGE:
            end = "top" if position >= 1 - EDGE else "bottom"
            found.append(f"its learning rate {row['learning_rate']:.3g} lies in the {end} tenth of `search.learning_rate` "
                         f"[{low:g}, {high:g}] (on the log scale it is sampled on): a "
                         f"{'higher' if end == 'top' else 'lower'} one may do better")
    ranks = search["ranks"]
    if len(ranks) > 1 and int(row["r"]) == max(ranks):
        found.append(f"its rank {int(row['r'])} is the largest of `search.ranks`, and no smaller one came within the "
                     "tolerance: a larger one may do better")
    if not found:
        return ""
    return ("At the edge of the space: " + "; ".join(found) + ". Widen the space there to see, with more trials "
            "(`budget.num_samples`) for the wider space.")


def _cheaper_stage(trials: pd.DataFrame, chosen: Pick) -> str:
    """What the search's last stage (`selection.cheaper`) found: that the pick is the cheaper
    neighbour it tried, or which neighbours it tried that did not win and how they ended."""
    tried = trials[trials["origin"] == Origin.CHEAPER.value]
    if tried.empty:
        return ""

    def named(row) -> str:
        return f"`{row['trial_id']}` ({row['module_set']} r={int(row['r'])})"

    if chosen.trial_id in set(tried["trial_id"]):
        row = _row(trials, chosen.trial_id)
        parent = _row(trials, row["parent"]) if row["parent"] in set(trials["trial_id"]) else None
        before = f" of {named(parent)}, the pick before it" if parent is not None else ""
        return (f"The search's last stage found it: the nearest cheaper neighbour{before} (the next smaller rank, or a "
                f"module set inside its own, all else the same), trained to the full budget (`selection.cheaper`).")
    outcomes = []
    for _, row in tried.iterrows():
        value = row[chosen.metric]
        ended = (f"{chosen.metric} {value:.4g}" if row["status"] == "finished" and pd.notna(value)
                 else f"it {row['status']}")
        outcomes.append(f"{named(row)}: {ended}")
    return (f"The search's last stage (`selection.cheaper`) tried cheaper neighbours of the pick of its time, and "
            f"the rule prefers none of them: {'; '.join(outcomes)}.")


def _pick_section(trials: pd.DataFrame, chosen: Pick | None, no_pick: str | None, standing: WithoutPick | None,
                  search: dict) -> str:
    if chosen is None:
        return f"## The pick\n\n**No pick.** {no_pick}"
    row = _row(trials, chosen.trial_id)
    return (
        f"## The pick\n\n"
        f"**Trial `{chosen.trial_id}`**: {row['module_set']} (`{row['target_modules']}`), r={row['r']}, "
        f"lora_alpha={row['lora_alpha']:g}, dropout {row['lora_dropout']:.3g}, RSLoRA {row['use_rslora']}, "
        f"DoRA {row['use_dora']}, learning rate {row['learning_rate']:.3g}.\n\n"
        f"{rationale(chosen, trials)}\n\n"
        + (f"Its {chosen.metric} is the mean of {chosen.seeds} runs with different seeds (spread {chosen.spread:.3g}).\n\n"
           if chosen.seeds > 1 else "")
        + (f"**{chosen.undecided}**\n\n" if chosen.undecided else "")
        + (f"**Unable to decide: {chosen.tie}**\n\n" if chosen.tie else "")
        + (f"{standing.sentence}\n\n" if standing else "")
        + (f"{cheaper}\n\n" if (cheaper := _cheaper_stage(trials, chosen)) else "")
        + (f"{edge}\n\n" if _found_by_search(trials, chosen.trial_id) and (edge := at_the_edge(search, row)) else "")
        + f"{_pick_against_best(trials, chosen)}\n\n"
        + f"Rule: {chosen.rule} Written to `pick.json` and `adapter/adapter_config.json`."
    )


def _found_by_search(trials: pd.DataFrame, trial_id: str) -> bool:
    """Whether the search's sampler proposed `trial_id`'s configuration (its first run's origin is
    `search`): only then does the pick at the edge of the space say where the search moved. A prior
    sits where the user or the rule of thumb put it, at a bound of the range as often as not."""
    first = trials[trials["trial_id"] == configuration_root(trials)[trial_id]]
    # a first run that Tune lost before it started left no row: who proposed it is not known
    return not first.empty and first.iloc[0]["origin"] == Origin.SEARCH.value


# What the pick section shows of the pick and the best trial, whatever metric selects (it is
# shown too); eval_exact_match only where the trials generated answers.
_PICK_METRICS = ("eval_loss", "eval_accuracy", "eval_exact_match")


def _pick_against_best(trials: pd.DataFrame, chosen: Pick) -> str:
    """The pick's eval loss, token accuracy, exact match and selecting metric beside the best
    trial's, as each trial reported them at the full budget; a metric no trial of the two
    reported is left out."""
    ids = list(dict.fromkeys([chosen.trial_id, chosen.best_trial_id]))
    headers = ("", f"pick `{chosen.trial_id}`" + (" (also the best)" if len(ids) == 1 else ""),
               *([f"best `{chosen.best_trial_id}`"] if len(ids) == 2 else []))
    rows = []
    for metric in dict.fromkeys([*_PICK_METRICS, chosen.metric]):
        values = [_row(trials, trial_id)[metric] for trial_id in ids]
        if all(pd.isna(value) for value in values):
            continue
        name = f"{metric} (selects)" if metric == chosen.metric else metric
        rows.append((name, *("not reported" if pd.isna(value) else f"{value:.4g}" for value in values)))
    return f"At step {chosen.step}, as each trial reported it:\n\n" + _markdown_table(headers, rows)


def _prior_section(trials: pd.DataFrame, chosen: Pick | None, comparison: Comparison) -> str:
    """The known-good configurations the search started from (search/tuning/prior.py), one row each,
    beside the pick: how each ended, what became of its configuration after (promoted, run again,
    confirmed with other seeds), and what the search bought over it."""
    priors = trials[trials["origin"] == Origin.PRIOR.value].sort_values("trial_id", kind="stable")
    if priors.empty or chosen is None:
        return "## Against the known-good configurations\n\nThe run has no prior trial to compare with."
    metric, max_steps = comparison.metric, comparison.max_steps
    pick_row = _row(trials, chosen.trial_id)
    roots = configuration_root(trials)
    finished = finished_trials(trials, metric, comparison.cost)
    compared = (by_configuration(finished, trials, metric) if not finished.empty else finished).assign(
        _root=lambda table: table["trial_id"].map(roots)).set_index("_root")
    rows = []
    for _, row in priors.iterrows():
        value, root = row[metric], roots[row["trial_id"]]
        if root == roots[chosen.trial_id]:
            against = "the pick" if row["trial_id"] == chosen.trial_id else f"its configuration is the pick (`{chosen.trial_id}`)"
        elif root in compared.index:
            mean = compared.at[root, metric]
            against = (f"{metric} {_relative(mean, chosen.value, 'lower')} "
                       f"than the pick's, {_relative(row['trainable_params'], pick_row['trainable_params'], 'fewer')} "
                       "parameters")
        elif row["status"] == "failed":
            against = f"failed: {row['error']}"
        else:
            against = f"stopped at step {row['step']}, below its rung's cut"
        rows.append((f"`{row['trial_id']}`",
                     f"{row['module_set']}, r={row['r']}, alpha {row['lora_alpha']:g}{', RSLoRA' if row['use_rslora'] else ''}, "
                     f"lr {row['learning_rate']:.3g}",
                     "" if pd.isna(row["step"]) else row["step"], row["status"],
                     "not reported" if pd.isna(value) else f"{value:.4g}", against,
                     _what_became_of(row["trial_id"], trials, roots, compared, metric)))
    first = "first trial was a prior" if len(priors) == 1 else f"first {len(priors)} trials were the priors"
    return (f"## Against the known-good configurations\n\nThe search's {first}; "
            f"the pick (`{chosen.trial_id}`) reached {metric} {chosen.value:.4g} at step {max_steps}.\n\n"
            + _markdown_table(("trial", "configuration", "step", "status", metric, "against the pick",
                               "what became of it"), rows))


# How the report names a trial that carries on a prior's configuration, by its origin.
_LATER_RUN = {Origin.PROMOTED.value: "promoted as", Origin.RERUN.value: "run again as",
              Origin.CONFIRM.value: "repeated with another seed as"}


def _what_became_of(trial_id: str, trials: pd.DataFrame, roots: dict[str, str], compared: pd.DataFrame,
                    metric: str) -> str:
    """The later runs of `trial_id`'s configuration (promoted, run again, confirmed), each with how
    it ended, and the configuration's mean where several of its runs finished; "no later run"."""
    later = trials[(trials["trial_id"].map(roots) == roots[trial_id]) & (trials["trial_id"] != trial_id)]
    parts = []
    for row in later.itertuples():
        ended = ("failed" if row.status == "failed"
                 else f"{row.status} at step {row.step} with {metric} {_row(trials, row.trial_id)[metric]:.4g}")
        parts.append(f"{_LATER_RUN.get(row.origin, row.origin)} `{row.trial_id}`, {ended}")
    root = roots[trial_id]
    if root in compared.index and compared.at[root, "seeds"] > 1:
        parts.append(f"mean of its {int(compared.at[root, 'seeds'])} finished runs {compared.at[root, metric]:.4g}")
    return "; ".join(parts) if parts else "no later run"


def _top_trials(trials: pd.DataFrame, comparison: Comparison, chosen: Pick | None, diagnoses: dict[str, str]) -> str:
    finished = finished_trials(trials, comparison.metric, comparison.cost)
    if finished.empty:
        return "## Top trials\n\nNo trial finished the full budget."
    top = rank_by_metric(finished, comparison.metric, comparison.mode).head(TOP_TRIALS)
    # a column only where some shown trial has something in it: the curve's diagnosis, the marks
    curve = [diagnoses.get(trial_id, "") for trial_id in top["trial_id"]]
    roots = configuration_root(trials)
    marks = [_marks(trial_id, chosen, roots) for trial_id in top["trial_id"]]
    optional = [(name, values) for name, values in (("curve", curve), ("pick or best", marks)) if any(values)]
    headers = (
        "trial", "origin", "module set", "r", "lora_alpha", "dropout", "RSLoRA", "DoRA", "learning rate",
        comparison.metric, "trainable params", "train s", *(name for name, _ in optional),
    )
    rows = [
        (
            f"`{row.trial_id}`", row.origin, row.module_set, row.r, f"{row.lora_alpha:g}", f"{row.lora_dropout:.3g}",
            row.use_rslora, row.use_dora, f"{row.learning_rate:.3g}", f"{value:.4g}",
            f"{row.trainable_params:,}", f"{row.train_seconds:,.0f}", *(values[n] for _, values in optional),
        )
        # the metric's value beside the row: a user's `module:function` is no attribute name for itertuples
        for n, (row, value) in enumerate(zip(top.itertuples(), top[comparison.metric]))
    ]
    return (
        f"## Top trials\n\nThe {len(top)} best of {len(finished)} finished trials by {comparison.metric}."
        + (" The pick and the best are configurations: one run with several seeds counts by the mean of its runs, "
           "and each of them is marked." if any("another run" in mark for mark in marks) else "")
        + "\n\n" + _markdown_table(headers, rows)
    )


def retrain_section(retrains: list[dict], chosen: Pick | None, run_path: str, batch_size: int) -> str:
    """Which trained weights exist, how they were trained (steps of `batch_size` sequences on
    how many rows) and which pick they belong to; `run_path` the run directory as commands name it."""
    if not retrains:
        return ("## Retrain\n\nNo configuration was retrained on all the data (`selection.retrain` is off, "
                f"`{RETRAIN_COMMAND}` was not run, or the run stopped first): `adapter/` holds the pick's configuration, "
                "not weights.")
    lines = ["## Retrain", ""]
    for retrain in retrains:
        figures = ", ".join(f"{key} {retrain[key]:.4g}" for key in ("eval_loss", "eval_accuracy", "eval_exact_match")
                            if isinstance(retrain[key], (int, float)))
        state = f"failed ({retrain['error']})" if retrain["error"] else f"reached step {retrain['step']}: {figures}"
        lines.append(f"- Trial `{retrain['trial_id']}` retrained trial `{retrain['parent']}`'s configuration"
                     f"{_retrain_amount(retrain['step'], batch_size, retrain['train_rows'])} and {state}.")
    matching = chosen is not None and any(r["parent"] == chosen.trial_id and r["weights"] for r in retrains)
    if chosen is None:
        pass
    elif matching:
        lines += ["", f"`adapter/` holds these weights with the pick's configuration: load them with "
                      f"`PeftModel.from_pretrained(base, \"{_adapter_path(run_path)}\")`."]
    else:
        lines += ["", f"**The pick, trial `{chosen.trial_id}`, was not retrained**: the weights above belong to another "
                      "configuration. They are kept with the analysis that picked it (`picks/`) and in the retrain's "
                      "trial directory; `adapter/` now holds this pick's configuration only. To get its weights, train "
                      f"it alone: `{RETRAIN_COMMAND} {run_path}` (the last section)."]
    return "\n".join(lines)


def _retrain_amount(steps: int | None, batch_size: int, rows: int) -> str:
    """' for 200 steps of 8 sequences on the 400 training rows (4 passes over them)': what a retrain trained on."""
    if steps is None:
        return f" on the {rows:,} training rows"
    passes = steps * batch_size / rows if rows else math.inf
    return (f" for {steps:,} steps of {batch_size} sequences on the {rows:,} training rows "
            f"({passes:.2g} passes over them)" if rows else f" for {steps:,} steps of {batch_size} sequences")


def _adapter_path(run_path: str) -> str:
    return str(Path(run_path) / ADAPTER)


def _plots_section(plots: "Plots") -> str:
    images = [f"![{path.stem.replace('_', ' ')}](plots/{path.name})" for path in plots.files]
    skipped = [f"- `plots/{name}` not drawn: {reason}." for name, reason in plots.skipped.items()]
    return "## Plots\n\n" + "\n\n".join(images + (["\n".join(skipped)] if skipped else []))


# The command that trains the pick alone on all the training data (search/retrain.py).
RETRAIN_COMMAND = "python -m search.retrain"


def _clock_section(clock: RunClock | None, budget: Budget) -> str:
    """The trials' wall time, an estimate of it for `budget.num_samples` twice and four times over, and
    how long the run took to start training where it recorded its start."""
    if clock is None:
        return "## Wall time\n\nNo trial of the search recorded its clock readings."
    estimates = "; ".join(f"`budget.num_samples={budget.num_samples * factor}` (x{factor}) about "
                          f"{duration(clock.estimate(factor))}" for factor in (2, 4))
    return (
        "## Wall time\n\n"
        f"The search's trials ran for {duration(clock.wall_seconds)} of wall-clock time, from the first trial's start "
        f"to the last one's end ({clock.concurrency:.2g} trials at a time on average; the time before the first trial "
        f"and this analysis are not counted, nor, in a resumed run, the time it stood still).\n\n"
        f"A larger search, estimated from these trials: {estimates}. Each trial added costs what the {clock.proposed} "
        f"proposed trials cost on average, stopped by ASHA or not ({clock.seconds_per_proposed:,.0f} trial-seconds), "
        f"and runs {clock.concurrency:.2g} at a time as these did; the promotions, confirmations and reruns are "
        "counted once, as measured. A rough guide: more trials may promote or confirm more."
        + ("" if clock.first_step_seconds is None else
           f"\n\nThe first training step began {clock.first_step_seconds:,.1f} s after the command started "
           "(`first_step_seconds`: its imports, the model and data prepared, Ray's start, the trials' processes, "
           "their imports and their setup).")
    )


def _snippet_section(chosen: Pick, trials: pd.DataFrame, run_config: RunConfig, run_path: str, retrained: bool) -> str:
    """The pick's LoraConfig, the whole recipe its trial trained with, a training example as the model
    saw it, and how to get its weights."""
    row, budget, info = _row(trials, chosen.trial_id), run_config.budget, run_config.data_info
    training = run_config.training
    turns = "every assistant turn" if info.train_turns == "all" else "the last assistant turn"
    template = ("none (text rows: every token trained)" if info.train.format == "text"
                else f"{info.template}, loss on {turns} (`data.train_turns={info.train_turns}`)")
    recipe = [
        ("learning rate", f"{row['learning_rate']:.3g}"),
        ("LoRA+ ratio (`loraplus_lr_ratio`)", f"{row['loraplus_lr_ratio']:g}"),
        ("optimizer", training.optimizer if training else "not recorded"),
        ("schedule", training.schedule if training else "not recorded"),
        ("batch size (`budget.batch_size`)", f"{budget.batch_size} sequences"),
        ("steps (`budget.max_steps`)", f"{budget.max_steps}"),
        ("warm-up (`budget.warmup_steps`)", f"{budget.warmup_steps} steps"),
        ("template", template),
        ("`data.max_length`", f"{info.max_length} tokens"),
        ("seed", f"{row['seed']}"),
        ("training rows", f"{info.search_train_rows:,} in the search; a retrain draws from all {info.train_rows:,}"),
    ]
    adapter = _adapter_path(run_path)
    if retrained:
        weights = (f"`{adapter}` holds the pick's weights, retrained on all the training data (the Retrain section): "
                   f"`PeftModel.from_pretrained(base, \"{adapter}\")` loads them.")
    else:
        weights = (f"Train the pick alone on the {info.train_rows:,} training rows with this recipe, without searching "
                   f"again:\n\n```\n{RETRAIN_COMMAND} {run_path}\n```\n\nIt runs {budget.max_steps} steps of "
                   f"{budget.batch_size} sequences and writes the weights to `{adapter}`, where "
                   f"`PeftModel.from_pretrained(base, \"{adapter}\")` loads them.")
    return (
        "## Use it\n\n```python\n"
        + lora_config_snippet(chosen.lora_config)
        + "\n```\n\nThe trial trained it with:\n\n"
        + _markdown_table(("", "value"), recipe)
        + "\n\nThe first training row as the model saw it, its trained tokens between [[ and ]]; prompt the adapter "
        "the same way:\n\n```\n" + info.example + "\n```\n\n"
        + weights
    )


def _marks(trial_id: str, chosen: Pick | None, roots: dict[str, str]) -> str:
    """"pick", "best", or both, for the run the pick and the best are named by; "pick (another run)"
    and the like for the other runs of their configurations (`roots`: `configuration_root`)."""
    if chosen is None:
        return ""
    marks = []
    for mark, marked_trial in (("pick", chosen.trial_id), ("best", chosen.best_trial_id)):
        if marked_trial == trial_id:
            marks.append(mark)
        elif roots[marked_trial] == roots[trial_id]:
            marks.append(f"{mark} (another run)")
    return ", ".join(marks)


def _row(trials: pd.DataFrame, trial_id: str) -> pd.Series:
    return trials[trials["trial_id"] == trial_id].iloc[0]


def _relative(value: float, reference: float, less: str) -> str:
    """'75% fewer' / '10% more' for `value` against `reference`; 'not comparable' without a positive reference."""
    if not reference > 0 or math.isnan(value):
        return "not comparable"
    change = (reference - value) / reference
    return f"{change:.0%} {less}" if change >= 0 else f"{-change:.0%} more"


def _markdown_table(headers: tuple, rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)
