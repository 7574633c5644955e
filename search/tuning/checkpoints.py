"""Each trial keeps one checkpoint: Tune deletes none (`CheckpointConfig(num_to_keep=None)`), and
`DropSupersededCheckpoints` drops a trial's older ones once no resume can need them."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from ray import tune

from rundir.atomicfs import checkpoint_index, drop_superseded_checkpoints, moment, whole_state_began_after


@dataclass
class _Ended:
    """An ended trial's last registered checkpoint directory, `latest`; `saved` is the `moment()` of
    Tune's first save of the experiment state after the trial was seen ended, None until then."""

    latest: str
    saved: int | None = None


class DropSupersededCheckpoints(tune.Callback):
    """Deletes, through `filesystem` (Tune's storage filesystem of the run), every checkpoint of a
    trial older than the last one Tune registered for it, once the trial has ended and storage holds
    an experiment state that says so.

    Why that is safe, with a kill possible at any moment: `--resume` continues each trial that the
    latest experiment state in storage holds unfinished from the checkpoint that state names, and
    a promotion or a rerun starts from a trial's last registered checkpoint, which stays. A trial
    that a state holds as ended is never continued, and every later state holds it ended too. So a
    trial's older checkpoints may go once a state written after its end is whole in storage. Tune
    writes the state into a staging file (in place, then calls each callback's `get_state`: the
    moment `saved` here) and a background sync copies that file into storage, reading it when it
    writes the copy; the storage filesystem notes when each whole copy began. A copy that began after
    a save following the trial's end holds that save or a later one, whichever sync launched it: a
    copy that began earlier may hold a state from before the end, however late it completes.
    Trials that are ended when an experiment is restored, before its first step (the leftovers of a
    killed driver), are ended in the state Tune restored them from: theirs go at once. At the
    experiment's end Tune saves the state and waits for its copy before `on_experiment_end`, so
    every ended trial's go then; a trial still unfinished (a graceful stop) keeps its own."""

    def __init__(self, filesystem):
        self.filesystem = filesystem
        self._seen: set[str] = set()  # trial ids noted as ended
        self._waiting: list[_Ended] = []
        self._before_first_step = True

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        self._note(trials)
        self._before_first_step = False

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        self._note(trials)
        self._drop_saved()

    def on_experiment_end(self, trials: list, **info) -> None:
        self._note(trials)
        self._drop_saved()

    def get_state(self) -> None:
        """Tune's save of the experiment state. Nothing to keep: a restored experiment's ended
        trials are found again, in the trials Tune restores."""
        now = moment()
        for ended in self._waiting:
            if ended.saved is None:
                ended.saved = now

    def _note(self, trials: list) -> None:
        for trial in trials:
            if trial.trial_id in self._seen or not trial.is_finished():
                continue
            self._seen.add(trial.trial_id)
            if trial.checkpoint is None:
                continue
            if self._before_first_step:
                self._drop(trial.checkpoint.path)
            else:
                self._waiting.append(_Ended(trial.checkpoint.path))

    def _drop_saved(self) -> None:
        waiting = []
        for ended in self._waiting:
            experiment_dir = posixpath.dirname(posixpath.dirname(ended.latest))
            if ended.saved is not None and whole_state_began_after(experiment_dir, ended.saved):
                self._drop(ended.latest)
            else:
                waiting.append(ended)
        self._waiting = waiting

    def _drop(self, latest: str) -> None:
        drop_superseded_checkpoints(self.filesystem, posixpath.dirname(latest), checkpoint_index(latest))
