"""A trial that runs out of GPU memory while other trials share its GPU is not the
configuration's fault: it is run again with a larger share, from its last checkpoint, and its
run can be the pick. Ray is told of one GPU that this CPU machine does not have, so trials are
packed two to it (tests/faults.py raises the out-of-memory error)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from faults import run_search

ROOT = Path(__file__).resolve().parent.parent

DRIVER = """
import ray, sys
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
         runtime_env={"worker_process_setup_hook": "tests.faults.install_out_of_memory_when_shared",
                      "env_vars": {"PYTHONPATH": %r}})
import search.inputs.prepare
search.inputs.prepare.check_device = lambda *args, **kwargs: None  # the GPU Ray was told of is not this machine's
from search.run import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def shared_run(tiny_model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("shared")
    sets = [f"model.path={tiny_model_dir}", "model.dtype=float32", "resources.gpus_per_trial=0.5",
            "search.module_sets=[attention_qv]", "search.ranks=[8]", "search.priors=none",
            "search.learning_rate=2e-2", "budget.num_samples=2", "budget.max_steps=6", "budget.eval_every=3",
            "budget.grace_period=6", "budget.batch_size=4", "data.eval_examples=8", "selection.confirm_top_k=0",
            "selection.cheaper=0",
            "selection.promote=false"]
    return run_search(DRIVER, output, "shared", sets)


def test_a_trial_out_of_memory_beside_others_is_run_again_alone_from_its_checkpoint_and_finishes(shared_run):
    code, _, trials = shared_run
    assert code == 0
    failed = trials[(trials.status == "failed")]
    assert len(failed) == 2 and failed.error.str.contains("OutOfMemoryError").all()
    assert (failed.step == 3).all()  # it had reported once, and left a checkpoint
    reruns = trials[trials.origin == "rerun"].set_index("parent")
    assert sorted(reruns.index) == sorted(failed.trial_id)
    assert (reruns.status == "finished").all() and (reruns.step == 6).all()


def test_the_pick_can_be_the_trial_run_again(shared_run):
    _, run_dir, trials = shared_run
    pick = json.loads((run_dir / "pick.json").read_text())
    assert trials.set_index("trial_id").loc[pick["trial_id"], "origin"] == "rerun"  # every search trial ran out


def test_the_report_says_how_many_trials_were_run_again_and_why(shared_run):
    _, run_dir, trials = shared_run
    report = (run_dir / "report.md").read_text()
    assert f"{(trials.origin == 'rerun').sum()} trial" in report and "out of GPU memory" in report


def test_optuna_learns_what_each_rerun_reached_as_a_trial_of_its_own(shared_run):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    _, run_dir, trials = shared_run
    study = optuna.load_study(study_name="shared",
                              storage=JournalStorage(JournalFileBackend(str(run_dir / "optuna_study.log"))))
    by_id = trials.set_index("trial_id")
    added = {trial.user_attrs["rerun"]: trial for trial in study.trials if "rerun" in trial.user_attrs}
    reruns = trials[trials.origin == "rerun"]
    assert sorted(added) == sorted(reruns.trial_id)  # once each
    for rerun_id, trial in added.items():
        original = next(t for t in study.trials if t.params == trial.params and "rerun" not in t.user_attrs)
        assert original.state == optuna.trial.TrialState.FAIL  # what the failed first run told it
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert trial.value == pytest.approx(by_id.loc[rerun_id, "eval_loss"])
        assert trial.user_attrs["rerun_of"] == by_id.loc[rerun_id, "parent"]
