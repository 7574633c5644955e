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

import json
from pathlib import Path

from ray.tune.search import Searcher

from search.config import Config
from search.storage import RunLocation
from search.tuner import experiment, fit_or_restore


class GivenConfigs(Searcher):
    """Hands out exactly `configs`, in order, then finishes. (Tune's BasicVariantGenerator
    accepts preset points only for keys of a param_space; ours are complete configs.)"""

    def __init__(self, configs: list[dict]):
        super().__init__()
        self._configs = list(configs)

    def suggest(self, trial_id: str) -> dict | None:
        return self._configs.pop(0) if self._configs else Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps(self._configs))

    def restore(self, checkpoint_path: str) -> None:
        self._configs = json.loads(Path(checkpoint_path).read_text())


def stage_tuner(name: str, configs: list[dict], config: Config, trainable, location: RunLocation):
    """A Tuner that trains each of `configs` (complete trial configs) to the full budget,
    as the run's experiment `name`."""
    return experiment(name, trainable, config, location, GivenConfigs(configs), len(configs))


def after_search(config: Config, trainable, location: RunLocation, stopped) -> None:
    """Promote, confirm, retrain, each only when it has work and no stop was requested
    (`stopped()` is checked between stages). A stage already started is restored."""
    from analysis.candidates import confirmation_candidates, current_pick_cost, promotion_candidates
    from analysis.results import load_curves, load_trials, read_trial_files

    selection, max_steps = config.selection, config.budget.max_steps
    run_dir = location.local  # the local copy: each experiment is pulled into it after its fit
    rule = (selection.metric, selection.mode, selection.tolerance, selection.cost, max_steps)

    def stage(name: str, configs: list[dict]) -> None:
        if configs and not stopped():
            fit_or_restore(name, location, trainable, lambda: stage_tuner(name, configs, config, trainable, location))

    def files() -> dict:
        return {trial.trial_id: trial for trial in read_trial_files(run_dir)}

    if selection.promote:
        trials = load_trials(run_dir)
        chosen = promotion_candidates(trials, load_curves(run_dir), *rule[:4], max_steps,
                                      current_pick_cost(trials, *rule))
        by_id = files()
        stage("promote", [repeat(by_id[t].params, "promoted", t,
                                 start_from=location.storage_path_of(_last_checkpoint(by_id[t].directory)))
                          for t in chosen if _last_checkpoint(by_id[t].directory)])
    if selection.confirm_top_k and selection.confirm_seeds:
        leading = confirmation_candidates(load_trials(run_dir), *rule, selection.confirm_top_k)
        by_id = files()
        stage("confirm", [repeat(by_id[t].params, "confirm", t, seed=config.seed + 1 + k)
                          for t in leading for k in range(selection.confirm_seeds)])
    if selection.retrain:
        from analysis.report import analyse

        analyse(run_dir)  # the pick to retrain
        pick_path = run_dir / "pick.json"
        if pick_path.exists():
            picked = json.loads(pick_path.read_text())["trial_id"]
            stage("retrain", [repeat(files()[picked].params, "retrain", picked, seed=config.seed, full_data=True)])


def _last_checkpoint(trial_dir: Path) -> Path | None:
    checkpoints = sorted(trial_dir.glob("checkpoint_*"))
    return checkpoints[-1].resolve() if checkpoints else None


def repeat(params: dict, origin: str, parent: str, **changes) -> dict:
    """A trial config that repeats `params` (the parent's config) with `changes`."""
    return {**params, "origin": origin, "parent": parent, "start_from": None, "full_data": False, **changes}
