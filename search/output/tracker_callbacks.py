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
from rundir.layout import LATEST, MLFLOW_RUN, RUN_CONFIG, TRIALS_CSV
from search import environment

if TYPE_CHECKING:
    from mlflow import MlflowClient

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: its UI and API nest a run under the run it names


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
    `trial_name` after the trial, its config as parameters, each report's numbers as metrics,
    FINISHED or FAILED at its end), with each trial's run nested under the search's run, metrics
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
            self._runs[trial.trial_id] = self._trial_run(str(trial))
        params = [Param(key, str(value)) for key, value in flatten_dict(trial.config).items()]
        self._mlflow.log_batch(self._runs[trial.trial_id], params=params)

    def _trial_run(self, name: str) -> str:
        """The id of the trial `name`'s run under the search's run: the one an interrupted driver
        made for it (Tune's restore makes a new Trial object for it), else a new one."""
        earlier = self._mlflow.search_runs([self._experiment_id], max_results=1,
                                           filter_string=f"tags.`{PARENT_TAG}` = '{self._parent}' AND "
                                                         f"tags.trial_name = '{name}'")
        if earlier:
            return earlier[0].info.run_id
        tags = {PARENT_TAG: self._parent, "trial_name": name}
        return self._mlflow.create_run(self._experiment_id, run_name=name, tags=tags).info.run_id

    def log_trial_result(self, iteration: int, trial, result: dict):
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now_ms, result["step"]) for key, value in flatten_dict(result).items()
                   if isinstance(value, numbers.Real)]  # MLflow's metrics are numbers; a report also holds names
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
