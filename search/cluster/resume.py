"""Continuing an interrupted run: check it is ours and unchanged, and that nothing of the
dead run still runs (a SIGKILLed driver leaves its Ray workers alive for about a minute,
holding their GPU memory and still writing checkpoints).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from rundir.files import write_text_atomic
from rundir.layout import DRIVER_PID, RAY_SESSION, RUN_CONFIG
from rundir.runconfig import CREATED_BY, DataInfo, RunConfig
from search.config import Config, ConfigError, to_dict

# The keys of a trial's result row that name a process of the run: Tune's `pid`, the trial's own,
# and under shared packing `trainer_pid`, the trainer that trained it (trainables/shared.py).
PID_KEYS = ("pid", "trainer_pid")


def resume_check(run_dir: Path, config: Config) -> DataInfo:
    """The stored data facts of a run that may be resumed with `config`; ConfigError when
    the directory is not a run of this tool, belongs to someone else, or was started with
    a different configuration (resources may change: they say where it runs, not what; but not
    resources.packing, as resolved, which says with which trainable)."""
    stored_path = run_dir / RUN_CONFIG
    if not stored_path.is_file():
        raise ConfigError(f"--resume: {run_dir} holds no {RUN_CONFIG}, so it is not a run this tool started. "
                          f"Fix: check --output and --name, or start a new run without --resume")
    if stored_path.stat().st_uid != os.getuid():
        raise ConfigError(f"--resume: {run_dir} belongs to another user; its state files are pickles and are only "
                          f"read from runs you created")
    try:
        stored = RunConfig.from_json(json.loads(stored_path.read_text()))
    except ValueError as error:  # not JSON, or not the record this tool writes
        raise ConfigError(f"--resume: {stored_path} was not written by this tool ({error})") from None
    if stored.created_by != CREATED_BY:
        raise ConfigError(f"--resume: {stored_path} was not written by this tool")
    current, recorded = to_dict(config), stored.to_json()
    differing = [key for section in current if section != "resources"
                 for key in _differences(current[section], recorded[section], section)]
    if differing:
        raise ConfigError(f"--resume: the configuration differs from the one {run_dir} was started with, at "
                          f"{', '.join(differing)}. Fix: resume with the original settings, or start a new run (--name)")
    # Tune continues an experiment only with the trainable it started with, and each packing has its own
    started_with = stored.resources.packing
    if config.resources.packing != started_with:
        raise ConfigError(f"--resume: {run_dir} was started with resources.packing={started_with}, and this resume "
                          f"would run it with {config.resources.packing}; a run continues with the packing it started "
                          f"with. Fix: --set resources.packing={started_with}")
    return stored.data_info


def _differences(current, stored, key: str) -> list[str]:
    """The dotted keys of `current` at which `stored` differs from it (lacking one included)."""
    if isinstance(current, dict) and isinstance(stored, dict):
        return [k for name in current
                for k in (_differences(current[name], stored[name], f"{key}.{name}") if name in stored
                          else [f"{key}.{name}"])]
    return [] if current == stored else [key]


def stop_leftover_workers(run_dir: Path, grace_seconds: float = 10.0) -> list[int]:
    """End the Ray worker processes that trained this run's trials and are still alive (each
    trial's own process, and under shared packing the trainers): SIGTERM, then SIGKILL after
    `grace_seconds`. Returns the pids that had to be stopped.

    A pid from a result row alone proves nothing (the machine may have given it to another
    process since), so a process is stopped only when it is a Ray worker of ours whose open
    files lie in the Ray session the interrupted driver recorded (`record_ray_session`)."""
    session = _recorded_session(run_dir)
    if session is None:
        return []
    alive = [pid for pid in _worker_pids(run_dir) if _is_worker_of(pid, session)]
    for pid in alive:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and any(_is_worker_of(pid, session) for pid in alive):
        time.sleep(0.2)
    for pid in alive:
        if _is_worker_of(pid, session):
            _signal(pid, signal.SIGKILL)
    if alive:
        print(f"stopped {len(alive)} worker process(es) left over from the interrupted run: {alive}")
    return alive


def record_ray_session(run_dir: Path) -> None:
    """Write down the name of the Ray session this driver's trials run in, for a later
    `stop_leftover_workers`: its workers keep their log files open in the session's directory,
    which bears that name on every node (wherever the node keeps its temp dir)."""
    import ray

    write_text_atomic(run_dir / RAY_SESSION, ray.get_runtime_context().get_session_name())


def _recorded_session(run_dir: Path) -> str | None:
    """The recorded session's name; a run recorded before names held the session's directory,
    whose last part is the name."""
    try:
        return Path((run_dir / RAY_SESSION).read_text().strip()).name or None
    except OSError:
        return None


def _worker_pids(run_dir: Path) -> set[int]:
    """The processes that the result rows of the run's experiments name (PID_KEYS)."""
    pids = set()
    for result in run_dir.glob("*/trial_*/result.json"):
        for line in result.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a row cut short by the kill
                continue
            pids.update(row[key] for key in PID_KEYS if isinstance(row.get(key), int))
    return pids


def _is_worker_of(pid: int, session: str) -> bool:
    """True for a live process of this user whose command line is a Ray worker's and which holds
    a file open inside a directory named `session` (every Ray worker keeps its log files in its
    session's directory)."""
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.getuid():
            return False
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if not (cmdline.startswith(b"ray::") or b"default_worker.py" in cmdline):
            return False
        return any(session in Path(os.readlink(fd)).parts for fd in Path(f"/proc/{pid}/fd").iterdir()
                   if fd.is_symlink())
    except OSError:  # gone meanwhile, or not ours to read
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def record_driver(run_dir: Path) -> None:
    write_text_atomic(run_dir / DRIVER_PID, str(os.getpid()))


def check_driver_gone(run_dir: Path) -> None:
    """Refuse to resume a run whose driver is still alive: two drivers would train the same trials."""
    try:
        pid = int((run_dir / DRIVER_PID).read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if pid != os.getpid() and b"search.run" in cmdline:
        raise ConfigError(f"--resume: the run in {run_dir} is still going (driver pid {pid}). "
                          f"Fix: stop it first (Ctrl+C or kill {pid}), then resume")
