"""A local run is local: without --address and RAY_ADDRESS it starts a Ray of its own, on
loopback, whatever a crashed head left in Ray's temp dir, and leaves nothing running, also
when SIGTERM lands while that Ray starts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import processes_using

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def ray_tmpdir():
    """A Ray temp dir of the test's own (Ray reads RAY_TMPDIR for it and for the current-cluster
    file); short, since Ray's Unix sockets live under it and their paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _port_where_nothing_listens() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_stale_current_cluster_file_is_ignored_and_the_search_runs_on_its_own_loopback_ray(
        tiny_model_dir, tmp_path, ray_tmpdir):
    # what `ray start --head` leaves behind when the head dies without `ray stop`
    (ray_tmpdir / "ray").mkdir()
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_port_where_nothing_listens()}")
    sets = [f"model.path={tiny_model_dir}", "search.module_sets=[attention_qv]", "search.ranks=[2]",
            "budget.num_samples=1", "budget.max_steps=2", "budget.eval_every=2", "budget.grace_period=2",
            "budget.batch_size=2", "data.eval_examples=2", "selection.tolerance=1", "selection.retrain=false"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    result = subprocess.run(
        [sys.executable, "-m", "search.run", "--output", str(tmp_path), "--name", "local",
         *[x for s in sets for x in ("--set", s)]],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**env, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmpdir)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Joining the Ray cluster" not in result.stdout
    assert list((ray_tmpdir / "ray").glob("session_*")), "the run's Ray did not use the test's temp dir"
    run_dir = tmp_path / "local"
    assert (run_dir / "pick.json").is_file()
    # Ray's servers listen on 127.0.0.1 only when the node's address is 127.0.0.1
    node_ips = {json.loads(line)["node_ip"] for f in (run_dir / "tune").glob("trial_*/result.json")
                for line in f.read_text().splitlines()}
    assert node_ips == {"127.0.0.1"}
    assert not _processes_left(ray_tmpdir, wait_s=10), "the run's Ray is still running"



def test_sigterm_while_the_local_ray_starts_exits_143_with_the_resume_line_and_leaves_nothing_running(
        tiny_model_dir, tmp_path, ray_tmpdir):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = ["--output", str(tmp_path), "--name", "early", "--set", f"model.path={tiny_model_dir}",
            "--set", "search.ranks=[2,4]"]
    process = subprocess.Popen([sys.executable, "-m", "search.run", *args], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env={**env, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmpdir)})
    deadline = time.monotonic() + 120
    while not list(ray_tmpdir.glob("ray/session_*/logs/gcs_server.out")) and time.monotonic() < deadline:
        time.sleep(0.05)  # ray.init has started the head's processes and waits for them
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = process.communicate(timeout=60)
    assert time.monotonic() - sent < 15
    assert process.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    # a new run's Ray starts while the model and the data are prepared: the signal lands before the run
    # directory is made, while it is, or after, and the line says which
    run_dir, command = tmp_path / "early", f"python -m search.run {' '.join(args[:-1])} 'search.ranks=[2,4]'"
    if not run_dir.exists():
        said = "nothing was written. Start again with: " + command
    elif not (run_dir / "run_config.json").exists():
        said = f"the run directory {run_dir} was being made and is incomplete. Start again with: {command} --overwrite"
    else:
        said = (f"the run so far is saved in {run_dir} (finished trials, and unfinished ones at their last checkpoint). "
                f"Resume with: {command} --resume")
    assert err.strip().splitlines()[-1] == f"stopped by SIGTERM: {said}"
    assert not _processes_left(ray_tmpdir, wait_s=10), "the run's Ray is still running"

def _processes_left(path: Path, wait_s: float) -> list[int]:
    """PIDs with a file open under `path`, once none are left or after wait_s. Ray's processes
    all keep logs open in its session dir; their command lines are rewritten (`ray::IDLE`)."""
    deadline = time.monotonic() + wait_s
    while True:
        pids = processes_using(path)
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.5)


def _run_alone(script: str, ray_tmpdir: Path) -> str:
    """`script` run by a fresh interpreter with a Ray temp dir of its own and no address to join:
    its output, once it exited 0 and left no Ray process running."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=180,
                            env={**env, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmpdir)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert not _processes_left(ray_tmpdir, wait_s=10), "the test's Ray is still running"
    return result.stdout


def test_the_loopback_switch_is_gone_from_the_process_once_its_local_ray_runs_on_loopback(ray_tmpdir):
    """A `ray start --address` launched later from the same process (a notebook, a test) refuses to
    join a cluster while the switch is in its environment."""
    script = (
        "import os\n"
        "from search.cluster.connect import LOOPBACK_ENV, connect, keep_local_ray_on_loopback\n"
        "keep_local_ray_on_loopback()  # before ray is imported, as search.run does\n"
        "import ray\n"
        "assert os.environ[LOOPBACK_ENV] == '0'\n"
        "connect(None, num_cpus=1)\n"
        "print('after:', os.environ.get(LOOPBACK_ENV), {n['NodeManagerAddress'] for n in ray.nodes()})\n"
        "ray.shutdown()\n")
    assert "after: None {'127.0.0.1'}" in _run_alone(script, ray_tmpdir)


def test_a_local_ray_shut_down_without_waiting_goes_down_in_its_thread_while_the_caller_goes_on(ray_tmpdir):
    """A search that ended analyses while its Ray shuts down (search/recipe.py): `shut_down(wait=False)`
    returns while Ray's shutdown is still held here, and `join` returns once Ray is down."""
    script = (
        "import threading\n"
        "from search.cluster.connect import LocalRayStart\n"
        "start = LocalRayStart()\n"
        "assert start.wait()\n"
        "import ray\n"
        "release, real = threading.Event(), ray.shutdown\n"
        "def held():\n"
        "    release.wait()\n"
        "    real()\n"
        "ray.shutdown = held\n"
        "timer = threading.Timer(60, release.set)  # a shut_down that waits fails the test, not hangs it\n"
        "timer.daemon = True\n"
        "timer.start()\n"
        "start.shut_down(wait=False)\n"
        "print('returned with ray up:', ray.is_initialized())\n"
        "release.set()\n"
        "start.join()\n"
        "print('joined with ray up:', ray.is_initialized())\n")
    assert "returned with ray up: True\njoined with ray up: False" in _run_alone(script, ray_tmpdir)
