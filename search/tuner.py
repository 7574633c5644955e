"""Where the seams meet: space, searcher, scheduler, trainable and storage, wired in one
function. Everything else (restore, storage, progress, retries) is Ray's own.
"""

from __future__ import annotations

import math
from pathlib import Path

from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from search.config import Config
from trainables.config import TrialSetup
from trainables.trial import train_lora

EXPERIMENT = "tune"


class LoraOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna the truth about how a trial ended.

    Ray's version records a trial stopped early by ASHA as COMPLETE with its early-rung
    value, and leaves a NaN trial RUNNING (Optuna refuses the value, Ray logs and moves
    on). Here a trial below the full budget is PRUNED (TPE then ranks it by its last
    intermediate value at that step), a non-finite or missing value is FAIL, and every
    Optuna trial ends with exactly one final state.
    """

    def __init__(self, *args, max_steps: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._max_steps = max_steps

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if trial_id in self._completed_trials:
            return
        from optuna.trial import TrialState

        ot_trial = self._ot_trials[trial_id]
        value = (result or {}).get(self.metric)
        if error or value is None or not math.isfinite(value):
            self._ot_study.tell(ot_trial, state=TrialState.FAIL)
        elif result.get("step", 0) < self._max_steps:
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
        else:
            self._ot_study.tell(ot_trial, value, state=TrialState.COMPLETE)
        self._completed_trials.add(trial_id)

    def on_trial_result(self, trial_id: str, result: dict):
        value = result.get(self.metric)
        if value is not None and math.isfinite(value):
            self._ot_trials[trial_id].report(value, result["step"])


def trial_dirname(trial) -> str:
    """Short, stable trial directories (Ray's default spells the whole config into the path)."""
    return f"trial_{trial.trial_id}"


def build_tuner(config: Config, setup: TrialSetup, space, prior: dict, gpus_per_trial: float, run_dir: Path) -> tune.Tuner:
    """A Tuner for `config`: Optuna TPE (seeded, constant liar for parallel proposals)
    over `space` with the rule-of-thumb `prior` as its first trial, ASHA on training
    steps, `gpus_per_trial` (resolved, not 'auto') per trial, results under `run_dir/tune`."""
    import optuna

    budget, selection = config.budget, config.selection
    sampler = optuna.samplers.TPESampler(
        seed=config.seed,
        constant_liar=True,  # parallel trials otherwise get near-duplicate proposals (optuna#892)
        n_startup_trials=max(2, min(10, budget.num_samples // 3)),
    )
    searcher = LoraOptunaSearch(space=space, metric=selection.metric, mode=selection.mode,
                                sampler=sampler, points_to_evaluate=[prior], max_steps=budget.max_steps)
    scheduler = ASHAScheduler(
        time_attr="step",
        max_t=budget.max_steps,
        grace_period=budget.grace_period,
        reduction_factor=budget.reduction_factor,
    )
    resources = {"cpu": config.resources.cpus_per_trial, "gpu": gpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(train_lora, setup=setup), resources)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=selection.metric,
            mode=selection.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=budget.num_samples,
            max_concurrent_trials=config.resources.max_concurrent_trials or None,
            reuse_actors=True,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=str(run_dir.resolve()),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=config.resources.max_failures),
            verbose=1,
        ),
    )
