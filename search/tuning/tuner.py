"""Where the seams meet: space, searcher, scheduler, stages, trainable and storage, wired in
`build_tuner`; the retrain of the pick in `retrain`. Everything else (restore, storage,
progress, retries) is Ray's own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from analysis.candidates import decide
from analysis.results import read_trial_files
from rundir.atomicfs import drop_trial_directories, has_experiment_state
from rundir.files import atomic_path
from rundir.layout import ASHA_STATE, OPTUNA_STUDY, RETRAIN_EXPERIMENT, SEARCH_EXPERIMENT, trial_directory
from rundir.location import RunLocation
from rundir.params import Origin, TrialParams
from search import environment
from search.config import SHARED, Config
from search.output.tracking import logger_callbacks
from search.output.trial_lines import progress_callbacks, status_reporter
from search.resources.memory import larger_share, ran_out_of_memory
from search.resources.trainers import ReleaseSlots
from search.tuning.checkpoints import DropSupersededCheckpoints
from search.tuning.searcher import StudySearcher
from search.tuning.space import GRID, RANDOM, grid_points
from search.tuning.stages import GivenConfigs, StagedSearch
from trainables.config import TrialSetup
from trainables.placement import in_own_process, train_lora_packed_or_alone
from trainables.trial import train_lora

CLIENT_CPUS = 0.01  # a shared trial's client waits on its trainer nearly all the time


class ResumableASHA(ASHAScheduler):
    """ASHA whose rungs survive `Tuner.restore`.

    Ray pickles the scheduler once, when the Tuner is created, and restores that empty
    copy: a resumed run would forget every value recorded at every rung and let weak
    trials through. Here ASHA's own `save` writes its state to `state_path` after every
    decision, and its `restore` reads it back when the scheduler is unpickled on restore.
    Stage trials (`_from_stage`) bypass it.
    """

    def __init__(self, *, state_path: str, **kwargs):
        super().__init__(**kwargs)
        self._state_path = state_path

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        # a restored copy has Tune's metric and mode already (a resume with another config is refused before)
        return super().set_search_properties(metric, mode, **spec) or metric == self.metric

    def on_trial_add(self, tune_controller, trial):
        if not _from_stage(trial):
            super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        if _from_stage(trial):
            return self.CONTINUE
        action = super().on_trial_result(tune_controller, trial, result)
        self._save_state()
        return action

    def on_trial_complete(self, tune_controller, trial, result):
        if _from_stage(trial):
            return
        super().on_trial_complete(tune_controller, trial, result)
        self._save_state()

    def on_trial_remove(self, tune_controller, trial):
        if not _from_stage(trial):
            super().on_trial_remove(tune_controller, trial)

    def _save_state(self) -> None:
        with atomic_path(self._state_path) as temporary:
            self.save(str(temporary))

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if os.path.exists(self._state_path):
            self.restore(self._state_path)  # same milestones: a resume with a different budget is refused before this


def _from_stage(trial) -> bool:
    """A promotion or confirmation trains to the full budget: ASHA neither stops it nor records it at its rungs."""
    return not Origin(trial.config["origin"]).proposed


def fit_or_restore(name: str, location: RunLocation, trainable, build) -> None:
    """Fit the experiment `name` of the run: restored from its own state when it exists
    (finished trials kept, unfinished ones continue from their last checkpoint, failed
    ones stay failed), else the Tuner that `build()` makes. Then the experiment is in the
    local copy of the run for the analysis, however the fit ended."""
    path, filesystem = location.experiment_storage(name), location.storage_filesystem()
    try:
        # A Tuner writes its own file when made, and Tune its first state only later: restored
        # before that state, Tune 2.60 starts the experiment anew with one sample in place of
        # the searcher's many (tests/test_resume.py), so a driver killed in between is built again
        if tune.Tuner.can_restore(path, storage_filesystem=filesystem) and has_experiment_state(filesystem, path):
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                       storage_filesystem=filesystem)
        else:
            tuner = build()
        tuner.fit()
    finally:
        location.pull((name,))


def trainable_for(setup: TrialSetup, cpus_per_trial: int, gpus_per_trial: float, trainers: list = ()):
    """The trial function with its resources. With `trainers` (shared packing: search/resources/trainers.py),
    a client of theirs, given their handles, that asks for a token CPU share only: it relays its
    trainer's reports, and the trainers' slots, through max_concurrent_trials, limit how many run;
    a trial that trains in its own process beside them (a DoRA trial: trainables.placement.in_own_process)
    asks for what a trial of resources.packing=processes does. Else the trial function with its
    setup (by object reference, once): a trial run again after running out of memory beside others
    takes the larger share its `TrialParams.gpu_share` names."""
    from ray.tune.execution.placement_groups import PlacementGroupFactory

    def alone(config: dict) -> PlacementGroupFactory:
        share = TrialParams.from_config(config).gpu_share or gpus_per_trial
        return PlacementGroupFactory([{"CPU": cpus_per_trial, "GPU": share}])

    if trainers:
        def resources(config: dict) -> PlacementGroupFactory:
            return alone(config) if in_own_process(config) else PlacementGroupFactory([{"CPU": CLIENT_CPUS}])

        return tune.with_resources(
            tune.with_parameters(train_lora_packed_or_alone, setup=setup, trainers=list(trainers)), resources)
    return tune.with_resources(tune.with_parameters(train_lora, setup=setup), alone)


class OutOfMemoryReruns(tune.Callback):
    """A trial that failed with CUDA's out-of-memory error while other trials shared its GPU is
    run again by `staged` with a larger share (search/resources/memory.py `larger_share`); one that had a GPU
    to itself stays failed. Tune tells a searcher only that a trial failed, not why; a callback
    sees the trial, whose `error.txt` Tune has written by then (Ray 2.60:
    TuneController._process_trial_failure)."""

    def __init__(self, staged: StagedSearch):
        self.staged = staged

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        share = larger_share(trial.placement_group_factory.required_resources.get("GPU", 0))
        if share and trial.error_file and ran_out_of_memory(Path(trial.error_file).read_text(errors="replace")):
            self.staged.run_again(trial.trial_id, share)


class TellLostTrials(tune.Callback):
    """Keeps the staged searcher in step with the trials Tune holds.

    On the first step of a process, before Tune asks for a trial, the searcher is aligned with the
    trials Tune restored (`StagedSearch.align`): Tune's saved trials and saved searcher may come from
    two different saves. Then every trial directory of the experiment that Tune does not hold is
    removed: Tune's saved trials may be a second or more behind the kill, while the worker of a
    trial started meanwhile wrote its reports and checkpoints into storage, and the analysis reads
    every trial directory. Such a trial is never continued; its configuration, or another in its
    place, runs again.

    Each step after, it tells the searcher of a trial that Tune ended without telling it, and runs
    it again. Where Tune cannot reuse a worker for the next trial (the last trial's thread outlived
    TUNE_FUNCTION_THREAD_TIMEOUT_S: trainables.config.let_tune_wait_for_the_last_trial), Ray 2.60
    ends that trial in ERROR before it starts and never calls the searcher
    (TuneController._on_trial_reset); StagedSearch, which ends the search once every trial it
    handed out has ended and counts it as running, would wait for it for good. An ended trial the
    searcher was not told of is told as failed, and its configuration is handed out again (origin
    `rerun`): it never ran, so no fault of its own is known."""

    def __init__(self, staged: StagedSearch, location: RunLocation):
        self.staged, self.location = staged, location
        self.aligned = False  # pickled with the Tuner as False: a restored Tuner aligns once too

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        from ray.tune.experiment import Trial

        if not self.aligned:
            self.staged.align({trial.trial_id: trial.config for trial in trials})
            drop_trial_directories(self.location.storage_filesystem(),
                                   self.location.experiment_storage(SEARCH_EXPERIMENT),
                                   keep={trial_directory(trial.trial_id) for trial in trials})
            self.aligned = True
        for trial in trials:
            if trial.status in (Trial.ERROR, Trial.TERMINATED) and not self.staged.ended(trial.trial_id):
                self.staged.on_trial_complete(trial.trial_id, result=trial.last_result or None,
                                              error=trial.status == Trial.ERROR)
                if trial.status == Trial.ERROR and "step" not in (trial.last_result or {}):
                    self.staged.run_again(trial.trial_id, TrialParams.from_config(trial.config).gpu_share)


def shared_callbacks(config: Config) -> list:
    """Under shared packing, the callback that frees an ended trial's slot on its trainer."""
    return [ReleaseSlots()] if config.resources.packing == SHARED else []


