"""The stages after the search run in the search's own Tuner: the staged searcher's order
(search, promotions, confirmations), its state across Tune's save and restore, and ASHA
leaving stage trials alone. Real Optuna, real Tune wrappers; the trials' reports are
written by hand (the end-to-end run is in test_search_run.py)."""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from ray.tune.experiment import Trial
from ray.tune.search import Searcher
from ray.tune.search.search_generator import SearchGenerator

from rundir.location import RunLocation
from rundir.params import TrialParams
from search.config import load
from search.inputs import modules
from search.tuning.searcher import StudySearcher
from search.tuning.space import LoraSpace, module_set_key
from search.tuning.stages import StagedSearch
from search.tuning.tuner import ResumableASHA

optuna.logging.set_verbosity(optuna.logging.WARNING)
MAX_STEPS = 4


@pytest.fixture(scope="module")
def run_config(tiny_model_dir):
    config = load(None, ["search.module_sets=[attention_qv,all_linear]", "search.ranks=[2,4,8]",
                         f"budget.max_steps={MAX_STEPS}", "budget.eval_every=2", "budget.grace_period=2", "budget.num_samples=4",
                         "selection.confirm_top_k=2", "selection.confirm_seeds=1", "seed=3"])
    model = modules.meta_model(modules.load_model_config(str(tiny_model_dir)))
    resolved = {module_set_key(s): modules.resolve(model, s) for s in config.search.module_sets}
    return config, resolved


def staged(run_config, with_cheaper: bool = False, storage=None, max_concurrent: int = 0, **selection) -> StagedSearch:
    config, resolved = run_config
    config = replace(config, selection=replace(config.selection, **selection))
    space = LoraSpace(config.search, resolved, config.seed)
    inner = StudySearcher(space, metric="eval_loss", mode="min", storage=storage,
                          sampler=optuna.samplers.TPESampler(seed=config.seed), max_steps=MAX_STEPS)
    return StagedSearch(inner, config.budget.num_samples, config.selection, MAX_STEPS, config.seed,
                        RunLocation(Path("/runs/x")), cheaper=space.cheaper if with_cheaper else None,
                        max_concurrent=max_concurrent)


def report(search: Searcher, trial_id: str, step: int, loss: float, params: int, last: bool = False, stop: bool = False,
           se: float | None = None, rows: list[float] | None = None):
    result = {"step": step, "eval_loss": loss, "trainable_params": params, "train_seconds": step * 0.5,
              "checkpoint_dir_name": f"checkpoint_{step // 2 - 1:06d}", "trial_id": trial_id,
              **({"eval_loss_se": se} if se is not None else {}), **({"eval_row_loss": rows} if rows else {})}
    if stop or last:  # Tune passes a stopped trial's last result to on_trial_complete only
        if not stop:
            search.on_trial_result(trial_id, result)
        search.on_trial_complete(trial_id, result)
    else:
        search.on_trial_result(trial_id, result)


def test_stage_trials_are_handed_out_as_soon_as_they_qualify_and_the_final_leaders_are_all_confirmed(run_config):
    search = staged(run_config)
    configs = {t: search.suggest(t) for t in "abcd"}
    assert all(isinstance(c, dict) and c["origin"] in ("search", "prior") for c in configs.values())
    assert search.suggest("x") is None  # all four are out, none has ended: nothing qualifies yet

    report(search, "a", 2, 0.60, 9000)
    report(search, "a", 4, 0.50, 9000, last=True)
    report(search, "d", 2, 0.605, 500)  # d still runs: cheap and within tolerance, but not stopped
    first = search.suggest("e")  # a leads alone: its confirmation starts while b, c, d still run
    assert (first["origin"], first["parent"], first["seed"]) == ("confirm", "a", 4)
    assert first["lora_config"] == configs["a"]["lora_config"]
    assert search.suggest("x") is None  # and d is not promoted while it runs

    report(search, "b", 2, 0.62, 4000)
    report(search, "b", 4, 0.52, 4000, last=True)  # within 95% of a and cheaper: leads with a
    report(search, "c", 2, 0.61, 1000, stop=True)  # stopped within tolerance, cheaper than b: promoted
    promoted = search.suggest("f")
    assert (promoted["origin"], promoted["parent"]) == ("promoted", "c")
    assert promoted["start_from"] == "/runs/x/tune/trial_c/checkpoint_000000"  # c's last checkpoint
    assert promoted["lora_config"] == configs["c"]["lora_config"]
    search.on_trial_complete("d", None, error=True)  # an end between two hand-outs keeps what was queued
    second = search.suggest("g")
    assert (second["origin"], second["parent"]) == ("confirm", "b")
    assert search.suggest("x") is None

    report(search, "f", 4, 0.515, 1000, last=True)  # the promotion finishes: now p leads, then b
    third = search.suggest("h")
    assert (third["origin"], third["parent"]) == ("confirm", "f")
    assert search.suggest("x") is None  # the confirmations still run
    for trial_id, params in (("e", 9000), ("g", 4000), ("h", 1000)):
        report(search, trial_id, 4, 0.51, params, last=True)
    assert search.suggest("x") == Searcher.FINISHED  # everything ended, nothing more qualifies


