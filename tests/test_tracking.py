"""The Optuna study kept in the run's journal, against a searcher restored as Tune restores it."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest


# The searcher against a study that outlives it: what a resume finds after a kill that came
# after Tune's last copy of the searcher (Tune saves it at most every second).

def _space(trial) -> dict:
    return {"x": trial.suggest_float("x", 0.0, 1.0)}


def _searcher(storage, points=None):
    import optuna

    from search.tuner import LoraOptunaSearch

    sampler = optuna.samplers.TPESampler(seed=0, constant_liar=True, n_startup_trials=1)  # as build_tuner's, TPE at once
    return LoraOptunaSearch(space=_space, metric="loss", mode="min", sampler=sampler, storage=storage,
                            study_name="s", points_to_evaluate=points, max_steps=4)


@pytest.fixture
def journal(tmp_path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(tmp_path / "optuna.log")))


def _resumed(at_start: bytes, saved: Path):
    """The searcher as Tune's restore makes it: the copy pickled when the Tuner was made, then its saved state."""
    searcher = pickle.loads(at_start)
    searcher.restore(str(saved))
    return searcher


def test_a_trial_asked_after_tunes_copy_fails_and_its_proposal_comes_again(journal, tmp_path):
    searcher = _searcher(journal)
    at_start = pickle.dumps(searcher)
    searcher.suggest("a")
    searcher.on_trial_complete("a", {"loss": 0.6, "step": 4})
    searcher.save(str(tmp_path / "saved.pkl"))
    lost = searcher.suggest("b")  # TPE's proposal, then the driver was killed before Tune saved again

    resumed = _resumed(at_start, tmp_path / "saved.pkl")
    assert resumed.suggest("b2") == lost  # what an uninterrupted search runs: TPE saw the same trials
    resumed.on_trial_complete("b2", {"loss": 0.5, "step": 4})
    assert [t.state.name for t in resumed._ot_study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]


def test_a_trial_the_study_ended_after_tunes_copy_is_not_told_again(journal, tmp_path):
    searcher = _searcher(journal)
    at_start = pickle.dumps(searcher)
    searcher.suggest("a")
    searcher.save(str(tmp_path / "saved.pkl"))
    searcher.on_trial_complete("a", {"loss": 0.5, "step": 4})  # told, then killed before Tune saved

    resumed = _resumed(at_start, tmp_path / "saved.pkl")  # Tune resumes "a" from its last checkpoint
    resumed.on_trial_result("a", {"loss": 0.4, "step": 4})
    resumed.on_trial_complete("a", {"loss": 0.4, "step": 4})
    (trial,) = resumed._ot_study.trials
    assert trial.state.name == "COMPLETE" and trial.value == 0.5


def test_a_second_start_on_the_runs_study_queues_the_first_point_once(journal):
    _searcher(journal, points=[{"x": 0.25}])
    again = _searcher(journal, points=[{"x": 0.25}])  # killed before Tune saved anything: built anew
    assert again.suggest("a") == {"x": 0.25}
    assert again.suggest("b") != {"x": 0.25}
    assert len(again._ot_study.trials) == 2


def test_a_first_point_asked_before_tune_saved_anything_is_queued_again(journal):
    _searcher(journal, points=[{"x": 0.25}]).suggest("a")  # the prior, then killed
    again = _searcher(journal, points=[{"x": 0.25}])
    assert again.suggest("a2") == {"x": 0.25}
    assert [t.state.name for t in again._ot_study.trials] == ["FAIL", "RUNNING"]
