"""The stages that follow the search's trials, in the search's own Tuner (`StagedSearch`),
so the workers that trained the search (each with the base model loaded) train these too,
as soon as a trial qualifies:
- promote: trials ASHA stopped while within the tolerance of their rung's best and
  cheaper than the current pick continue from their last checkpoint to the full budget,
  so the cheapest-within-tolerance rule sees exactly what early stopping would hide;
- confirm: the leading candidates are trained again with other seeds, and the pick is
  made on the mean, so one lucky run cannot win; while the pick cannot be told apart from
  another configuration, both get more seeds, up to `selection.confirm_max_seeds` runs each;
- cheaper: once the search's own trials have ended and no promotion is pending, ahead of the
  confirmations (a neighbour that becomes the pick needs its own confirmation after it), the
  configurations next to the pick that train fewer parameters
  (`LoraSpace.cheaper`: its next smaller rank, a module set inside its own) are trained to the
  full budget, up to `selection.cheaper` of them, nearest first: a sampler finds the region that
  is good, and the rule asks for the cheapest point in it, which the sampler has no reason to try;
  where a slot would stand idle beside it, the neighbour's own confirmation runs there at once
  (`_spare_confirmation`), instead of after it should it become the pick.
Which trials qualify is `analysis.candidates.decide`'s answer over the trials' reports.
The retrain of the pick on all the data follows as a Tune run of its own (`search.tuning.tuner.retrain`),
handed out by `GivenConfigs`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ray.tune.search import Searcher

from analysis.candidates import decide
from analysis.config import SelectionConfig
from analysis.results import ROW_COLUMNS, TrialFiles
from rundir.files import write_json_atomic
from rundir.layout import SEARCH_EXPERIMENT, trial_directory
from rundir.location import RunLocation
from rundir.params import Origin, TrialParams


class StagedSearch(Searcher):
    """The search and its stages from one Tuner: the first `num_samples` trials come from
    `searcher` (Optuna), each queued `repeats` times more with the next seeds (origin confirm:
    a grid's runs of each point); then promotions and confirmations, each handed out as soon as a
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

    At most `max_concurrent` trials are out at once (0: no limit), as Tune's ConcurrencyLimiter
    would keep them, here where the trials' ends are known (`align`).

    A Tune search wrapper, as ConcurrencyLimiter is one: the wrapped searcher is `.searcher`
    and sees only the search's trials; `get_state`/`set_state` carry this wrapper's own state,
    which Tune saves beside the wrapped searcher's and restores with `Tuner.restore`. The
    candidates come from the trials' reports as they arrive (the tables and rules the
    analysis uses), not from files, so a run kept at a URI needs nothing downloaded."""

    def __init__(self, searcher: Searcher, num_samples: int, selection: SelectionConfig, max_steps: int, seed: int,
                 location: RunLocation, repeats: int = 0, cheaper: Callable[[TrialParams], list[TrialParams]] | None = None,
                 max_concurrent: int = 0):
        super().__init__(metric=selection.metric, mode=selection.direction)
        self.searcher = searcher
        self._num_samples = num_samples
        self._repeats = repeats  # each proposed trial again with this many other seeds (a grid's landscape seeds)
        self._selection, self._max_steps, self._seed = selection, max_steps, seed
        self._location = location  # where Tune keeps the trials' checkpoints
        self._proposed = 0  # trials the wrapped searcher proposed
        self._queue: list[TrialParams] = []
        self._stale = True  # a trial ended since the queue was last computed
        self._handed: set[tuple] = set()  # the stage trials handed out or queued (`_handed_key`)
        self._params: dict[str, TrialParams] = {}  # every trial handed out, by trial id
        self._rows: dict[str, list[dict]] = {}  # each trial's reports (scalars, and the latest's per-row values)
        self._ended: dict[str, bool] = {}  # trial id -> failed, once it ended
        self._reruns: list[dict] = []  # Tune configs of trials to run again with a larger GPU share
        self._cheaper = cheaper  # the configurations next to a pick that train fewer parameters
        self.max_concurrent = max_concurrent  # trials out at once (0: no limit); not saved, a resume may change it

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.max_concurrent and len(self._params) - len(self._ended) >= self.max_concurrent:
            return None
        if self._reruns:
            config = self._reruns.pop(0)
            self._params[trial_id] = TrialParams.from_config(config)
            return config
        if self._proposed < self._num_samples:
            proposal = self.searcher.suggest(trial_id)
            if proposal == Searcher.FINISHED:  # a space with fewer points than num_samples
                self._num_samples = self._proposed
            elif proposal is None:
                return None
            else:
                self._proposed += 1
                self._params[trial_id] = params = TrialParams.from_config(proposal)
                self._queue += [params.repeat(Origin.CONFIRM, trial_id, seed=self._seed + 1 + k)
                                for k in range(self._repeats)]
                return proposal
        if self._stale:
            self._queue, self._stale = self._queue + self._qualified(), False
        if self._queue:
            self._params[trial_id] = self._queue.pop(0)
            return self._params[trial_id].to_config()
        spare = self._spare_confirmation()
        if spare is not None:
            self._params[trial_id] = spare
            return spare.to_config()
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
        elif (proposed := self._rerun_of_proposed(trial_id)) and hasattr(self.searcher, "tell_rerun"):
            self.searcher.tell_rerun(proposed, trial_id, result, error)

    def run_again(self, trial_id: str, gpu_share: float | None) -> None:
        """Hand out the configuration of `trial_id`, which ran out of GPU memory while sharing its
        GPU or which Tune lost before it started, as a new trial (origin `rerun`, parent `trial_id`)
        with `gpu_share` of a GPU (None: the run's share), from the failed trial's last checkpoint,
        else from where it started. Called before Tune asks for the next trial
        (`search.tuning.tuner.OutOfMemoryReruns`, `search.tuning.tuner.TellLostTrials`), so the search cannot
        finish meanwhile."""
        params = self._params[trial_id]
        rerun = params.repeat(Origin.RERUN, trial_id, start_from=self._last_checkpoint(trial_id) or params.start_from,
                              full_data=params.full_data, gpu_share=gpu_share)
        self._reruns.append(rerun.to_config())

    def align(self, held: dict[str, dict]) -> None:
        """Make this searcher's record agree with the trials Tune restored, `held` (trial id: config).

        Tune saves its trials and its searchers in two files, and a background upload copies them
        into storage while the next save may rewrite either, so after a kill storage can hold a
        searcher a little behind or ahead of the trials. Only Tune's trials will run: one handed
        out after this copy is taken up (`_adopt`), and one Tune lost is given back to be handed
        out again (`_forget`). Called before Tune first asks this process for a trial."""
        for trial_id in [trial_id for trial_id in self._params if trial_id not in held]:
            self._forget(trial_id)
        for trial_id, config in held.items():
            if trial_id not in self._params:
                self._adopt(trial_id, TrialParams.from_config(config))

    def _adopt(self, trial_id: str, params: TrialParams) -> None:
        self._params[trial_id], self._stale = params, True
        if params.origin.proposed:
            self._proposed += 1
            if hasattr(self.searcher, "adopt"):
                self.searcher.adopt(trial_id)
            self._queue += [params.repeat(Origin.CONFIRM, trial_id, seed=self._seed + 1 + k) for k in range(self._repeats)]
        elif params.origin == Origin.RERUN:
            self._reruns = [c for c in self._reruns if TrialParams.from_config(c) != params]
        else:
            self._handed.add(_handed_key(params, self._seed))
        self._queue = [queued for queued in self._queue if queued != params]

    def _forget(self, trial_id: str) -> None:
        params = self._params.pop(trial_id)
        self._rows.pop(trial_id, None)
        self._ended.pop(trial_id, None)
        self._stale = True
        if params.origin.proposed:  # the searcher proposes it, or another in its place, again
            self._proposed -= 1
            if hasattr(self.searcher, "forget"):
                self.searcher.forget(trial_id)
            self._queue = [queued for queued in self._queue if queued.parent != trial_id]
        elif params.origin == Origin.RERUN:
            self._reruns.insert(0, params.to_config())
        else:
            self._queue.insert(0, params)

    def get_state(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key not in ("searcher", "max_concurrent")}

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)

    def ended(self, trial_id: str) -> bool:
        """Whether this searcher was told that the trial ended."""
        return trial_id in self._ended

    def _rerun_of_proposed(self, trial_id: str) -> str | None:
        """The searcher's trial that `trial_id` runs again after running out of memory (through
        reruns only), or None: a rerun of a stage's trial is that stage's, which the searcher never saw."""
        params = self._params.get(trial_id)
        while params is not None and params.origin == Origin.RERUN:
            trial_id, params = params.parent, self._params.get(params.parent)
        return trial_id if params is not None and params.origin.proposed else None

    def _last_checkpoint(self, trial_id: str) -> str | None:
        """The checkpoint of the trial's last report, where Tune keeps it; None without one."""
        rows = self._rows.get(trial_id)
        checkpoint = rows[-1].get("checkpoint_dir_name") if rows else None
        return self._location.path_of(SEARCH_EXPERIMENT, trial_directory(trial_id), checkpoint) if checkpoint else None

    def _from_search(self, trial_id: str) -> bool:
        params = self._params.get(trial_id)
        return params is None or params.origin.proposed

    def _record(self, trial_id: str, result: dict | None) -> None:
        if not result or "step" not in result:
            return
        row = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None}
        # the per-row eval values, for the pick's paired comparison: on the latest report only,
        # which is the one the rule reads, so the searcher's saved state stays small
        row |= {k: result[k] for k in ROW_COLUMNS.values() if isinstance(result.get(k), list)}
        rows = self._rows.setdefault(trial_id, [])
        if rows and rows[-1]["step"] == row["step"]:
            rows[-1] = row
        else:
            if rows:
                rows[-1] = {k: v for k, v in rows[-1].items() if k not in ROW_COLUMNS.values()}
            rows.append(row)

    def _qualified(self) -> list[TrialParams]:
        """Promotions and confirmations that qualify now and were not handed out yet."""
        selection = self._selection
        if not selection.promote and not (selection.confirm_top_k and selection.confirm_seeds) and not selection.cheaper:
            return []
        reports = [TrialFiles(trial_id, params, self._rows.get(trial_id, []), "failed" if self._ended.get(trial_id) else "",
                              None) for trial_id, params in self._params.items()]
        running = {trial_id for trial_id in self._params if trial_id not in self._ended}
        decision = decide(reports, selection, self._max_steps, running)
        out = []
        for parent in decision.promote:
            start_from = self._last_checkpoint(parent)
            promotion = self._params[parent].repeat(Origin.PROMOTED, parent, start_from=start_from)
            key = _handed_key(promotion, self._seed)
            if key in self._handed or not start_from:  # every report carries one
                continue
            self._handed.add(key)
            out.append(promotion)
        wanted = {parent: selection.confirm_seeds for parent in decision.confirm}
        for parent, runs in decision.more_seeds.items():
            wanted[parent] = max(wanted.get(parent, 0), runs)
        for parent, runs in wanted.items():
            for k in range(runs):
                confirmation = self._params[parent].repeat(Origin.CONFIRM, parent, seed=self._seed + 1 + k)
                key = _handed_key(confirmation, self._seed)
                if key not in self._handed:
                    self._handed.add(key)
                    out.append(confirmation)
        search_running = any(params.origin.proposed and trial_id in running for trial_id, params in self._params.items())
        promoting = any(p.origin == Origin.PROMOTED for p in [*out, *self._queue]) or any(
            params.origin == Origin.PROMOTED and trial_id in running for trial_id, params in self._params.items())
        if search_running or promoting or self._proposed < self._num_samples:
            return out
        return self._cheaper_than(decision.pick) + out

    def _cheaper_than(self, pick: str | None) -> list[TrialParams]:
        """The pick's cheaper neighbours not yet run, within what `selection.cheaper` leaves. Only
        once the search's own trials have ended and no promotion is pending (either may still move
        the pick anywhere); beside the confirmations, which keep it among the configurations
        already run, so that the neighbour adds no round of its own to the search's wall time.
        Handed out ahead of them: where the neighbour becomes the pick, its own confirmation
        follows it, and the pick's confirmation can run beside that instead of before both."""
        left = self._selection.cheaper - sum(1 for key in self._handed if key[0] == Origin.CHEAPER)
        if not self._cheaper or left <= 0 or pick is None:
            return []
        tried = {_configuration(params) for params in self._params.values()}
        out = []
        for neighbour in self._cheaper(self._params[pick]):
            candidate = replace(neighbour, origin=Origin.CHEAPER, parent=pick, seed=self._seed, start_from=None,
                                full_data=False, gpu_share=None)
            key = _handed_key(candidate, self._seed)
            if len(out) < left and _configuration(neighbour) not in tried and key not in self._handed:
                self._handed.add(key)
                out.append(candidate)
        return out

    def _spare_confirmation(self) -> TrialParams | None:
        """A confirmation of a cheaper neighbour that is still running, for a slot nothing else
        wants now (only where `max_concurrent` says how many there are). Should the neighbour
        become the pick, its confirmation would follow it, a whole trial's time after every other
        trial has ended; beside it, it takes a slot that would stand idle. Should it not, the run
        is one more seed of a configuration that ran, which the pick's comparison reads as any
        other. A later confirmation that qualifies waits for a slot, as it would behind any trial."""
        selection = self._selection
        if not (self.max_concurrent and selection.confirm_top_k and selection.confirm_seeds):
            return None
        for trial_id, params in list(self._params.items()):
            if params.origin != Origin.CHEAPER or trial_id in self._ended:
                continue
            for k in range(selection.confirm_seeds):
                confirmation = params.repeat(Origin.CONFIRM, trial_id, seed=self._seed + 1 + k)
                key = _handed_key(confirmation, self._seed)
                if key not in self._handed:
                    self._handed.add(key)
                    return confirmation
        return None


def _handed_key(params: TrialParams, seed: int) -> tuple:
    """How `_handed` knows a stage's trial: a promotion by its parent, a confirmation by its
    parent and seed index, a cheaper neighbour by its configuration."""
    if params.origin == Origin.PROMOTED:
        return Origin.PROMOTED, params.parent
    if params.origin == Origin.CONFIRM:
        return Origin.CONFIRM, params.parent, params.seed - seed - 1
    return Origin.CHEAPER, *_configuration(params)


def _configuration(params: TrialParams) -> tuple:
    """What makes two trials the same configuration: everything but the seed and why it ran."""
    config = params.lora_config
    return (params.module_set, config["r"], params.alpha_ratio, config["lora_dropout"], config["use_rslora"],
            config["use_dora"], params.learning_rate, params.loraplus_lr_ratio)


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
        write_json_atomic(checkpoint_path, self._configs)

    def restore(self, checkpoint_path: str) -> None:
        self._configs = json.loads(Path(checkpoint_path).read_text())
