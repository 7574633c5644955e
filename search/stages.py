"""The stages that follow the search's trials, and how they run.

In the search's own Tuner (`StagedSearch`), so the workers that trained the search (each
with the base model loaded) train these too, as soon as a trial qualifies:
- promote: trials ASHA stopped while within the tolerance of their rung's best and
  cheaper than the current pick continue from their last checkpoint to the full budget,
  so the cheapest-within-tolerance rule sees exactly what early stopping would hide;
- confirm: the leading candidates are trained again with other seeds, and the pick is
  made on the mean, so one lucky run cannot win.
After it, as a Tune run of its own (`after_search`):
- retrain: the pick is trained once more on all the training data and its adapter
  weights are exported.
"""

from __future__ import annotations

import json
from pathlib import Path

from ray.tune.search import Searcher

from search.config import Config
from search.storage import RunLocation
from search.tuner import EXPERIMENT, STAGE_ORIGINS, experiment, fit_or_restore, trial_directory

__all__ = ["STAGE_ORIGINS", "GivenConfigs", "StagedSearch", "after_search", "repeat"]


class StagedSearch(Searcher):
    """The search and its stages from one Tuner: the first `num_samples` trials come from
    `searcher` (Optuna); then promotions and confirmations, each handed out as soon as a
    trial qualifies for one, in the slots the search's last trials leave free; finished once
    every trial has ended and none qualifies for more. In between it answers None (Tune asks
    again).

    Handing them out early, rather than after the last search trial, keeps the workers busy
    (Tune keeps a finished trial's worker, with its loaded model, only for a trial waiting
    to start: a confirmation started after the search needed a new worker). It never does
    less than waiting would: whatever qualifies once everything has ended is handed out
    then, so the final leaders are all confirmed and every final promotion candidate is
    promoted. It may do more: a trial that led for a while keeps its extra seed. A trial's
    rank among the leaders only falls as more trials finish, so no leader is missed.

    A Tune search wrapper, as ConcurrencyLimiter is one: the wrapped searcher is `.searcher`
    and sees only the search's trials; `get_state`/`set_state` carry this wrapper's own state,
    which Tune saves beside the wrapped searcher's and restores with `Tuner.restore`. The
    candidates come from the trials' reports as they arrive (the tables and rules the
    analysis uses), not from files, so a run kept at a URI needs nothing downloaded."""

    def __init__(self, searcher: Searcher, num_samples: int, config: Config, location: RunLocation):
        selection = config.selection
        super().__init__(metric=selection.metric, mode=selection.mode)
        self.searcher = searcher
        self._num_samples = num_samples
        self._rule = (selection.metric, selection.mode, selection.tolerance, selection.cost, config.budget.max_steps)
        self._promote = selection.promote
        self._confirm = (selection.confirm_top_k, selection.confirm_seeds) if selection.confirm_seeds else (0, 0)
        self._seed = config.seed
        self._location = location  # where Tune keeps the trials' checkpoints
        self._proposed = 0  # trials the wrapped searcher proposed
        self._queue: list[dict] = []
        self._stale = True  # a trial ended since the queue was last computed
        self._handed: set[tuple] = set()  # ("promoted", parent) and ("confirm", parent, seed index)
        self._params: dict[str, dict] = {}  # every trial handed out, by trial id
        self._rows: dict[str, list[dict]] = {}  # each trial's reports (scalars only)
        self._ended: dict[str, bool] = {}  # trial id -> failed, once it ended

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str) -> dict | str | None:
        if self._proposed < self._num_samples:
            proposal = self.searcher.suggest(trial_id)
            if proposal == Searcher.FINISHED:  # a space with fewer points than num_samples
                self._num_samples = self._proposed
            elif proposal is None:
                return None
            else:
                self._proposed += 1
                self._params[trial_id] = proposal
                return proposal
        if self._stale:
            self._queue, self._stale = self._queue + self._qualified(), False
        if self._queue:
            self._params[trial_id] = self._queue.pop(0)
            return self._params[trial_id]
        return Searcher.FINISHED if len(self._ended) == len(self._params) else None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._record(trial_id, result)
        if self._from_search(trial_id):
            self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # a trial ASHA stopped has its last result here only (Tune passes it to on_trial_result otherwise)
        self._record(trial_id, result)
        self._ended[trial_id] = error
        self._stale = True
        if self._from_search(trial_id):
            self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def get_state(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "searcher"}

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)

    def _from_search(self, trial_id: str) -> bool:
        return self._params.get(trial_id, {}).get("origin") not in STAGE_ORIGINS

    def _record(self, trial_id: str, result: dict | None) -> None:
        if not result or "step" not in result:
            return
        if trial_id not in self._params and isinstance(result.get("config"), dict):
            self._params[trial_id] = result["config"]  # handed out after the state Tune restored was saved
        row = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None}
        rows = self._rows.setdefault(trial_id, [])
        if rows and rows[-1]["step"] == row["step"]:
            rows[-1] = row
        else:
            rows.append(row)

    def _qualified(self) -> list[dict]:
        """Promotions and confirmations that qualify now and were not handed out yet."""
        from analysis.candidates import confirmation_candidates, current_pick_cost, promotion_candidates
        from analysis.results import TrialFiles, curves_table, trials_table

        if not self._promote and not self._confirm[0]:
            return []
        files = [TrialFiles(trial_id, params, self._rows.get(trial_id, []), "failed" if self._ended.get(trial_id) else "",
                            None) for trial_id, params in self._params.items()]
        # trials that ended: one still running is neither stopped nor finished yet
        trials = trials_table([f for f in files if f.trial_id in self._ended], self._rule[-1])
        out = []
        if self._promote:
            pick_cost = current_pick_cost(trials, *self._rule)
            for parent in promotion_candidates(trials, curves_table(files), *self._rule[:4], self._rule[-1], pick_cost):
                checkpoint = self._rows[parent][-1].get("checkpoint_dir_name")
                if ("promoted", parent) in self._handed or not checkpoint:  # every report carries one
                    continue
                self._handed.add(("promoted", parent))
                start_from = self._location.path_of(EXPERIMENT, trial_directory(parent), checkpoint)
                out.append(repeat(self._params[parent], "promoted", parent, start_from=start_from))
        top_k, seeds = self._confirm
        if top_k:  # leaders among the runs of their own configuration (not the confirmations)
            for parent in confirmation_candidates(trials[trials["origin"] != "confirm"], *self._rule, top_k):
                for k in range(seeds):
                    if ("confirm", parent, k) not in self._handed:
                        self._handed.add(("confirm", parent, k))
                        out.append(repeat(self._params[parent], "confirm", parent, seed=self._seed + 1 + k))
        return out


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


def after_search(config: Config, trainable, location: RunLocation, stopped) -> None:
    """Retrain the pick on all the data, when asked for and no stop was requested (a
    retrain already started is restored)."""
    if not config.selection.retrain or stopped():
        return
    from analysis.report import analyse
    from analysis.results import read_trial_files

    run_dir = location.local  # the local copy: each experiment is pulled into it after its fit
    analyse(run_dir)  # the pick to retrain
    pick_path = run_dir / "pick.json"
    if pick_path.exists():
        picked = json.loads(pick_path.read_text())["trial_id"]
        params = {trial.trial_id: trial.params for trial in read_trial_files(run_dir)}[picked]
        configs = [repeat(params, "retrain", picked, seed=config.seed, full_data=True)]
        fit_or_restore("retrain", location, trainable,
                       lambda: experiment("retrain", trainable, config, location, GivenConfigs(configs), len(configs)))


def repeat(params: dict, origin: str, parent: str, **changes) -> dict:
    """A trial config that repeats `params` (the parent's config) with `changes`."""
    return {**params, "origin": origin, "parent": parent, "start_from": None, "full_data": False, **changes}
