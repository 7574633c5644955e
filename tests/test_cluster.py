"""Several machines only through Ray: a two-node cluster (ray.cluster_utils.Cluster, each
node on its own loopback address) runs trials on both nodes into one run directory; joining
names where the address came from, and a head that does not answer is bad input within seconds."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import LOOPBACK

ROOT = Path(__file__).resolve().parent.parent

DRIVER = """
import sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                        "include_dashboard": False})
cluster.add_node(num_cpus=1, node_ip_address="127.0.0.2")
cluster.wait_for_nodes()
from search.run import main
code = main(["--address", cluster.address, *sys.argv[1:]])
import ray
ray.shutdown()
cluster.shutdown()
sys.exit(code)
"""


def test_trials_run_on_both_nodes_and_land_in_one_run_directory(tiny_model_dir, tmp_path):
    sets = [f"model.path={tiny_model_dir}", "search.module_sets=[attention_qv,all_linear]", "search.ranks=[2,4]",
            "budget.num_samples=4", "budget.max_steps=4", "budget.eval_every=2", "budget.grace_period=2",
            "budget.batch_size=4", "data.eval_examples=4", "selection.tolerance=1"]
    args = ["--output", str(tmp_path), "--name", "cluster", *[x for s in sets for x in ("--set", s)]]
    result = subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **LOOPBACK}, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    run_dir = tmp_path / "cluster"
    nodes = set()
    for result_file in (run_dir / "tune").glob("trial_*/result.json"):
        nodes.update(json.loads(line)["node_ip"] for line in result_file.read_text().splitlines())
    assert nodes == {"127.0.0.1", "127.0.0.2"}
    origins = [json.loads(p.read_text())["origin"] for p in (run_dir / "tune").glob("trial_*/params.json")]
    assert sum(origin in ("search", "prior") for origin in origins) == 4
    assert (run_dir / "pick.json").is_file()


def test_more_gpus_per_trial_than_any_node_has_is_refused_with_exit_2(tiny_model_dir, tmp_path):
    sets = [f"model.path={tiny_model_dir}", "search.ranks=[2,4]", "resources.gpus_per_trial=2"]
    args = ["--output", str(tmp_path), "--name", "too-big", *[x for s in sets for x in ("--set", s)]]
    result = subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **LOOPBACK}, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "resources.gpus_per_trial is 2.0 but the largest node of the Ray cluster has 0 GPU(s)" in result.stderr
    assert not (tmp_path / "too-big").exists()


SLOTS = """
import json
import ray
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1, "node_ip_address": "127.0.0.1",
                                                        "include_dashboard": False})