def test_more_seeds_go_to_the_leaders_while_they_cannot_be_told_apart_each_seed_once(run_config):
    search = staged(run_config, confirm_top_k=1, confirm_seeds=1, confirm_max_seeds=3)
    {t: search.suggest(t) for t in "abcd"}
    # a best (0.50, bar 0.5263); b cheaper at 0.53, in the band by its interval (0.53 - 1.28 * 0.005) only
    report(search, "a", 4, 0.50, 9000, last=True, se=0.01)
    report(search, "b", 4, 0.53, 1000, last=True, se=0.005)
    search.on_trial_complete("c", None, error=True)
    search.on_trial_complete("d", None, error=True)
    handed = [search.suggest(t) for t in "ef"]  # a as the leader, b as the one the pick cannot be told apart from
    assert [(c["origin"], c["parent"], c["seed"]) for c in handed] == [("confirm", "a", 4), ("confirm", "b", 4)]
    assert search.suggest("x") is None

    report(search, "e", 4, 0.50, 9000, last=True, se=0.01)  # a's seeds agree: no seeds' part left, no more for a
    report(search, "f", 4, 0.55, 1000, last=True, se=0.005)  # b's disagree: mean 0.54, still undecided
    third = search.suggest("g")
    assert (third["origin"], third["parent"], third["seed"]) == ("confirm", "b", 5)  # the seed after b's first
    assert search.suggest("x") is None

    report(search, "g", 4, 0.54, 1000, last=True, se=0.005)  # b at 0.54 +- 0.0076: told apart, a is the pick
    assert search.suggest("x") == Searcher.FINISHED


def fresh_neighbours(search: StagedSearch, configs: dict[str, dict]) -> dict[str, list[TrialParams]]:
    """Each trial's cheaper neighbours (the search's own `LoraSpace.cheaper`) that no trial of `configs` ran."""
    space = search._cheaper.__self__
    ran = {(c["module_set"], c["lora_config"]["r"], c["learning_rate"]) for c in configs.values()}
    return {trial_id: [n for n in space.cheaper(TrialParams.from_config(config))
                       if (n.module_set, n.lora_config["r"], n.learning_rate) not in ran]
            for trial_id, config in configs.items()}


def test_the_picks_cheaper_neighbours_come_once_all_else_has_ended_each_once_and_no_more_than_allowed(run_config):
    search = staged(run_config, with_cheaper=True, promote=False, confirm_top_k=0, cheaper=2)
    configs = {t: search.suggest(t) for t in "abcd"}
    # the best and the pick: the trial with the most cheaper neighbours that no other trial ran
    fresh = fresh_neighbours(search, configs)
    best = max(fresh, key=lambda t: len(fresh[t]))
    assert len(fresh[best]) >= 2, "the fixture's space gives this trial two cheaper neighbours"
    for trial_id in configs:
        report(search, trial_id, 4, 0.50 if trial_id == best else 0.90, 9000, last=trial_id != "d")
    assert search.suggest("x") is None  # d still runs: the pick may still move
    report(search, "d", 4, 0.90, 9000, last=True)
    handed = [search.suggest(t) for t in "ef"]
    expected = fresh[best][:2]
    assert [(c["origin"], c["parent"], c["seed"]) for c in handed] == [("cheaper", best, 3)] * 2
    assert [(c["module_set"], c["lora_config"]) for c in handed] == [(n.module_set, n.lora_config) for n in expected]
    assert all(c["learning_rate"] == configs[best]["learning_rate"] for c in handed)
    assert search.suggest("x") is None  # both run; the budget of two is spent
    report(search, "e", 4, 0.51, 3000, last=True)  # within tolerance and cheaper: the new pick
    report(search, "f", 4, 0.60, 2000, last=True)
    assert search.suggest("x") == Searcher.FINISHED  # the new pick's neighbours are past selection.cheaper


