"""Several machines only through Ray: a two-node cluster (ray.cluster_utils.Cluster, each
node on its own loopback address) runs trials on both nodes into one run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Ray turns a 127.0.0.1 address into the machine's own IP before connecting, which the
# loopback-only nodes do not listen on; this keeps the driver on loopback too.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

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
from search.cluster import trial_slots
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
