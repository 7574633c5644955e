"""A resume stops the workers its interrupted driver left behind, and only those: a pid in a
result row may belong to another process by now."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from helpers import alive
from rundir.layout import RAY_SESSION
from search.cluster.resume import stop_leftover_workers


def _run_dir(tmp_path: Path, pids: list[int], session: str) -> Path:
    trial = tmp_path / "run" / "tune" / "trial_a"
    trial.mkdir(parents=True)
    (trial / "result.json").write_text("".join(json.dumps({"step": 3, "pid": pid}) + "\n" for pid in pids))
    (tmp_path / "run" / RAY_SESSION).write_text(session)
    return tmp_path / "run"


@ray.remote(num_cpus=0)
class Sleeper:
    def pid(self) -> int:
        return os.getpid()


@pytest.fixture
def worker():
    started = not ray.is_initialized()  # the session's local Ray (conftest) may be up already
    if started:
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        sleeper = Sleeper.remote()
        yield ray.get(sleeper.pid.remote()), ray.get_runtime_context().get_session_name()
    finally:
        if started:
            ray.shutdown()


def _stopped(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


def test_a_worker_of_the_recorded_session_is_stopped(worker, tmp_path):
    pid, session = worker
    stopped = stop_leftover_workers(_run_dir(tmp_path, [pid], session), grace_seconds=5)
    assert stopped == [pid]
    assert _stopped(pid)


def test_a_session_recorded_as_its_directory_by_an_earlier_version_is_found_by_its_name(worker, tmp_path):
    pid, session = worker
    assert stop_leftover_workers(_run_dir(tmp_path, [pid], f"/tmp/ray/{session}"), grace_seconds=5) == [pid]
    assert _stopped(pid)


def test_a_worker_of_another_session_is_left_alone(worker, tmp_path):
    pid, _ = worker
    assert stop_leftover_workers(_run_dir(tmp_path, [pid], "session_2000-01-01_00-00-00_000000_1"), grace_seconds=1) == []
    assert alive(pid)


def test_a_process_that_merely_has_a_recorded_pid_is_left_alone(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert stop_leftover_workers(_run_dir(tmp_path, [other.pid], str(tmp_path)), grace_seconds=1) == []
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
