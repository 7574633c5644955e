"""The analysis of a run directory: its files -> the trial table -> the pick -> the export ->
trials.csv, pick.json, adapter/adapter_config.json, plots/ and report.md (`analyse`); a run kept
at a storage URI is downloaded, analysed and its outputs uploaded back (`analyse_at_uri`).
The command line is `analysis.report`, the text of report.md `analysis.render`.
"""

import datetime
import filecmp
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from analysis.config import SelectionConfig
from analysis.diagnose import diagnose
from analysis.render import RETRAIN_COMMAND, render_report, retrain_section
from analysis.results import (
    curves_table,
    lora_configs,
    read_retrain_files,
    read_run_config,
    read_trial_files,
    trials_table,
    write_trials_csv,
)
from analysis.select import Comparison, NoCandidate, amount, pick, without_pick
from analysis.timing import duration, run_clock
from rundir.files import (
    download_tree,
    join_uri,
    publish_copy,
    remove,
    upload,
    without_trial_checkpoints,
    write_json_atomic,
    write_text_atomic,
)
from rundir.layout import ADAPTER, ANALYSIS_OUTPUTS, LATEST, PICK, PICKS, PLOTS, REPORT, TRIALS_CSV
from rundir.runconfig import RunConfig


def analyse(run_dir: str | os.PathLike, selection: SelectionConfig | None = None, shown_as: str | None = None) -> int:
    """Write the analysis of `run_dir` into it; return 0 with a pick, 1 when no trial is eligible.

    `selection` replaces run_config.json's selection settings when given. trials.csv (the facts
    of every trial) is rewritten; everything that depends on the selection (pick.json,
    adapter/, plots/, report.md) goes into a directory of its own, `picks/<time>/`, which no
    later analysis touches, and is then copied to the top of the run as the latest. Nothing is
    deleted: an earlier pick, and the weights of a retrain that no longer match the pick, stay
    in their own `picks/<time>/` (and the retrain's in `retrain/`). Prints the outcome once, with
    the trials' wall time and the command that retrains the pick or the path its weights load from.
    Commands and paths name the run as `shown_as` (default: its absolute path, which works from
    any directory). Raises ValueError for bad input (not a run directory, invalid selection settings).
    """
    run_dir = Path(run_dir)
    run_path = shown_as or str(run_dir.resolve())
    run_config = read_run_config(run_dir)
    selection = selection or SelectionConfig.recorded(run_config.selection)
    problems = selection.problems()
    if problems:
        raise ValueError(" ".join(problems))
    max_steps = run_config.budget.max_steps
    comparison = Comparison.of(selection, max_steps)
    # every trial's files read once, for the table, the curves, the configs and the clock
    files = read_trial_files(run_dir)
    recorded_metric = SelectionConfig.recorded(run_config.selection).metric  # the column the trials reported
    trials = trials_table(files, max_steps, recorded_metric)
    clock = run_clock(files, run_config.started_at)
    write_trials_csv(trials, run_dir / TRIALS_CSV)
    configs = lora_configs(files)
    try:
        chosen = pick(trials, comparison, configs)
    except NoCandidate as error:
        chosen, no_pick, standing = None, str(error), None
    else:
        no_pick, standing = None, without_pick(trials, chosen, max_steps, configs)
    # Imported here, not at the top, so that --help and input errors answer at once:
    # matplotlib and optuna take about a second to import, peft (through torch) about five.
    from analysis.plots import write_plots

    out = _new_analysis_dir(run_dir)
    curves = curves_table(files, recorded_metric)
    plots = write_plots(trials, curves, selection, chosen, out / PLOTS)
    retrains = [_retrain_record(trial, run_dir, run_config) for trial in read_retrain_files(run_dir)]
    retrain = None
    if chosen is not None:
        from analysis.export import export_adapter_config, export_retrained_weights

        retrain = next((r for r in retrains if r["parent"] == chosen.trial_id and r["weights"]), None)
        export_adapter_config(chosen.lora_config, run_config.base_model.name, out / ADAPTER)
        if retrain:
            export_retrained_weights(run_dir / retrain["directory"], out / ADAPTER)
        write_json_atomic(out / PICK, {**asdict(chosen), "without_pick": asdict(standing),
                                       "analysis": out.relative_to(run_dir).as_posix(),
                                       "retrain": retrain, "data": _data_sources(run_config),
                                       "wall_time": asdict(clock) if clock else None})
    write_text_atomic(out / REPORT, render_report(
        run_config, trials, comparison, chosen, no_pick, plots, diagnose(trials, curves),
        retrain_section(retrains, chosen, run_path, run_config.budget.batch_size), standing, clock, run_path,
        retrained=retrain is not None))
    for name in LATEST:
        if (out / name).exists():
            publish_copy(out / name, run_dir / name)
        elif name in (PICK, ADAPTER) and (run_dir / name).exists():  # no pick now: the last one stays in picks/
            _retire(run_dir / name)
    if chosen is None:
        print(f"analysis: {no_pick} The report is {run_dir / REPORT}.", file=sys.stderr)
        return 1
    print(
        f"Picked trial {chosen.trial_id}: {chosen.metric} {chosen.value:.4g} (best {chosen.best_value:.4g}), "
        f"{chosen.cost_name} {amount(chosen.cost)}"
        f"{', uncertain: it rests on one configuration the search found' if standing.uncertain else ''}"
        f"{f', but {chosen.metric} cannot tell the finished configurations apart (one value for all)' if chosen.tie else ''}. "
        f"Report: {run_dir / REPORT}"
    )
    if clock:
        print(f"Wall time: the trials ran for {duration(clock.wall_seconds)}; with budget.num_samples x2 about "
              f"{duration(clock.estimate(2))}, x4 about {duration(clock.estimate(4))} (the report says how).")
    adapter = Path(run_path) / ADAPTER
    if retrain:
        print(f"Weights: PeftModel.from_pretrained(base, \"{adapter}\") loads the pick retrained on all the training data.")
    else:
        print(f"Train the pick alone on all the training data: {RETRAIN_COMMAND} {run_path} "
              f"(weights to {adapter})")
    return 0


