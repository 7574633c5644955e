"""A trial that runs out of memory or diverges is a failed trial with its reason: the search
goes on, the pick is among the healthy trials, and Optuna's record agrees with Tune's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from faults import run_search

ROOT = Path(__file__).resolve().parent.parent

DRIVER = """
import ray, sys
ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
         runtime_env={"worker_process_setup_hook": "tests.faults.install", "env_vars": {"PYTHONPATH": %r}})
from search.run import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def faulty_run(tiny_model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("faulty")
    sets = [f"model.path={tiny_model_dir}", "search.module_sets=[attention_qv,mlp,all_linear]", "search.ranks=[2,4,8]",
            "search.learning_rate=[1e-3,2e-2]", "budget.num_samples=10", "budget.max_steps=6", "budget.eval_every=3",
            "budget.grace_period=3", "budget.batch_size=4", "data.eval_examples=8"]
    return run_search(DRIVER, output, "faulty", sets)


def test_the_search_goes_on_and_every_trial_has_a_row(faulty_run):
    code, _, trials = faulty_run
    assert code == 0
    assert trials.origin.isin(["search", "prior"]).sum() == 10


def test_out_of_memory_trials_are_failed_with_the_reason(faulty_run):
    _, _, trials = faulty_run
    oom = trials[trials.r == 8]
    assert len(oom) >= 1
    assert (oom.status == "failed").all()
    assert oom.error.str.contains("OutOfMemoryError").all()


def test_diverged_trials_are_failed_with_the_reason(faulty_run):
    _, _, trials = faulty_run
    nan = trials[(trials.module_set == "mlp") & (trials.r != 8)]
    assert len(nan) >= 1
    assert (nan.status == "failed").all()
    assert nan.error.str.contains("TrialDiverged").all() and nan.error.str.contains("nan").all()


def test_the_pick_is_among_the_healthy_trials(faulty_run):
    _, run_dir, trials = faulty_run
    pick = json.loads((run_dir / "pick.json").read_text())
    row = trials.set_index("trial_id").loc[pick["trial_id"]]
    assert row.status == "finished" and row.r != 8 and row.module_set != "mlp"


def test_every_optuna_trial_ends_in_one_state_matching_tune(faulty_run):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    _, run_dir, trials = faulty_run
    study = optuna.load_study(study_name="faulty",  # the run's own study, in its journal
                              storage=JournalStorage(JournalFileBackend(str(run_dir / "optuna_study.log"))))
    trials = trials[trials.origin.isin(["search", "prior"])]  # Optuna proposes these; later stages are Tune's
    states = [t.state for t in study.trials]
    assert TrialState.RUNNING not in states
    assert states.count(TrialState.FAIL) == (trials.status == "failed").sum()
    assert states.count(TrialState.PRUNED) == (trials.status == "stopped").sum()
    assert states.count(TrialState.COMPLETE) == (trials.status == "finished").sum()


def test_a_transient_failure_is_retried_from_the_last_checkpoint(tiny_model_dir, tmp_path):
    driver = DRIVER.replace("tests.faults.install", "tests.faults.install_transient").replace(
        '"env_vars": {"PYTHONPATH": %r}', '"env_vars": {"PYTHONPATH": %r, "FAULT_DIR": %r}')
    sets = [f"model.path={tiny_model_dir}", "search.module_sets=[attention_qv]", "search.ranks=[2,4]",
            "budget.num_samples=2", "budget.max_steps=9", "budget.eval_every=3", "budget.grace_period=9",
            "budget.batch_size=4", "data.eval_examples=8", "resources.max_failures=1",
            "selection.promote=false", "selection.confirm_top_k=0", "selection.cheaper=0"]
    args = ["--output", str(tmp_path), "--name", "retried", *[x for s in sets for x in ("--set", s)]]
    result = subprocess.run([sys.executable, "-c", driver % (str(ROOT), str(tmp_path)), *args], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(tmp_path.glob("*.failed"))) == 2  # each trial really failed once
    trials = pd.read_csv(tmp_path / "retried" / "trials.csv")
    assert (trials.status == "finished").all() and (trials.step == 9).all()
    for result_file in (tmp_path / "retried" / "tune").glob("trial_*/result.json"):
        steps = [json.loads(line)["step"] for line in result_file.read_text().splitlines()]
        assert steps == [3, 6, 9]  # continued after step 6 from its checkpoint, not from scratch
