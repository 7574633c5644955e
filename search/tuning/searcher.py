"""Optuna behind Tune's searcher interface, through Optuna's ask-and-tell API: Tune asks for a
configuration, Optuna's study proposes it, and the study learns how the trial ended.

Tune's own `OptunaSearch` records a trial that ASHA stopped early as COMPLETE at its early
value and leaves a NaN trial RUNNING; `StudySearcher` tells Optuna how each trial really ended.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable

import optuna
from optuna.storages import BaseStorage, InMemoryStorage
from optuna.trial import FrozenTrial, TrialState
from ray.tune.search import Searcher

DIRECTIONS = {"min": "minimize", "max": "maximize"}
QUEUED_POINT = "queued_point"  # the user attribute that holds the point a queued trial was asked with
RERUN, RERUN_OF = "rerun", "rerun_of"  # the user attributes of a trial added for a rerun (`tell_rerun`)
TUNE_TRIAL = "tune_trial"  # the user attribute that names the Tune trial an Optuna trial was asked for


class StudySearcher(Searcher):
    """Tune's searcher over one Optuna study named `study_name` in `storage` (None: in memory).

    `space` is Optuna's define-by-run function: called with the asked trial, it returns the
    trial's config; Tune gets that config with the values Optuna sampled merged in. The
    `points_to_evaluate` are queued as the first trials when the study is created, and not
    again when `storage` holds the study already (a run built again after a kill).

    Each trial's reports reach the study as intermediate values at their `step`. How a trial
    ended is told once: FAIL for an error, a missing or a non-finite value; PRUNED when it
    stopped below `max_steps` (TPE then ranks it by its last intermediate value); else
    COMPLETE with its value. Every Optuna trial ends with exactly one final state.

    With a `storage` that outlives the process (the run's journal), the study can be ahead of
    the copy of this searcher that Tune saved, at most a second before a kill. A resumed search
    tells no trial twice (a trial told after that copy stays as the study has it), and ends a
    trial asked after that copy, which Tune will never run, as FAIL (`_fail_lost_trials`).

    Tune saves its trials and this searcher in separate files, so a resumed copy may miss a trial
    Tune restored, or hold one Tune lost (`StagedSearch.align`): `adopt` finds the first in the
    study, where each asked trial names its Tune trial; `forget` lets `_fail_lost_trials` end the
    second.

    Tune's saved copy (`get_state`, `save`) is plain state: which Optuna trial each Tune trial
    is, which were told, and the sampler with its random state; the study itself is read back
    from `storage` by name, or travels with the state when it lives in memory only.
    """

    def __init__(self, space: Callable[[optuna.Trial], dict], *, metric: str, mode: str,
                 sampler: optuna.samplers.BaseSampler, max_steps: int, storage: BaseStorage | None = None,
                 study_name: str = "search", points_to_evaluate: list[dict] | None = None):
        if mode not in DIRECTIONS:
            raise ValueError(f"mode is {mode!r}; allowed: {', '.join(DIRECTIONS)}")
        super().__init__(metric=metric, mode=mode)
        self._space, self._sampler, self._max_steps = space, sampler, max_steps
        self._storage = storage if storage is not None else InMemoryStorage()
        self._study_name = study_name
        self._numbers: dict[str, int] = {}  # Tune trial id -> Optuna trial number
        self._told: set[str] = set()  # Tune trials whose end the study knows
        known = study_name in optuna.get_all_study_names(self._storage)
        self._study: optuna.Study | None = optuna.create_study(
            storage=self._storage, sampler=sampler, pruner=optuna.pruners.NopPruner(), study_name=study_name,
            direction=DIRECTIONS[mode], load_if_exists=True)
        for point in [] if known else points_to_evaluate or []:
            self._study.enqueue_trial(point, user_attrs={QUEUED_POINT: point})

    @property
    def study(self) -> optuna.Study:
        """The study, read from its storage by name with this searcher's sampler."""
        if self._study is None:
            self._study = optuna.load_study(study_name=self._study_name, storage=self._storage, sampler=self._sampler,
                                            pruner=optuna.pruners.NopPruner())
        return self._study

    def suggest(self, trial_id: str) -> dict:
        self._fail_lost_trials()
        trial = self.study.ask()
        trial.set_user_attr(TUNE_TRIAL, trial_id)
        self._numbers[trial_id] = trial.number
        config = self._space(trial)
        return {**trial.params, **config}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        value = self._value(result)
        if value is None:
            return
        reported = self._frozen(trial_id)
        # a step reported already keeps its first value, as Optuna's `Trial.report` does
        if not reported.state.is_finished() and result["step"] not in reported.intermediate_values:
            # through the storage: a trial asked before a restore has no live `optuna.Trial` to report to
            storage = self._storage
            study_id = storage.get_study_id_from_name(self._study_name)
            storage.set_trial_intermediate_value(
                storage.get_trial_id_from_study_id_trial_number(study_id, reported.number), result["step"], value)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._told:
            return
        # a trial the study ended already was told before a kill that came after Tune's last copy of this searcher
        if not self._frozen(trial_id).state.is_finished():
            number, value = self._numbers[trial_id], self._value(result)
            if error or value is None:
                self.study.tell(number, state=TrialState.FAIL)
            elif result["step"] < self._max_steps:
                self.study.tell(number, state=TrialState.PRUNED)
            else:
                self.study.tell(number, value, state=TrialState.COMPLETE)
        self._told.add(trial_id)

    def tell_rerun(self, trial_id: str, rerun_id: str, result: dict | None, error: bool) -> None:
        """Add to the study what `rerun_id`, the rerun of this searcher's `trial_id` (which ran out of
        GPU memory beside others, or which Tune lost before it started), reached: a trial of its own
        with `trial_id`'s parameters, complete at the full budget, else pruned at its last step.
        `trial_id` itself ended FAIL, and Optuna never tells an ended trial again; without this TPE
        would learn nothing of the configuration. A rerun that failed adds nothing (TPE leaves failed
        trials out). Once per rerun: a resumed run finds the trial it added by its `rerun` user attribute."""
        value = self._value(result)
        if error or value is None or trial_id not in self._numbers:
            return
        if any(trial.user_attrs.get(RERUN) == rerun_id for trial in self.study.get_trials(deepcopy=False)):
            return
        original = self._frozen(trial_id)
        full = result["step"] >= self._max_steps
        self.study.add_trial(optuna.trial.create_trial(
            params=original.params, distributions=original.distributions,
            state=TrialState.COMPLETE if full else TrialState.PRUNED, value=value if full else None,
            intermediate_values={int(result["step"]): value}, user_attrs={RERUN: rerun_id, RERUN_OF: trial_id}))

    def adopt(self, trial_id: str) -> None:
        """Take up Tune's trial `trial_id`, asked after the copy of this searcher that Tune restored."""
        asked = [t.number for t in self.study.get_trials(deepcopy=False) if t.user_attrs.get(TUNE_TRIAL) == trial_id]
        if not asked:
            raise KeyError(f"the study {self._study_name!r} holds no trial asked for Tune's trial {trial_id}")
        self._numbers[trial_id] = asked[-1]

    def forget(self, trial_id: str) -> None:
        """Drop Tune's trial `trial_id`, which Tune lost with the driver: its Optuna trial, if still
        running, ends as FAIL at the next `suggest` (`_fail_lost_trials`)."""
        self._numbers.pop(trial_id, None)
        self._told.discard(trial_id)

    def get_state(self) -> dict:
        state = {"numbers": dict(self._numbers), "told": set(self._told), "sampler": self._sampler}
        if isinstance(self._storage, InMemoryStorage):  # the study lives nowhere else
            state["storage"] = self._storage
        return state

    def set_state(self, state: dict) -> None:
        self._numbers, self._told, self._sampler = state["numbers"], state["told"], state["sampler"]
        if "storage" in state:
            self._storage = state["storage"]
        self._study = None  # read again from the storage, with the restored sampler

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))

    def __getstate__(self) -> dict:
        # Tune pickles the searcher with the Tuner; the study is read back from its storage
        return {**self.__dict__, "_study": None}

    def _fail_lost_trials(self) -> None:
        """End as FAIL each RUNNING trial of the study that no Tune trial holds: one asked after
        Tune's last copy of this searcher, lost with the process that asked it (Optuna fails a
        trial whose worker died the same way). TPE leaves failed trials out, so the sampler, in
        the state of Tune's copy, proposes what it proposed before the kill: the resumed search
        goes on as an uninterrupted one would. A queued point (a prior) is queued again."""
        held = set(self._numbers.values())
        for lost in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if lost.number not in held:
                self.study.tell(lost.number, state=TrialState.FAIL)
                if QUEUED_POINT in lost.user_attrs:
                    point = lost.user_attrs[QUEUED_POINT]
                    self.study.enqueue_trial(point, user_attrs={QUEUED_POINT: point})

    def _frozen(self, trial_id: str) -> FrozenTrial:
        """The study's record of Tune's trial `trial_id` (a trial's number is its index in the study)."""
        return self.study.get_trials(deepcopy=False)[self._numbers[trial_id]]

    def _value(self, result: dict | None) -> float | None:
        """The metric of `result`, or None when it is missing or not finite."""
        value = result[self.metric] if result and self.metric in result else None
        return value if value is not None and math.isfinite(value) else None
