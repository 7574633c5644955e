"""Joining Ray: an existing cluster by address, or a local one that listens on loopback only."""

from __future__ import annotations

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