def test_the_cheaper_neighbour_runs_beside_the_picks_confirmation_once_the_searchs_trials_have_ended(run_config):
    search = staged(run_config, with_cheaper=True, promote=False, confirm_top_k=1, confirm_seeds=1, cheaper=1)
    configs = {t: search.suggest(t) for t in "abcd"}
    fresh = fresh_neighbours(search, configs)
    best = max(fresh, key=lambda t: len(fresh[t]))
    others = [t for t in configs if t != best]
    report(search, best, 4, 0.50, 9000, last=True)
    confirm = search.suggest("e")  # the leader's confirmation starts at once; the search's trials still run
    assert (confirm["origin"], confirm["parent"]) == ("confirm", best)
    assert search.suggest("x") is None
    for trial_id in others:
        report(search, trial_id, 4, 0.90, 9000, last=True)
    neighbour = search.suggest("f")  # the search's trials have ended: the neighbour, while the confirmation runs
    assert (neighbour["origin"], neighbour["parent"]) == ("cheaper", best)
    assert search.suggest("x") is None


def test_where_the_neighbour_and_the_picks_confirmation_qualify_together_the_neighbour_goes_first(run_config):
    """Its own confirmation, if it becomes the pick, can only follow it: started first, the chain of
    the two ends sooner, and the pick's confirmation runs beside it."""
    search = staged(run_config, with_cheaper=True, promote=False, confirm_top_k=1, confirm_seeds=1, cheaper=1)
    configs = {t: search.suggest(t) for t in "abcd"}
    fresh = fresh_neighbours(search, configs)
    best = max(fresh, key=lambda t: len(fresh[t]))
    for trial_id in [t for t in configs if t != best]:
        report(search, trial_id, 4, 0.90, 9000, last=True)
    report(search, best, 4, 0.50, 9000, last=True)  # the last search trial to end is the leader
    handed = [search.suggest("e"), search.suggest("f")]
    assert [(c["origin"], c["parent"]) for c in handed] == [("cheaper", best), ("confirm", best)]
    assert search.suggest("x") is None


def test_a_slot_left_idle_beside_the_cheaper_neighbour_runs_its_confirmation_which_is_not_run_again(run_config):
    """Should the neighbour become the pick, its confirmation would follow it, a trial's time
    after all else ended: with a slot to spare it runs beside the neighbour instead, and when the
    neighbour becomes the pick it is not handed out again. Without a spare slot, nothing extra."""
    search = staged(run_config, with_cheaper=True, promote=False, confirm_top_k=1, confirm_seeds=1, cheaper=1,
                    max_concurrent=4)
    configs = {t: search.suggest(t) for t in "abcd"}
    fresh = fresh_neighbours(search, configs)
    best = max(fresh, key=lambda t: len(fresh[t]))
    for trial_id in [t for t in configs if t != best]:
        report(search, trial_id, 4, 0.90, 9000, last=True)
    report(search, best, 4, 0.50, 9000, last=True)
    handed = {t: search.suggest(t) for t in "efg"}
    assert [(c["origin"], c["parent"], c["seed"]) for c in handed.values()] == [
        ("cheaper", best, 3), ("confirm", best, 4), ("confirm", "e", 4)]
    assert search.suggest("x") is None  # the neighbour's only confirmation is out
    report(search, "e", 4, 0.51, 3000, last=True)  # within tolerance and cheaper: the new pick
    assert search.suggest("x") is None  # its confirmation already runs: nothing more to hand out
    report(search, "f", 4, 0.50, 9000, last=True)
    report(search, "g", 4, 0.51, 3000, last=True)
    assert search.suggest("x") == Searcher.FINISHED

    full = staged(run_config, with_cheaper=True, promote=False, confirm_top_k=1, confirm_seeds=1, cheaper=1,
                  max_concurrent=2)
    configs = {t: full.suggest(t) for t in "ab"}
    report(full, "a", 4, 0.90, 9000, last=True)
    report(full, "b", 4, 0.50, 9000, last=True)
    configs |= {t: full.suggest(t) for t in "cd"}
    for trial_id in "cd":
        report(full, trial_id, 4, 0.90, 9000, last=True)
    handed = [full.suggest(t) for t in "efg"]
    assert [c["origin"] for c in handed[:2]] == ["cheaper", "confirm"] and handed[2] is None  # two slots, both taken


