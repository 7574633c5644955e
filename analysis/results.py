"""Read a run directory into tables: one row per trial, and every reported step for curves.

The run directory is the only input: `run_config.json` written by the driver,
and the Ray Tune experiments whose trials compete (`rundir.layout.COMPETING_EXPERIMENTS`), each
with one sub-directory per trial. Seen with Ray 2.60, a trial directory holds:
- `params.json`: the trial's config, read through the trial contract (`rundir.params`; it
  carries no trial id);
- `result.json`: one JSON object per `tune.report` call, each with Ray's `trial_id` added (and
  the config repeated under `config`, which we ignore in favour of `params.json`);
- `error.txt`: when the trial raised, "Failure # N (occurred at ...)" then the traceback, once
  per failure; a trial can fail before its first report and then has no result rows. It stays
  when Tune retried the trial (`resources.max_failures`) and the retry reported again, so a
  trial failed when its last failure is no older than its last report (`_failed_last`); Tune's
  experiment state is not read.
Its name is the driver's `trial_<trial id>`, or Ray's default
`<trainable>_<trial id>_<index>_<short config>_<date>`; the trial id is 8 hex digits with a
searcher (`ab12cd34`) or `<5 hex>_<5 digits>` without one (`711d0_00001`).
Ray's `done` flag is not used: it was seen false on the last row of a finished trial and true
on a row where ASHA stopped a trial.
"""

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.config import is_user_metric
from rundir.files import atomic_path
from rundir.layout import COMPETING_EXPERIMENTS, RETRAIN_EXPERIMENT, RUN_CONFIG
from rundir.params import TrialParams
from rundir.report import ROW_COLUMNS as REPORT_ROW_COLUMNS
from rundir.report import TABLE_COLUMNS
from rundir.runconfig import RunConfig

COLUMNS = (
    "trial_id", "status", "origin", "parent", "module_set", "target_modules", "target_parameters", "r", "alpha_ratio",
    "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "learning_rate",
    "loraplus_lr_ratio", "seed", *TABLE_COLUMNS, "error",
)
CURVE_COLUMNS = ("trial_id", "step", "eval_loss", "eval_accuracy", "eval_exact_match", "train_loss")
# What a trial's last report gives the table is `rundir.report.TABLE_COLUMNS` (besides the user's
# metric, `user_metric_columns`); a trial that failed before its first report has none, and
# eval_exact_match is missing where the trial generated no answers (data.eval_generate_examples 0).
# The per-row values of the eval metrics, by metric (`rundir.report.ROW_COLUMNS`): the same rows
# for every trial of a run, so two trials' lists pair row by row (analysis/select.py). The trial
# table carries them after its other columns, a list each (None where the trial reported none);
# trials.csv leaves them out.
ROW_COLUMNS = {column.replace("eval_row_", "eval_"): column for column in REPORT_ROW_COLUMNS}
# Integer columns that are missing for a trial without reports: pandas' nullable integers.
_NULLABLE_INTEGER_COLUMNS = ("step", "trainable_params")
_LORA_CONFIG_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora")
_TRIAL_ID_IN_NAME = re.compile(r"_(?P<trial_id>[0-9a-f]{8}|[0-9a-f]{5}_[0-9]{5})(?:_|$)")
_FAILURE_HEADER = re.compile(r"^Failure # \d+ .*$", re.MULTILINE)
_FAILURE_AT = re.compile(r"^Failure # \d+ \(occurred at ([\d_-]+)\)", re.MULTILINE)
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*(?P<name>[A-Za-z_]\w*): (?P<message>.*\S)")


@dataclass(frozen=True)
class TrialFiles:
    """What one trial directory holds, parsed: `rows` in report order, `error` "" unless it
    failed. `directory` is None for a trial known from its reports only (the driver's searcher)."""

    trial_id: str
    params: TrialParams
    rows: list[dict]
    error: str
    directory: Path | None


