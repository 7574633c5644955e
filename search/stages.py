"""The stages after the search, each a plain Tune run of given configurations at the full
budget (no searcher, no early stopping), in its own experiment under the run directory:

- promote: trials ASHA stopped while within the tolerance of their rung's best and
  cheaper than the current pick continue from their last checkpoint to the full budget,
  so the cheapest-within-tolerance rule sees exactly what early stopping would hide;
- confirm: the leading candidates are trained again with other seeds, and the pick is
  made on the mean, so one lucky run cannot win;
- retrain: the pick is trained once more on all the training data and its adapter
  weights are exported.
"""

from __future__ import annotations

from pathlib import Path

from ray import tune
from ray.tune.search.basic_variant import BasicVariantGenerator

from search.config import Config
from trainables.config import TrialSetup
from trainables.trial import train_lora

STAGES = ("promote", "confirm", "retrain")


def run_stage(name: str, configs: list[dict], config: Config, setup: TrialSetup, gpus_per_trial: float,
              run_dir: Path) -> None:
    """Train each of `configs` (complete trial configs) to the full budget as Tune trials
    of the experiment `run_dir/<name>`."""
    from search.tuner import trial_dirname

    resources = {"cpu": config.resources.cpus_per_trial, "gpu": gpus_per_trial}
    tune.Tuner(
        tune.with_resources(tune.with_parameters(train_lora, setup=setup), resources),
        tune_config=tune.TuneConfig(
            search_alg=BasicVariantGenerator(points_to_evaluate=configs),
            num_samples=len(configs),
            max_concurrent_trials=config.resources.max_concurrent_trials or None,
            reuse_actors=True,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(run_dir.resolve()),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=config.resources.max_failures),
            verbose=1,
        ),
    ).fit()


def repeat(params: dict, origin: str, parent: str, **changes) -> dict:
    """A trial config that repeats `params` (the parent's config) with `changes`."""
    return {**params, "origin": origin, "parent": parent, "start_from": None, "full_data": False, **changes}
