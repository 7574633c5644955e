"""A run kept in object storage: `--output s3://...` against a real S3 protocol server
(moto's, on loopback: S3 itself cannot be reached from here). Tune writes the experiments
there from the workers, the driver uploads its own files, and a resume from a machine
that has no local copy pulls the run and ends with the same answer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from rundir.files import is_uri, join_uri
from rundir.location import LocationError, RunLocation, locate

ROOT = Path(__file__).resolve().parent.parent
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """An S3 endpoint on loopback with the bucket `runs`; yields the URI options."""
    import boto3
    from moto.server import ThreadedMotoServer

    saved = {key: os.environ.get(key) for key in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="runs")
    yield f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _objects(uri: str) -> dict[str, bytes]:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as stream:
                out[info.path[len(path) + 1:]] = stream.read()
    return out


def _search(tiny_model_dir, output: str, name: str, cache: Path, *extra: str, driver: list[str] | None = None
            ) -> subprocess.CompletedProcess:
    """search.run (or `driver`, a command given the same arguments) on a small search."""
    sets = [f"model.path={tiny_model_dir}", "search.module_sets=[attention_qv,all_linear]", "search.ranks=[2,4]",
            "search.dropout=[0.0,0.0]", "budget.num_samples=3", "budget.max_steps=6", "budget.eval_every=3",
            "budget.grace_period=3", "budget.batch_size=4", "data.eval_examples=8",
            "resources.max_concurrent_trials=1", "selection.retrain=true"]
    args = ["--output", output, "--name", name, *[x for s in sets for x in ("--set", s)], *extra]
    env = {**os.environ, **CREDENTIALS, "PYTHONPATH": str(ROOT), "LORA_SEARCH_CACHE": str(cache)}
    return subprocess.run([*(driver or [sys.executable, "-m", "search.run"]), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def s3_run(s3, tiny_model_dir, tmp_path_factory):
    output = f"s3://runs/team?{s3}"
    cache = tmp_path_factory.mktemp("driver-cache")
    result = _search(tiny_model_dir, output, "first", cache)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return output, cache, join_uri(output, "first")


def test_the_whole_run_lands_in_the_bucket(s3_run):
    _, _, run_uri = s3_run
    objects = _objects(run_uri)
    for name in ("run_config.json", "trials.csv", "pick.json", "report.md", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "asha_state.pkl"):
        assert name in objects, sorted(objects)
    assert any(name.startswith("data/search_train/") for name in objects)
    assert any(name.startswith("tune/experiment_state-") for name in objects)
    trial_results = [name for name in objects if name.startswith("tune/trial_") and name.endswith("/result.json")]
    params = [json.loads(objects[name.replace("result.json", "params.json")]) for name in trial_results]
    assert sum(p["origin"] in ("search", "prior") for p in params) == 3  # and the stages' trials, same experiment
    promoted = [p for p in params if p["origin"] == "promoted"]
    assert all(p["start_from"].startswith("s3://runs/team/first/tune/trial_") for p in promoted)
    assert any(name.startswith("tune/trial_") and "/checkpoint_" in name for name in objects)  # written by workers
    assert "driver.pid" not in objects  # a pid means nothing on another machine


def test_the_bucket_and_the_drivers_copy_agree(s3_run):
    output, cache, run_uri = s3_run
    local = locate(output, "first", cache).local
    objects = _objects(run_uri)
    assert objects["trials.csv"] == (local / "trials.csv").read_bytes()
    assert objects["pick.json"] == (local / "pick.json").read_bytes()
    # trial checkpoints stay in the bucket (only their directories are made locally);
    # the retrained pick's are downloaded, and its weights exported from them
    remote_checkpoints = {name[: name.index("/", name.index("/checkpoint_") + 1)] for name in objects
                          if name.startswith("tune/") and "/checkpoint_" in name}
    assert remote_checkpoints and all((local / c).is_dir() and not any((local / c).rglob("*.safetensors"))
                                      for c in remote_checkpoints)
    assert list((local / "retrain").rglob("checkpoint_*/adapter/adapter_model.safetensors"))
    assert (local / "adapter" / "adapter_model.safetensors").read_bytes() == objects["adapter/adapter_model.safetensors"]
    trials = pd.read_csv(local / "trials.csv")
    assert len(trials[trials.origin.isin(["search", "prior"])]) == 3 and (trials.status != "failed").all()


def test_a_resume_from_another_machine_pulls_the_run_and_trains_nothing_again(s3_run, tiny_model_dir, tmp_path):
    output, _, run_uri = s3_run
    before = _objects(run_uri)
    other_machine = tmp_path / "other-cache"  # no local copy of the run at all
    result = _search(tiny_model_dir, output, "first", other_machine, "--resume")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    after = _objects(run_uri)
    results = [name for name in before if name.endswith("/result.json")]
    assert {name: after[name] for name in results} == {name: before[name] for name in results}
    assert json.loads(after["pick.json"])["trial_id"] == json.loads(before["pick.json"])["trial_id"]
    local = locate(output, "first", other_machine).local
    assert (local / "report.md").is_file()
    assert not (local / "data").exists()  # the trials read the data at the URI; the driver needs no copy


def test_a_new_run_over_a_run_in_the_bucket_is_refused_and_nothing_is_touched(s3_run, tiny_model_dir, tmp_path):
    output, _, run_uri = s3_run
    before = _objects(run_uri)
    result = _search(tiny_model_dir, output, "first", tmp_path / "cache")
    assert result.returncode == 2
    assert "already exists" in result.stderr and "Traceback" not in result.stderr
    assert _objects(run_uri) == before


def test_a_bucket_that_does_not_exist_is_an_input_error(s3, tiny_model_dir, tmp_path):
    result = _search(tiny_model_dir, f"s3://no-such-bucket/x?{s3}", "r", tmp_path / "cache")
    assert result.returncode == 2
    assert "not writable" in result.stderr and "no-such-bucket" in result.stderr and "Traceback" not in result.stderr


def test_uri_options_stay_at_the_end_when_paths_are_joined():
    uri = "s3://b/runs?endpoint_override=h:9000&scheme=http"
    assert join_uri(uri, "name", "data/") == "s3://b/runs/name/data?endpoint_override=h:9000&scheme=http"
    assert join_uri("gs://b/runs/", "name") == "gs://b/runs/name"
    assert is_uri(uri) and is_uri("file:///tmp/x") and not is_uri("runs/s3:/x") and not is_uri("/data/runs")


def test_a_uri_runs_working_copy_is_in_the_cache_and_maps_back_to_the_uri(tmp_path):
    location = locate("s3://b/runs?endpoint_override=h:9000", "exp", tmp_path)
    assert location.local == tmp_path / "remote-runs" / "s3" / "b" / "runs" / "exp"
    # Tune writes through the URI's own filesystem (its options kept), wrapped (rundir/atomicfs.py)
    filesystem = location.storage_filesystem()
    assert location.storage == "b/runs/exp" and filesystem.type_name == "py::whole-s3"
    import pyarrow.fs as pafs

    assert filesystem.handler.base.equals(pafs.FileSystem.from_uri("s3://b/runs?endpoint_override=h:9000")[0])
    assert not filesystem.handler.base.equals(pafs.FileSystem.from_uri("s3://b/runs?endpoint_override=h:9001")[0])
    assert location.data_dir() == "s3://b/runs/exp/data?endpoint_override=h:9000"
    assert location.path_of("tune", "trial_1", "checkpoint_000001") == \
        "s3://b/runs/exp/tune/trial_1/checkpoint_000001?endpoint_override=h:9000"
    plain = locate("runs", "exp", tmp_path)
    assert plain == RunLocation(Path("runs") / "exp") and plain.storage == str((Path("runs") / "exp").resolve())
    assert plain.path_of("tune", "trial_1") == str((Path("runs") / "exp" / "tune" / "trial_1").resolve())


def test_an_unknown_scheme_is_an_input_error(tmp_path):
    with pytest.raises(LocationError, match="nosuch://x.*Allowed"):
        locate("nosuch://x", "exp", tmp_path)


@pytest.mark.filterwarnings("ignore:`get_checkpoint` is meant to only be called:UserWarning")  # no Tune session here
def test_a_trial_continues_from_a_checkpoint_kept_at_a_uri(s3, tiny_model_dir, tmp_path):
    """What a promoted trial does when the run is in a bucket: start_from is the URI."""
    import pyarrow.fs as pafs
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainables.metrics import Progress
    from trainables.optim import loraplus_adamw, warmup_cosine
    from trainables.trial import checkpoint, restore

    def trial_state():
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        optimizer = loraplus_adamw(model, 1e-3, 1.0, cuda=False)
        return model, optimizer, warmup_cosine(optimizer, 2, 10)

    model, optimizer, scheduler = trial_state()
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_()  # trained weights, unlike a fresh adapter's
    checkpoint(model, optimizer, scheduler, Progress(called_at=0.0, imported_at=0.0, step=5, train_seconds=1.5,
                                                     eval_seconds=0.5, tokens=321)).save(tmp_path / "checkpoint_000001")
    uri = f"s3://runs/ckpt/trial_1/checkpoint_000001?{s3}"
    fs, path = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(str(tmp_path / "checkpoint_000001"), path, destination_filesystem=fs)

    fresh, fresh_optimizer, fresh_scheduler = trial_state()
    progress = Progress(called_at=0.0, imported_at=0.0)
    restore(fresh, fresh_optimizer, fresh_scheduler, uri, progress)
    assert (progress.step, progress.train_seconds, progress.eval_seconds, progress.tokens) == (5, 1.5, 0.5, 321)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, p in fresh.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, trained[name])


CLUSTER_DRIVER = """
import sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                        "include_dashboard": False})
cluster.add_node(num_cpus=1, node_ip_address="127.0.0.2", env_vars={"LORA_SEARCH_CACHE": sys.argv[1]})
cluster.wait_for_nodes()
from search.run import main
code = main(["--address", cluster.address, *sys.argv[2:]])
import ray
ray.shutdown()
cluster.shutdown()
sys.exit(code)
"""


def test_on_two_nodes_with_their_own_caches_each_reads_the_data_from_the_bucket(s3, tiny_model_dir, tmp_path):
    from helpers import LOOPBACK

    head_cache, node_cache = tmp_path / "head-cache", tmp_path / "node-cache"
    output = f"s3://runs/cluster?{s3}"
    sets = [f"model.path={tiny_model_dir}", "search.module_sets=[attention_qv,all_linear]", "search.ranks=[2,4]",
            "budget.num_samples=4", "budget.max_steps=4", "budget.eval_every=2", "budget.grace_period=2",
            "budget.batch_size=4", "data.eval_examples=4", "selection.tolerance=1"]
    args = ["--output", output, "--name", "two-nodes", *[x for s in sets for x in ("--set", s)]]
    env = {**os.environ, **CREDENTIALS, **LOOPBACK, "PYTHONPATH": str(ROOT), "LORA_SEARCH_CACHE": str(head_cache)}
    result = subprocess.run([sys.executable, "-c", CLUSTER_DRIVER, str(node_cache), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    objects = _objects(join_uri(output, "two-nodes"))
    nodes = {json.loads(line)["node_ip"] for name, body in objects.items() if name.endswith("/result.json")
             for line in body.decode().splitlines()}
    assert nodes == {"127.0.0.1", "127.0.0.2"}
    for cache in (head_cache, node_cache):  # each node downloaded the tokenized data once, into its own cache
        assert [p.name for p in (cache / "data").iterdir()] and list((cache / "data").glob("*/search_train"))
    assert not (node_cache / "remote-runs").exists()  # the run's working copy is the driver's alone


def test_sigkill_as_tune_deletes_a_checkpoint_in_the_bucket_then_resume_continues_every_trial(s3, tiny_model_dir,
                                                                                              tmp_path):
    from helpers import KILLED_AS_TUNE_DELETES_A_CHECKPOINT

    output, cache = f"s3://runs/killed?{s3}", tmp_path / "driver-cache"
    killed = _search(tiny_model_dir, output, "k", cache, driver=[sys.executable, "-c", KILLED_AS_TUNE_DELETES_A_CHECKPOINT])
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-3000:]

    resumed = _search(tiny_model_dir, output, "k", cache, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    trials = pd.read_csv(locate(output, "k", cache).local / "trials.csv")
    assert (trials.status != "failed").all(), trials[["trial_id", "status", "error"]].to_string()
    assert len(trials[trials.origin.isin(["search", "prior"])]) == 3
    checkpoints: dict[str, set[str]] = {}
    for name in _objects(join_uri(output, "k")):
        if name.startswith("tune/trial_") and "/checkpoint_" in name:
            trial, checkpoint = name.split("/")[1:3]
            checkpoints.setdefault(trial, set()).add(checkpoint)
    assert checkpoints and all(len(kept) == 1 for kept in checkpoints.values()), checkpoints


def test_the_analysis_redoes_the_pick_of_a_run_in_the_bucket_and_uploads_it_back(s3_run):
    _, _, run_uri = s3_run
    before = _objects(run_uri)
    env = {**os.environ, **CREDENTIALS, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "analysis.report", run_uri, "--tolerance", "0.5"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    after = _objects(run_uri)
    assert json.loads(after["pick.json"])["tolerance"] == 0.5 and json.loads(before["pick.json"])["tolerance"] == 0.95
    assert "within 0.5 of the best" in after["report.md"].decode()
    # the retrained weights are exported again from the run's own retrain checkpoint
    assert after["adapter/adapter_model.safetensors"] == before["adapter/adapter_model.safetensors"]
    rewritten = ("trials.csv", "pick.json", "report.md", "adapter", "plots")
    untouched = [name for name in before if name.split("/")[0] not in rewritten]
    assert {name: after[name] for name in untouched} == {name: before[name] for name in untouched}


def test_the_analysis_of_an_empty_uri_is_an_input_error(s3):
    env = {**os.environ, **CREDENTIALS, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "analysis.report", f"s3://runs/nothing-here?{s3}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "holds nothing" in result.stderr and "Traceback" not in result.stderr
