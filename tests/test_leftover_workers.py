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
from search.resume import stop_leftover_workers


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
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        sleeper = Sleeper.remote()
        yield ray.get(sleeper.pid.remote()), ray._private.worker._global_node.get_session_dir_path()
    finally:
        ray.shutdown()


def test_a_worker_of_the_recorded_session_is_stopped(worker, tmp_path):
    pid, session = worker
    stopped = stop_leftover_workers(_run_dir(tmp_path, [pid], session), grace_seconds=5)
    assert stopped == [pid]
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid)


def test_a_worker_of_another_session_is_left_alone(worker, tmp_path):
    pid, _ = worker
    assert stop_leftover_workers(_run_dir(tmp_path, [pid], "/tmp/ray/session_of_another_run"), grace_seconds=1) == []
    assert alive(pid)


def test_a_process_that_merely_has_a_recorded_pid_is_left_alone(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert stop_leftover_workers(_run_dir(tmp_path, [other.pid], str(tmp_path)), grace_seconds=1) == []
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
