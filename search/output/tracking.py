"""The experiment trackers a run reports to, besides what Ray writes anyway (its JSON, CSV and
TensorBoard files in `runs/<name>/tune/`): MLflow and Weights & Biases, both optional extras.

The settings are checked with the config, without importing either tracker (a configured
tracker that is not installed is bad input); `logger_callbacks` turns them into Ray Tune's
own logger callbacks (search/output/tracker_callbacks.py), importing the trackers only then.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

from search import environment

WANDB_MODES = ("online", "offline")


@dataclass
class MlflowConfig:
    enabled: bool = field(default=False, metadata={"help": "one MLflow run per trial, nested under a run for the search that gets the pick's files"})
    tracking_uri: str = field(default="", metadata={"help": "http://HOST:PORT, sqlite:///mlflow.db, databricks, ...; empty: $MLFLOW_TRACKING_URI, else MLflow's default"})
    experiment: str = field(default="lora-search", metadata={"help": "the MLflow experiment that holds the runs (made if missing)"})

    def problems(self) -> list[str]:
        if not self.enabled:
            return []
        out = _not_installed("tracking.mlflow.enabled", "mlflow")
        if not self.experiment:
            out.append("tracking.mlflow.experiment is ''; allowed: an MLflow experiment name (made if missing)")
        return out


@dataclass
class WandbConfig:
    enabled: bool = field(default=False, metadata={"help": "one Weights & Biases run per trial"})
    project: str = field(default="lora-search", metadata={"help": "the W&B project"})
    group: str = field(default="", metadata={"help": "the W&B group of the search's runs; empty: the run's name"})
    mode: str = field(default="online", metadata={"help": "online, or offline: no network, run files in runs/<name>/wandb/ for `wandb sync`"})

    def problems(self) -> list[str]:
        out = []
        if self.mode not in WANDB_MODES:
            out.append(f"tracking.wandb.mode is {self.mode!r}; allowed: {' or '.join(WANDB_MODES)}")
        if self.enabled:
            out += _not_installed("tracking.wandb.enabled", "wandb")
            if not self.project:
                out.append("tracking.wandb.project is ''; allowed: a W&B project name")
        return out


@dataclass
class TrackingConfig:
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def _not_installed(key: str, package: str) -> list[str]:
    """A problem naming `key` when `package` (also the name of its extra) cannot be imported
    here; found without importing it, so checking a config stays fast."""
    if find_spec(package) is not None:
        return []
    return [(f'{key} is true, but {package} is not installed. Fix: pip install -e ".[{package}]" in the checkout, '
            f"or set {key}=false")]


def logger_callbacks(tracking: TrackingConfig, run_name: str, run_dir: Path) -> list:
    """Ray Tune callbacks for the trackers `tracking` turns on, for the run `run_name` whose
    driver-side directory is `run_dir`: its MLflow runs (the search's parent run is recorded
    there) and W&B's run files. Empty when none is on."""
    if not (tracking.mlflow.enabled or tracking.wandb.enabled):
        return []
    from search.output.tracker_callbacks import MLflowTrialRuns, WandbTrialRuns

    run_dir = run_dir.resolve()  # W&B's logging actors run in the trial's directory
    callbacks = []
    if tracking.mlflow.enabled:
        callbacks.append(MLflowTrialRuns(tracking.mlflow.tracking_uri, tracking.mlflow.experiment, run_name, run_dir))
    if tracking.wandb.enabled:
        callbacks.append(WandbTrialRuns(tracking.wandb.project, tracking.wandb.group or run_name,
                                        tracking.wandb.mode, run_dir))
    return callbacks


# while the store is checked: one try, a short wait (MLflow's defaults retry an HTTP store 7 times
# with backoff, minutes before a wrong address is reported)
_CHECK_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# MLflow 3 keeps its file store in maintenance, behind this variable; its own message is long
_FILE_STORE_OPT_IN = "MLFLOW_ALLOW_FILE_STORE"
_SQLITE = "sqlite:///"  # then the database's path, absolute where it starts with a fourth slash


def mlflow_store_problem(mlflow: MlflowConfig, dry_run: bool = False) -> str | None:
    """Why the MLflow store that `mlflow` names cannot be used, or None (also when MLflow is off):
    it is asked for the run's experiment once, before Ray starts, so a wrong URI is bad input
    rather than a failure inside the search. A `dry_run` writes nothing: it leaves alone a SQLite
    store that does not exist yet, which asking would create."""
    if not mlflow.enabled:
        return None
    with environment.temporarily(_CHECK_ENV):
        return _store_problem(mlflow, dry_run)


def _store_problem(mlflow: MlflowConfig, dry_run: bool) -> str | None:
    from mlflow import MlflowClient, get_tracking_uri

    from search.output.console import divert_logs

    divert_logs("mlflow")  # its INFO lines (a new SQLite store's tables, ...) go to the run's logs/
    uri = mlflow.tracking_uri or get_tracking_uri()  # MLflow's default: sqlite:///mlflow.db in the working directory
    if dry_run and uri.startswith(_SQLITE) and not Path(uri.removeprefix(_SQLITE).split("?", 1)[0]).exists():
        return None
    try:
        MlflowClient(mlflow.tracking_uri or None).get_experiment_by_name(mlflow.experiment)
    except Exception as error:  # noqa: BLE001 - whatever the store says is the reason to show
        where = mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "MLflow's default store"
        if _FILE_STORE_OPT_IN in str(error):
            return (f"tracking.mlflow.tracking_uri {where!r}: MLflow refuses a file store (a directory or file: URI) "
                    f"unless {_FILE_STORE_OPT_IN}=true is set. Fix: use a database store (sqlite:///PATH.db), or "
                    f"export {_FILE_STORE_OPT_IN}=true")
        reason = " ".join(str(error).split())[:300]
        return (f"tracking.mlflow.tracking_uri {where!r}: the MLflow store does not answer ({type(error).__name__}: "
                f"{reason}). Fix: start the tracking server or correct the URI (http://HOST:PORT, sqlite:///PATH.db, "
                f"or a file store with {_FILE_STORE_OPT_IN}=true), or set tracking.mlflow.enabled=false")
    return None