def trial_dirname(trial) -> str:
    return trial_directory(trial.trial_id)


@dataclass(frozen=True)
class SearchParts:
    """The search's deciding parts, wired once (`search_parts`) for the real run and for the simulator."""

    searcher: StudySearcher  # Optuna's sampler behind Tune's searcher interface
    staged: StagedSearch     # what Tune asks: the searcher with the promotions, confirmations and a grid's repeats
    scheduler: TrialScheduler  # ASHA on training steps; none that stops (FIFO) for a grid


def search_parts(config: Config, space, priors: list[dict], location: RunLocation, asha_state: str,
                 storage=None) -> SearchParts:
    """Optuna (search.algorithm: TPE, seeded, constant liar for parallel proposals; random; or the
    grid) over `space` with the known-good `priors` (search/tuning/prior.py) as its first trials,
    ASHA on training steps with its rungs saved to `asha_state`, and the promotions and
    confirmations (search/tuning/stages.py), concurrency-limited to resources.max_concurrent_trials.
    `storage` holds the Optuna study (None: in memory). A grid proposes each of its points
    (`grid_points`; `priors` are none) once, and runs each again with budget.landscape_seeds - 1
    other seeds, with neither ASHA nor stages."""
    import optuna

    budget, selection, algorithm = config.budget, config.selection, config.search.algorithm
    num_samples = budget.num_samples
    if algorithm == GRID:
        # Every point queued, as the priors are, so that a point lost to a kill is queued again
        # (StudySearcher); the sampler proposes nothing of its own.
        priors = grid_points(config.search)
        num_samples = len(priors)
        sampler = optuna.samplers.RandomSampler(seed=config.seed)
    elif algorithm == RANDOM:
        sampler = optuna.samplers.RandomSampler(seed=config.seed)
    else:
        sampler = optuna.samplers.TPESampler(
            seed=config.seed,
            constant_liar=True,  # parallel trials otherwise get near-duplicate proposals (optuna#892)
            n_startup_trials=max(2, min(10, num_samples // 3)),
        )
    searcher = StudySearcher(space, metric=selection.metric, mode=selection.direction, sampler=sampler, storage=storage,
                             study_name=config.name, points_to_evaluate=priors, max_steps=budget.max_steps)
    if algorithm == GRID:
        scheduler = FIFOScheduler()
        selection = replace(selection, promote=False, confirm_top_k=0, cheaper=0)
        repeats = budget.landscape_seeds - 1
    else:
        scheduler = ResumableASHA(state_path=asha_state, time_attr="step", max_t=budget.max_steps,
                                  grace_period=budget.grace_period, reduction_factor=budget.reduction_factor)
        repeats = 0
    staged = StagedSearch(searcher, num_samples, selection, budget.max_steps, config.seed, location, repeats=repeats,
                          cheaper=space.cheaper, max_concurrent=config.resources.max_concurrent_trials or 0)
    return SearchParts(searcher, staged, scheduler)


def build_tuner(config: Config, trainable, space, priors: list[dict], location: RunLocation) -> tune.Tuner:
    """A Tuner for `config`: the search's parts (`search_parts`), with the study in the run and
    ASHA's rungs beside it, results in the run's `tune` experiment."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    # The study in the run, for optuna-dashboard and the resume: Optuna's journal file is only ever
    # appended to, so a kill leaves every line before it whole, and its lock is a symlink, which
    # works on the network filesystems a cluster's output lives on (SQLite's file locks often do not).
    storage = JournalStorage(JournalFileBackend(str((location.local / OPTUNA_STUDY).resolve())))
    parts = search_parts(config, space, priors, location, str((location.local / ASHA_STATE).resolve()), storage)
    staged = parts.staged
    if config.resources.max_concurrent_trials:
        environment.setenvs(environment.pending_trials(config.resources.max_concurrent_trials), keep_users=True)
    # A shared trial has no GPU share of its own to enlarge: its trainer holds the GPU for all its slots.
    reruns = [] if config.resources.packing == SHARED else [OutOfMemoryReruns(staged)]
    # -1: as many trials as the staged searcher hands out (num_samples of them from Optuna); it keeps
    # to max_concurrent_trials itself, so Tune is given no limit of its own
    return experiment(SEARCH_EXPERIMENT, trainable, config, location, staged, -1, [*reruns, TellLostTrials(staged, location)],
                      max_concurrent_trials=None,
                      metric=config.selection.metric, mode=config.selection.direction, scheduler=parts.scheduler)


def experiment(name: str, trainable, config: Config, location: RunLocation, search_alg, num_samples: int,
               callbacks: list = (), **tune_config) -> tune.Tuner:
    """A Tuner for the run's experiment `name`, with what every experiment of a run shares:
    reused workers (the base model stays loaded), short trial directories, adapter-only
    checkpoints of which one is kept, and the retry policy."""
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=search_alg,
            num_samples=num_samples,
            reuse_actors=True,
            trial_dirname_creator=trial_dirname,
            **tune_config,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=location.storage,
            storage_filesystem=location.storage_filesystem(),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            failure_config=tune.FailureConfig(max_failures=config.resources.max_failures),
            callbacks=[*callbacks, *shared_callbacks(config), *logger_callbacks(config.tracking, config.name, location.local),
                       *progress_callbacks(config), DropSupersededCheckpoints(location.storage_filesystem())],
            # Tune's own tables with --verbose, else these lines in their place (search/output/console.py)
            progress_reporter=status_reporter(config, num_samples),
            verbose=1,
        ),
    )


def retrain(config: Config, trainable, location: RunLocation, picked: str | None = None) -> None:
    """Train the trial `picked` once more on all the training data, in the run's retrain
    experiment (restored when a retrain already started). Without `picked`, the current pick of
    the search's trials by the analysis' rule (`decide`); nothing happens when there is none."""
    trials = read_trial_files(location.local)  # each experiment is pulled into the local copy after its fit
    picked = picked or decide(trials, config.selection, config.budget.max_steps).pick
    if picked is None:
        return
    params = {trial.trial_id: trial.params for trial in trials}[picked]
    configs = [params.repeat(Origin.RETRAIN, picked, seed=config.seed, full_data=True).to_config()]
    fit_or_restore(RETRAIN_EXPERIMENT, location, trainable,
                   lambda: experiment(RETRAIN_EXPERIMENT, trainable, config, location, GivenConfigs(configs), len(configs),
                                      max_concurrent_trials=config.resources.max_concurrent_trials or None))
