"""The search's searcher against a real Optuna study, without Ray: what the study is told, the
priors queued once, Tune's save and restore, and the trials a kill left behind. (The searcher
against a study that is ahead of Tune's copy after a kill: test_tracking.py.)"""

from __future__ import annotations

import math
import pickle
import shutil

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from search.tuning.searcher import StudySearcher

optuna.logging.set_verbosity(optuna.logging.WARNING)
MAX_STEPS = 4


def space(trial) -> dict:
    x = trial.suggest_float("x", 0.0, 1.0)
    return {"double": 2 * x}  # a derived constant, as LoraSpace's lora_config


def searcher(storage=None, points=None, mode="min") -> StudySearcher:
    sampler = optuna.samplers.TPESampler(seed=0, constant_liar=True, n_startup_trials=1)  # TPE at once
    return StudySearcher(space, metric="loss", mode=mode, sampler=sampler, storage=storage, study_name="s",
                         points_to_evaluate=points, max_steps=MAX_STEPS)


def journal(path) -> JournalStorage:
    return JournalStorage(JournalFileBackend(str(path)))


def play(search: StudySearcher, trial_ids: str) -> list[dict]:
    """Each trial proposed, then finished at the full budget with a loss that grows with x."""
    configs = []
    for trial_id in trial_ids:
        configs.append(search.suggest(trial_id))
        search.on_trial_complete(trial_id, {"loss": configs[-1]["x"], "step": MAX_STEPS})
    return configs


def test_a_proposal_is_the_spaces_config_with_the_sampled_values():
    config = searcher().suggest("a")
    assert set(config) == {"x", "double"} and config["double"] == 2 * config["x"]


def test_the_study_is_told_complete_at_the_full_budget_pruned_below_it_and_failed_without_a_finite_value():
    search = searcher()
    ends = {"full": ({"loss": 0.5, "step": MAX_STEPS}, False), "stopped": ({"loss": 0.6, "step": 2}, False),
            "error": ({"loss": 0.5, "step": MAX_STEPS}, True), "nan": ({"loss": math.nan, "step": MAX_STEPS}, False),
            "missing": ({"step": MAX_STEPS}, False), "none": (None, False)}
    for trial_id, (result, error) in ends.items():
        search.suggest(trial_id)
        search.on_trial_complete(trial_id, result, error=error)
    assert [t.state.name for t in search.study.trials] == ["COMPLETE", "PRUNED", "FAIL", "FAIL", "FAIL", "FAIL"]
    assert search.study.trials[0].value == 0.5


def test_a_trial_is_told_once_however_often_tune_ends_it():
    search = searcher()
    search.suggest("a")
    search.on_trial_complete("a", {"loss": 0.5, "step": MAX_STEPS})
    search.on_trial_complete("a", {"loss": 0.1, "step": MAX_STEPS}, error=True)
    (trial,) = search.study.trials
    assert trial.state.name == "COMPLETE" and trial.value == 0.5


def test_each_finite_report_is_an_intermediate_value_at_its_step_and_the_first_at_a_step_stays():
    search = searcher()
    search.suggest("a")
    for step, loss in ((1, 0.9), (2, math.nan), (3, 0.7), (3, 0.1)):
        search.on_trial_result("a", {"loss": loss, "step": step})
    search.on_trial_result("a", {"step": 4})  # a report without the metric
    assert search.study.trials[0].intermediate_values == {1: 0.9, 3: 0.7}


def test_a_pruned_trial_keeps_its_last_report_for_tpe():
    search = searcher()
    search.suggest("a")
    search.on_trial_result("a", {"loss": 0.6, "step": 2})
    search.on_trial_complete("a", {"loss": 0.6, "step": 2})
    (trial,) = search.study.trials
    assert trial.state.name == "PRUNED" and trial.intermediate_values == {2: 0.6}


def test_mode_max_maximizes_and_another_mode_is_refused_naming_the_allowed():
    assert searcher(mode="max").study.direction == optuna.study.StudyDirection.MAXIMIZE
    with pytest.raises(ValueError, match="mode is 'best'; allowed: min, max"):
        searcher(mode="best")


