"""The few things the driver needs from Ray that Ray offers no public API for, in one place,
for the one Ray version they were written against (tests/test_ray_contract.py pins each).

Joining a cluster started by `ray start --head` needs them: `ray.init` resolves the address
"auto" and speaks token auth only inside its own connect, which waits minutes on a head that
refuses it and never says why, so the driver resolves and checks first, as `ray.init` would.
And Ray's driver prints the errors its cluster publishes for the job ("(raylet) A worker died
...") to the console from a thread of its own, whatever `log_to_driver` says; only the switch
Ray's debugger uses stops that (`error_messages_off_the_console`). And Tune's run imports, on
its way to the first trial, modules that the driver can import while Ray starts
(`import_what_tune_fit_imports`).
Importing this module with another Ray is an error that names the version it was written for.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager

import ray

RAY_VERSION = "2.60.0"

if ray.__version__ != RAY_VERSION:
    raise ImportError(f"search/cluster/ray_contract.py was written for Ray {RAY_VERSION}, and Ray {ray.__version__} is "
                      f"installed: the Ray internals it uses may differ. Fix: pip install ray=={RAY_VERSION}, or "
                      f"check each function against the new Ray (tests/test_ray_contract.py) and update "
                      f"RAY_VERSION")

import ray._private.worker as ray_worker
from ray._private.authentication.authentication_token_setup import _enable_token_auth
from ray._private.services import canonicalize_bootstrap_address_or_die
from ray._raylet import AuthenticationTokenLoader, GcsClient
from ray.exceptions import AuthenticationError

# What `Tuner.fit` imports before it starts a trial, where the run passes callbacks: its usage
# tag imports every built-in logger callback's module to count them (and with them mlflow and
# wandb, where installed: 1.5-2.1 s on a 2-core CPU), and its TensorBoard logger tensorboardX.
TUNE_FIT_IMPORTS = ("ray.air.integrations.comet", "ray.air.integrations.mlflow", "ray.air.integrations.wandb",
                    "ray.tune.logger.aim", "tensorboardX")


def import_what_tune_fit_imports() -> None:
    """Import `TUNE_FIT_IMPORTS` now, while the driver waits for Ray's start, so that the run's
    `Tuner.fit` does not import them between its start and its first trial's. A module that
    fails to import is left to fail where Tune imports it, as it would without this."""
    for name in TUNE_FIT_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def auto_address() -> str:
    """The HOST:PORT of the head that `ray.init(address="auto")` would join: RAY_ADDRESS, then
    the cluster Ray's temp dir names, then a GCS process found by `ps`. ConnectionError (Ray's
    own message) when there is none, or more than one."""
    return canonicalize_bootstrap_address_or_die("auto")


def head_refuses_this_client(address: str) -> bool:
    """Whether the GCS at `address` (HOST:PORT) turns this process away for its auth (a token
    missing or not the head's). Call it once a gRPC server answers there: it answers within
    milliseconds then."""
    try:
        GcsClient(address=address)
    except AuthenticationError:
        return True
    return False


def has_auth_token() -> bool:
    """Whether Ray finds an auth token for this process (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token), whatever RAY_AUTH_MODE says. False where RAY_AUTH_TOKEN_PATH names no
    file (Ray raises there)."""
    try:
        return AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)
    except AuthenticationError:
        return False


def send_auth_token() -> None:
    """Token auth for this process from now on, and for the processes it starts, as a local
    `ray.init` turns it on: RAY_AUTH_MODE=token, and Ray's config, which this process read once
    at import, read again."""
    _enable_token_auth()


@contextmanager
def error_messages_off_the_console() -> Iterator[None]:
    """Inside this block, the driver prints none of the error messages Ray publishes for the job,
    nor (were `log_to_driver` on) its workers' output: the console keeps the run's own lines, and
    each trial's failure reaches the run's files through Tune. Ray's switch, put back after."""
    before = ray_worker._worker_logs_enabled
    ray_worker._worker_logs_enabled = False
    try:
        yield
    finally:
        ray_worker._worker_logs_enabled = before
