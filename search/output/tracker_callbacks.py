"""Ray Tune's logger callbacks for MLflow and W&B as a run needs them, and the search's own MLflow
run, which gets the pick's files after the analysis. Imported only when a tracker is on (Ray's
integration modules import mlflow and wandb where they are installed); either may be missing
while the other is on.
"""

from __future__ import annotations

import json
import numbers
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ray.air.integrations.wandb import WandbLoggerCallback
from ray.tune.logger import LoggerCallback
from ray.tune.utils import flatten_dict

from rundir.files import write_json_atomic
from rundir.layout import LATEST, MLFLOW_RUN, PICK, RUN_CONFIG, TRIALS_CSV
from rundir.params import TrialParams
from rundir.report import TABLE_COLUMNS
from search import environment

if TYPE_CHECKING:
    from mlflow import MlflowClient

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: its UI and API nest a run under the run it names
TRIAL_ID_TAG = "trial_id"          # Tune's id of a trial's run, which pick.json names
PICKED_TAG = "picked"              # "true" on the picked trial's run, "false" on one an earlier analysis picked
PICK_TRIAL_TAG = "pick.trial_id"   # on the search's run: the picked trial
PICK_RUN_TAG = "pick.run_id"       # on the search's run: the picked trial's MLflow run


def trial_params(params: TrialParams) -> dict[str, str]:
    """A trial's MLflow params: the trial contract's fields, the LoRA config's under
    `lora_config/`, as text. The same keys for every trial, whichever stage made it: the copies
    of sampled values that Optuna's searcher adds to Tune's config are not the trial's contract."""
    return {key: str(value) for key, value in flatten_dict(params.to_config()).items()}


def report_metrics(result: dict) -> dict[str, float]:
    """The MLflow metrics of one report: the trial's own numbers (the report contract's columns
    and the user's metric, `module:function`), without what Ray adds to a report (its clocks,
    ids, config) nor the step, which is the metrics' step."""
    return {key: float(value) for key, value in result.items()
            if (key in TABLE_COLUMNS or ":" in key) and key != "step"
            and isinstance(value, numbers.Real) and not isinstance(value, bool)}


def _client(tracking_uri: str | None) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri)


def search_run_id(client: MlflowClient, experiment_id: str, run_name: str, run_dir: Path) -> str:
    """The id of the search's MLflow run: the one recorded in `run_dir` (so a resume, the retrain
    and the pick find it), else a new run in `experiment_id`, recorded there."""
    recorded = run_dir / MLFLOW_RUN
    if recorded.is_file():
        return json.loads(recorded.read_text())["run_id"]
    run = client.create_run(experiment_id, run_name=run_name, tags={"run_dir": str(run_dir)})
    write_json_atomic(recorded, {"run_id": run.info.run_id, "experiment_id": experiment_id})
    return run.info.run_id


