"""A trial that Tune loses before it starts (it cannot reuse a worker whose last trial's thread has
not ended: Ray ends the next trial in ERROR and never tells the searcher) neither hangs the search
nor loses its configuration: the searcher is told, and the configuration runs again. Ray is made
to lose trials by giving it no time at all to wait for the last thread
(TUNE_FUNCTION_THREAD_TIMEOUT_S=0, which the trials leave as the user set it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = 5


@pytest.fixture(scope="module")
def lost(tiny_model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("lost")
    sets = [f"model.path={tiny_model_dir}", "search.module_sets=[attention_qv,mlp]", "search.ranks=[2,4]",
            "search.learning_rate=[1e-3,2e-2]", f"budget.num_samples={SAMPLES}", "budget.max_steps=6",
            "budget.eval_every=3", "budget.grace_period=6", "budget.batch_size=4", "data.eval_examples=8",
            "data.eval_generate_examples=0", "resources.max_concurrent_trials=1", "selection.confirm_top_k=0",
            "selection.cheaper=0",
            "selection.promote=false"]
    done = subprocess.run([sys.executable, "-m", "search.run", "--output", str(output), "--name", "lost",
                           *[x for s in sets for x in ("--set", s)]], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "TUNE_FUNCTION_THREAD_TIMEOUT_S": "0"},
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return output / "lost"


def test_every_configuration_runs_to_the_end_though_tune_lost_trials_before_they_started(lost):
    trials = pd.read_csv(lost / "trials.csv")
    assert "Could not re-use actor" in (lost / "logs" / "ray.log").read_text()  # Tune did lose trials
    reruns = trials[trials.origin == "rerun"]
    assert len(reruns) >= 1 and not reruns.parent.isin(trials.trial_id).any()  # the lost left no files of their own
    assert len(trials) == SAMPLES and (trials.status == "finished").all(), trials.to_string()
    report = (lost / "report.md").read_text()
    assert f"{len(reruns)} trial{'s' if len(reruns) > 1 else ''} ran again (rerun) because Tune could not start" in report


def test_optuna_holds_each_lost_trial_as_failed_and_what_its_rerun_reached(lost):
    study = optuna.load_study(study_name="lost",
                              storage=JournalStorage(JournalFileBackend(str(lost / "optuna_study.log"))))
    trials = pd.read_csv(lost / "trials.csv").set_index("trial_id")
    added = {trial.user_attrs["rerun"]: trial for trial in study.trials if "rerun" in trial.user_attrs}
    assert sorted(added) == sorted(trials[trials.origin == "rerun"].index)
    assert all(trial.value == pytest.approx(trials.loc[rerun, "eval_loss"]) for rerun, trial in added.items())
    failed = [trial for trial in study.trials if trial.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == len(added)  # each lost trial, told as failed so that the search went on