cluster.add_node(num_cpus=4, num_gpus=1, node_ip_address="127.0.0.2")
cluster.wait_for_nodes()
ray.init(address=cluster.address)
from search.cluster.connect import trial_slots
print(json.dumps([trial_slots(g, c) for g, c in [(0.25, 1), (0.5, 1), (0.125, 2), (2, 1), (0, 1), (0, 4), (0, 8)]]))
ray.shutdown()
cluster.shutdown()
"""


def test_trial_slots_count_the_whole_clusters_gpus_and_cpus(tmp_path):
    # two nodes: 2 CPUs + 1 GPU and 4 CPUs + 1 GPU (logical GPUs: Ray only counts them)
    result = subprocess.run([sys.executable, "-c", SLOTS], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **LOOPBACK}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    slots = json.loads(result.stdout.strip().splitlines()[-1])
    # GPU share: min(GPUs / share, CPUs / cpus_per_trial); CPU trials: CPUs / cpus_per_trial, at least 1
    assert slots == [6, 4, 3, 1, 6, 1, 1]


# Joining: where the address comes from, and a head that does not answer is bad input within seconds.

def test_the_address_comes_from_the_flag_or_from_ray_address_and_none_means_a_local_ray(monkeypatch):
    from search.cluster.connect import ClusterAddress, resolve_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) is None
    assert resolve_address("10.0.0.1:6379") == ClusterAddress("10.0.0.1:6379", "--address")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert resolve_address("10.0.0.2:6379") == ClusterAddress("10.0.0.2:6379", "RAY_ADDRESS")  # the CLI's default
    assert resolve_address("10.0.0.1:6379") == ClusterAddress("10.0.0.1:6379", "--address")
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert resolve_address("") is None


@pytest.fixture
def silent_head():
    """A port that accepts connections (the kernel does, into the backlog) and never answers,
    like a head that is stopped or hung."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def not_a_head():
    """A port that answers every connection with something other than gRPC."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)

    def serve():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def test_a_head_that_does_not_answer_is_refused_naming_address_source_and_wait(silent_head):
    from search.cluster.connect import ClusterAddress, check_head_answers
    from search.config import ConfigError

    started = time.monotonic()
    with pytest.raises(ConfigError, match=rf"head at {silent_head}, from RAY_ADDRESS, did not answer within 0.5 s.*"
                                          r"Fix: .*unset RAY_ADDRESS to run on a local Ray"):
        check_head_answers(ClusterAddress(silent_head, "RAY_ADDRESS"), timeout_s=0.5)
    assert time.monotonic() - started < 2


def test_something_other_than_a_ray_head_is_refused(not_a_head):
    from search.cluster.connect import ClusterAddress, check_head_answers
    from search.config import ConfigError

    with pytest.raises(ConfigError, match=rf"head at {not_a_head}, from --address, answered, but not as a Ray head"):
        check_head_answers(ClusterAddress(not_a_head, "--address"), timeout_s=5)


@pytest.mark.parametrize("address", ["6379", "head-node", "10.0.0.1:port", ":6379"])
def test_an_address_that_is_not_host_port_is_refused_listing_the_allowed_forms(address):
    from search.cluster.connect import ClusterAddress, check_head_answers
    from search.config import ConfigError

    with pytest.raises(ConfigError, match=rf"--address is '{address}'; allowed: HOST:PORT .*, ray://HOST:PORT or auto"):
        check_head_answers(ClusterAddress(address, "--address"), timeout_s=1)


def _search_cli(args: list[str], env: dict[str, str] | None = None, driver: str | None = None) -> subprocess.Popen:
    sets = ["--name", "joined", "--set", "search.ranks=[2,4]"]
    command = ["-c", driver, *args, *sets] if driver else ["-m", "search.run", *args, *sets]
    return subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_an_address_where_nothing_listens_exits_2_within_15_s_with_one_line(tiny_model_dir, tmp_path):
    started = time.monotonic()
    process = _search_cli(["--address", "127.0.0.1:1", "--output", str(tmp_path), "--set", f"model.path={tiny_model_dir}"],
                          env={"RAY_ADDRESS": ""})
    out, err = process.communicate(timeout=60)
    seconds = time.monotonic() - started
    assert process.returncode == 2, err[-3000:]
    assert seconds < 15
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        "error: the Ray head at 127.0.0.1:1, from --address, cannot be reached (Connection refused). Fix: ")
    assert "Joining the Ray cluster at 127.0.0.1:1 (from --address)" in out
    assert not list(tmp_path.iterdir())


def test_ray_address_is_joined_and_said_so_not_ignored(tiny_model_dir, tmp_path):
    process = _search_cli(["--output", str(tmp_path), "--set", f"model.path={tiny_model_dir}"],
                          env={"RAY_ADDRESS": "127.0.0.1:1"})
    out, err = process.communicate(timeout=60)
    assert process.returncode == 2, err[-3000:]
    assert "Joining the Ray cluster at 127.0.0.1:1 (from RAY_ADDRESS; unset it to run on a local Ray)" in out
    assert "from RAY_ADDRESS, cannot be reached" in err and "Fix: " in err


# The head's deadline is long here, so that only the signal can end the wait.
PATIENT = """
import sys
import search.cluster.connect
search.cluster.connect.CONNECT_TIMEOUT_S = 120
from search.run import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_while_joining_a_head_that_never_answers_exits_143_within_10_s(
        tiny_model_dir, silent_head, tmp_path):
    args = ["--address", silent_head, "--output", str(tmp_path), "--set", f"model.path={tiny_model_dir}"]
    process = _search_cli(args, driver=PATIENT)
    line = "-"
    while line and not line.startswith(f"Joining the Ray cluster at {silent_head}"):
        line = process.stdout.readline()
    assert line, process.stderr.read()[-3000:]
    time.sleep(0.5)  # into the wait for the head's answer
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    out, err = process.communicate(timeout=60)
    assert time.monotonic() - sent < 10
    assert process.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"stopped by SIGTERM: nothing was written (it was joining the Ray cluster at {silent_head}). Start again "
        f"with: python -m search.run --address {silent_head} --output {tmp_path} --set model.path={tiny_model_dir} "
        f"--name joined --set 'search.ranks=[2,4]'")
    assert not list(tmp_path.iterdir())