class MLflowTrialRuns(LoggerCallback):
    """A run per trial in MLflow, as Ray's MLflowLoggerCallback makes them (named and tagged
    `trial_name` after the trial, FINISHED or FAILED at its end), with the trial's own
    configuration as parameters (`trial_params`) and its own numbers as metrics
    (`report_metrics`), tagged with its `trial_id`, nested under the search's run, metrics
    at the trial's optimizer step (Ray's step counts reports, and starts again for a promoted
    trial that continues its parent's steps), and a trial that `--resume` continues logging to
    its own run. Written on MLflow's public client: Ray's callback keeps its table of runs, which
    a resumed trial must be entered in, to itself."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, run_dir: Path):
        self._tracking_uri = tracking_uri or None
        self._experiment, self._run_name, self._run_dir = experiment, run_name, run_dir
        self._runs: dict[str, str] = {}  # trial id -> MLflow run id

    def setup(self, *args, **kwargs):
        self._mlflow = _client(self._tracking_uri)
        found = self._mlflow.get_experiment_by_name(self._experiment)
        self._experiment_id = found.experiment_id if found else self._mlflow.create_experiment(self._experiment)
        self._parent = search_run_id(self._mlflow, self._experiment_id, self._run_name, self._run_dir)

    def log_trial_start(self, trial):
        from mlflow.entities import Param

        if trial.trial_id not in self._runs:
            self._runs[trial.trial_id] = self._trial_run(str(trial), trial.trial_id)
        params = [Param(key, value) for key, value in trial_params(TrialParams.from_config(trial.config)).items()]
        self._mlflow.log_batch(self._runs[trial.trial_id], params=params)

    def _trial_run(self, name: str, trial_id: str) -> str:
        """The id of the trial `name`'s run under the search's run: the one an interrupted driver
        made for it (Tune's restore makes a new Trial object for it), else a new one."""
        earlier = self._mlflow.search_runs([self._experiment_id], max_results=1,
                                           filter_string=f"tags.`{PARENT_TAG}` = '{self._parent}' AND "
                                                         f"tags.trial_name = '{name}'")
        if earlier:
            return earlier[0].info.run_id
        tags = {PARENT_TAG: self._parent, "trial_name": name, TRIAL_ID_TAG: trial_id}
        return self._mlflow.create_run(self._experiment_id, run_name=name, tags=tags).info.run_id

    def log_trial_result(self, iteration: int, trial, result: dict):
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        metrics = [Metric(key, value, now_ms, result["step"]) for key, value in report_metrics(result).items()]
        self._mlflow.log_batch(self._runs[trial.trial_id], metrics=metrics)

    def log_trial_end(self, trial, failed: bool = False):
        self._mlflow.set_terminated(self._runs[trial.trial_id], "FAILED" if failed else "FINISHED")


class WandbTrialRuns(WandbLoggerCallback):
    """Ray's WandbLoggerCallback (a W&B run per trial, logged from an actor of its own), its run
    files in `run_dir`/wandb/, in `mode` online or offline; a trial that `--resume` continues
    logs to its own run."""

    def __init__(self, project: str, group: str, mode: str, run_dir: Path):
        super().__init__(project=project, group=group, mode=mode, dir=str(run_dir), resume="allow")

    def setup(self, *args, **kwargs):
        if self.kwargs["mode"] == "offline":
            environment.setenv("WANDB_MODE", "offline")  # else Ray's setup demands an API key that offline runs never use
        super().setup(*args, **kwargs)


def log_pick(tracking_uri: str, run_dir: Path) -> bool:
    """Log the latest analysis' outputs in `run_dir` (the pick, adapter, plots and report), the
    trial table and the resolved config as artifacts of the search's MLflow run, and mark it finished.
    False, with one line on stderr, when MLflow cannot be written: the files are still in `run_dir`."""
    client = _client(tracking_uri or None)
    try:
        run_id = json.loads((run_dir / MLFLOW_RUN).read_text())["run_id"]
        if (run_dir / PICK).is_file():  # else no trial was eligible, and the report says why
            _mark_pick(client, run_id, run_dir)
        for name in (*LATEST, TRIALS_CSV, RUN_CONFIG):
            path = run_dir / name
            if path.is_dir():
                client.log_artifacts(run_id, str(path), artifact_path=name)
            elif path.is_file():
                client.log_artifact(run_id, str(path))
        client.set_terminated(run_id, "FINISHED")
    except Exception as e:  # noqa: BLE001 - the run's results are safe locally: say so, exit 1
        print(f"error: could not log the pick to MLflow ({type(e).__name__}: {e}); the files are in {run_dir}. "
              f"Fix: check tracking.mlflow.tracking_uri, then --resume logs them again", file=sys.stderr)
        return False
    print(f"MLflow: the search's run {run_id} holds the pick's files ({client.tracking_uri})")
    return True


def _mark_pick(client: MlflowClient, run_id: str, run_dir: Path) -> None:
    """Show the pick in MLflow: the search's run `run_id` gets the picked trial's configuration as
    params, its last report's numbers and the pick's value and standard error as metrics, and
    tags naming the trial and its run; the picked trial's run gets the tag `picked`, which a run an
    earlier analysis picked loses. MLflow never changes a param: where a later analysis (a resume)
    picks another configuration, the params keep the first pick's and the tags name the new one."""
    from mlflow.entities import Metric, Param

    from analysis.results import read_trial_files

    pick = json.loads((run_dir / PICK).read_text())
    (picked,) = [trial for trial in read_trial_files(run_dir) if trial.trial_id == pick["trial_id"]]
    held = client.get_run(run_id)
    params = [Param(key, value) for key, value in trial_params(picked.params).items() if key not in held.data.params]
    last = picked.rows[-1]
    now_ms = int(time.time() * 1000)
    values = {**report_metrics(last), "pick_value": float(pick["value"]), "pick_se": float(pick["se"])}
    client.log_batch(run_id, params=params, metrics=[Metric(key, value, now_ms, last["step"]) for key, value in values.items()])
    children = f"tags.`{PARENT_TAG}` = '{run_id}'"
    experiment = [held.info.experiment_id]
    for earlier in client.search_runs(experiment, filter_string=f"{children} AND tags.{PICKED_TAG} = 'true'"):
        client.set_tag(earlier.info.run_id, PICKED_TAG, "false")
    client.set_tag(run_id, PICK_TRIAL_TAG, picked.trial_id)
    # none where the trial's run was made without the tag (by an earlier version of this callback)
    for child in client.search_runs(experiment, filter_string=f"{children} AND tags.{TRIAL_ID_TAG} = '{picked.trial_id}'"):
        client.set_tag(child.info.run_id, PICKED_TAG, "true")
        client.set_tag(run_id, PICK_RUN_TAG, child.info.run_id)
