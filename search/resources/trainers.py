"""The shared trainers of a run with `resources.packing=shared`: one Ray actor per GPU of the
cluster (one on a cluster without GPUs), each holding the base model once and training the
adapters of up to `resources.pack_slots` trials in one pass (trainables/shared.py), in its own
process or in the one the driver started before Ray (trainables/host.py). Every
configuration stays a Tune trial of its own, whose light client (trainables/client.py) trains
in a slot of one of them. They serve the search and the retrain, and are killed at the end.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

from ray import tune

from trainables.host import HostAddress, Trainer, TrainerArgs

# Trainers are found by name in the driver's own Ray namespace (a new one for each driver, so
# two runs on one cluster never see each other's), where a resumed run's trainers have the same names.
TRAINER_NAME = "lora-search-trainer-"
# Besides the pack_slots clients waiting in next_report: calls that must not queue behind them
# (open, release, free_slots), from clients being placed and from the driver.
SPARE_CALLS = 4


class TrainerNotStarted(RuntimeError):
    """A shared trainer raised in its constructor (its base model or data could not be loaded, say).
    Ray does not restart an actor whose constructor raised, so the run cannot go on."""


@contextmanager
def shared_trainers(args: TrainerArgs, cpus_per_trial: int, host: HostAddress | None = None) -> Iterator[list]:
    """The handles of the run's trainers, made with `args`, started and answering, for the block;
    killed after it. One per whole GPU that Ray's cluster has, each with `args.share` of that GPU
    (all but what a trial in a process of its own beside the trainer takes: a DoRA trial,
    trainables.placement.in_own_process), told as its share of the GPU's memory for its
    evaluations, and `cpus_per_trial` CPUs, else one with `cpus_per_trial` CPUs. Ray restarts a
    trainer that dies (its trials fail with the reason, and Tune's retries, resources.max_failures,
    continue them from their checkpoints on it). A trainer that cannot start ends the run here,
    before any trial: TrainerNotStarted, naming what its constructor raised. `host`: a trainer's
    process the driver started before Ray, which the trainer on its GPU takes (trainables/host.py)."""
    import ray

    gpus = math.floor(ray.cluster_resources().get("GPU", 0) + 1e-9)
    trainer = ray.remote(Trainer)
    options = {"num_cpus": cpus_per_trial, "max_concurrency": args.capacity + SPARE_CALLS,
               "max_restarts": -1, **({"num_gpus": args.share} if gpus else {})}
    handles = []
    try:
        for index in range(max(1, gpus)):
            actor = trainer.options(name=f"{TRAINER_NAME}{index}", **options)
            handles.append(actor.remote(args.setup, args.capacity, args.share, host))
        for index, handle in enumerate(handles):
            try:
                ray.get(handle.free_slots.remote())
            except ray.exceptions.RayActorError as e:
                raise TrainerNotStarted(f"shared trainer {index} could not start: {_raised(e)}") from None
        yield handles
    finally:
        for handle in handles:
            ray.kill(handle)


def _raised(error: Exception) -> str:
    """What an actor's constructor raised, on one line, from Ray's `error`: Ray keeps only the text
    of the constructor's traceback, whose last lines after its last frame are the exception as
    Python prints it (the frame's own lines are indented). Any other error: its text, on one line."""
    lines = str(error).splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    if frames:
        lines = lines[frames[-1] + 1:]
        while lines and lines[0].startswith(" "):
            lines.pop(0)
    return " ".join(" ".join(lines).split())


def trainer_slots(trainers: list, pack_slots: int, max_concurrent_trials: int) -> int:
    """Trials at once under shared packing: every slot of every trainer, or the user's
    `max_concurrent_trials` where it is lower (0: no limit of the user's)."""
    slots = pack_slots * len(trainers)
    return min(max_concurrent_trials, slots) if max_concurrent_trials else slots


class ReleaseSlots(tune.Callback):
    """Frees an ended trial's slot at once, for the next trial. A trial that ASHA stops ends inside
    Tune's report, where its client's own release may never run; a trial whose client died never
    releases. Releasing a slot that is already free does nothing.

    It holds no actor handle: Tune pickles its callbacks into the experiment, and a resumed run
    uses those copies, so it finds the trainers by name (TRAINER_NAME) when a trial ends."""

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        _release(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        _release(trial.trial_id)


def _release(trial_id: str) -> None:
    import ray

    for name in ray.util.list_named_actors():
        if name.startswith(TRAINER_NAME):
            ray.get_actor(name).release.remote(trial_id)  # not awaited: the driver's loop goes on