def analyse_at_uri(uri: str, overrides: dict) -> int:
    """Download the run (trial checkpoints only where weights are exported: the retrained
    pick's), analyse it in a temporary directory, upload the outputs back next to it."""
    import tempfile

    with tempfile.TemporaryDirectory() as temporary:
        run_dir = Path(temporary) / "run"
        try:
            found = download_tree(uri, run_dir, keep=without_trial_checkpoints)
        except OSError as error:
            raise ValueError(f"cannot read {uri!r} ({type(error).__name__}: {error}).") from None
        if not found:
            raise ValueError(f"{uri!r} holds nothing. Fix: pass the URI a search wrote, <output>/<name>.")
        selection = SelectionConfig.recorded(read_run_config(run_dir).selection).with_options(**overrides)
        code = analyse(run_dir, selection, shown_as=uri)
        for name in ANALYSIS_OUTPUTS:
            remove(join_uri(uri, name))  # an output this analysis did not write (no pick) must not stay behind
            if (run_dir / name).exists():
                upload(run_dir / name, join_uri(uri, name))
        print(f"analysis: the outputs were uploaded to {uri}", file=sys.stderr)
        return code


def _data_sources(run_config: RunConfig) -> dict:
    """What pick.json says of the data the pick was judged on: each split's source, the part of it
    used, its rows, and how many rows max_length truncated or dropped (`RunConfig.data_info`)."""
    info = run_config.data_info
    keys = ("source", "part", "format", "rows", "truncated", "dropped")
    return {"template": info.template, "max_length": info.max_length,
            **{split: {key: getattr(source, key) for key in keys} for split, source in (("train", info.train),
                                                                                         ("eval", info.eval))},
            "eval_rows_scored": info.eval_rows}


def _new_analysis_dir(run_dir: Path) -> Path:
    """`picks/<UTC time>/`, made empty; a second analysis within the same second gets a suffix."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")
    for suffix in ("", *(f"-{n}" for n in range(2, 1000))):
        candidate = run_dir / PICKS / f"{stamp}{suffix}"
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
    raise ValueError(f"{run_dir / PICKS} already holds 999 analyses made in the second {stamp}")


def _retire(path: Path) -> None:
    """Take a top-level output of an earlier analysis away without losing it: removed where an
    analysis under picks/ holds the same, else moved into picks/earlier/ (a run analysed before
    analyses kept their own copies)."""
    for analysis in (path.parent / PICKS).iterdir():
        if _same(path, analysis / path.name):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            return
    (path.parent / PICKS / "earlier").mkdir(parents=True, exist_ok=True)
    os.replace(path, path.parent / PICKS / "earlier" / path.name)


def _same(a: Path, b: Path) -> bool:
    if a.is_file() and b.is_file():
        return filecmp.cmp(a, b, shallow=False)
    if a.is_dir() and b.is_dir():
        names = sorted(p.name for p in a.iterdir())
        return names == sorted(p.name for p in b.iterdir()) and all(_same(a / n, b / n) for n in names)
    return False


def _retrain_record(trial, run_dir: Path, run_config: RunConfig) -> dict:
    """What pick.json and the report say of one retrain: whose configuration, on how much data,
    its last evaluation, and where its trial keeps the weights."""
    last = trial.rows[-1] if trial.rows else {}
    directory = trial.directory.relative_to(run_dir)
    has_weights = any(trial.directory.glob("checkpoint_*/adapter/adapter_model.safetensors"))
    return {
        "trial_id": trial.trial_id,
        "parent": trial.params.parent,
        "train_rows": run_config.data_info.train_rows,
        "step": last.get("step"),
        "eval_loss": last.get("eval_loss"),
        "eval_accuracy": last.get("eval_accuracy"),
        "eval_exact_match": last.get("eval_exact_match"),
        "error": trial.error,
        "directory": directory.as_posix(),
        "weights": (directory / "adapter").as_posix() if has_weights else None,
    }