def read_run_config(run_dir: str | os.PathLike) -> RunConfig:
    """The run's record, `<run_dir>/run_config.json`.

    Raises ValueError naming the path when the directory or file is missing or unreadable,
    and, from `RunConfig.from_json`, naming a key of the wrong type or unknown, or listing every
    key the file lacks.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"Run directory {str(run_dir)!r} does not exist. "
                         "Fix: pass the directory a search wrote, such as runs/<name>.")
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        raise ValueError(
            f"{str(path)!r} is missing, so {str(run_dir)!r} is not a run directory. "
            "Fix: pass the directory a search wrote (it holds run_config.json and tune/)."
        )
    return RunConfig.from_json(_read_json(path))


def read_trial_files(run_dir: str | os.PathLike) -> list[TrialFiles]:
    """Every trial of the run's competing experiments, experiment by experiment, by directory name; [] when none started.

    A trial directory is any sub-directory of an experiment directory holding `params.json`.
    """
    trials = []
    for experiment in COMPETING_EXPERIMENTS:
        for params in sorted(Path(run_dir, experiment).glob("*/params.json")):
            trials.append(_read_trial(params.parent))
    return trials


def read_retrain_files(run_dir: str | os.PathLike) -> list[TrialFiles]:
    """Every retrain of a pick on all the training data (the `retrain` experiment), by directory name."""
    return [_read_trial(params.parent) for params in sorted(Path(run_dir, RETRAIN_EXPERIMENT).glob("*/params.json"))]


def trials_table(trials: list[TrialFiles], max_steps: int, metric: str) -> pd.DataFrame:
    """One row per trial of `trials` (read from files, or known from their reports) with exactly
    `COLUMNS` (then the user's metric column where `metric`, the run's selection.metric, names
    one: `user_metric_columns`, then `ROW_COLUMNS`' columns), in the order of `trials`.

    `status` is "failed" when Ray recorded an error (then `error` is its one-line summary),
    "finished" when the trial reported step `max_steps` (budget.max_steps), and "stopped"
    otherwise (stopped early by the scheduler, or the run was interrupted). Metrics are those of
    the trial's last report, at `step`; NaN (NA for the integer columns `step` and
    `trainable_params`) when it never reported.
    """
    records = [trial_record(trial, max_steps, metric) for trial in trials]
    table = pd.DataFrame.from_records(records, columns=[*COLUMNS, *user_metric_columns(metric), *ROW_COLUMNS.values()])
    return table.astype({column: "Int64" for column in _NULLABLE_INTEGER_COLUMNS})


def curves_table(trials: list[TrialFiles], metric: str) -> pd.DataFrame:
    """Every reported step of `trials`: `CURVE_COLUMNS` (then the user's metric column, as in
    `trials_table`), trials in the order given, steps ascending; where a restored trial reported a
    step twice, the later report wins. `metric` is the run's selection.metric."""
    columns = [*CURVE_COLUMNS, *user_metric_columns(metric)]
    records = [record for trial in trials for record in _curve_records(trial, columns[1:])]
    return pd.DataFrame.from_records(records, columns=columns)


def user_metric_columns(metric: str) -> tuple[str, ...]:
    """The column of the user's metric function where `metric` (a run's selection.metric) names
    one: its trials report the function's value under the name `module:function`."""
    return (metric,) if is_user_metric(metric) else ()


def lora_configs(trials: list[TrialFiles]) -> dict[str, dict]:
    """The exact PEFT `LoraConfig` keyword arguments each of `trials` trained with, by trial id."""
    return {trial.trial_id: trial.params.lora_config for trial in trials}