def test_the_stages_compare_a_trial_with_the_best_row_by_row_where_both_reported_rows(run_config):
    search = staged(run_config, confirm_top_k=1, confirm_seeds=1, confirm_max_seeds=3)
    {t: search.suggest(t) for t in "abcd"}
    best_rows = [0.30, 0.70, 0.45, 0.55]  # mean 0.50: the bar is 0.50 / 0.95 = 0.5263
    # b is 0.0037 past the bar on every row: by its own standard error (0.005) it could be within the
    # band, as in the test above, where it got seeds; row by row it is plainly not
    b_rows = [value / 0.95 + 0.0037 for value in best_rows]
    report(search, "a", 2, 0.60, 9000, rows=[0.9, 0.9, 0.9, 0.9])  # an earlier round's rows are not the last's
    report(search, "a", 4, 0.50, 9000, last=True, se=0.01, rows=best_rows)
    report(search, "b", 4, sum(b_rows) / 4, 1000, last=True, se=0.005, rows=b_rows)
    search.on_trial_complete("c", None, error=True)
    search.on_trial_complete("d", None, error=True)
    handed = search.suggest("e")
    assert (handed["origin"], handed["parent"]) == ("confirm", "a")  # only the leader's confirmation
    assert search.suggest("x") is None
    first, latest = search._rows["a"]
    assert "eval_row_loss" not in first and latest["eval_row_loss"] == best_rows  # the saved state keeps the latest's only


def play_search(search: Searcher) -> dict[str, dict]:
    """Four search trials: a and b finish (a best, b within 95% of it and cheaper), c is stopped
    at step 2 within tolerance and cheaper than both (a promotion), d fails."""
    configs = {t: search.suggest(t) for t in "abcd"}
    report(search, "a", 2, 0.60, 9000)
    report(search, "a", 4, 0.50, 9000, last=True)
    report(search, "b", 2, 0.62, 4000)
    report(search, "b", 4, 0.52, 4000, last=True)
    report(search, "c", 2, 0.61, 1000, stop=True)
    search.on_trial_complete("d", None, error=True)
    return configs


def test_optuna_sees_only_the_searchs_trials_and_pruned_stops(run_config):
    search = staged(run_config)
    play_search(search)
    study = search.searcher.study
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE", "FAIL", "PRUNED"]
    stage_trial = search.suggest("p")
    assert stage_trial["origin"] in ("promoted", "confirm")
    report(search, "p", 4, 0.515, 1000, last=True)
    assert len(study.trials) == 4  # a stage's trial is not an Optuna trial


def test_tune_saves_and_restores_the_stage_and_the_inner_searcher(run_config, tmp_path):
    search = SearchGenerator(staged(run_config))
    inner = search.searcher
    configs = play_search(inner)
    search.save_to_dir(str(tmp_path), session_str="s")

    restored = SearchGenerator(staged(run_config))
    restored.restore_from_dir(str(tmp_path))
    again = restored.searcher
    assert len(again.searcher.study.trials) == 4  # Optuna's study came back too
    handed = [again.suggest(t) for t in ("p", "q", "r")]
    assert [(c["origin"], c["parent"]) for c in handed] == [("promoted", "c"), ("confirm", "b"), ("confirm", "a")]
    assert handed[0]["lora_config"] == configs["c"]["lora_config"]
    assert [inner.suggest(t) for t in ("p", "q", "r")] == handed  # the same as the run that was not interrupted


