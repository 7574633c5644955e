"""Joining Ray: an existing cluster by address, or a local one that listens on loopback only."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path


def connect(address: str | None, num_cpus: int | None = None) -> bool:
    """Start or join Ray unless this process already has; True when it was started here
    (the caller then shuts it down). A local Ray gets no dashboard and loopback listeners."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    tighten_auth_token()
    return True


def tighten_auth_token() -> None:
    """Ray 2.60 writes its cluster auth token readable by every user of the machine; make it owner-only."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        if path.stat().st_uid == os.getuid() and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            path.chmod(0o600)
    except FileNotFoundError:
        pass


def check_cluster_gpus(gpus_per_trial: float) -> None:
    """A trial asking for more GPUs than any node has would wait forever: bad input."""
    import ray

    from search.config import ConfigError

    largest = max((node["Resources"].get("GPU", 0) for node in ray.nodes() if node["Alive"]), default=0)
    if gpus_per_trial > largest:
        raise ConfigError(f"resources.gpus_per_trial is {gpus_per_trial} but the largest node of the Ray cluster has "
                          f"{largest:g} GPU(s); no trial could ever start. Fix: lower it, or add GPU nodes")


def trial_slots(gpus_per_trial: float, cpus_per_trial: int) -> int:
    """How many trials the Ray cluster can run at once, from its total resources: GPU slots
    where trials take GPUs (a node's CPUs permitting), else CPU slots. At least 1."""
    import ray

    total = ray.cluster_resources()
    slots = math.floor(total.get("CPU", 1) / cpus_per_trial + 1e-9)
    if gpus_per_trial > 0:
        slots = min(slots, math.floor(total.get("GPU", 0) / gpus_per_trial + 1e-9))
    return max(1, slots)
