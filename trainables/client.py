"""A shared trial: the Tune function trainable of a trial that `resources.packing=shared` runs.

The trial's process holds no model. It opens a slot for its configuration on one of the run's
trainers (`trainables.shared.SharedTrainer`, a Ray actor per GPU that trains the adapters of
several trials in one pass), hands it the trial's checkpoint where there is one, and passes
each report that the trainer makes for it on to Tune, with that report's checkpoint. So it
imports neither torch, transformers nor PEFT, and a trial starts in a fraction of a second.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import ray
from ray import tune

from rundir.params import TrialParams
from trainables.checkpoint import read_files, write_files
from trainables.config import let_tune_wait_for_the_last_trial

FULL_WAIT_S = 0.2  # between rounds of asking while every slot is taken: a slot frees when a trial ends
CLIENT_LOADED = time.time()  # when this worker process loaded the client's code: its reports' worker_started_at


class TrainerDied(RuntimeError):
    """The trainer that held the trial's slot died; Tune's retries (resources.max_failures)
    continue the trial from its last checkpoint on a trainer that Ray restarts."""


def train_lora_shared(config: dict, trainers: list) -> None:
    """Train one configuration, `config` being Tune's config of the trial, in a slot of one of
    `trainers` (handles of Ray actors of `SharedTrainer`): the one with the most free slots,
    waiting while all are full. The trial continues from Tune's checkpoint of it (a retry or a
    resumed run), else from its `start_from` (a promotion), else starts fresh. Every report of
    the trainer goes to Tune as trainables/trial.py's reports do, with its checkpoint, until the
    trainer says the trial is done. Raises what the trainer raised for the trial (TrialDiverged,
    ValueError for a configuration it cannot train), and TrainerDied when the trainer died."""
    called_at = time.time()
    let_tune_wait_for_the_last_trial()
    trial_id = tune.get_context().get_trial_id()
    files = _checkpoint_files(TrialParams.from_config(config).start_from)
    index, token = _open(trainers, trial_id, config, ray.put(files) if files else None, (called_at, CLIENT_LOADED))
    trainer = trainers[index]
    try:
        while True:
            try:
                report = ray.get(trainer.next_report.remote(trial_id))
            except ray.exceptions.RayActorError as e:
                raise TrainerDied(f"the shared trainer {index} of the run died while it trained this trial "
                                  f"({type(e).__name__}: {e})") from e
            if report is None:
                return
            with tempfile.TemporaryDirectory() as directory:
                write_files(Path(directory), report.files)
                tune.report(report.report.to_dict(), checkpoint=tune.Checkpoint.from_directory(directory))
    finally:
        # Also on the SystemExit with which Tune's report ends a trial that ASHA stopped. Not awaited:
        # Tune gives this process the next trial only once this function has ended (within
        # TUNE_FUNCTION_THREAD_TIMEOUT_S: trainables.config.let_tune_wait_for_the_last_trial, else it
        # loses that trial), and a trainer answers between its packed steps, which take seconds on a
        # CPU. So it may arrive after a retry of this trial has opened a slot (here, or on this trainer
        # restarted by Ray): the token frees this attempt's only.
        trainer.release.remote(trial_id, token)


def checkpoint_to_continue(start_from: str | None) -> tune.Checkpoint | None:
    """The checkpoint a trial continues from, in either packing: Tune's of this trial (a retry or
    a resumed run), else the one at `start_from` (a promotion: a directory or a storage URI, as
    Tune stored it); None for a fresh trial."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None and start_from is not None:
        checkpoint = tune.Checkpoint(start_from)
    return checkpoint


def _checkpoint_files(start_from: str | None) -> dict[str, bytes] | None:
    """The files of the checkpoint the trial continues from (`checkpoint_to_continue`), by their
    paths inside it; None for a fresh trial."""
    checkpoint = checkpoint_to_continue(start_from)
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return read_files(Path(directory))


def _open(trainers: list, trial_id: str, config: dict, files, client: tuple[float, float]) -> tuple[int, str]:
    """The index of the trainer that opened a slot for the trial, and the slot's token (`release`
    frees that slot only): trainers are asked in order of their free slots, most first, again
    every FULL_WAIT_S while all are full or being restarted. `files` is the checkpoint's files in
    Ray's object store (put once, however often they are offered), or None; `client`, when Tune
    called the trial and when its process loaded this code (`SharedTrainer.open`). TrainerDied when every
    trainer has died for good."""
    while True:
        free, restarting = _free_slots(trainers)
        if not free and not restarting:
            raise TrainerDied(f"none of the run's {len(trainers)} shared trainer(s) answers: all have died")
        for slots, index in free:
            if slots <= 0:
                break
            try:
                token = ray.get(trainers[index].open.remote(trial_id, config, files, client))
                if token is not None:
                    return index, token
            except ray.exceptions.RayActorError:
                continue  # died since it answered: another may take the trial
        time.sleep(FULL_WAIT_S)


def _free_slots(trainers: list) -> tuple[list[tuple[int, int]], int]:
    """(free slots, index) of every trainer that answers, most free slots first; and how many
    trainers Ray is restarting (they answer again once they have loaded the model)."""
    asked = [(index, trainer.free_slots.remote()) for index, trainer in enumerate(trainers)]
    free, restarting = [], 0
    for index, slots in asked:
        try:
            free.append((ray.get(slots), index))
        except ray.exceptions.ActorUnavailableError:
            restarting += 1
        except ray.exceptions.RayActorError:
            continue
    return sorted(free, key=lambda slots: -slots[0]), restarting