def journal(path: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def saved_copy(search: StagedSearch, run_config, tmp_path: Path, name: str) -> StagedSearch:
    """What a resumed driver holds: the Tuner's fresh copy (the study in the same journal),
    restored from the searcher state that Tune saved now."""
    directory = tmp_path / name
    directory.mkdir()
    SearchGenerator(search).save_to_dir(str(directory), session_str="s")
    restored = SearchGenerator(staged(run_config, storage=journal(tmp_path / "study.log")))
    restored.restore_from_dir(str(directory))
    return restored.searcher


def finish_everything(search: StagedSearch, first: dict[str, dict]) -> dict[str, dict]:
    """Every trial in `first` and every later one the search hands out finished at the full budget;
    all the trials it handed out, once it says FINISHED (within a bound: a search that waits for a
    trial that never runs answers None for good)."""
    handed, waiting, number = dict(first), list(first), 0
    for _ in range(40):
        for trial_id in waiting:
            loss = 0.5 + 0.01 * sorted(handed).index(trial_id)
            report(search, trial_id, MAX_STEPS, loss, 1000 * (1 + len(trial_id)), last=True)
        waiting = []
        while isinstance(proposal := search.suggest(f"n{number}"), dict):
            handed[f"n{number}"], waiting = proposal, [*waiting, f"n{number}"]
            number += 1
        if proposal == Searcher.FINISHED:
            return handed
    raise AssertionError(f"the search never finished: it handed out {sorted(handed)}")


def test_a_trial_tune_restored_from_after_the_searchers_saved_copy_is_taken_up_and_told(run_config, tmp_path):
    search = staged(run_config, storage=journal(tmp_path / "study.log"))
    tune_holds = {t: search.suggest(t) for t in "ab"}
    report(search, "a", MAX_STEPS, 0.5, 9000, last=True)
    restored = saved_copy(search, run_config, tmp_path, "before_c")
    tune_holds["c"] = search.suggest("c")  # Tune saved its trials with c, then the kill came before the searcher's copy

    restored.align(tune_holds)
    report(restored, "c", 2, 0.6, 1000)  # c goes on from its checkpoint: its reports reach its Optuna trial
    report(restored, "c", MAX_STEPS, 0.55, 1000, last=True)
    study = restored.searcher.study
    assert (study.trials[2].params, study.trials[2].state.name) == (search.searcher.study.trials[2].params, "COMPLETE")
    assert study.trials[2].intermediate_values == {2: 0.6, MAX_STEPS: 0.55}
    handed = finish_everything(restored, {"b": tune_holds["b"]})
    proposed = [trial_id for trial_id, config in {**tune_holds, **handed}.items() if config["origin"] in ("search", "prior")]
    assert len(proposed) == 4 and len(study.trials) == 4  # num_samples: c counts, and nothing is proposed twice


def test_a_trial_the_searchers_copy_holds_and_tune_lost_is_proposed_again_and_the_search_finishes(run_config, tmp_path):
    search = staged(run_config, storage=journal(tmp_path / "study.log"))
    tune_holds = {t: search.suggest(t) for t in "ab"}
    report(search, "a", MAX_STEPS, 0.5, 9000, last=True)
    search.suggest("c")  # the searcher's copy was saved with c; Tune's trials, saved before, lack it
    restored = saved_copy(search, run_config, tmp_path, "with_c")

    restored.align(tune_holds)
    handed = finish_everything(restored, {"b": tune_holds["b"]})
    proposed = [trial_id for trial_id, config in {**tune_holds, **handed}.items() if config["origin"] in ("search", "prior")]
    assert len(proposed) == 4  # c's place was proposed again
    states = [trial.state.name for trial in restored.searcher.study.trials]
    assert states.count("FAIL") == 1 and states[2] == "FAIL" and len(states) == 5  # c ended as lost


def test_a_promotion_tune_holds_is_not_handed_out_twice_and_one_it_lost_is_handed_out_again(run_config, tmp_path):
    search = staged(run_config, storage=journal(tmp_path / "study.log"))
    configs = play_search(search)
    before = saved_copy(search, run_config, tmp_path, "before_p")
    promoted = search.suggest("p")
    assert (promoted["origin"], promoted["parent"]) == ("promoted", "c")
    after = saved_copy(search, run_config, tmp_path, "with_p")

    before.align({**configs, "p": promoted})  # Tune holds the promotion the copy had not handed out
    assert [before.suggest(t)["origin"] for t in "qr"] == ["confirm", "confirm"]
    after.align(configs)  # Tune lost the promotion the copy had handed out
    assert after.suggest("p2") == promoted


def test_a_restored_search_drops_the_directories_of_trials_tune_does_not_hold_and_aligns_the_searcher(run_config, tmp_path):
    from search.tuning.tuner import TellLostTrials

    search = staged(run_config, storage=journal(tmp_path / "study.log"))
    configs = {t: search.suggest(t) for t in "abc"}  # the searcher's copy holds c; Tune's trials do not
    for trial_id in ("a", "b", "c", "x"):  # x: a trial neither knew of, whose worker wrote files before the kill
        (tmp_path / "tune" / f"trial_{trial_id}").mkdir(parents=True)
        (tmp_path / "tune" / f"trial_{trial_id}" / "result.json").write_text("{}\n")
    (tmp_path / "tune" / "experiment_state-x.json").write_text("{}")
    restored = TellLostTrials(search, RunLocation(tmp_path))
    tune_holds = [Trial("t", config=configs[t], trial_id=t, stub=True) for t in "ab"]

    restored.on_step_begin(0, tune_holds)
    assert sorted(p.name for p in (tmp_path / "tune").iterdir()) == ["experiment_state-x.json", "trial_a", "trial_b"]
    # c's place goes to the searcher again: two more proposals make budget.num_samples (4)
    assert [search.suggest(t)["origin"] for t in "de"] == ["search", "search"]
    (tmp_path / "tune" / "trial_d").mkdir()
    restored.on_step_begin(1, tune_holds)  # once per process: later trials' directories stay
    assert (tmp_path / "tune" / "trial_d").is_dir()


def test_at_most_max_concurrent_trials_are_out_and_a_resume_may_change_how_many(run_config, tmp_path):
    search = staged(run_config, storage=journal(tmp_path / "study.log"), max_concurrent=2)
    assert isinstance(search.suggest("a"), dict) and isinstance(search.suggest("b"), dict)
    assert search.suggest("c") is None
    search.on_trial_complete("a", None, error=True)
    assert isinstance(search.suggest("c"), dict)
    restored = saved_copy(search, run_config, tmp_path, "saved")  # built with no limit: the resume's own setting
    assert isinstance(restored.suggest("d"), dict)


def test_the_search_s_tuner_has_tune_keep_a_trial_pending_for_each_slot(run_config, tmp_path, monkeypatch):
    import os

    from search import environment
    from search.tuning.tuner import build_tuner

    config, resolved = run_config
    config = replace(config, resources=replace(config.resources, max_concurrent_trials=3))
    monkeypatch.delenv("TUNE_MAX_PENDING_TRIALS_PG", raising=False)
    try:
        build_tuner(config, lambda _: None, LoraSpace(config.search, resolved, config.seed), [], RunLocation(tmp_path))
        assert os.environ["TUNE_MAX_PENDING_TRIALS_PG"] == "3"
    finally:
        environment.restore()


def test_asha_neither_stops_nor_records_stage_trials(tmp_path):
    asha = ResumableASHA(state_path=str(tmp_path / "rungs.json"), time_attr="step", metric="eval_loss", mode="min",
                         max_t=8, grace_period=2, reduction_factor=2)
    controller = SimpleNamespace(get_live_trials=lambda: [])

    def trial(trial_id, origin):
        t = Trial("t", config={"origin": origin}, trial_id=trial_id, stub=True)
        asha.on_trial_add(controller, t)
        return t

    good, confirm, bad = trial("good", "search"), trial("conf", "confirm"), trial("bad", "search")
    assert asha.on_trial_result(controller, good, {"step": 2, "eval_loss": 0.1}) == asha.CONTINUE
    # a confirmation far worse than the rung's best still continues, and is not recorded there
    assert asha.on_trial_result(controller, confirm, {"step": 2, "eval_loss": 9.0}) == asha.CONTINUE
    # not recorded: a search trial at 3.0, which 9.0 in the rung would let through (the cutoff would be the
    # median of 0.1 and 9.0), is stopped
    assert asha.on_trial_result(controller, trial("mid", "search"), {"step": 2, "eval_loss": 3.0}) == asha.STOP
    asha.on_trial_complete(controller, confirm, {"step": 8, "eval_loss": 9.0})
    # a search trial as bad is stopped: the rule still holds for the search
    assert asha.on_trial_result(controller, bad, {"step": 2, "eval_loss": 9.0}) == asha.STOP


def test_asha_rungs_survive_tunes_restore_of_the_copy_it_pickled_at_the_start(tmp_path):
    asha = ResumableASHA(state_path=str(tmp_path / "asha_state.pkl"), time_attr="step", max_t=8, grace_period=2,
                         reduction_factor=2)
    at_start = pickle.dumps(asha)  # as the Tuner pickles it, before Tune sets the metric
    controller = SimpleNamespace(get_live_trials=lambda: [])

    def result(scheduler, trial_id: str, loss: float) -> str:
        assert scheduler.set_search_properties("eval_loss", "min")  # Tune sets them on every fit, a restored one too
        trial = Trial("t", config={"origin": "search"}, trial_id=trial_id, stub=True)
        scheduler.on_trial_add(controller, trial)
        return scheduler.on_trial_result(controller, trial, {"step": 2, "eval_loss": loss})

    assert result(asha, "good", 0.1) == asha.CONTINUE
    assert result(pickle.loads(at_start), "bad", 9.0) == asha.STOP  # the good trial's value is in the rung
    (tmp_path / "asha_state.pkl").unlink()
    assert result(pickle.loads(at_start), "bad", 9.0) == asha.CONTINUE  # what the copy alone would decide


def test_a_grid_hands_out_every_point_then_each_again_with_the_next_seeds_and_no_stage_of_its_own(run_config, tmp_path):
    from ray.tune.schedulers import FIFOScheduler

    from search.tuning.space import grid_points
    from search.tuning.tuner import search_parts

    config, resolved = run_config
    config = load(None, ["search.algorithm=grid", "search.module_sets=[attention_qv,all_linear]", "search.ranks=[2,4]",
                         "search.alpha_ratios=[1.0]", "search.use_rslora=[false]", "search.grid.learning_rates=[1e-3]",
                         "budget.landscape_seeds=3", f"budget.max_steps={MAX_STEPS}", "budget.eval_every=2",
                         "budget.grace_period=2", "seed=3"])
    parts = search_parts(config, LoraSpace(config.search, resolved, config.seed), [], RunLocation(tmp_path),
                         str(tmp_path / "asha_state.pkl"))
    assert isinstance(parts.scheduler, FIFOScheduler)  # no ASHA: every run reaches the full budget
    handed = {f"t{i}": parts.staged.suggest(f"t{i}") for i in range(12)}
    points = grid_points(config.search)
    first = [handed[f"t{i}"] for i in range(4)]
    assert [(c["origin"], c["seed"]) for c in first] == [("search", 3)] * 4
    assert sorted((c["module_set"], c["lora_config"]["r"]) for c in first) == sorted((p["module_set"], p["r"]) for p in points)
    again = [handed[f"t{i}"] for i in range(4, 12)]
    assert sorted((c["parent"], c["seed"]) for c in again) == sorted((f"t{i}", s) for i in range(4) for s in (4, 5))
    assert all(c["origin"] == "confirm" for c in again)
    assert parts.staged.suggest("x") is None  # all twelve run: nothing more until they end
    for i, config_ in handed.items():  # the best a stage would confirm or promote gets nothing more
        report(parts.staged, i, MAX_STEPS, 0.5 if config_["lora_config"]["r"] == 2 else 0.9, 100, last=True)
    assert parts.staged.suggest("y") == Searcher.FINISHED
