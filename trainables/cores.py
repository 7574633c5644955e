"""On CPU, a trial's torch threads: the share of its node's CPUs that the trials running there
leave it.

Ray gives each CPU trial `resources.cpus_per_trial` CPUs, so the embedded default runs two
trials at once on a 2-core machine. Its last stages often run one trial alone (the seeds that
tell the pick from a close configuration come one after another), and the other core then
sits idle: on that machine a step of the default takes 1.76 s with two threads against 2.81 s
with one, and 7.2 s with two threads in each of two trials at once (OpenMP's threads spin for a
core the other trial holds; bench/cpu_step.py, bench/results/cpu_step.json). So the share follows the trials
that run: each registers its process in one folder of the node's temporary directory, and
before each step and each evaluation takes the node's CPUs (as Ray counts them) divided by the
live registered processes, never fewer than its own `cpus_per_trial`. A process that died
without leaving is seen as gone: its pid no longer exists (a pid the system gave to another
process since only lowers the share). Torch computes the same values with
any number of threads here (tests/test_cores.py).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

FOLDER = f"lora-search-cpu-trials-{getattr(os, 'getuid', lambda: 0)()}"  # one per user: each may write it


class CoreShare:
    """A trial's registration on its node; `apply()` sets torch's threads to its share now."""

    def __init__(self, own_cpus: int, node_cpus: int, folder: Path | None = None):
        self.own, self.node = own_cpus, max(node_cpus, own_cpus)
        self.folder = folder or Path(tempfile.gettempdir()) / FOLDER
        self.folder.mkdir(parents=True, exist_ok=True)
        self.entry = self.folder / str(os.getpid())
        self.entry.touch()

    def threads(self) -> int:
        return max(self.own, self.node // max(1, len(_live(self.folder))))

    def apply(self) -> int:
        threads = self.threads()
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads

    def close(self) -> None:
        self.entry.unlink(missing_ok=True)
        torch.set_num_threads(self.own)


def node_cpus(default: int) -> int:
    """The CPUs Ray counts on this process's node (a user's `ray start --num-cpus` included);
    `default` outside Ray."""
    import ray

    if not ray.is_initialized():
        return default
    here = ray.get_runtime_context().get_node_id()
    node = next((node for node in ray.nodes() if node.get("NodeID") == here), None)
    return int(node["Resources"].get("CPU", default)) if node else default


def _live(folder: Path) -> list[int]:
    """The pids registered in `folder` whose processes still exist; the others' entries removed."""
    live = []
    for entry in folder.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            entry.unlink(missing_ok=True)
            continue
        live.append(pid)
    return live