def test_the_points_to_evaluate_come_first_in_order_then_the_sampler(tmp_path):
    points = [{"x": 0.25}, {"x": 0.75}]
    search = searcher(journal(tmp_path / "s.log"), points=points)
    assert [c["x"] for c in play(search, "abc")][:2] == [0.25, 0.75]
    again = searcher(journal(tmp_path / "s.log"), points=points)  # the run built again: the study is known
    assert again.suggest("d")["x"] not in (0.25, 0.75)
    assert len(again.study.trials) == 4


@pytest.mark.parametrize("kind", ["memory", "journal"])
def test_a_restored_copy_proposes_what_the_saved_one_goes_on_to_propose(kind, tmp_path):
    storage = journal(tmp_path / "s.log") if kind == "journal" else None
    search = searcher(storage, points=[{"x": 0.25}])
    at_start = pickle.dumps(search)  # as the Tuner pickles it
    search.suggest("a")
    search.on_trial_result("a", {"loss": 0.3, "step": 2})  # still running when Tune saved
    play(search, "bc")
    search.save(str(tmp_path / "saved.pkl"))
    if kind == "journal":  # the study as it was at the save, apart from the one the first copy goes on with
        shutil.copy(tmp_path / "s.log", tmp_path / "copy.log")
        resumed = searcher(journal(tmp_path / "copy.log"), points=[{"x": 0.25}])
    else:
        resumed = pickle.loads(at_start)
    resumed.restore(str(tmp_path / "saved.pkl"))

    for copy in (search, resumed):
        copy.on_trial_complete("a", {"loss": 0.2, "step": MAX_STEPS})
    assert play(resumed, "def") == play(search, "def")
    assert [(t.state.name, t.params, t.intermediate_values) for t in resumed.study.trials] == [
        (t.state.name, t.params, t.intermediate_values) for t in search.study.trials]


def test_a_queued_point_asked_after_tunes_copy_fails_and_is_queued_again(tmp_path):
    points = [{"x": 0.25}, {"x": 0.75}]
    search = searcher(journal(tmp_path / "s.log"), points=points)
    at_start = pickle.dumps(search)
    play(search, "a")
    search.save(str(tmp_path / "saved.pkl"))
    assert search.suggest("b")["x"] == 0.75  # the second prior, then the driver was killed before Tune saved again

    resumed = pickle.loads(at_start)
    resumed.restore(str(tmp_path / "saved.pkl"))
    assert resumed.suggest("b2")["x"] == 0.75
    assert [t.state.name for t in resumed.study.trials] == ["COMPLETE", "FAIL", "RUNNING"]


def test_a_trial_tune_still_holds_is_not_failed_on_restore(tmp_path):
    search = searcher(journal(tmp_path / "s.log"))
    at_start = pickle.dumps(search)
    search.suggest("a")  # running when Tune saved: Tune resumes it
    search.save(str(tmp_path / "saved.pkl"))
    resumed = pickle.loads(at_start)
    resumed.restore(str(tmp_path / "saved.pkl"))
    resumed.suggest("b")
    assert [t.state.name for t in resumed.study.trials] == ["RUNNING", "RUNNING"]


def test_a_rerun_adds_a_trial_of_its_own_once_complete_at_the_full_budget_else_pruned():
    search = searcher()
    for trial_id in "ab":
        search.suggest(trial_id)
        search.on_trial_complete(trial_id, None, error=True)  # out of memory beside others
    search.tell_rerun("a", "ra", {"loss": 0.4, "step": MAX_STEPS}, error=False)
    search.tell_rerun("a", "ra", {"loss": 0.4, "step": MAX_STEPS}, error=False)  # a resumed run tells it again
    search.tell_rerun("b", "rb", {"loss": 0.5, "step": 2}, error=False)
    search.tell_rerun("b", "rb2", {"loss": 0.5, "step": MAX_STEPS}, error=True)  # failed: nothing to learn
    first, second, *added = search.study.trials
    assert [(t.state.name, t.value, t.params, t.user_attrs) for t in added] == [
        ("COMPLETE", 0.4, first.params, {"rerun": "ra", "rerun_of": "a"}),
        ("PRUNED", None, second.params, {"rerun": "rb", "rerun_of": "b"})]
    assert added[1].intermediate_values == {2: 0.5}
