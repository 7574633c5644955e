"""Every environment variable the driver sets goes through here: `setenv` remembers what was
there before, and `restore` (called when `search.run.main` returns) puts it all back, so a
process that runs the command twice, a notebook or a test, starts the second run as it started
the first. Ray, Tune, MLflow and W&B read these settings only from the environment."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

# Tune writes its experiment state at most every second (its default: 10 s), so a killed run
# loses at most a second of bookkeeping; it warns when that is frequent, which here is on purpose.
TUNE_STATE = {"TUNE_GLOBAL_CHECKPOINT_S": "1", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}
# Ctrl+C is the run's own (search.run.GracefulStop), which asks Tune to stop through SIGUSR1.
TUNE_SIGINT = {"TUNE_DISABLE_SIGINT_HANDLER": "1"}
# Tune's older output engine prints nothing of its own at verbose=1 but what the run's
# progress reporter prints; the newer one prints its boxes at any verbosity.
TUNE_PLAIN_OUTPUT = {"RAY_AIR_NEW_OUTPUT": "0"}


def pending_trials(slots: int) -> dict[str, str]:
    """Tune keeps one trial pending at a time for a searcher that is not wrapped in its own
    ConcurrencyLimiter (as StagedSearch is not), so `slots` free slots would fill one after another,
    each waiting for the last one's worker; with as many pending as slots, all start at once."""
    return {"TUNE_MAX_PENDING_TRIALS_PG": str(slots)}


_before: dict[str, str | None] = {}


def setenv(name: str, value: str, *, keep_users: bool = False) -> bool:
    """Set `name` to `value` for this process and the processes it starts; with `keep_users`, a
    value already set is left alone. True when this call set it."""
    if keep_users and name in os.environ:
        return False
    _before.setdefault(name, os.environ.get(name))
    os.environ[name] = value
    return True


def setenvs(values: Mapping[str, str], *, keep_users: bool = False) -> None:
    for name, value in values.items():
        setenv(name, value, keep_users=keep_users)


def put_back(name: str) -> None:
    """Give `name` back the value it had before this module first set it."""
    if name in _before:
        _set_or_unset(name, _before.pop(name))


@contextmanager
def temporarily(values: Mapping[str, str]) -> Iterator[None]:
    """`values`, except where the user set one, for the block only."""
    set_here = [name for name, value in values.items() if setenv(name, value, keep_users=True)]
    try:
        yield
    finally:
        for name in set_here:
            put_back(name)


def restore() -> None:
    """Every variable this module set gets back the value it had before."""
    for name in list(_before):
        put_back(name)


def _set_or_unset(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
