"""The cluster path as users take it: a head from `ray start --head` that requires a token (Ray's
default where the machine has one) and a second node from `ray start --address`, real processes
with their own temp dirs and ports, joined by `python -m search.run --address`. The faster
`ray.cluster_utils` tests in test_cluster.py never go through `ray start` nor token auth."""

from __future__ import annotations

import json
import os
import secrets
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
RAY = str(Path(sys.executable).parent / "ray")
# Ray turns a 127.0.0.1 address into the machine's own IP before connecting, where no node of
# this cluster listens; this keeps the driver on loopback too (test_cluster.py does the same).
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
SEARCH = ["search.ranks=[2,4]", "budget.num_samples=4", "budget.max_steps=4", "budget.eval_every=2",
          "budget.grace_period=2", "budget.batch_size=4", "data.eval_examples=4", "selection.tolerance=1"]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _node_ports(ip: str, avoid: tuple[int, ...] = ()) -> list[str]:
    """Every port a node listens on, free ones, so that nothing meets another Ray on this machine;
    none of them, nor any of `avoid`, inside the worker ports' range (Ray refuses a node whose
    components share a port, and free ports come close together)."""
    while True:
        manager, objects, agent, agent_grpc, runtime_env, metrics, workers = _free_ports(7)
        if not any(workers <= port <= workers + 40 for port in (manager, objects, agent, agent_grpc, runtime_env,
                                                                  metrics, *avoid)):
            break
    return [f"--node-ip-address={ip}", f"--node-manager-port={manager}", f"--object-manager-port={objects}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
            # Ray takes worker ports from a range; the first one free is a start, and Ray skips any taken
            f"--min-worker-port={workers}", f"--max-worker-port={min(workers + 40, 65535)}"]


def _stop(groups: list[int], temp_dirs: list[Path]) -> None:
    """Stop the nodes this test started, and nothing else: `ray stop` would stop every Ray of the
    user. The daemons share the process group of their `ray start`; a worker left behind by its
    raylet still has files open in the node's temp dir."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        for group in groups:
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while processes_using(*temp_dirs) and time.monotonic() < deadline:
            time.sleep(0.5)
        if not processes_using(*temp_dirs):
            return
        if sig is signal.SIGKILL:
            for pid in processes_using(*temp_dirs):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_start_cluster():
    """A head (127.0.0.1, resource node_head) and a second node (127.0.0.2, resource node_second),
    one CPU each, started as a user would, with a token of their own (RAY_AUTH_TOKEN_PATH, so the
    user's ~/.ray is untouched). Yields the head's address and the token file."""
    root = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))  # short: Ray's socket paths are limited to 107 bytes
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    # as a user's shell has them: without what an in-process search.run sets for its local Ray (the loopback
    # switch, which makes `ray start --address` refuse to join), and without any cluster or token of theirs
    env = {key: value for key, value in os.environ.items()
           if key not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", *LOOPBACK)}
    env |= {"RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
    head_port = _free_ports(1)[0]
    nodes = [  # the head finds the token and turns token auth on by itself; other nodes must be told
        ({}, ["--head", f"--port={head_port}", "--include-dashboard=false", *_node_ports("127.0.0.1", (head_port,)),
              '--resources={"node_head": 1}']),
        ({"RAY_AUTH_MODE": "token"}, [f"--address=127.0.0.1:{head_port}", *_node_ports("127.0.0.2", (head_port,)),
                                      '--resources={"node_second": 1}']),
    ]
    groups, temp_dirs = [], []
    try:
        for i, (node_env, args) in enumerate(nodes):
            temp_dirs.append(root / f"n{i}")
            start = subprocess.Popen([RAY, "start", *args, "--num-cpus=1", f"--temp-dir={temp_dirs[-1]}",
                                      "--disable-usage-stats"], env=env | node_env, start_new_session=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            groups.append(start.pid)
            out, _ = start.communicate(timeout=120)
            assert start.returncode == 0, out[-3000:]
        yield {"address": f"127.0.0.1:{head_port}", "token": token, "env": env}
    finally:
        _stop(groups, temp_dirs)
        assert not processes_using(*temp_dirs), "a node this test started is still running"
        shutil.rmtree(root, ignore_errors=True)


def _search(address: str, env: dict[str, str], args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.run", "--address", address, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
                          env=env | {"PYTHONPATH": str(ROOT), **LOOPBACK})


def test_a_search_joins_a_ray_start_cluster_with_its_token_and_runs_trials_on_both_nodes(
        ray_start_cluster, tiny_model_dir, tmp_path):
    sets = [f"model.path={tiny_model_dir}", *SEARCH]
    args = ["--output", str(tmp_path), "--name", "joined", *[x for s in sets for x in ("--set", s)]]
    assert "RAY_AUTH_MODE" not in ray_start_cluster["env"]  # the run turns token mode on itself
    result = _search(ray_start_cluster["address"], ray_start_cluster["env"], args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    run_dir = tmp_path / "joined"
    nodes = set()
    for result_file in (run_dir / "tune").glob("trial_*/result.json"):
        nodes.update(json.loads(line)["node_ip"] for line in result_file.read_text().splitlines())
    # the second node keeps 127.0.0.2; Ray reports the head's 127.0.0.1 as the machine's own address
    assert len(nodes) == 2 and "127.0.0.2" in nodes
    origins = [json.loads(p.read_text())["origin"] for p in (run_dir / "tune").glob("trial_*/params.json")]
    assert sum(origin in ("search", "prior") for origin in origins) == 4
    assert (run_dir / "pick.json").is_file()


def test_joining_a_head_that_requires_a_token_without_one_exits_2_naming_where_the_head_keeps_it(
        ray_start_cluster, tiny_model_dir, tmp_path):
    missing = tmp_path / "no-token"
    started = time.monotonic()
    result = _search(ray_start_cluster["address"], ray_start_cluster["env"] | {"RAY_AUTH_TOKEN_PATH": str(missing)},
                     ["--output", str(tmp_path / "out"), "--set", f"model.path={tiny_model_dir}",
                      "--set", "search.ranks=[2,4]"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert time.monotonic() - started < 15
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: the Ray head at {ray_start_cluster['address']}, from --address, requires an auth token and this "
        f"machine has none (RAY_AUTH_TOKEN is unset and {missing} does not exist). Fix: copy the token from the head "
        f"node (`ray get-auth-token` there prints it; `ray start --head` keeps it in ~/.ray/auth_token) to {missing} "
        f"here, or export RAY_AUTH_TOKEN=<that token>, or leave --address out to run on a local Ray")
    assert not (tmp_path / "out").exists()


def test_a_token_the_head_refuses_exits_2_saying_where_it_came_from(ray_start_cluster, tiny_model_dir, tmp_path):
    result = _search(ray_start_cluster["address"], ray_start_cluster["env"] | {"RAY_AUTH_TOKEN": secrets.token_hex(32)},
                     ["--output", str(tmp_path / "out"), "--set", f"model.path={tiny_model_dir}",
                      "--set", "search.ranks=[2,4]"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: the Ray head at {ray_start_cluster['address']}, from --address, refused this machine's auth token "
        f"(from RAY_AUTH_TOKEN): it is not the head's. Fix: ")
    assert not (tmp_path / "out").exists()