def write_trials_csv(trials: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the trial table to `path` as CSV (no index), without the per-row values
    (`ROW_COLUMNS`: each trial's result.json keeps them), atomically; return `path`."""
    with atomic_path(path) as temporary:
        trials.drop(columns=list(ROW_COLUMNS.values()), errors="ignore").to_csv(temporary, index=False)
    return Path(path)


def trial_record(trial: TrialFiles, max_steps: int, metric: str) -> dict:
    """One trial's row of the trial table, as a dict keyed by `COLUMNS`, `user_metric_columns(metric)`
    and `ROW_COLUMNS`' columns."""
    params = trial.params
    lora_config = params.lora_config
    last = trial.rows[-1] if trial.rows else {}
    reported = {key: last.get(key, math.nan) for key in (*TABLE_COLUMNS, *user_metric_columns(metric))}
    reported |= {column: row_values(last.get(column)) for column in ROW_COLUMNS.values()}
    return {
        "trial_id": trial.trial_id,
        "status": trial_status(reported["step"], trial.error, max_steps),
        "origin": params.origin.value,
        "parent": params.parent,
        "module_set": params.module_set,
        "target_modules": json.dumps(lora_config["target_modules"]),
        # expert weights, in a mixture of experts; a LoraConfig without them has no such key
        "target_parameters": json.dumps(lora_config.get("target_parameters", [])),
        "r": lora_config["r"],
        "alpha_ratio": params.alpha_ratio,
        "lora_alpha": lora_config["lora_alpha"],
        "lora_dropout": lora_config["lora_dropout"],
        "use_rslora": lora_config["use_rslora"],
        "use_dora": lora_config["use_dora"],
        "learning_rate": params.learning_rate,
        "loraplus_lr_ratio": params.loraplus_lr_ratio,
        "seed": params.seed,
        **reported,
        "error": trial.error,
    }


def row_values(reported) -> list[float] | None:
    """A report's per-row values (`ROW_COLUMNS`) as floats; None where the report has none, or
    where they are not a list of finite numbers (nothing to pair with)."""
    if not isinstance(reported, list) or not reported:
        return None
    try:
        values = [float(value) for value in reported]
    except (TypeError, ValueError):
        return None
    return values if all(math.isfinite(value) for value in values) else None


def trial_status(step: float, error: str, max_steps: int) -> str:
    """The status of a trial: "failed" with an error, else "finished" at `max_steps` or beyond, else "stopped".

    `step` is NaN for a trial that never reported.
    """
    if error:
        return "failed"
    if step >= max_steps:
        return "finished"
    return "stopped"


def error_summary(error_text: str) -> str:
    """The one line that says why a trial failed, from the text of Ray's `error.txt`.

    Reads the last failure only (Ray appends one block per failure). Within it, the last
    unindented `package.module.Name: message` line, without the module path
    ("trainables.train.TrialDiverged: loss became nan" -> "TrialDiverged: loss became nan");
    for errors without a traceback (a worker that died), the block's first line.
    """
    last_failure = _FAILURE_HEADER.split(error_text)[-1]
    lines = [line for line in last_failure.splitlines() if line.strip()]
    for line in reversed(lines):
        match = _EXCEPTION_LINE.match(line)
        if match:
            return f"{match['name']}: {match['message']}"
    return lines[0].strip() if lines else "failed without a message"


def _read_trial(trial_dir: Path) -> TrialFiles:
    params_path = trial_dir / "params.json"
    config = _read_json(params_path)
    missing = [f"lora_config.{key}" for key in _LORA_CONFIG_KEYS if key not in config.get("lora_config", {})]
    try:
        params = TrialParams.from_config(config)
    except KeyError as error:
        missing.insert(0, error.args[0])
    except ValueError as error:  # an origin this version does not know
        raise ValueError(f"{str(params_path)!r}: {error}; the trial was not started by this version of the search.") from None
    if missing:
        raise ValueError(f"{str(params_path)!r} lacks {missing}; the trial was not started by this version of the search.")
    rows = _read_result_rows(trial_dir / "result.json")
    error_path = trial_dir / "error.txt"
    trial_id = rows[0]["trial_id"] if rows else _trial_id_from_name(trial_dir.name)
    error_text = error_path.read_text(encoding="utf-8", errors="replace") if error_path.is_file() else ""
    failed = bool(error_text) and _failed_last(error_text, rows)
    error = error_summary(error_text) if failed else ""
    return TrialFiles(trial_id=trial_id, params=params, rows=rows, error=error, directory=trial_dir)


def _failed_last(error_text: str, rows: list[dict]) -> bool:
    """Whether the trial's last failure came after its last report: then it ended failed. A trial
    that Tune retried (resources.max_failures) and that reported again has a later report; the
    trial's own files tell, not Tune's experiment state. Ray stamps both in its local time, to the
    second (`date`, "Failure # N (occurred at ...)"); a retry takes longer than that to report."""
    failures = _FAILURE_AT.findall(error_text)
    dates = [row["date"] for row in rows if isinstance(row.get("date"), str)]
    return not failures or not dates or failures[-1] >= max(dates)


def _read_result_rows(path: Path) -> list[dict]:
    """The JSON lines of `result.json`; [] when absent.

    A kill while Ray appends can leave the last line cut short: that line is dropped.
    Any other line that is not JSON raises ValueError naming the file and line.
    """
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                break
            raise ValueError(f"{str(path)!r} line {number} is not JSON ({error.msg}).") from None
    return rows


def _trial_id_from_name(dir_name: str) -> str:
    """Ray's trial id inside a trial directory's name; the whole name when it has none."""
    match = _TRIAL_ID_IN_NAME.search(dir_name)
    return match["trial_id"] if match else dir_name


def _curve_records(trial: TrialFiles, columns: list[str]) -> list[dict]:
    by_step = {row["step"]: row for row in trial.rows}
    return [
        {"trial_id": trial.trial_id, **{key: by_step[step].get(key, math.nan) for key in columns}}
        for step in sorted(by_step)
    ]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} is not valid JSON ({error.msg} at line {error.lineno}).") from None

